"""A logged segmentor's files in the artifact store, read through MLflow's
public artifact API: its ``MLmodel``, the checkpoint entry in it, the check
that the checkpoint file is complete, and downloading that file alone."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from .errors import RegistryError
from .versions import logged_model_id

__all__ = [
    "model_file_uri",
    "read_mlmodel",
    "checkpoint_entry",
    "verify_artifacts",
    "version_metadata",
    "download_model_file",
    "download_checkpoint",
    "error_cause",
]


def error_cause(err: Exception) -> str:
    """The last line of an MLflow error, for a one-line message."""
    # MLflow's download errors put the cause last, after a header line.
    text = getattr(err, "message", None) or str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else type(err).__name__)[:200]


def model_file_uri(model_uri: str, path: str) -> str:
    """The URI of ``path`` inside the model at ``model_uri``, as
    :func:`mlflow.artifacts.download_artifacts` takes it.

    Args:
        model_uri: ``models:/NAME/VERSION``, ``models:/m-…``,
            ``runs:/RUN_ID/PATH`` or another artifact URI of a logged model.
        path: A file or folder inside the model (``MLmodel``,
            ``artifacts``).
    """
    model_id = logged_model_id(model_uri)
    if model_id is not None:
        # MLflow's split of a models:/ URI reads models:/m-…/PATH as a
        # registered model and a stage; a logged model's own location is
        # an artifact URI like any other.
        model_uri = mlflow.get_logged_model(model_id).artifact_location
    return f"{str(model_uri).rstrip('/')}/{path}" if path else str(model_uri)


def download_model_file(model_uri: str, path: str, folder: str | os.PathLike) -> Path:
    """Download the file ``path`` of the model at ``model_uri`` into ``folder``
    (only that file). Raises MLflow's error, or OSError, when it is missing."""
    return Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=model_file_uri(model_uri, path), dst_path=str(folder)
        )
    )


def read_mlmodel(model_uri: str, folder: str | os.PathLike) -> Model:
    """The ``MLmodel`` of the model at ``model_uri``, downloaded into ``folder``."""
    return Model.load(str(download_model_file(model_uri, "MLmodel", folder)))


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
    """The version's MLmodel and full checkpoint file are in the store.

    Raises:
        RegistryError: No readable MLmodel, no checkpoint file, or one with
            fewer bytes than were logged (``checkpoint_bytes``).
    """
    where = f"models:/{name}/{version}"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mlmodel = read_mlmodel(where, tmp)
        except (MlflowException, OSError) as err:
            raise RegistryError(
                f"{where} has no readable MLmodel ({err}); the model was not fully logged."
            ) from None
    entry = checkpoint_entry(mlmodel, where)
    folder, _, file_name = entry.rpartition("/")
    listed = mlflow.artifacts.list_artifacts(artifact_uri=model_file_uri(where, folder))
    sizes = {Path(a.path).name: a.file_size for a in listed}
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
    with tempfile.TemporaryDirectory() as tmp:
        mlmodel = read_mlmodel(f"models:/{name}/{version}", tmp)
    return dict(mlmodel.metadata or {})


def download_checkpoint(name: str, version: int | str, folder: str | os.PathLike) -> Path:
    """Download only the checkpoint file (and the small MLmodel) of
    ``models:/NAME/VERSION`` into ``folder``.

    Args:
        name: Registered model name.
        version: Version number.
        folder: Where to put the files (created if needed).

    Returns:
        The checkpoint file.

    Raises:
        RegistryError: The version is not a cs2acdc-uda segmentor, or its
            files cannot be downloaded (not fully logged).
    """
    uri = f"models:/{name}/{version}"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        entry = checkpoint_entry(read_mlmodel(uri, folder), uri)
        return download_model_file(uri, entry, folder)
    except (MlflowException, OSError) as err:
        raise RegistryError(
            f"Cannot download the checkpoint of {uri} ({error_cause(err)}); the model was not fully logged."
        ) from None
