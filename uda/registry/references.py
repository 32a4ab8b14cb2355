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
import re
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Iterator, Mapping

import mlflow
import torch.nn as nn
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models.model import ModelInfo

from uda.errors import UserError

__all__ = [
    "RegistryError",
    "version_model_id",
    "TEACHER_MODEL_NAME",
    "STUDENT_MODEL_NAME",
    "SOURCE_ONLY_MODEL_NAME",
    "KINDS",
    "CHECKPOINT_TAGS",
    "PIP_REQUIREMENTS",
    "log_segmentor",
    "register_checkpoint",
    "log_and_register",
    "discard_unfinished_models",
    "resolve_alias",
    "verify_loadable",
    "set_alias",
    "set_alias_safely",
    "load_segmentor",
    "iteration_alias",
    "MODEL_URI_FORMS",
    "ModelNotFoundError",
    "UnknownModelError",
    "ModelReference",
    "validate_model_name",
    "validate_alias",
    "check_model_uri",
    "get_registered_model",
    "find_versions",
    "source_run_id",
    "version_metadata",
]

log = logging.getLogger(__name__)

#: The registered models a training run (or an import of that role)
#: registers into, unless ``-P model_name`` says otherwise.
TEACHER_MODEL_NAME = "cs2acdc-teacher"
STUDENT_MODEL_NAME = "cs2acdc-student"
#: The baseline main trains beside the teacher: the teacher's architecture on the source only.
SOURCE_ONLY_MODEL_NAME = "cs2acdc-source-only"
#: What a registered version holds (its ``kind`` tag).
KINDS = ("checkpoint", "soup", "import")
#: Tags every version gets; ``run_id`` + ``kind`` + ``iteration`` identify it.
CHECKPOINT_TAGS = ("run_id", "kind", "iteration", "preset")
#: Serving dependencies, pinned as in requirements/main.txt (explicit, so
#: MLflow neither infers them slowly nor writes a local ``+cpu`` torch pin;
#: MLflow adds its own ``mlflow==`` pin).
PIP_REQUIREMENTS = (
    "torch==2.13.0",
    "torchvision==0.28.0",
    "timm==1.0.31",
    "numpy==1.26.4",
    "pillow==13.0.0",
    "pyyaml==6.0.4",
)

_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # uda/, logged as the code
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
    return f"iter-{int(iteration)}"


def _client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient()


def _check_name(name: str) -> None:
    # The library's own guard; entry points check earlier, with their
    # parameter's name (validate_model_name).
    if not isinstance(name, str):
        raise RegistryError(f"Registered model name {name!r} is not a string.")
    if validate_model_name(name, "Registered model name") != name:
        raise RegistryError(f"Registered model name {name!r} has surrounding spaces; pass {name.strip()!r}.")


# ----------------------------------------------------------------------
# Parameter checks: one function per concept, used by every entry point
# before any work (registered model names, aliases, model references)
# ----------------------------------------------------------------------
#: Every form a model reference may take; error messages list them.
MODEL_URI_FORMS = (
    "models:/NAME@ALIAS, models:/NAME/VERSION, "
    "models:/NAME/latest, models:/m-<logged model id>, "
    "runs:/RUN_ID/PATH or a checkpoint file"
)
_MAX_NAME_LENGTH = 256  # the name column of MLflow's SQL registry
_MAX_ALIAS_LENGTH = 255  # MLflow's MAX_REGISTERED_MODEL_ALIAS_LENGTH
_ALIAS_PATTERN = re.compile(r"^[\w\-]+$")  # MLflow's alias rule
_RUN_ID_PATTERN = re.compile(r"^[a-zA-Z0-9][\w\-]{0,255}$")  # MLflow's
_URI_SCHEME = re.compile(r"^[A-Za-z][\w+.\-]*:/")
#: How MLflow stores answer a look-up of a run or logged model that is not there.
_NOT_FOUND_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


class ModelNotFoundError(RegistryError, FileNotFoundError):
    """A model reference that names no file, folder, model or run (still a
    ``FileNotFoundError`` for callers that catch that for paths)."""


class UnknownModelError(ModelNotFoundError):
    """No registered model by that name (the message lists those that
    exist); callers add what to run first."""


def _name_problem(name: str) -> str | None:
    """Why MLflow (or this project) refuses ``name``, or None."""
    if "/" in name or ":" in name:
        return "MLflow does not allow '/' or ':' in names"
    if "'" in name:
        return "a single quote cannot be used in registry searches"
    if "%" in name:
        return "MLflow's file-based registry does not allow '%'"
    if name == "." or name.startswith(".."):
        return "MLflow refuses names that read as a relative path ('.', '..')"
    if len(name) > _MAX_NAME_LENGTH:
        return f"it has {len(name)} characters, the registry stores at most {_MAX_NAME_LENGTH}"
    try:  # MLflow's own rule, in case a newer version adds to it
        from mlflow.utils.validation import _validate_model_name
    except ImportError:  # pragma: no cover
        return None
    try:
        _validate_model_name(name)
    except MlflowException as err:
        return err.message.rstrip(".")
    return None


def validate_model_name(name: Any, parameter: str = "model_name") -> str:
    """A registered model name, checked by MLflow's rules before any work.

    MLflow refuses names with ``/`` or ``:`` (and ``%`` in its file store,
    ``.`` / ``..`` path names); this project also refuses a single quote
    (registry search strings quote names with it).

    Args:
        name: The name as given (surrounding spaces are removed).
        parameter: How the message calls it (``model_name``).

    Returns:
        The stripped name.

    Raises:
        RegistryError: Empty or invalid; the message says why and suggests
            a valid name.
    """
    text = "" if name is None else str(name).strip()
    if not text:
        raise RegistryError(f"{parameter} is empty; pass a registered model name such as cs2acdc-student.")
    problem = _name_problem(text)
    if problem is not None:
        shown = text if len(text) <= 80 else text[:60] + "…"
        fixed = re.sub(r"[/:'%]+", "-", text).strip(".-")
        fix = (
            f"use e.g. {fixed!r}"
            if fixed and len(fixed) <= 80
            else "use a shorter name such as cs2acdc-student"
        )
        raise RegistryError(f"{parameter} {shown!r} is not a valid registered model name: {problem}; {fix}.")
    return text


def validate_alias(alias: Any, parameter: str = "alias") -> str:
    """An alias name, checked by MLflow's rule (letters, digits, ``_``,
    ``-``; at most 255 characters).

    Returns:
        The stripped alias.

    Raises:
        RegistryError: Empty or invalid (says why, gives an example).
    """
    text = "" if alias is None else str(alias).strip()
    if not text:
        raise RegistryError(f"{parameter} is empty; pass an alias such as iter-4000 or serving.")
    if not _ALIAS_PATTERN.match(text) or len(text) > _MAX_ALIAS_LENGTH:
        raise RegistryError(
            f"{parameter} {text!r} is not a valid alias: MLflow aliases "
            f'have only letters, digits, "_" and "-" (at most '
            f"{_MAX_ALIAS_LENGTH}), e.g. iter-4000 or serving."
        )
    if text.lower() == "latest" or re.fullmatch(r"[vV]\d+", text):
        # MLflow reserves these: models:/NAME/latest and version references.
        raise RegistryError(
            f"{parameter} {text!r} is not a valid alias: MLflow reserves "
            f'"latest" and v<number>; use e.g. iter-4000 or serving.'
        )
    return text


@dataclass(frozen=True)
class ModelReference:
    """A checked model reference (see :func:`check_model_uri`).

    Attributes:
        given: As the user wrote it.
        uri: Pinned: ``models:/NAME/VERSION`` (aliases and ``latest``
            resolved), ``models:/m-…``, ``runs:/RUN_ID/PATH``, another
            artifact URI, or the absolute path of a file or folder.
        kind: ``version``, ``logged-model``, ``run``, ``artifact``,
            ``file`` or ``folder``.
        name, version: The registered model and version (``version``).
        model_id: The MLflow 3 logged model behind it, when known.
        checkpoint: The checkpoint's path inside the model folder (all
            kinds but ``file``).
    """

    given: str
    uri: str
    kind: str
    name: str | None = None
    version: str | None = None
    model_id: str | None = None
    checkpoint: str | None = None


def check_model_uri(uri: str | os.PathLike, parameter: str | None = "model") -> ModelReference:
    """Check that a model reference names an existing cs2acdc-uda model.

    Cheap (registry and run look-ups, the small ``MLmodel`` file, the
    layout of a checkpoint file; no weights), so entry points call it
    before any work: a typo fails in seconds with one message, never after
    training.

    Args:
        uri: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
            ``models:/NAME/latest``, ``models:/m-<logged model id>``,
            ``runs:/RUN_ID/PATH``, another artifact URI of a logged model,
            a logged model folder or a checkpoint file.
        parameter: The parameter name that starts each message
            (``teacher``, ``model``); None for no prefix.

    Returns:
        A :class:`ModelReference`, its ``uri`` pinned to a version.

    Raises:
        ModelNotFoundError: No such file, folder, run or logged model (also a
            ``FileNotFoundError``).
        RegistryError: Malformed URI, unknown model/alias/version (lists
            what exists), or not a cs2acdc-uda segmentor.
        CheckpointError: A checkpoint file that cannot be one.
    """
    from uda.models.checkpoint_files import CheckpointError

    given = "" if uri is None else str(uri).strip()
    try:
        if not given:
            raise RegistryError(f"The model reference is empty; pass {MODEL_URI_FORMS}.")
        return _locate(given)
    except (RegistryError, CheckpointError) as err:
        if parameter is None:
            raise
        label = f"{parameter} {given!r}: " if given else f"{parameter}: "
        raise type(err)(label + str(err)) from None
    except FileNotFoundError as err:  # a checkpoint file inside a folder
        raise ModelNotFoundError((f"{parameter} {given!r}: " if parameter else "") + str(err)) from None


def _locate(given: str) -> ModelReference:
    from urllib.parse import unquote, urlparse

    from uda.models.checkpoint_files import check_checkpoint_file

    # file:///abs/path is a local path like any other.
    local = Path(unquote(urlparse(given).path)) if given.startswith("file://") else Path(given).expanduser()
    if local.is_file():
        check_checkpoint_file(local)
        return ModelReference(given, str(local.resolve()), "file")
    if local.is_dir():
        from mlflow.models import Model

        if not (local / "MLmodel").is_file():
            raise ModelNotFoundError(
                f"{given!r} is a folder without an MLmodel file; pass a "
                f"logged model folder or a checkpoint file."
            )
        entry = _checkpoint_entry(Model.load(str(local / "MLmodel")), given)
        check_checkpoint_file(local / entry)
        return ModelReference(given, str(local.resolve()), "folder", checkpoint=entry)
    if given.startswith("models:"):
        return _locate_registered(given)
    if given.startswith("runs:"):
        return _locate_run(given)
    if _URI_SCHEME.match(given) and not given.startswith("file://"):
        return _with_checkpoint(ModelReference(given, given, "artifact"))
    raise ModelNotFoundError(
        f"No such checkpoint or model folder: {str(local)!r} (and it is not "
        f"a models:/ or runs:/ URI); pass {MODEL_URI_FORMS}."
    )


def _bad_form(given: str, why: str) -> RegistryError:
    return RegistryError(f"{given} is not a model URI: {why}; use {MODEL_URI_FORMS}.")


def _locate_registered(given: str) -> ModelReference:
    ref = given[len("models:") :]
    if not ref.startswith("/") or not ref.strip("/"):
        raise _bad_form(given, 'models: is followed by "/NAME…"')
    parts = ref.strip("/").split("/")
    if len(parts) > 2:
        raise _bad_form(given, "a models:/ URI has at most NAME/VERSION")
    if len(parts) == 2:
        name = validate_model_name(parts[0], "The model name")
        suffix = parts[1].strip()
        if suffix.isdigit():
            version = str(_get_version(name, suffix).version)
        elif suffix.lower() == "latest":
            version = _latest_version(name)
        else:
            raise _bad_form(
                given,
                f"{suffix!r} is neither a version number nor "
                f'"latest" (MLflow stages are not used here; an alias is '
                f"written models:/{name}@{suffix})",
            )
        return _registered_reference(given, name, version)
    head = parts[0]
    if "@" in head:
        name, alias = head.rsplit("@", 1)
        name = validate_model_name(name, "The model name")
        alias = validate_alias(alias, "The alias")
        version = str(resolve_alias(name, alias).version)
        return _registered_reference(given, name, version)
    if head.startswith("m-"):
        return _with_checkpoint(
            ModelReference(given, f"models:/{head}", "logged-model", model_id=_logged_model(head).model_id)
        )
    # MLflow would read models:/NAME as a logged model id: say what to add.
    name = validate_model_name(head, "The model name")
    try:
        registered = get_registered_model(name)
    except RegistryError as err:
        raise RegistryError(
            f"{given} names neither a version nor a logged model (ids start with m-). {err}"
        ) from None
    listed = ", ".join(sorted(registered.aliases or {})) or "none"
    raise RegistryError(
        f"{given} names no version of {name!r}: use models:/{name}@ALIAS "
        f"(aliases: {listed}), models:/{name}/VERSION or "
        f"models:/{name}/latest."
    )


def _latest_version(name: str) -> str:
    """The highest usable version number of ``name`` (``models:/NAME/latest``)."""
    get_registered_model(name)
    versions = [v for v in find_versions(name) if v.status != "FAILED_REGISTRATION"]
    if not versions:
        raise RegistryError(
            f"Registered model {name!r} has no versions yet; train, import or register one first."
        )
    return str(max(int(v.version) for v in versions))


def _registered_reference(given: str, name: str, version: str) -> ModelReference:
    mv = _client().get_model_version(name, version)
    if mv.status == "FAILED_REGISTRATION":
        raise RegistryError(
            f"models:/{name}/{version} failed to register "
            f"({mv.status_message or 'no message'}); use "
            f"another version."
        )
    return _with_checkpoint(
        ModelReference(
            given,
            f"models:/{name}/{version}",
            "version",
            name=name,
            version=version,
            model_id=version_model_id(mv),
        )
    )


def version_model_id(mv: ModelVersion) -> str | None:
    """The MLflow 3 logged model behind a registered version (None for a version
    registered from a run artifact). The SQL store leaves ``ModelVersion.model_id``
    empty; the version's ``models:/m-…`` source names it then."""
    if getattr(mv, "model_id", None):
        return mv.model_id
    # Versions registered from a logged model's URI keep it as their source.
    return logged_model_id(str(mv.source or ""))


def logged_model_id(uri: str) -> str | None:
    """``m-…`` of a logged-model URI (``models:/m-…[/path]``); None for any other URI."""
    return uri[len("models:/") :].split("/", 1)[0] if uri.startswith("models:/m-") else None


def _logged_model(model_id: str) -> Any:
    try:
        logged = _client().get_logged_model(model_id)
    except MlflowException as err:
        if err.error_code not in _NOT_FOUND_CODES:
            raise
        raise ModelNotFoundError(
            f"No logged model {model_id!r} in {mlflow.get_tracking_uri()}; a "
            f"logged model id is the m-… on its page in mlflow ui (or use "
            f"models:/NAME@ALIAS)."
        ) from None
    status = str(logged.status)
    if status != "READY":
        raise RegistryError(
            f"Logged model {model_id!r} is {status}: it was not fully logged; use another model."
        )
    return logged


def _locate_run(given: str) -> ModelReference:
    ref = given[len("runs:") :]
    run_id, _, path = ref.strip("/").partition("/")
    path = path.strip("/")
    if not ref.startswith("/") or not run_id or not path:
        raise _bad_form(
            given,
            "a runs:/ URI names a run and the model's "
            "path in it: runs:/RUN_ID/PATH (e.g. "
            "runs:/<run id>/iter-4000)",
        )
    if not _RUN_ID_PATTERN.match(run_id):
        raise _bad_form(given, f"{run_id!r} is not an MLflow run id")
    try:
        run = _client().get_run(run_id)
    except MlflowException as err:
        if err.error_code not in _NOT_FOUND_CODES:
            raise
        raise ModelNotFoundError(
            f"No run {run_id!r} in {mlflow.get_tracking_uri()}; copy the run "
            f"id from mlflow ui (or use models:/NAME@ALIAS)."
        ) from None
    reference = ModelReference(given, f"runs:/{run_id}/{path}", "run")
    try:
        return _with_checkpoint(reference, quiet=True)
    except _NoModel:
        pass
    names = sorted(
        {
            m.name
            for m in mlflow.search_logged_models(
                experiment_ids=[run.info.experiment_id],
                filter_string=f"source_run_id = '{run_id}'",
                output_format="list",
            )
        }
    )
    listed = (
        (f"its logged models: {', '.join(names)} (e.g. runs:/{run_id}/{names[0]})")
        if names
        else "it logged no models"
    )
    raise ModelNotFoundError(f"Run {run_id} has no model at {path!r}; {listed}.")


def _last_line(err: Exception) -> str:
    # MLflow's download errors put the cause last, after a header line.
    text = getattr(err, "message", None) or str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else type(err).__name__)[:200]


class _NoModel(Exception):
    """No MLmodel at a reference (turned into a message by the caller)."""


def _with_checkpoint(reference: ModelReference, quiet: bool = False) -> ModelReference:
    """``reference`` with the checkpoint entry of its MLmodel; checks that
    the MLmodel exists and describes a cs2acdc-uda segmentor."""
    from dataclasses import replace

    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from uda.tracking import temporary_env

    try:
        # No download progress bar for the small MLmodel file of a check.
        with temporary_env("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"):
            repo = get_artifact_repository(reference.uri)
            with tempfile.TemporaryDirectory(prefix="uda-check-") as tmp:
                mlmodel = _read_mlmodel(repo, tmp)
    except (MlflowException, OSError) as err:
        if quiet:
            raise _NoModel() from None
        raise RegistryError(
            f"{reference.uri} has no readable MLmodel file "
            f"({_last_line(err)}); it is not a logged model "
            f"or was not fully logged."
        ) from None
    entry = _checkpoint_entry(mlmodel, reference.uri)
    return replace(reference, checkpoint=entry)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}.")


# ----------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------
@contextmanager
def _serving_device(device: str) -> Iterator[None]:
    """Run MLflow's input-example check of ``log_model`` on ``device`` (the
    CPU), not on the GPU a training run is using."""
    from uda.serving import DEVICE_ENV
    from uda.tracking import temporary_env

    with temporary_env(DEVICE_ENV, device):
        yield


def log_segmentor(
    checkpoint: str | os.PathLike | nn.Module | Mapping[str, Any],
    name: str | None = None,
    model_cfg: Mapping[str, Any] | None = None,
    iteration: int | None = None,
    kind: str = "checkpoint",
    preset: str | None = None,
    tags: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> ModelInfo:
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
    from uda.models.checkpoint_files import file_sha256
    from uda.models.foreign import as_checkpoint_file
    from uda.serving import CHECKPOINT_ARTIFACT, example_image_png, input_frame, serving_signature
    from uda.tracking import flatten

    _check_kind(kind)
    if mlflow.active_run() is None:
        raise ValueError(
            "log_segmentor needs an active MLflow run (call it "
            "inside `with mlflow.start_run():` or an entry "
            "point run)."
        )
    if name is None:
        name = iteration_alias(iteration) if iteration is not None else kind
    model_tags = {"kind": kind}
    if iteration is not None:
        model_tags["iteration"] = str(int(iteration))
    if preset:
        model_tags["preset"] = str(preset)
    model_tags.update({k: str(v) for k, v in (tags or {}).items()})
    with (
        as_checkpoint_file(checkpoint, model_cfg, meta) as (path, cfg),
        tempfile.TemporaryDirectory(prefix="uda-pyfunc-") as tmp,
    ):
        code_file = Path(tmp) / "segmentation_model.py"
        code_file.write_text(_MODEL_CODE)
        metadata = {
            "checkpoint_format": FORMAT_TAG,
            "checkpoint_file": path.name,
            "checkpoint_bytes": path.stat().st_size,
            "checkpoint_sha256": file_sha256(path),
            "backbone": cfg.get("backbone"),
            "num_classes": cfg.get("num_classes"),
            "test_mode": (cfg.get("test_cfg") or {}).get("mode"),
        }
        with _serving_device("cpu"):
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
                params={f"model.{k}": str(v) for k, v in flatten(cfg).items()},
                step=int(iteration or 0),
            )
    return info


# ----------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------
def _model_source(model: ModelInfo | str) -> tuple[str, str, str | None]:
    """``(model_uri, run_id, model_id)`` of a logged model."""
    if isinstance(model, ModelInfo):
        return model.model_uri, model.run_id, model.model_id
    if not isinstance(model, str):
        raise TypeError(f"Expected a ModelInfo or a model URI, got {type(model).__name__}.")
    if model.startswith("runs:/"):
        parts = model[len("runs:/") :].split("/", 1)
        return model, parts[0], None
    model_id = logged_model_id(model)
    if model_id is not None:
        logged = _client().get_logged_model(model_id)
        return model, logged.source_run_id, model_id
    raise ValueError(
        f'Expected a logged model (ModelInfo, "models:/m-..." or "runs:/RUN_ID/NAME"), got {model!r}.'
    )


def find_versions(
    name: str, filter_extra: str = "", client: mlflow.MlflowClient | None = None
) -> list[ModelVersion]:
    """Every version of ``name`` matching ``filter_extra`` (MLflow's
    search syntax, e.g. ``tags.kind = 'soup'``), all pages, oldest first;
    through ``client`` (default: the current tracking URI's)."""
    client = client or _client()
    query = f"name='{name}'" + (f" and {filter_extra}" if filter_extra else "")
    found: list[ModelVersion] = []
    token = None
    while True:
        page = client.search_model_versions(query, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return sorted(found, key=lambda v: int(v.version))


def source_run_id(version: ModelVersion) -> str | None:
    """The run that registered ``version``: the ``run_id`` tag this project
    sets, else MLflow's own field."""
    return version.tags.get("run_id") or version.run_id


def _find_version(name: str, run_id: str, kind: str, iteration: int | None) -> ModelVersion | None:
    """The version registered before for ``(run_id, kind, iteration)``."""
    try:
        candidates = find_versions(name, f"run_id='{run_id}'")
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    wanted = None if iteration is None else str(int(iteration))
    matches = [
        v
        for v in candidates
        if v.tags.get("kind", "checkpoint") == kind and v.tags.get("iteration") == wanted
    ]
    if len(matches) > 1:
        log.warning(
            "%s has %d versions for run %s, %s, iteration %s; using version %s.",
            name,
            len(matches),
            run_id,
            kind,
            wanted,
            matches[0].version,
        )
    return matches[0] if matches else None


def _ensure_registered_model(name: str, description: str | None) -> None:
    client = _client()
    try:
        client.get_registered_model(name)
        return
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        client.create_registered_model(
            name,
            description=description
            or (
                "cs2acdc-uda segmentor (HRDA + DAFormer head): one version "
                "per checkpoint, soup or import, tagged with iteration, "
                "run_id, kind and metrics; aliases iter-<N> name "
                "checkpoints, `serving` the served model."
            ),
        )
    except MlflowException as err:  # created concurrently
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _wait_ready(name: str, version: str) -> ModelVersion:
    client = _client()
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while True:
        mv = client.get_model_version(name, version)
        if mv.status == "READY":
            return mv
        if mv.status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            raise RegistryError(
                f"Version {version} of {name!r} is {mv.status} "
                f"({mv.status_message or 'no message'}); not using it."
            )
        time.sleep(0.5)


def _read_mlmodel(repo: Any, tmp: str) -> Any:
    from mlflow.models import Model

    return Model.load(repo.download_artifacts("MLmodel", tmp))


def _checkpoint_entry(mlmodel: Any, where: str) -> str:
    """Path of the checkpoint inside a logged segmentor model."""
    from uda.serving import CHECKPOINT_ARTIFACT

    pyfunc = mlmodel.flavors.get("python_function") or {}
    entry = (pyfunc.get("artifacts") or {}).get(CHECKPOINT_ARTIFACT)
    if not entry:
        raise RegistryError(
            f"{where} is not a cs2acdc-uda segmentor: its MLmodel has no {CHECKPOINT_ARTIFACT!r} artifact."
        )
    return entry["path"]


def _verify_artifacts(name: str, version: str) -> None:
    """The version's MLmodel and full checkpoint file are in the store."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    where = f"models:/{name}/{version}"
    repo = get_artifact_repository(where)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mlmodel = _read_mlmodel(repo, tmp)
        except (MlflowException, OSError) as err:
            raise RegistryError(
                f"{where} has no readable MLmodel ({err}); the model was not fully logged."
            ) from None
    entry = _checkpoint_entry(mlmodel, where)
    folder, _, file_name = entry.rpartition("/")
    sizes = {Path(a.path).name: a.file_size for a in repo.list_artifacts(folder or None)}
    expected = (mlmodel.metadata or {}).get("checkpoint_bytes")
    if file_name not in sizes:
        raise RegistryError(f"{where} lacks its checkpoint {entry!r}; the model was not fully logged.")
    if expected is not None and sizes[file_name] != int(expected):
        raise RegistryError(
            f"{where}: checkpoint {entry!r} has {sizes[file_name]} bytes, "
            f"{expected} were logged; the upload is incomplete."
        )


def version_metadata(name: str, version: int | str) -> dict[str, Any]:
    """The ``metadata`` of a version's MLmodel: ``checkpoint_bytes``,
    ``checkpoint_sha256``, ``backbone``, ``num_classes``, ``test_mode``."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(f"models:/{name}/{version}")
    with tempfile.TemporaryDirectory() as tmp:
        mlmodel = _read_mlmodel(repo, tmp)
    return dict(mlmodel.metadata or {})


def _set_alias(name: str, alias: str, version: str, move: bool = True) -> None:
    """Point ``alias`` at ``version``; with ``move=False`` an alias that
    already names another version is left alone."""
    client = _client()
    current = client.get_registered_model(name).aliases.get(alias)
    if current is not None and str(current) == str(version):
        return
    if current is not None:
        if not move:
            log.warning(
                "Alias %s@%s stays on version %s (not moved back to the re-registered version %s).",
                name,
                alias,
                current,
                version,
            )
            return
        log.warning("Moving alias %s@%s from version %s to version %s.", name, alias, current, version)
    client.set_registered_model_alias(name, alias, str(version))


def register_checkpoint(
    model: ModelInfo | str,
    registered_name: str,
    iteration: int | None = None,
    metrics: Mapping[str, float] | None = None,
    alias: str | None = "auto",
    kind: str = "checkpoint",
    preset: str | None = None,
    extra_tags: Mapping[str, Any] | None = None,
    description: str | None = None,
    identity_tags: Mapping[str, Any] | None = None,
) -> ModelVersion:
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
        identity_tags: Tags the version is created with, next to
            ``run_id``/``kind``/``iteration``, because searches find it by
            them (an import's ``source_sha256``): a process killed before
            the other tags are set leaves a version that is still found.

    Returns:
        The (new or existing) :class:`ModelVersion`, with its tags.

    Raises:
        RegistryError: The version did not become READY or its artifacts
            are incomplete.
    """
    _check_name(registered_name)
    _check_kind(kind)
    model_uri, run_id, model_id = _model_source(model)
    if model_id:  # never a version (nor an alias) of a half-logged model
        _logged_model(model_id)
    client = _client()
    existing = _find_version(registered_name, run_id, kind, iteration)
    if existing is not None:
        log.info(
            "Reusing version %s of %s for run %s, iteration %s.",
            existing.version,
            registered_name,
            run_id,
            iteration,
        )
        version = str(existing.version)
    else:
        _ensure_registered_model(registered_name, description)
        key_tags = {"run_id": run_id, "kind": kind}
        if iteration is not None:
            key_tags["iteration"] = str(int(iteration))
        key_tags.update({k: str(v) for k, v in (identity_tags or {}).items()})
        created = client.create_model_version(
            registered_name, source=model_uri, run_id=run_id, tags=key_tags, model_id=model_id
        )
        version = str(created.version)
    _wait_ready(registered_name, version)
    _verify_artifacts(registered_name, version)
    tags: dict[str, str] = {}
    if preset:
        tags["preset"] = str(preset)
    tags.update({k: str(v) for k, v in (metrics or {}).items()})
    tags.update({k: str(v) for k, v in (extra_tags or {}).items()})
    for key, value in tags.items():
        client.set_model_version_tag(registered_name, version, key, value)
    if alias == "auto":
        alias = iteration_alias(iteration) if iteration is not None else None
    if alias:
        # A re-registration never takes an alias away from another version.
        _set_alias(registered_name, alias, version, move=existing is None)
    return client.get_model_version(registered_name, version)


def _find_logged_model(run_id: str, kind: str, iteration: int | None) -> str | None:
    """URI of a READY model logged before in ``run_id`` for ``(kind,
    iteration)`` (a run interrupted between logging and registering)."""
    run = _client().get_run(run_id)
    wanted = None if iteration is None else str(int(iteration))
    found = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}'",
        output_format="list",
    )
    for logged in sorted(found, key=lambda m: m.creation_timestamp):
        if (
            str(logged.status) == "READY"
            and logged.tags.get("kind") == kind
            and logged.tags.get("iteration") == wanted
        ):
            return logged.model_uri
    return None


def discard_unfinished_models(run_id: str, reason: str) -> list[str]:
    """Marks the run's logged models that never became READY as FAILED,
    tags them ``uda.discarded=<reason>`` and deletes them.

    A process killed (or interrupted) inside ``log_model`` leaves its logged
    model PENDING for ever, and ``mlflow ui`` and searches list it with the
    run. Deleted, it is hidden from both, and ``mlflow gc`` can remove its
    partial files. READY models are kept (a resumed run registers them).
    Call it only for a run that no live process is logging into: a resumed
    run, or the active run after a failure in this process.

    Returns:
        The ids of the models discarded.
    """
    from mlflow.entities import LoggedModelStatus

    client = _client()
    experiment_id = client.get_run(run_id).info.experiment_id
    found, token = [], None
    while True:
        page = client.search_logged_models(
            [experiment_id], filter_string=f"source_run_id = '{run_id}'", page_token=token
        )
        found.extend(page)
        token = page.token
        if not token:
            break
    discarded = []
    for logged in found:
        status = str(logged.status)
        if status == "READY":
            continue
        try:
            if status != "FAILED":
                client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
            client.set_logged_model_tags(logged.model_id, {"uda.discarded": reason})
            client.delete_logged_model(logged.model_id)
        except MlflowException as err:  # e.g. deleted meanwhile
            log.warning(
                "Could not discard logged model %s of run %s: %s", logged.model_id, run_id, err.message
            )
            continue
        log.warning(
            "Discarded logged model %s (%s, iteration %s) of run %s: %s.",
            logged.model_id,
            status,
            logged.tags.get("iteration", "-"),
            run_id,
            reason,
        )
        discarded.append(logged.model_id)
    return discarded


def log_and_register(
    checkpoint: str | os.PathLike | nn.Module | Mapping[str, Any],
    registered_name: str,
    iteration: int | None = None,
    metrics: Mapping[str, float] | None = None,
    model_cfg: Mapping[str, Any] | None = None,
    alias: str | None = "auto",
    kind: str = "checkpoint",
    preset: str | None = None,
    extra_tags: Mapping[str, Any] | None = None,
    description: str | None = None,
    name: str | None = None,
    identity_tags: Mapping[str, Any] | None = None,
) -> ModelVersion:
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
        identity_tags: See :func:`register_checkpoint`.

    Returns:
        The :class:`ModelVersion`.
    """
    _check_name(registered_name)
    _check_kind(kind)
    run = mlflow.active_run()
    if run is None:
        raise ValueError("log_and_register needs an active MLflow run.")
    run_id = run.info.run_id
    source: ModelInfo | str | None = None
    existing = _find_version(registered_name, run_id, kind, iteration)
    if existing is not None:
        source = existing.source
    else:
        source = _find_logged_model(run_id, kind, iteration)
    try:
        if source is None:
            source = log_segmentor(
                checkpoint, name=name, model_cfg=model_cfg, iteration=iteration, kind=kind, preset=preset
            )
        return register_checkpoint(
            source,
            registered_name,
            iteration=iteration,
            metrics=metrics,
            alias=alias,
            kind=kind,
            preset=preset,
            extra_tags=extra_tags,
            description=description,
            identity_tags=identity_tags,
        )
    except BaseException as error:
        # MLflow marks a model FAILED only on an Exception; Ctrl-C inside
        # log_model leaves it PENDING. Either way it is half-logged: hide it.
        try:
            discard_unfinished_models(run_id, f"logging failed: {type(error).__name__}")
        except Exception as cleanup:  # never mask the original error
            log.warning("Could not discard half-logged models of run %s: %s", run_id, cleanup)
        raise


# ----------------------------------------------------------------------
# Lookup, verification, aliases
# ----------------------------------------------------------------------
def get_registered_model(name: str, hint: str = "") -> Any:
    """The registered model ``name``, or a RegistryError listing those that exist.

    Args:
        name: Registered model name.
        hint: What the user should do, appended to the error message.
    """
    name = validate_model_name(name, "Registered model name")
    client = _client()
    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    names = sorted(m.name for m in client.search_registered_models(max_results=50))
    known = ", ".join(names) if names else "none"
    raise UnknownModelError(
        f"No registered model {name!r} in {mlflow.get_tracking_uri()}. "
        f"Registered models: {known}." + (f" {hint}" if hint else "")
    )


def _describe_versions(name: str) -> str:
    versions = find_versions(name)
    if not versions:
        return "no versions"
    parts = []
    for v in versions[-20:]:
        bits = [v.tags.get("kind", "?")]
        if "iteration" in v.tags:
            bits.append(f"iteration {v.tags['iteration']}")
        parts.append(f"{v.version} ({', '.join(bits)})")
    more = f" (last 20 of {len(versions)})" if len(versions) > 20 else ""
    return f"versions{more}: " + ", ".join(parts)


def resolve_alias(name: str, alias: str) -> ModelVersion:
    """The version ``models:/NAME@ALIAS`` points at.

    Raises:
        RegistryError: The model or the alias does not exist; the message
            lists the registered models, or the aliases and versions.
    """
    registered = get_registered_model(name)
    alias = validate_alias(alias, "Alias")
    aliases = dict(registered.aliases or {})
    if alias not in aliases:
        listed = ", ".join(f"{a} -> {v}" for a, v in sorted(aliases.items())) or "none"
        raise RegistryError(
            f"Registered model {name!r} has no alias {alias!r}. Aliases: "
            f"{listed}; {_describe_versions(name)}."
        )
    return _client().get_model_version(name, str(aliases[alias]))


def _get_version(name: str, version: int | str) -> ModelVersion:
    get_registered_model(name)
    try:
        return _client().get_model_version(name, str(version))
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
    raise RegistryError(f"Registered model {name!r} has no version {version!r}; {_describe_versions(name)}.")


def verify_loadable(name: str, version: int | str) -> None:
    """Load ``models:/NAME/VERSION`` as pyfunc (on the CPU) and segment the
    example image once.

    Raises:
        RegistryError: It does not load or does not answer as a segmentor.
    """
    import pandas as pd

    from uda.serving import decode_png, example_image_png, input_frame

    mv = _wait_ready(name, str(_get_version(name, version).version))
    model_id = version_model_id(mv)
    if model_id:  # an alias never names a half-logged (or deleted) model
        _logged_model(model_id)
    _verify_artifacts(name, mv.version)
    uri = f"models:/{name}/{mv.version}"
    with _serving_device("cpu"):
        try:
            pyfunc_model = mlflow.pyfunc.load_model(uri)
            out = pyfunc_model.predict(input_frame(example_image_png(64, 64)))
        except Exception as err:  # any failure means "not servable"
            raise RegistryError(f"{uri} does not load or predict: {type(err).__name__}: {err}") from err
    if (
        not isinstance(out, pd.DataFrame)
        or "label_map" not in out
        or decode_png(out["label_map"][0]).shape != (64, 64)
    ):
        raise RegistryError(f"{uri} loads but does not return a 64x64 label map for a 64x64 image.")


def set_alias(name: str, alias: str, version: int | str) -> None:
    """Point ``alias`` at a version that is READY with complete artifacts
    (without loading it; :func:`set_alias_safely` also runs it once)."""
    _check_name(name)
    version = str(_wait_ready(name, str(version)).version)
    _verify_artifacts(name, version)
    _set_alias(name, alias, version)


def set_alias_safely(name: str, alias: str, version: int | str) -> ModelVersion:
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
def load_segmentor(
    model_uri: str | os.PathLike,
    device: str = "cpu",
    foreign_cfg: Mapping[str, Any] | None = None,
    architecture: str = "",
) -> tuple[nn.Module, dict[str, Any]]:
    """The torch segmentor of a registered version, a logged model or a file.

    Only the checkpoint artifact (and the small MLmodel file) is downloaded.

    Args:
        model_uri: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
            ``models:/NAME/latest``, ``models:/m-<logged model id>``,
            ``runs:/RUN_ID/NAME``, a local logged model directory, or a
            checkpoint file: ours, or a foreign one (MIC, the original's
            distillation or soup, a state dict) given ``foreign_cfg``.
        device: Device to put the model on.
        foreign_cfg: The architecture of a foreign checkpoint file (a
            preset's ``<role>.model``), loaded strictly.
        architecture: Where ``foreign_cfg`` came from, for messages.

    Returns:
        ``(model, model_cfg)``: the segmentor in eval mode and its
        normalised ``model`` config.

    Raises:
        RegistryError: Unknown model, version, alias, run or logged model
            (lists what exists); :class:`ModelNotFoundError` (also a
            ``FileNotFoundError``) when nothing by that name exists.
        CheckpointError: Bad checkpoint file.
    """
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from uda.models import build_from_checkpoint
    from uda.models.foreign import load_segmentor_file

    # One owner for every URI form and its errors (see check_model_uri).
    reference = check_model_uri(model_uri, parameter=None)
    if reference.kind == "file":
        model, _, _ = load_segmentor_file(reference.uri, foreign_cfg, architecture=architecture)
    elif reference.kind == "folder":
        model = build_from_checkpoint(Path(reference.uri) / str(reference.checkpoint))
    else:
        repo = get_artifact_repository(reference.uri)
        with tempfile.TemporaryDirectory(prefix="uda-load-") as tmp:
            try:
                local = repo.download_artifacts(str(reference.checkpoint), tmp)
            except (MlflowException, OSError) as err:
                raise RegistryError(
                    f"Cannot download the checkpoint of {reference.uri} "
                    f"({_last_line(err)}); the model was not fully "
                    f"logged."
                ) from None
            model = build_from_checkpoint(local)
    model = model.eval().to(device)
    return model, dict(model.model_cfg)
