"""Model references: every form a user may pass (``models:/NAME@ALIAS``,
``models:/NAME/VERSION``, ``models:/NAME/latest``, ``models:/m-…``,
``runs:/RUN_ID/PATH``, an artifact URI, a logged model folder, a checkpoint
file), checked and pinned to a :class:`ModelReference` before any work."""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from .artifacts import checkpoint_entry, error_cause, read_mlmodel
from .errors import ModelNotFoundError, RegistryError
from .names import validate_alias, validate_model_name
from .versions import (
    NOT_FOUND_CODES,
    get_registered_model,
    get_version,
    latest_version,
    ready_logged_model,
    resolve_alias,
    run_logged_models,
    version_model_id,
)

__all__ = ["MODEL_URI_FORMS", "ModelReference", "check_model_uri"]

#: Every form a model reference may take; error messages list them.
MODEL_URI_FORMS = (
    "models:/NAME@ALIAS, models:/NAME/VERSION, "
    "models:/NAME/latest, models:/m-<logged model id>, "
    "runs:/RUN_ID/PATH or a checkpoint file"
)
_RUN_ID_PATTERN = re.compile(r"^[a-zA-Z0-9][\w\-]{0,255}$")  # MLflow's
_URI_SCHEME = re.compile(r"^[A-Za-z][\w+.\-]*:/")


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
        entry = checkpoint_entry(Model.load(str(local / "MLmodel")), given)
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
            version = str(get_version(name, suffix).version)
        elif suffix.lower() == "latest":
            version = latest_version(name)
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
            ModelReference(
                given, f"models:/{head}", "logged-model", model_id=ready_logged_model(head).model_id
            )
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


def _registered_reference(given: str, name: str, version: str) -> ModelReference:
    mv = mlflow.MlflowClient().get_model_version(name, version)
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
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException as err:
        if err.error_code not in NOT_FOUND_CODES:
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
    names = sorted({m.name for m in run_logged_models(run_id, run.info.experiment_id)})
    listed = (
        (f"its logged models: {', '.join(names)} (e.g. runs:/{run_id}/{names[0]})")
        if names
        else "it logged no models"
    )
    raise ModelNotFoundError(f"Run {run_id} has no model at {path!r}; {listed}.")


class _NoModel(Exception):
    """No MLmodel at a reference (turned into a message by the caller)."""


def _with_checkpoint(reference: ModelReference, quiet: bool = False) -> ModelReference:
    """``reference`` with the checkpoint entry of its MLmodel; checks that
    the MLmodel exists and describes a cs2acdc-uda segmentor."""
    from dataclasses import replace

    from uda.tracking import temporary_env

    try:
        # No download progress bar for the small MLmodel file of a check.
        with temporary_env("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"):
            with tempfile.TemporaryDirectory(prefix="uda-check-") as tmp:
                mlmodel = read_mlmodel(reference.uri, tmp)
    except (MlflowException, OSError) as err:
        if quiet:
            raise _NoModel() from None
        raise RegistryError(
            f"{reference.uri} has no readable MLmodel file "
            f"({error_cause(err)}); it is not a logged model "
            f"or was not fully logged."
        ) from None
    entry = checkpoint_entry(mlmodel, reference.uri)
    return replace(reference, checkpoint=entry)
