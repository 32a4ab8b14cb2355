"""Finding what the store holds: registered models, their versions (by
number, by alias, ``latest``, by the run that registered them) and the logged
models behind them. The one owner of the store's paged searches
(:func:`find_versions`, :func:`run_logged_models`)."""

from __future__ import annotations

import logging
import time
from typing import Any

import mlflow
from mlflow.entities import LoggedModel
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from .errors import ModelNotFoundError, RegistryError, UnknownModelError
from .names import validate_alias, validate_model_name

__all__ = [
    "NOT_FOUND_CODES",
    "get_registered_model",
    "find_versions",
    "find_run_version",
    "get_version",
    "latest_version",
    "describe_versions",
    "resolve_alias",
    "wait_ready",
    "source_run_id",
    "iteration_of",
    "run_versions",
    "version_model_id",
    "logged_model_id",
    "ready_logged_model",
    "run_logged_models",
]

log = logging.getLogger(__name__)

#: How MLflow stores answer a look-up of a run or logged model that is not there.
NOT_FOUND_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")
_READY_TIMEOUT_S = 300.0


def get_registered_model(name: str, hint: str = "") -> Any:
    """The registered model ``name``, or a RegistryError listing those that exist.

    Args:
        name: Registered model name.
        hint: What the user should do, appended to the error message.
    """
    name = validate_model_name(name, "Registered model name")
    client = mlflow.MlflowClient()
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


def find_versions(
    name: str, filter_extra: str = "", client: mlflow.MlflowClient | None = None
) -> list[ModelVersion]:
    """Every version of ``name`` matching ``filter_extra`` (MLflow's
    search syntax, e.g. ``tags.kind = 'soup'``), all pages, oldest first;
    through ``client`` (default: the current tracking URI's). A model that
    does not exist has no versions (some stores raise instead)."""
    client = client or mlflow.MlflowClient()
    query = f"name='{name}'" + (f" and {filter_extra}" if filter_extra else "")
    found: list[ModelVersion] = []
    token = None
    while True:
        try:
            page = client.search_model_versions(query, page_token=token)
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                return []
            raise
        found.extend(page)
        token = page.token
        if not token:
            return sorted(found, key=lambda v: int(v.version))


def run_logged_models(run_id: str, experiment_id: str | None = None) -> list[LoggedModel]:
    """Every model logged in run ``run_id`` (all pages, any status).

    Args:
        run_id: The run.
        experiment_id: Its experiment, when the caller has it (else looked up).
    """
    client = mlflow.MlflowClient()
    if experiment_id is None:
        experiment_id = client.get_run(run_id).info.experiment_id
    found: list[LoggedModel] = []
    token = None
    while True:
        page = client.search_logged_models(
            [experiment_id], filter_string=f"source_run_id = '{run_id}'", page_token=token
        )
        found.extend(page)
        token = page.token
        if not token:
            return found


def source_run_id(version: ModelVersion) -> str | None:
    """The run that registered ``version``: the ``run_id`` tag this project
    sets, else MLflow's own field."""
    return version.tags.get("run_id") or version.run_id


def iteration_of(version: ModelVersion) -> int | None:
    """The training iteration of a registered version (its ``iteration`` tag), or None."""
    try:
        return int(version.tags.get("iteration"))
    except (TypeError, ValueError):
        return None


def run_versions(name: str, run_id: str) -> list[ModelVersion]:
    """The versions of ``name`` that run ``run_id`` registered, by (iteration, version
    number): highest iteration last, versions without an iteration first."""
    # Filtered here, not with the store's run_id filter: the project's run_id tag wins over MLflow's field.
    versions = [v for v in find_versions(name) if source_run_id(v) == run_id]
    return sorted(
        versions, key=lambda v: (iteration_of(v) if iteration_of(v) is not None else -1, int(v.version))
    )


def find_run_version(name: str, run_id: str, kind: str, iteration: int | None) -> ModelVersion | None:
    """The version registered before for ``(run_id, kind, iteration)``."""
    candidates = find_versions(name, f"run_id='{run_id}'")
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


def get_version(name: str, version: int | str) -> ModelVersion:
    """Version ``version`` of ``name``, or a RegistryError listing the versions."""
    get_registered_model(name)
    try:
        return mlflow.MlflowClient().get_model_version(name, str(version))
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
    raise RegistryError(f"Registered model {name!r} has no version {version!r}; {describe_versions(name)}.")


def latest_version(name: str) -> str:
    """The highest usable version number of ``name`` (``models:/NAME/latest``)."""
    get_registered_model(name)
    versions = [v for v in find_versions(name) if v.status != "FAILED_REGISTRATION"]
    if not versions:
        raise RegistryError(
            f"Registered model {name!r} has no versions yet; train, import or register one first."
        )
    return str(max(int(v.version) for v in versions))


def describe_versions(name: str) -> str:
    """``versions: 3 (checkpoint, iteration 40), …`` (the last 20), for messages."""
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
            f"Registered model {name!r} has no alias {alias!r}. Aliases: {listed}; {describe_versions(name)}."
        )
    return mlflow.MlflowClient().get_model_version(name, str(aliases[alias]))


def wait_ready(name: str, version: str) -> ModelVersion:
    """The version once READY; a RegistryError if it failed or is still
    pending after :data:`_READY_TIMEOUT_S` seconds."""
    client = mlflow.MlflowClient()
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


def ready_logged_model(model_id: str) -> Any:
    """The logged model ``m-…``, if it is fully logged (READY).

    Raises:
        ModelNotFoundError: No such logged model.
        RegistryError: It is PENDING or FAILED.
    """
    try:
        logged = mlflow.MlflowClient().get_logged_model(model_id)
    except MlflowException as err:
        if err.error_code not in NOT_FOUND_CODES:
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
