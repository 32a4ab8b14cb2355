"""The ``import`` step: foreign checkpoint files in, registered versions out.

Order of operations (:func:`import_checkpoints`), so that bad input
registers nothing:

1. **Request** (:func:`make_request`): every file exists and can be a
   checkpoint, the role and prefix are known, the aliases are valid and
   distinct.
2. **Plan**, nothing written: each file's SHA-256, layout, sub-model,
   iteration (``meta.iter`` or the file name; none for a frozen sub-model
   such as ``ca_model.``) and alias (``iter-<N>`` unless given); a file
   already registered in the model (same ``source_sha256`` and
   ``source_prefix``, READY) is reused. Two files may not claim one alias.
3. **Convert** every new file, strictly, into a temporary ``cs2acdc-uda/1``
   file holding only the chosen sub-model
   (:func:`uda.models.foreign.convert_checkpoint`).
4. **Register**, one nested MLflow run per new file: the converted file is
   logged once as a pyfunc model and registered (``kind=import``; created
   with the tags ``source_sha256`` and ``source_prefix`` it is found by,
   then ``source_file``, ``source_format``, ``role``).
5. **Aliases**, once every version exists: an alias on another version
   moves, and the output says so; a re-import without ``-P aliases`` does
   not move an alias back. An interrupted import moved no alias; running it
   again completes it.

Two imports of the same file at the same moment can both register it (the
SHA-256 check is not a lock); the next import reuses the older version.

The five stages stay in one file (~490 lines): each is one function, and they share
the request and plan types above; the conversion itself lives in
:mod:`uda.models.foreign`, the registration in :mod:`uda.registry`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Mapping, Sequence

from uda.errors import UserError
from uda.registry import ROLE_MODEL_NAMES

__all__ = [
    "ImportRequestError",
    "ImportRequest",
    "ImportedVersion",
    "make_request",
    "import_checkpoints",
]

_NO_ALIAS = ("none", "-")


class ImportRequestError(UserError):
    """An import request that cannot be carried out."""


@dataclass(frozen=True)
class ImportRequest:
    """A validated import request (nothing in it has touched the registry).

    Attributes:
        checkpoints: The files, absolute, in the order given.
        role: ``student`` or ``teacher``: the preset section that gives the
            architecture.
        prefix: Sub-model prefix (``'auto'``, ``''`` or ``'model.'`` …).
        aliases: One alias per file (None: no alias), or None for
            ``iter-<N>`` from each file's iteration.
        model_name: Registered model the versions join.
        cfg: The resolved preset.
    """

    checkpoints: tuple
    role: str
    prefix: str
    aliases: tuple | None
    model_name: str
    cfg: dict = field(repr=False)

    @property
    def architecture(self) -> str:
        return f"preset {self.cfg.get('name')!r} {self.role}.model"


@dataclass
class ImportedVersion:
    """One file's outcome.

    Attributes:
        source: The file.
        version: The registered version.
        reused: True when the file was registered before (same SHA-256).
        alias: The alias now on it (None: none).
        iteration: The training iteration it came from, if known.
        layout: The file's layout (``ckd-distill``, ``mic``, ...).
        prefix: The sub-model taken.
        seconds: Conversion time (0 for a reused version).
        source_bytes, stored_bytes: Size of the file and of the stored
            checkpoint (the registry's share of it).
    """

    source: Path
    version: str
    reused: bool
    alias: str | None
    iteration: int | None
    layout: str
    prefix: str
    seconds: float = 0.0
    source_bytes: int = 0
    stored_bytes: int = 0


def _split(text: Any) -> list[str]:
    if text is None:
        return []
    if isinstance(text, (list, tuple)):
        return [str(t).strip() for t in text]
    text = str(text).strip()
    return [part.strip() for part in text.split(",")] if text else []


def make_request(
    cfg: Mapping[str, Any],
    checkpoints: Any,
    role: str = "student",
    prefix: str = "auto",
    aliases: Any = "",
    model_name: str | None = None,
) -> ImportRequest:
    """Check an import request before any work (cheap: no tensors read).

    Args:
        cfg: The resolved preset (gives the architecture of ``role``).
        checkpoints: Comma-separated files (or a list).
        role: ``student`` or ``teacher``.
        prefix: ``auto`` (``model.*``), ``none`` or a sub-model prefix.
        aliases: Comma-separated, one per file (``none`` for no alias);
            empty: ``iter-<N>`` from each file's iteration.
        model_name: Registered model; default ``cs2acdc-<role>``.

    Raises:
        ImportRequestError / CheckpointError / RegistryError / FileNotFoundError
        subclasses: all ``UserError``; nothing has been written.
    """
    from uda.models.checkpoint_files import check_checkpoint_file
    from uda.models.foreign import normalize_prefix, role_model_cfg
    from uda.registry import ModelNotFoundError, validate_alias, validate_model_name

    role = str(role or "student").strip()
    role_model_cfg(cfg, role)  # the role exists
    files = _split(checkpoints)
    if not files or any(not f for f in files):
        raise ImportRequestError(
            f"checkpoints must be a comma-separated list of checkpoint files "
            f"(e.g. fan_iter_24k.pth,fan_iter_32k.pth,fan_iter_40k.pth), got "
            f"{checkpoints!r}."
        )
    paths = []
    for name in files:
        path = Path(name).expanduser()
        try:
            check_checkpoint_file(path)
        except FileNotFoundError as err:
            raise ModelNotFoundError(f"checkpoints: {err}") from None
        paths.append(path.resolve())
    chosen: tuple | None = None
    given = _split(aliases)
    if given:
        if len(given) != len(paths):
            raise ImportRequestError(
                f"aliases names {len(given)} alias(es) for {len(paths)} "
                f"checkpoint(s); give one per file, in the same order (none "
                f"for no alias), or leave it empty for iter-<N>."
            )
        chosen = tuple(None if a.lower() in _NO_ALIAS else validate_alias(a, "aliases") for a in given)
        named = [a for a in chosen if a is not None]
        twice = sorted({a for a in named if named.count(a) > 1})
        if twice:
            raise ImportRequestError(
                f"aliases gives {', '.join(twice)} to more than one file; an alias names one version."
            )
    name = model_name.strip() if model_name and model_name.strip() else ROLE_MODEL_NAMES[role]
    name = validate_model_name(name)
    return ImportRequest(tuple(paths), role, normalize_prefix(prefix), chosen, name, dict(cfg))


@dataclass
class _Prepared:
    source: Path
    sha256: str
    layout: str
    prefix: str
    iteration: int | None
    alias: str | None
    existing: Any = None  # a registered ModelVersion
    converted: Path | None = None
    seconds: float = 0.0
    iteration_from: str | None = None  # 'meta' or 'file name'


def _registered_with_sha(model_name: str, sha256: str, prefix: str) -> Any:
    """The oldest complete version of ``model_name`` imported from the
    sub-model ``prefix`` of a file with this SHA-256, or None."""
    from uda.registry import find_versions

    found = find_versions(model_name, f"tags.source_sha256 = '{sha256}'")
    # A version that never became READY is not one to reuse.
    found = [v for v in found if v.status == "READY" and v.tags.get("source_prefix", "") == prefix]
    return found[0] if found else None


def _check_reused_architecture(request: ImportRequest, source: Path, version: Any) -> None:
    """A reused version must be the architecture the preset asks for (a
    new conversion would check it by loading strictly)."""
    from uda.models.foreign import role_model_cfg
    from uda.registry import version_metadata

    stored = version_metadata(request.model_name, version.version)
    wanted = role_model_cfg(request.cfg, request.role)
    for key in ("backbone", "num_classes"):
        if key in stored and str(stored[key]) != str(wanted[key]):
            raise ImportRequestError(
                f"{source.name} is already registered as "
                f"{request.model_name} version {version.version} with "
                f"{key} {stored[key]}, but the {request.architecture} has "
                f"{wanted[key]}; pass the preset and role it was trained "
                f"with. Nothing was registered."
            )


def _plan(request: ImportRequest) -> list[_Prepared]:
    """What each file becomes, without converting anything yet: its
    SHA-256, layout, sub-model, iteration and alias, and the version it
    already is. Aliases that clash are an error here, before the
    (multi-GB) conversions."""
    from uda.models.foreign import describe, iteration_of, selected_prefix
    from uda.registry import iteration_alias
    from uda.models.checkpoint_files import file_sha256

    planned: list[_Prepared] = []
    seen: dict[str, _Prepared] = {}
    total = len(request.checkpoints)
    for index, source in enumerate(request.checkpoints):
        digest = file_sha256(source)
        summary = describe(source)
        prefix = selected_prefix(summary.layout, request.prefix)
        iteration = iteration_of(summary, prefix)
        alias = None
        if request.aliases is not None:
            alias = request.aliases[index]
        elif iteration is not None:
            alias = iteration_alias(iteration)
        if digest in seen:
            first = seen[digest]
            if request.aliases is not None and alias != first.alias:
                raise ImportRequestError(
                    f"{first.source.name} and {source.name} are the same file "
                    f"(SHA-256 {digest[:12]}…) but get different aliases "
                    f"({first.alias}, {alias}); a file is one version."
                )
            print(
                f"[{index + 1}/{total}] {source.name}: the same file as {first.source.name}; imported once.",
                flush=True,
            )
            continue
        existing = _registered_with_sha(request.model_name, digest, prefix)
        if existing is not None:
            _check_reused_architecture(request, source, existing)
        item = _Prepared(
            source,
            digest,
            summary.layout,
            prefix,
            iteration,
            alias,
            existing=existing,
            iteration_from=summary.iteration_from if iteration is not None else None,
        )
        seen[digest] = item
        planned.append(item)
    claimed: dict[str, Path] = {}
    for item in planned:
        if item.alias is None:
            continue
        if item.alias in claimed:
            raise ImportRequestError(
                f"{claimed[item.alias].name} and {item.source.name} would "
                f"both get the alias {item.alias!r}; give each file its own "
                f"with -P aliases=… (one per file, none for no alias). "
                f"Nothing was registered."
            )
        claimed[item.alias] = item.source
    return planned


def _convert(request: ImportRequest, planned: Sequence[_Prepared], folder: Path) -> None:
    """Convert every file that is not registered yet (strictly: a file that
    does not fit stops the import before anything is registered)."""
    from uda.models.foreign import convert_checkpoint, role_model_cfg

    model_cfg = role_model_cfg(request.cfg, request.role)
    for index, item in enumerate(planned):
        step = f"[{index + 1}/{len(planned)}] {item.source.name}"
        if item.existing is not None:
            print(
                f"{step}: already registered as {request.model_name} "
                f"version {item.existing.version} (same SHA-256 and prefix "
                f"{item.prefix or '(none)'}); reusing it.",
                flush=True,
            )
            continue
        print(f"{step}: converting ({request.architecture})…", flush=True)
        converted = convert_checkpoint(
            item.source,
            folder / f"{index:03d}-{item.source.stem}.pth",
            model_cfg,
            request.prefix,
            request.architecture,
            request.role,
            meta={"role": request.role},
            sha256=item.sha256,
        )
        item.converted, item.seconds = converted.path, converted.seconds
        iteration = (
            f"iteration {item.iteration} (from the {item.iteration_from})"
            if item.iteration is not None
            else "no iteration"
        )
        print(
            f"{step}: {item.layout}, prefix {item.prefix or '(none)'}, "
            f"{iteration}, {converted.report.loaded} tensors, "
            f"{converted.seconds:.1f} s.",
            flush=True,
        )


def _register(request: ImportRequest, item: _Prepared) -> ImportedVersion:
    """The version of one file: reused, or logged and registered in a
    nested run (its alias is set later, by :func:`_set_aliases`)."""
    import mlflow

    from uda.registry import log_and_register, version_metadata

    identity = {"source_sha256": item.sha256, "source_prefix": item.prefix}
    tags = {"source_file": item.source.name, "source_format": item.layout, "role": request.role}
    source_bytes = item.source.stat().st_size
    if item.existing is not None:
        version, reused, seconds = str(item.existing.version), True, 0.0
    else:
        # One run per file: a version is identified by (run, kind,
        # iteration), and two files may share an iteration or have none.
        with mlflow.start_run(run_name=f"import {item.source.name}", nested=True):
            mlflow.set_tags(
                {
                    "entry_point": "import",
                    "uda.role": request.role,
                    **{f"uda.{k}": v for k, v in {**identity, **tags}.items()},
                }
            )
            registered = log_and_register(
                item.converted,
                request.model_name,
                iteration=item.iteration,
                alias=None,
                kind="import",
                preset=str(request.cfg.get("name")),
                extra_tags=tags,
                name="import",
                identity_tags=identity,
            )
        version, reused, seconds = str(registered.version), False, item.seconds
    stored = int(version_metadata(request.model_name, version).get("checkpoint_bytes", 0))
    return ImportedVersion(
        item.source,
        version,
        reused,
        item.alias,
        item.iteration,
        item.layout,
        item.prefix,
        seconds,
        source_bytes,
        stored,
    )


def _set_aliases(request: ImportRequest, results: Sequence[ImportedVersion]) -> list[str]:
    """Point each alias at its version once every version exists. An alias
    on another version moves (said in the output); a re-import without
    ``-P aliases`` leaves an alias that meanwhile names another version."""
    from uda.registry import get_registered_model, set_alias

    current = dict(get_registered_model(request.model_name).aliases or {})
    notes = []
    for result in results:
        if result.alias is None:
            continue
        before = current.get(result.alias)
        if before is not None and str(before) == result.version:
            continue
        if before is not None and result.reused and request.aliases is None:
            notes.append(
                f"{result.alias} stays on version {before} (not "
                f"moved back to the reused version {result.version};"
                f" pass -P aliases= to move it)"
            )
            result.alias = None
            continue
        set_alias(request.model_name, result.alias, result.version)
        if before is not None:
            notes.append(f"{result.alias} moved from version {before} to version {result.version}")
    return notes


def import_checkpoints(
    request: ImportRequest, params: Mapping[str, Any], entry_point: str = "import"
) -> list[ImportedVersion]:
    """Register each file of ``request`` as a version (see module docstring).

    Args:
        request: From :func:`make_request`.
        params: The entry point's parameters (logged).
        entry_point: The run's entry point (``import``; ``teacher`` when its
            ``-P checkpoint=`` imports a MIC teacher).

    Returns:
        One :class:`ImportedVersion` per distinct file, in order.
    """
    import mlflow

    from uda.tracking import entry_point_run

    planned = _plan(request)
    with tempfile.TemporaryDirectory(prefix="uda-import-") as tmp:
        _convert(request, planned, Path(tmp))
        with entry_point_run(entry_point, params, request.cfg) as run:
            mlflow.set_tags(
                {"uda.mode": "import", "uda.role": request.role, "uda.model_name": request.model_name}
            )
            # Every version first, then the aliases: an interrupted import
            # moves no alias, and running it again completes it.
            results = [_register(request, item) for item in planned]
            notes = _set_aliases(request, results)
            mlflow.log_table(
                {
                    "file": [r.source.name for r in results],
                    "version": [r.version for r in results],
                    "reused": [r.reused for r in results],
                    "alias": [r.alias or "" for r in results],
                    "iteration": [r.iteration if r.iteration is not None else -1 for r in results],
                    "format": [r.layout for r in results],
                    "prefix": [r.prefix for r in results],
                    "source_bytes": [r.source_bytes for r in results],
                    "stored_bytes": [r.stored_bytes for r in results],
                },
                "imports.json",
            )
    for note in notes:
        print(f"Alias {note}.")
    _print_summary(request, results, run.info.run_id)
    return results


def _print_summary(request: ImportRequest, results: Sequence[ImportedVersion], run_id: str) -> None:
    for r in results:
        what = "reused" if r.reused else "registered"
        alias = f" @{r.alias}" if r.alias else ""
        print(
            f"  {r.source.name}: {what} {request.model_name} version "
            f"{r.version}{alias} (models:/{request.model_name}/{r.version}; "
            f"{r.source_bytes / 2**20:.1f} MiB file, "
            f"{r.stored_bytes / 2**20:.1f} MiB stored)."
        )
    new = sum(not r.reused for r in results)
    print(
        f"Imported {len(results)} checkpoint(s) into {request.model_name}: "
        f"{new} new, {len(results) - new} reused; run {run_id}."
    )
