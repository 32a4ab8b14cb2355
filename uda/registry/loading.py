"""Back to torch: the segmentor of any model reference
(:func:`load_segmentor`), and the check that a registered version loads as
the served pyfunc model and segments an image (:func:`verify_loadable`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import mlflow
import torch.nn as nn
from mlflow.exceptions import MlflowException

from .artifacts import download_model_file, error_cause, verify_artifacts
from .errors import RegistryError
from .references import check_model_uri
from .versions import get_version, ready_logged_model, version_model_id, wait_ready

__all__ = ["load_segmentor", "verify_loadable"]


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
            (lists what exists); :class:`~uda.registry.errors.ModelNotFoundError` (also a
            ``FileNotFoundError``) when nothing by that name exists.
        CheckpointError: Bad checkpoint file.
    """
    from uda.models import build_from_checkpoint
    from uda.models.foreign import load_segmentor_file

    # One owner for every URI form and its errors (see check_model_uri).
    reference = check_model_uri(model_uri, parameter=None)
    if reference.kind == "file":
        model, _, _ = load_segmentor_file(reference.uri, foreign_cfg, architecture=architecture)
    elif reference.kind == "folder":
        model = build_from_checkpoint(Path(reference.uri) / str(reference.checkpoint))
    else:
        with tempfile.TemporaryDirectory(prefix="uda-load-") as tmp:
            try:
                local = download_model_file(reference.uri, str(reference.checkpoint), tmp)
            except (MlflowException, OSError) as err:
                raise RegistryError(
                    f"Cannot download the checkpoint of {reference.uri} "
                    f"({error_cause(err)}); the model was not fully "
                    f"logged."
                ) from None
            model = build_from_checkpoint(local)
    model = model.eval().to(device)
    return model, dict(model.model_cfg)


def verify_loadable(name: str, version: int | str) -> None:
    """Load ``models:/NAME/VERSION`` as pyfunc (on the CPU) and segment the
    example image once.

    Raises:
        RegistryError: It does not load or does not answer as a segmentor.
    """
    import pandas as pd

    from uda.serving import decode_png, example_image_png, input_frame, serving_device

    mv = wait_ready(name, str(get_version(name, version).version))
    model_id = version_model_id(mv)
    if model_id:  # an alias never names a half-logged (or deleted) model
        ready_logged_model(model_id)
    verify_artifacts(name, mv.version)
    uri = f"models:/{name}/{mv.version}"
    with serving_device("cpu"):
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
