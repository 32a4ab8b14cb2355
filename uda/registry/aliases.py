"""Moving aliases: only onto a version that is READY with complete artifacts
(:func:`set_alias`), or that also loads and segments an image
(:func:`set_alias_safely`, for ``serving``); a re-registration never takes an
alias back (:func:`move_alias`)."""

from __future__ import annotations

import logging

import mlflow
from mlflow.entities.model_registry import ModelVersion

from .artifacts import verify_artifacts
from .loading import verify_loadable
from .names import check_name
from .versions import wait_ready

__all__ = ["move_alias", "set_alias", "set_alias_safely"]

log = logging.getLogger(__name__)


def move_alias(name: str, alias: str, version: str, move: bool = True) -> None:
    """Point ``alias`` at ``version`` (no checks; callers verify first).

    Args:
        name: Registered model name.
        alias: Alias to set or move (a move is logged as a warning).
        version: Version number.
        move: False: an alias that already names another version is left
            alone (a re-registration never takes an alias back).
    """
    client = mlflow.MlflowClient()
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


def set_alias(name: str, alias: str, version: int | str) -> None:
    """Point ``alias`` at a version that is READY with complete artifacts
    (without loading it; :func:`set_alias_safely` also runs it once).

    Args:
        name: Registered model name.
        alias: Alias to set or move.
        version: Version number.

    Raises:
        RegistryError: The version is not READY or its artifacts are incomplete.
    """
    check_name(name)
    version = str(wait_ready(name, str(version)).version)
    verify_artifacts(name, version)
    move_alias(name, alias, version)


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
    check_name(name)
    verify_loadable(name, version)
    move_alias(name, alias, str(version))
    return mlflow.MlflowClient().get_model_version(name, str(version))
