"""What an evaluation request may ask for: split, mode and precision checks,
the ACDC dataset with MIC's test pipeline, and the model behind a URI.

Every wrong request is an :class:`EvaluationError`, a :class:`~uda.errors.UserError`
(one line for the user, no traceback).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from uda.data.dataset import SegmentationDataset, acdc_dataset
from uda.errors import UserError
from uda.precision import PRECISIONS

#: ACDC splits the evaluate entry point handles.
SPLITS = ("val", "test")
#: Inference modes of :meth:`uda.models.HRDASegmentor.inference`.
MODES = ("whole", "slide")

PathLike = str | os.PathLike
Device = str | torch.device | None


class EvaluationError(UserError, ValueError):
    """A wrong evaluation request (split, mode, model path, unlabelled data)."""


def check_split(split: str) -> str:
    """``split`` if it is ``val`` or ``test``, else an :class:`EvaluationError`."""
    if split not in SPLITS:
        raise EvaluationError(
            f"split must be val (mIoU against the labels) or test (submission PNGs), got {split!r}."
        )
    return split


def check_mode(mode: str | None) -> str | None:
    """``whole``/``slide``, or None (``''`` too) for the model's ``test_cfg.mode``."""
    if mode in (None, ""):
        return None
    if mode not in MODES:
        raise EvaluationError(
            f"mode must be whole or slide (or '' for the model's test_cfg.mode), got {mode!r}."
        )
    return mode


def check_precision(precision: str) -> str:
    """``fp32`` or ``bf16`` (autocast; for GPUs), else an :class:`EvaluationError`."""
    if precision not in PRECISIONS:
        raise EvaluationError(
            f"precision must be fp32 or bf16 (autocast, for GPUs with bf16 support), got {precision!r}."
        )
    return precision


def build_dataset(
    root: PathLike,
    split: str = "val",
    img_scale: Sequence[int] | None = (1920, 1080),
    conditions: Iterable[str] | None = None,
    backend: str = "auto",
) -> SegmentationDataset:
    """The ACDC ``split`` with MIC's test pipeline (resize keeping the ratio).

    Args:
        root: ACDC root, as downloaded (nested) or flattened as in MIC's README.
        split: ``val`` (labelled) or ``test``.
        img_scale: Test resize target (width, height): the preset's
            ``data.target.img_scale``; None keeps the original size.
        conditions: Subset of fog/night/rain/snow; None keeps all present.
        backend: Test pipeline backend ('auto', 'mmseg', 'numpy').

    Raises:
        EvaluationError: ``split`` is not val/test.
        DatasetLayoutError: the root or split is missing (message shows the
            expected layout).
    """
    check_split(split)
    return acdc_dataset(
        root,
        split,
        train=False,
        conditions=conditions,
        img_scale=tuple(img_scale) if img_scale else None,
        backend=backend,
    )


def load_model(
    model_uri: PathLike,
    device: Device = "cpu",
    foreign_cfg: Mapping[str, Any] | None = None,
    architecture: str = "",
) -> tuple[torch.nn.Module, dict]:
    """:func:`uda.registry.load_segmentor`: every URI form, one clear error.

    Args:
        model_uri: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
            ``models:/NAME/latest``, ``models:/m-<logged model id>``,
            ``runs:/RUN_ID/PATH``, a logged-model folder or a checkpoint file.
        device: Where to put the model.
        foreign_cfg, architecture: The architecture of a foreign checkpoint
            file (a preset's ``<role>.model``) and where it came from.

    Returns:
        ``(model, model_cfg)``, the model in eval mode.

    Raises:
        RegistryError (``ModelNotFoundError`` for nothing by that name) /
        CheckpointError: unknown model, alias, version, run or logged model
        (the message lists what exists), or a bad checkpoint.
    """
    # Here, not at the top: uda.registry needs mlflow, the rest of the evaluation does not.
    from uda.registry import MODEL_URI_FORMS, load_segmentor

    try:
        return load_segmentor(
            model_uri, device=str(device), foreign_cfg=foreign_cfg, architecture=architecture
        )
    except FileNotFoundError as err:
        if isinstance(err, UserError):
            raise
        raise EvaluationError(f"{err} Pass {MODEL_URI_FORMS}.") from None
