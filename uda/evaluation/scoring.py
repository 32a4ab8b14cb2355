"""Scoring of a segmentor on a labelled split (ACDC val): mIoU, per-class IoU
and pixel accuracy, overall and per condition.

The confusion matrices (:mod:`uda.metrics`, which documents how absent classes
count) stay on the model's device; only the final 19x19 counts travel to the
host. Our mIoU equals ``mmseg.core.evaluation.mean_iou`` on the same
predictions (a test checks it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from uda import visualize
from uda.data.dataset import SegmentationDataset
from uda.data.layouts import ACDC_CONDITIONS, Sample
from uda.metrics import ConditionTable, ConfusionMatrix, PerConditionMetrics

from .inputs import Device, EvaluationError
from .prediction import model_device, predict_dataset


@dataclass
class EvaluationResult:
    """What :func:`evaluate` measured.

    Attributes:
        table: mIoU / aAcc / mAcc / per-class IoU, overall and per condition.
        metrics: The per-condition confusion matrices (on the device).
        num_images: Images evaluated.
        seconds: Wall time of loading + inference + scoring.
        overlays: ``(sample, panel)`` pairs: image | ground truth | prediction.
    """

    table: ConditionTable
    metrics: PerConditionMetrics
    num_images: int
    seconds: float
    overlays: list[tuple[Sample, np.ndarray]] = field(default_factory=list)

    @property
    def confusion(self) -> ConfusionMatrix:
        """Overall confusion matrix (sum over conditions)."""
        return self.metrics.overall()

    @property
    def images_per_second(self) -> float:
        return self.num_images / self.seconds if self.seconds > 0 else math.nan


def _conditions_of(samples: Sequence[Sample]) -> tuple[str, ...]:
    present = {s.condition for s in samples}
    ordered = [c for c in ACDC_CONDITIONS if c in present]
    return tuple(ordered + sorted(present - set(ordered)))


def evaluate(
    model: torch.nn.Module,
    dataset: SegmentationDataset,
    mode: str | None = None,
    batch_size: int = 1,
    device: Device = None,
    num_workers: int = 0,
    progress: bool = False,
    precision: str = "fp32",
    num_overlays: int = 4,
) -> EvaluationResult:
    """mIoU, per-class IoU, pixel accuracy, overall and per condition.

    Args:
        model: The segmentor (see :func:`~uda.evaluation.predict_dataset`).
        dataset: A labelled dataset with the test pipeline (ACDC val).
        mode: ``whole``/``slide``; None: the model's ``test_cfg.mode``.
        batch_size: Images per forward pass (results do not depend on it).
        device: Device for the model and the confusion matrices.
        num_workers: Data-loading processes.
        progress: Progress bar with images/s.
        precision: ``fp32`` or ``bf16``.
        num_overlays: Prediction panels to keep (first image of each
            condition first).

    Returns:
        An :class:`EvaluationResult`.

    Raises:
        EvaluationError: a sample has no label (use ``write_submission``).
    """
    unlabelled = [s for s in dataset.samples if s.label_path is None]
    if unlabelled:
        raise EvaluationError(
            f"{len(unlabelled)} of {len(dataset)} images have no label (e.g. "
            f"{unlabelled[0].image_path}); mIoU needs a labelled split (ACDC val). "
            f"For test images write a submission (split=test)."
        )
    device = torch.device(device) if device is not None else model_device(model)
    metrics = PerConditionMetrics(_conditions_of(dataset.samples), device=device)
    keep = set(visualize.panel_indices([s.condition for s in dataset.samples], num_overlays))
    overlays = []
    start = time.perf_counter()
    for item in predict_dataset(
        model, dataset, mode, batch_size, device, num_workers, progress, precision, desc="evaluate"
    ):
        metrics.update(item.prediction, item.label, item.sample.condition)
        if item.index in keep:
            overlays.append((item.sample, item.panel()))
    table = metrics.compute()  # host sync: all device work is done here
    return EvaluationResult(table, metrics, len(dataset), time.perf_counter() - start, overlays)
