"""Checkpoints as registered MLflow model versions.

A checkpoint is logged once, as the ``checkpoint`` artifact of a pyfunc
model (:class:`uda.serving.SegmentationModel`, the ``uda`` package as its
code, explicit pip pins, a signature and a PNG input example). The
registered version points at that logged model: registering copies no
weights, so every checkpoint is stored exactly once. The training loop's
resume state (optimizer, schedulers) is a separate file that is not logged
here.

Typical use, inside a run::

    version = log_and_register('work/iter_4000.pth', 'cs2acdc-student',
                               iteration=4000, metrics={'val_mIoU': 61.2})
    # -> version N of 'cs2acdc-student', alias 'iter-4000', tags
    #    iteration/run_id/kind/preset/val_mIoU; calling it again after a
    #    resume returns the same version.
    set_alias_safely('cs2acdc-student', 'serving', version.version)
    model, model_cfg = load_segmentor('models:/cs2acdc-student@iter-4000')

Order of operations: log → the version exists and is READY and its
artifacts are complete → tags → alias, so an alias never names a
half-logged model; :func:`set_alias_safely` also loads the model and runs
it once before it moves an alias (for ``serving``).
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

import mlflow
import torch.nn as nn
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models.model import ModelInfo

from uda.errors import UserError

__all__ = [
    'RegistryError', 'KINDS', 'CHECKPOINT_TAGS', 'PIP_REQUIREMENTS',
    'log_segmentor', 'register_checkpoint', 'log_and_register',
    'resolve_alias', 'verify_loadable', 'set_alias_safely', 'load_segmentor',
    'iteration_alias'
]

log = logging.getLogger(__name__)

#: What a registered version holds (its ``kind`` tag).
KINDS = ('checkpoint', 'soup', 'import')
#: Tags every version gets; ``run_id`` + ``kind`` + ``iteration`` identify it.
CHECKPOINT_TAGS = ('run_id', 'kind', 'iteration', 'preset')
#: Serving dependencies, pinned as in requirements/main.txt (explicit, so
#: MLflow neither infers them slowly nor writes a local ``+cpu`` torch pin;
#: MLflow adds its own ``mlflow==`` pin).
PIP_REQUIREMENTS = (
    'torch==2.13.0',
    'torchvision==0.28.0',
    'timm==1.0.31',
    'numpy==1.26.4',
    'pillow==13.0.0',
    'pyyaml==6.0.4',
)

_PACKAGE_DIR = Path(__file__).resolve().parent
_MODEL_CODE = '''\
"""Pyfunc entry point of a cs2acdc-uda segmentor (models-from-code: MLflow
runs this file with the logged `uda` package on sys.path; nothing is
unpickled)."""
import mlflow
from uda.serving import SegmentationModel

mlflow.models.set_model(SegmentationModel())
'''
_READY_TIMEOUT_S = 300.0


class RegistryError(UserError):
    """A registered model, version or alias that does not exist or is not
    usable; the message lists what exists."""


def iteration_alias(iteration: int) -> str:
    """The alias naming a checkpoint's iteration: ``iter-<N>``."""
    return f'iter-{int(iteration)}'


def _client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient()


def _check_name(name: str) -> None:
    # Names go into registry filter strings between single quotes.
    if not isinstance(name, str) or not name.strip() or "'" in name:
        raise ValueError(f'Registered model name must be a non-empty string '
                         f'without single quotes, got {name!r}.')


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f'kind must be one of {", ".join(KINDS)}, got '
                         f'{kind!r}.')


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, 'rb') as handle:
        for block in iter(lambda: handle.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------
@contextmanager
def _checkpoint_file(checkpoint: Union[str, os.PathLike, nn.Module,
                                       Mapping[str, Any]],
                     model_cfg: Optional[Mapping[str, Any]],
                     meta: Optional[Mapping[str, Any]]
                     ) -> Iterator[tuple[Path, dict[str, Any]]]:
    """A ``cs2acdc-uda/1`` file of ``checkpoint`` and its model config.

    Our own files are used as they are; a module, a state dict or a foreign
    checkpoint (MIC / CKD / mmseg) is written to a temporary file that is
    deleted after logging, so only the logged copy remains.
    """
    from uda.models import (FORMAT_TAG, build_segmentor, load_checkpoint,
                            normalize_model_cfg, read_checkpoint,
                            save_checkpoint)

    with tempfile.TemporaryDirectory(prefix='uda-ckpt-') as tmp:
        target = Path(tmp) / 'checkpoint.pth'
        if isinstance(checkpoint, (nn.Module, Mapping)):
            save_checkpoint(target, checkpoint, model_cfg, meta)
            cfg = model_cfg if model_cfg is not None else \
                checkpoint.model_cfg  # save_checkpoint checked one exists
            yield target, normalize_model_cfg(cfg)
            return
        path = Path(checkpoint)
        obj = read_checkpoint(path)
        if isinstance(obj, Mapping) and obj.get('format') == FORMAT_TAG:
            stored = dict(obj['model_cfg'])
            if model_cfg is not None and \
                    normalize_model_cfg(model_cfg) != normalize_model_cfg(
                        stored):
                raise ValueError(
                    f'{str(path)!r} describes another model than model_cfg '
                    f'(backbone {stored.get("backbone")!r}); pass '
                    f'model_cfg=None to use the one stored in the file.')
            del obj
            yield path, stored
            return
        if model_cfg is None:
            raise ValueError(
                f'{str(path)!r} is not a cs2acdc-uda/1 checkpoint, so it does '
                f'not say which model it holds; pass model_cfg (the preset\'s '
                f'model section) to import it.')
        model = build_segmentor(dict(model_cfg, pretrained=None))
        report = load_checkpoint(model, obj, strict=True)
        del obj
        log.info('Imported %s: %s', path, report)
        save_checkpoint(target, model, model.model_cfg,
                        dict(meta or {}, imported_from=str(path)))
        yield target, dict(model.model_cfg)


@contextmanager
def _serving_device(device: str) -> Iterator[None]:
    """Run MLflow's input-example check of ``log_model`` on ``device`` (the
    CPU), not on the GPU a training run is using."""
    from uda.serving import DEVICE_ENV

    previous = os.environ.get(DEVICE_ENV)
    os.environ[DEVICE_ENV] = device
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(DEVICE_ENV, None)
        else:
            os.environ[DEVICE_ENV] = previous


def log_segmentor(checkpoint: Union[str, os.PathLike, nn.Module,
                                    Mapping[str, Any]],
                  name: Optional[str] = None,
                  model_cfg: Optional[Mapping[str, Any]] = None,
                  iteration: Optional[int] = None,
                  kind: str = 'checkpoint',
                  preset: Optional[str] = None,
                  tags: Optional[Mapping[str, Any]] = None,
                  meta: Optional[Mapping[str, Any]] = None) -> ModelInfo:
    """Log a checkpoint as a pyfunc segmentation model in the active run.

    The checkpoint file is stored once, inside the logged model
    (``artifacts/<file name>``); do not log it again as a run artifact.

    Args:
        checkpoint: A ``cs2acdc-uda/1`` file (used as it is), a foreign
            checkpoint file (MIC / CKD / mmseg; needs ``model_cfg``), a
            segmentor module, or a state dict (needs ``model_cfg``).
        name: Name of the logged model within the run (``runs:/RUN/NAME``);
            default ``iter-<N>``, or the kind when there is no iteration.
        model_cfg: The ``model`` section of a preset, for checkpoints that
            do not describe themselves; checked against a file that does.
        iteration: Training iteration (logged-model tag and ``step``).
        kind: One of :data:`KINDS`.
        preset: Preset name, tagged.
        tags: Extra logged-model tags.
        meta: Extra checkpoint ``meta`` when the file is written here.

    Returns:
        MLflow's :class:`~mlflow.models.model.ModelInfo`
        (``model_uri`` = ``models:/<model id>``).

    Raises:
        ValueError: No active run, bad ``kind``, or a checkpoint that does
            not fit ``model_cfg``.
        FileNotFoundError / CheckpointError: Unreadable checkpoint.
    """
    from uda.models import FORMAT_TAG
    from uda.serving import (CHECKPOINT_ARTIFACT, example_image_png,
                             input_frame, serving_signature)
    from uda.tracking import flatten

    _check_kind(kind)
    if mlflow.active_run() is None:
        raise ValueError('log_segmentor needs an active MLflow run (call it '
                         'inside `with mlflow.start_run():` or an entry '
                         'point run).')
    if name is None:
        name = iteration_alias(iteration) if iteration is not None else kind
    model_tags = {'kind': kind}
    if iteration is not None:
        model_tags['iteration'] = str(int(iteration))
    if preset:
        model_tags['preset'] = str(preset)
    model_tags.update({k: str(v) for k, v in (tags or {}).items()})
    with _checkpoint_file(checkpoint, model_cfg, meta) as (path, cfg), \
            tempfile.TemporaryDirectory(prefix='uda-pyfunc-') as tmp:
        code_file = Path(tmp) / 'segmentation_model.py'
        code_file.write_text(_MODEL_CODE)
        metadata = {
            'checkpoint_format': FORMAT_TAG,
            'checkpoint_file': path.name,
            'checkpoint_bytes': path.stat().st_size,
            'checkpoint_sha256': _sha256(path),
            'backbone': cfg.get('backbone'),
            'num_classes': cfg.get('num_classes'),
            'test_mode': (cfg.get('test_cfg') or {}).get('mode'),
        }
        with _serving_device('cpu'):
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(code_file),
                artifacts={CHECKPOINT_ARTIFACT: str(path)},
                code_paths=[str(_PACKAGE_DIR)],
                pip_requirements=list(PIP_REQUIREMENTS),
                signature=serving_signature(),
                input_example=input_frame(example_image_png()),
                metadata=metadata,
                tags=model_tags,
                params={f'model.{k}': str(v)
                        for k, v in flatten(cfg).items()},
                step=int(iteration or 0))
    return info


# ----------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------
def _model_source(model: Union[ModelInfo, str]) -> tuple[str, str, Optional[str]]:
    """``(model_uri, run_id, model_id)`` of a logged model."""
    if isinstance(model, ModelInfo):
        return model.model_uri, model.run_id, model.model_id
    if not isinstance(model, str):
        raise TypeError(f'Expected a ModelInfo or a model URI, got '
                        f'{type(model).__name__}.')
    if model.startswith('runs:/'):
        parts = model[len('runs:/'):].split('/', 1)
        return model, parts[0], None
    if model.startswith('models:/m-'):
        model_id = model[len('models:/'):].split('/', 1)[0]
        logged = _client().get_logged_model(model_id)
        return model, logged.source_run_id, model_id
    raise ValueError(f'Expected a logged model (ModelInfo, "models:/m-..." '
                     f'or "runs:/RUN_ID/NAME"), got {model!r}.')


def _versions(name: str, filter_extra: str = '') -> list[ModelVersion]:
    client = _client()
    query = f"name='{name}'" + (f' and {filter_extra}' if filter_extra else '')
    found: list[ModelVersion] = []
    token = None
    while True:
        page = client.search_model_versions(query, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return sorted(found, key=lambda v: int(v.version))


def _find_version(name: str, run_id: str, kind: str,
                  iteration: Optional[int]) -> Optional[ModelVersion]:
    """The version registered before for ``(run_id, kind, iteration)``."""
    try:
        candidates = _versions(name, f"run_id='{run_id}'")
    except MlflowException as err:
        if err.error_code == 'RESOURCE_DOES_NOT_EXIST':
            return None
        raise
    wanted = None if iteration is None else str(int(iteration))
    matches = [v for v in candidates
               if v.tags.get('kind', 'checkpoint') == kind and
               v.tags.get('iteration') == wanted]
    if len(matches) > 1:
        log.warning('%s has %d versions for run %s, %s, iteration %s; using '
                    'version %s.', name, len(matches), run_id, kind, wanted,
                    matches[0].version)
    return matches[0] if matches else None


def _ensure_registered_model(name: str, description: Optional[str]) -> None:
    client = _client()
    try:
        client.get_registered_model(name)
        return
    except MlflowException as err:
        if err.error_code != 'RESOURCE_DOES_NOT_EXIST':
            raise
    try:
        client.create_registered_model(
            name, description=description or (
                'cs2acdc-uda segmentor (HRDA + DAFormer head): one version '
                'per checkpoint, soup or import, tagged with iteration, '
                'run_id, kind and metrics; aliases iter-<N> name '
                'checkpoints, `serving` the served model.'))
    except MlflowException as err:  # created concurrently
        if err.error_code != 'RESOURCE_ALREADY_EXISTS':
            raise


def _wait_ready(name: str, version: str) -> ModelVersion:
    client = _client()
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while True:
        mv = client.get_model_version(name, version)
        if mv.status == 'READY':
            return mv
        if mv.status == 'FAILED_REGISTRATION' or time.monotonic() > deadline:
            raise RegistryError(
                f'Version {version} of {name!r} is {mv.status} '
                f'({mv.status_message or "no message"}); not using it.')
        time.sleep(0.5)


def _read_mlmodel(repo: Any, tmp: str) -> Any:
    from mlflow.models import Model

    return Model.load(repo.download_artifacts('MLmodel', tmp))


def _checkpoint_entry(mlmodel: Any, where: str) -> str:
    """Path of the checkpoint inside a logged segmentor model."""
    from uda.serving import CHECKPOINT_ARTIFACT

    pyfunc = mlmodel.flavors.get('python_function') or {}
    entry = (pyfunc.get('artifacts') or {}).get(CHECKPOINT_ARTIFACT)
    if not entry:
        raise RegistryError(f'{where} is not a cs2acdc-uda segmentor: its '
                            f'MLmodel has no {CHECKPOINT_ARTIFACT!r} '
                            f'artifact.')
    return entry['path']


def _verify_artifacts(name: str, version: str) -> None:
    """The version's MLmodel and full checkpoint file are in the store."""
    from mlflow.store.artifact.artifact_repository_registry import \
        get_artifact_repository

    where = f'models:/{name}/{version}'
    repo = get_artifact_repository(where)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mlmodel = _read_mlmodel(repo, tmp)
        except (MlflowException, OSError) as err:
            raise RegistryError(f'{where} has no readable MLmodel ({err}); '
                                f'the model was not fully logged.') from None
    entry = _checkpoint_entry(mlmodel, where)
    folder, _, file_name = entry.rpartition('/')
    sizes = {Path(a.path).name: a.file_size
             for a in repo.list_artifacts(folder or None)}
    expected = (mlmodel.metadata or {}).get('checkpoint_bytes')
    if file_name not in sizes:
        raise RegistryError(f'{where} lacks its checkpoint {entry!r}; the '
                            f'model was not fully logged.')
    if expected is not None and sizes[file_name] != int(expected):
        raise RegistryError(
            f'{where}: checkpoint {entry!r} has {sizes[file_name]} bytes, '
            f'{expected} were logged; the upload is incomplete.')


def _set_alias(name: str, alias: str, version: str,
               move: bool = True) -> None:
    """Point ``alias`` at ``version``; with ``move=False`` an alias that
    already names another version is left alone."""
    client = _client()
    current = client.get_registered_model(name).aliases.get(alias)
    if current is not None and str(current) == str(version):
        return
    if current is not None:
        if not move:
            log.warning('Alias %s@%s stays on version %s (not moved back to '
                        'the re-registered version %s).', name, alias,
                        current, version)
            return
        log.warning('Moving alias %s@%s from version %s to version %s.', name,
                    alias, current, version)
    client.set_registered_model_alias(name, alias, str(version))


def register_checkpoint(model: Union[ModelInfo, str],
                        registered_name: str,
                        iteration: Optional[int] = None,
                        metrics: Optional[Mapping[str, float]] = None,
                        alias: Optional[str] = 'auto',
                        kind: str = 'checkpoint',
                        preset: Optional[str] = None,
                        extra_tags: Optional[Mapping[str, Any]] = None,
                        description: Optional[str] = None) -> ModelVersion:
    """Register a logged segmentor as a model version (idempotent).

    A version already registered for the same ``(run_id, kind, iteration)``
    is reused (e.g. after a resumed run): no duplicate version is created,
    and an alias that meanwhile names another version is not moved back.
    A new version takes its alias (moving it, with a warning). Order: version
    created with its identifying tags → READY and artifacts complete →
    metric/extra tags → alias.

    Args:
        model: What :func:`log_segmentor` returned, or a logged-model URI
            (``models:/m-...``, ``runs:/RUN_ID/NAME``).
        registered_name: Registered model name (created if needed).
        iteration: Training iteration (tag ``iteration``; alias
            ``iter-<N>``).
        metrics: e.g. ``{'val_mIoU': 61.2}``, stored as version tags.
        alias: Alias to point at the version; ``'auto'`` = ``iter-<N>``
            when ``iteration`` is given, None = no alias.
        kind: One of :data:`KINDS`.
        preset: Preset name (tag ``preset``).
        extra_tags: More version tags (e.g. soup ingredients and weights).
        description: Description of the registered model if it is created.

    Returns:
        The (new or existing) :class:`ModelVersion`, with its tags.

    Raises:
        RegistryError: The version did not become READY or its artifacts
            are incomplete.
    """
    _check_name(registered_name)
    _check_kind(kind)
    model_uri, run_id, model_id = _model_source(model)
    client = _client()
    existing = _find_version(registered_name, run_id, kind, iteration)
    if existing is not None:
        log.info('Reusing version %s of %s for run %s, iteration %s.',
                 existing.version, registered_name, run_id, iteration)
        version = str(existing.version)
    else:
        _ensure_registered_model(registered_name, description)
        key_tags = {'run_id': run_id, 'kind': kind}
        if iteration is not None:
            key_tags['iteration'] = str(int(iteration))
        created = client.create_model_version(
            registered_name, source=model_uri, run_id=run_id, tags=key_tags,
            model_id=model_id)
        version = str(created.version)
    _wait_ready(registered_name, version)
    _verify_artifacts(registered_name, version)
    tags: dict[str, str] = {}
    if preset:
        tags['preset'] = str(preset)
    tags.update({k: str(v) for k, v in (metrics or {}).items()})
    tags.update({k: str(v) for k, v in (extra_tags or {}).items()})
    for key, value in tags.items():
        client.set_model_version_tag(registered_name, version, key, value)
    if alias == 'auto':
        alias = iteration_alias(iteration) if iteration is not None else None
    if alias:
        # A re-registration never takes an alias away from another version.
        _set_alias(registered_name, alias, version, move=existing is None)
    return client.get_model_version(registered_name, version)


def _find_logged_model(run_id: str, kind: str,
                       iteration: Optional[int]) -> Optional[str]:
    """URI of a READY model logged before in ``run_id`` for ``(kind,
    iteration)`` (a run interrupted between logging and registering)."""
    run = _client().get_run(run_id)
    wanted = None if iteration is None else str(int(iteration))
    found = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}'", output_format='list')
    for logged in sorted(found, key=lambda m: m.creation_timestamp):
        if str(logged.status) == 'READY' and \
                logged.tags.get('kind') == kind and \
                logged.tags.get('iteration') == wanted:
            return logged.model_uri
    return None


def log_and_register(checkpoint: Union[str, os.PathLike, nn.Module,
                                       Mapping[str, Any]],
                     registered_name: str,
                     iteration: Optional[int] = None,
                     metrics: Optional[Mapping[str, float]] = None,
                     model_cfg: Optional[Mapping[str, Any]] = None,
                     alias: Optional[str] = 'auto',
                     kind: str = 'checkpoint',
                     preset: Optional[str] = None,
                     extra_tags: Optional[Mapping[str, Any]] = None,
                     description: Optional[str] = None,
                     name: Optional[str] = None) -> ModelVersion:
    """Log (once) and register a checkpoint of the active run.

    Resuming is safe: if this run already registered ``(kind, iteration)``
    the existing version is returned without logging anything; if it logged
    the model but stopped before registering, that logged model is
    registered instead of logging the weights a second time.

    Args:
        checkpoint: See :func:`log_segmentor`.
        registered_name: Registered model name.
        iteration, metrics, alias, kind, preset, extra_tags, description:
            See :func:`register_checkpoint`.
        model_cfg: See :func:`log_segmentor`.
        name: Logged-model name within the run (default ``iter-<N>``).

    Returns:
        The :class:`ModelVersion`.
    """
    _check_name(registered_name)
    _check_kind(kind)
    run = mlflow.active_run()
    if run is None:
        raise ValueError('log_and_register needs an active MLflow run.')
    run_id = run.info.run_id
    source: Optional[Union[ModelInfo, str]] = None
    existing = _find_version(registered_name, run_id, kind, iteration)
    if existing is not None:
        source = existing.source
    else:
        source = _find_logged_model(run_id, kind, iteration)
    if source is None:
        source = log_segmentor(checkpoint, name=name, model_cfg=model_cfg,
                               iteration=iteration, kind=kind, preset=preset)
    return register_checkpoint(source, registered_name, iteration=iteration,
                               metrics=metrics, alias=alias, kind=kind,
                               preset=preset, extra_tags=extra_tags,
                               description=description)


# ----------------------------------------------------------------------
# Lookup, verification, aliases
# ----------------------------------------------------------------------
def get_registered_model(name: str, hint: str = '') -> Any:
    """The registered model ``name``, or a RegistryError listing those that exist.

    Args:
        name: Registered model name.
        hint: What the user should do, appended to the error message.
    """
    client = _client()
    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != 'RESOURCE_DOES_NOT_EXIST':
            raise
    names = sorted(m.name for m in client.search_registered_models(
        max_results=50))
    known = ', '.join(names) if names else 'none'
    raise RegistryError(
        f'No registered model {name!r} in {mlflow.get_tracking_uri()}. '
        f'Registered models: {known}.' + (f' {hint}' if hint else ''))


def _describe_versions(name: str) -> str:
    versions = _versions(name)
    if not versions:
        return 'no versions'
    parts = []
    for v in versions[-20:]:
        bits = [v.tags.get('kind', '?')]
        if 'iteration' in v.tags:
            bits.append(f'iteration {v.tags["iteration"]}')
        parts.append(f'{v.version} ({", ".join(bits)})')
    more = f' (last 20 of {len(versions)})' if len(versions) > 20 else ''
    return f'versions{more}: ' + ', '.join(parts)


def resolve_alias(name: str, alias: str) -> ModelVersion:
    """The version ``models:/NAME@ALIAS`` points at.

    Raises:
        RegistryError: The model or the alias does not exist; the message
            lists the registered models, or the aliases and versions.
    """
    registered = get_registered_model(name)
    aliases = dict(registered.aliases or {})
    if alias not in aliases:
        listed = ', '.join(f'{a} -> {v}' for a, v in sorted(
            aliases.items())) or 'none'
        raise RegistryError(
            f'Registered model {name!r} has no alias {alias!r}. Aliases: '
            f'{listed}; {_describe_versions(name)}.')
    return _client().get_model_version(name, str(aliases[alias]))


def _get_version(name: str, version: Union[int, str]) -> ModelVersion:
    get_registered_model(name)
    try:
        return _client().get_model_version(name, str(version))
    except MlflowException as err:
        if err.error_code not in ('RESOURCE_DOES_NOT_EXIST',
                                  'INVALID_PARAMETER_VALUE'):
            raise
    raise RegistryError(f'Registered model {name!r} has no version '
                        f'{version!r}; {_describe_versions(name)}.')


def verify_loadable(name: str, version: Union[int, str]) -> None:
    """Load ``models:/NAME/VERSION`` as pyfunc (on the CPU) and segment the
    example image once.

    Raises:
        RegistryError: It does not load or does not answer as a segmentor.
    """
    import pandas as pd

    from uda.serving import decode_png, example_image_png, input_frame

    mv = _wait_ready(name, str(_get_version(name, version).version))
    _verify_artifacts(name, mv.version)
    uri = f'models:/{name}/{mv.version}'
    with _serving_device('cpu'):
        try:
            pyfunc_model = mlflow.pyfunc.load_model(uri)
            out = pyfunc_model.predict(input_frame(example_image_png(64, 64)))
        except Exception as err:  # any failure means "not servable"
            raise RegistryError(f'{uri} does not load or predict: '
                                f'{type(err).__name__}: {err}') from err
    if not isinstance(out, pd.DataFrame) or 'label_map' not in out or \
            decode_png(out['label_map'][0]).shape != (64, 64):
        raise RegistryError(f'{uri} loads but does not return a 64x64 '
                            f'label map for a 64x64 image.')


def set_alias_safely(name: str, alias: str,
                     version: Union[int, str]) -> ModelVersion:
    """Point ``alias`` (e.g. ``serving``) at a version only after it loads.

    Args:
        name: Registered model name.
        alias: Alias to set or move.
        version: Version number.

    Returns:
        The version, now carrying the alias.

    Raises:
        RegistryError: Unknown model/version, or it does not load; the
            alias is left where it was.
    """
    _check_name(name)
    verify_loadable(name, version)
    _set_alias(name, alias, str(version))
    return _client().get_model_version(name, str(version))


# ----------------------------------------------------------------------
# Back to torch
# ----------------------------------------------------------------------
def _resolve_registry_uri(model_uri: str) -> str:
    """``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` → a checked
    ``models:/NAME/VERSION`` (clear errors); other URIs unchanged."""
    if not model_uri.startswith('models:/') or \
            model_uri.startswith('models:/m-'):
        return model_uri
    ref = model_uri[len('models:/'):].rstrip('/')
    if '@' in ref:
        name, alias = ref.split('@', 1)
        return f'models:/{name}/{resolve_alias(name, alias).version}'
    name, _, version = ref.rpartition('/')
    if name and version.isdigit():
        return f'models:/{name}/{_get_version(name, version).version}'
    return model_uri  # e.g. models:/NAME/latest: let MLflow resolve it


def load_segmentor(model_uri: Union[str, os.PathLike],
                   device: str = 'cpu') -> tuple[nn.Module, dict[str, Any]]:
    """The torch segmentor of a registered version, a logged model or a file.

    Only the checkpoint artifact (and the small MLmodel file) is downloaded.

    Args:
        model_uri: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
            ``models:/<model id>``, ``runs:/RUN_ID/NAME``, a local logged
            model directory, or a ``cs2acdc-uda/1`` checkpoint file.
        device: Device to put the model on.

    Returns:
        ``(model, model_cfg)``: the segmentor in eval mode and its
        normalised ``model`` config.

    Raises:
        RegistryError: Unknown model, version or alias (lists what exists).
        FileNotFoundError / CheckpointError: Bad local file.
    """
    from mlflow.models import Model
    from mlflow.store.artifact.artifact_repository_registry import \
        get_artifact_repository

    from uda.models import build_from_checkpoint

    local = Path(model_uri)
    uri = str(model_uri)
    if local.is_file():
        model = build_from_checkpoint(local)
    elif local.is_dir():
        mlmodel_path = local / 'MLmodel'
        if not mlmodel_path.is_file():
            raise FileNotFoundError(f'{uri!r} is a folder without an MLmodel '
                                    f'file; pass a model folder or a '
                                    f'checkpoint file.')
        entry = _checkpoint_entry(Model.load(str(mlmodel_path)), uri)
        model = build_from_checkpoint(local / entry)
    elif ':/' not in uri:
        raise FileNotFoundError(f'No such checkpoint or model folder: {uri!r} '
                                f'(and it is not a models:/ or runs:/ URI).')
    else:
        uri = _resolve_registry_uri(uri)
        repo = get_artifact_repository(uri)
        with tempfile.TemporaryDirectory(prefix='uda-load-') as tmp:
            try:
                entry = _checkpoint_entry(_read_mlmodel(repo, tmp), uri)
            except MlflowException as err:
                raise RegistryError(f'Cannot read the model at {uri}: '
                                    f'{err.message}') from None
            model = build_from_checkpoint(repo.download_artifacts(entry, tmp))
    model = model.eval().to(device)
    return model, dict(model.model_cfg)
