"""Registering checkpoints: log (once) and register a checkpoint as a model
version, idempotently across resumes (:func:`log_and_register`,
:func:`register_checkpoint`), and hiding what a killed process half-logged
(:func:`discard_unfinished_models`).

Order of operations: log → the version exists and is READY and its
artifacts are complete → tags → alias, so an alias never names a
half-logged model.
"""

from __future__ import annotations

import logging
import os
from typing import Any
from collections.abc import Mapping

import mlflow
import torch.nn as nn
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models.model import ModelInfo

from .aliases import move_alias
from .artifacts import verify_artifacts
from .names import check_kind, check_name, iteration_alias
from .versions import find_run_version, logged_model_id, ready_logged_model, run_logged_models, wait_ready

__all__ = ["register_checkpoint", "log_and_register", "discard_unfinished_models"]

log = logging.getLogger(__name__)


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
        logged = mlflow.MlflowClient().get_logged_model(model_id)
        return model, logged.source_run_id, model_id
    raise ValueError(
        f'Expected a logged model (ModelInfo, "models:/m-..." or "runs:/RUN_ID/NAME"), got {model!r}.'
    )


def _ensure_registered_model(name: str, description: str | None) -> None:
    client = mlflow.MlflowClient()
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
        model: What :func:`uda.serving.log_segmentor` returned, or a logged-model URI
            (``models:/m-...``, ``runs:/RUN_ID/NAME``).
        registered_name: Registered model name (created if needed).
        iteration: Training iteration (tag ``iteration``; alias
            ``iter-<N>``).
        metrics: e.g. ``{'val_mIoU': 61.2}``, stored as version tags.
        alias: Alias to point at the version; ``'auto'`` = ``iter-<N>``
            when ``iteration`` is given, None = no alias.
        kind: One of :data:`~uda.registry.names.KINDS`.
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
    check_name(registered_name)
    check_kind(kind)
    model_uri, run_id, model_id = _model_source(model)
    if model_id:  # never a version (nor an alias) of a half-logged model
        ready_logged_model(model_id)
    client = mlflow.MlflowClient()
    existing = find_run_version(registered_name, run_id, kind, iteration)
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
    wait_ready(registered_name, version)
    verify_artifacts(registered_name, version)
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
        move_alias(registered_name, alias, version, move=existing is None)
    return client.get_model_version(registered_name, version)


def _find_logged_model(run_id: str, kind: str, iteration: int | None) -> str | None:
    """URI of a READY model logged before in ``run_id`` for ``(kind,
    iteration)`` (a run interrupted between logging and registering)."""
    wanted = None if iteration is None else str(int(iteration))
    for logged in sorted(run_logged_models(run_id), key=lambda m: m.creation_timestamp):
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

    client = mlflow.MlflowClient()
    discarded = []
    for logged in run_logged_models(run_id):
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
        checkpoint: See :func:`uda.serving.log_segmentor`.
        registered_name: Registered model name.
        iteration, metrics, alias, kind, preset, extra_tags, description:
            See :func:`register_checkpoint`.
        model_cfg: See :func:`uda.serving.log_segmentor`.
        name: Logged-model name within the run (default ``iter-<N>``).
        identity_tags: See :func:`register_checkpoint`.

    Returns:
        The :class:`ModelVersion`.
    """
    check_name(registered_name)
    check_kind(kind)
    run = mlflow.active_run()
    if run is None:
        raise ValueError("log_and_register needs an active MLflow run.")
    run_id = run.info.run_id
    source: ModelInfo | str | None = None
    existing = find_run_version(registered_name, run_id, kind, iteration)
    if existing is not None:
        source = existing.source
    else:
        source = _find_logged_model(run_id, kind, iteration)
    try:
        if source is None:
            # Imported here: the registry loads without the served model (uda.serving, Pillow).
            from uda.serving import log_segmentor

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
