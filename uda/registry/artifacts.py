"""A logged segmentor's files in the artifact store: its ``MLmodel``, the
checkpoint entry in it, the check that the checkpoint file is complete, and
downloading that file alone."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from .errors import RegistryError

__all__ = ["read_mlmodel", "checkpoint_entry", "verify_artifacts", "version_metadata", "error_cause"]


def error_cause(err: Exception) -> str:
    # MLflow's download errors put the cause last, after a header line.
    text = getattr(err, "message", None) or str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else type(err).__name__)[:200]


def read_mlmodel(repo: Any, tmp: str) -> Any:
    from mlflow.models import Model

    return Model.load(repo.download_artifacts("MLmodel", tmp))


def checkpoint_entry(mlmodel: Any, where: str) -> str:
    """Path of the checkpoint inside a logged segmentor model."""
    from uda.serving import CHECKPOINT_ARTIFACT

    pyfunc = mlmodel.flavors.get("python_function") or {}
    entry = (pyfunc.get("artifacts") or {}).get(CHECKPOINT_ARTIFACT)
    if not entry:
        raise RegistryError(
            f"{where} is not a cs2acdc-uda segmentor: its MLmodel has no {CHECKPOINT_ARTIFACT!r} artifact."
        )
    return entry["path"]


def verify_artifacts(name: str, version: str) -> None:
    """The version's MLmodel and full checkpoint file are in the store."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    where = f"models:/{name}/{version}"
    repo = get_artifact_repository(where)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mlmodel = read_mlmodel(repo, tmp)
        except (MlflowException, OSError) as err:
            raise RegistryError(
                f"{where} has no readable MLmodel ({err}); the model was not fully logged."
            ) from None
    entry = checkpoint_entry(mlmodel, where)
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
        mlmodel = read_mlmodel(repo, tmp)
    return dict(mlmodel.metadata or {})
