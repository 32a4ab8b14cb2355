"""Semantic-segmentation metrics: a confusion matrix on the device → IoU.

The numbers follow mmsegmentation 0.30 (``mmseg.core.evaluation.metrics``
``total_area_to_metrics`` and ``CustomDataset.evaluate``), which is what MIC,
HRDA and the original distillation report:

* pixels whose ground truth equals ``ignore_index`` are dropped before counting;
* ``IoU[c] = intersection / union`` with
  ``union = gt_area + pred_area - intersection``;
* ``Acc[c] = intersection / gt_area``;
* ``aAcc = sum(intersection) / sum(gt_area)`` (pixel accuracy);
* ``mIoU`` and ``mAcc`` are ``nanmean`` over classes.

**Absent classes.** A class with ``union == 0`` (no ground-truth pixel and
no predicted pixel) gets ``IoU = NaN`` and is left out of the mean. A class
with no ground-truth pixel but *some* predicted pixels has a positive union
and therefore ``IoU = 0``: it counts against the mean (false positives are
punished). ``Acc[c]`` is NaN whenever the class has no ground-truth pixel.
This is exactly mmseg's 0/0 → NaN behaviour, which the tests check against
``mmseg.core.evaluation.mean_iou``.

One deliberate difference: mmseg silently drops label values outside
``[0, num_classes)`` (``torch.histc`` range), whereas :meth:`ConfusionMatrix.update`
raises a ``ValueError`` for them, because they are always a mistake (e.g.
Cityscapes labelIds passed where trainIds are expected).

The class ids counted come from :func:`logits_to_labels` (resize to the label
size, softmax, argmax), in evaluation, training's validation and soup scoring alike.

The module is pure torch + numpy so that training, evaluation and tests can
use it without mmcv, mmseg or mlflow. It stays one file (~460 lines): the
per-condition table is the confusion matrix kept once per ACDC condition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from uda.data.labels import CLASSES, IGNORE_INDEX, NUM_CLASSES
from uda.data.layouts import ACDC_CONDITIONS

__all__ = ["logits_to_labels", "ConfusionMatrix", "SegMetrics", "ConditionTable", "PerConditionMetrics"]

ArrayLike = torch.Tensor | np.ndarray


def _nanmean(values: torch.Tensor) -> float:
    """Mean over the non-NaN entries; NaN (no warning) when all are NaN."""
    valid = values[~torch.isnan(values)]
    return float(valid.mean()) if valid.numel() else math.nan


def logits_to_labels(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Class ids at ``size`` from logits, as mmseg 0.30 scores a prediction.

    ``EncoderDecoder.inference(rescale=True)`` + ``simple_test``: bilinear
    resize (``align_corners=False``, in fp32) to the label's size, softmax,
    argmax. The softmax keeps the classes' order, but its rounding decides
    near-ties, so it stays: predictions equal mmseg's pixel for pixel, in the
    evaluation, the training's validation and soup scoring alike.

    Args:
        logits: ``(B, C, h, w)`` scores, any float dtype; no gradient flows back.
        size: ``(H, W)`` of the labels (logits of that size are not resized).

    Returns:
        ``(B, H, W)`` int64 class ids on the logits' device.
    """
    logits = logits.detach().float()
    size = tuple(int(s) for s in size)
    if tuple(logits.shape[-2:]) != size:
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return F.softmax(logits, dim=1).argmax(dim=1)


@dataclass(frozen=True)
class SegMetrics:
    """Metrics of one confusion matrix (fractions in [0, 1], NaN = undefined).

    Attributes:
        miou: Mean IoU over classes with a non-empty union (mmseg ``mIoU``).
        pixel_accuracy: Correct / all non-ignored pixels (mmseg ``aAcc``).
        mean_accuracy: Mean per-class accuracy over classes present in the
            ground truth (mmseg ``mAcc``).
        iou: Per-class IoU, in class order.
        accuracy: Per-class accuracy (recall), in class order.
        num_pixels: Number of non-ignored pixels counted.
    """

    miou: float
    pixel_accuracy: float
    mean_accuracy: float
    iou: list[float]
    accuracy: list[float]
    num_pixels: int


class ConfusionMatrix:
    """Accumulates a ``num_classes × num_classes`` confusion matrix on a device.

    Rows are ground-truth classes, columns predicted classes; counts are
    int64, so adding matrices (other processes, other conditions) is exact
    and order-independent.

    Args:
        num_classes: Number of classes (19 for Cityscapes/ACDC).
        ignore_index: Ground-truth value of pixels that are not evaluated.
        device: Where the matrix lives; put it where the predictions are, so
            that ``update`` needs no host transfer.

    Example:
        >>> cm = ConfusionMatrix(num_classes=3)
        >>> cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2]))
        >>> cm.iou().tolist()
        [1.0, 0.5, 0.0]
    """

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        ignore_index: int = IGNORE_INDEX,
        device: str | torch.device | None = None,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index={ignore_index} is a valid class id for "
                f"num_classes={num_classes}; choose a value outside "
                f"[0, {num_classes}) (255 for Cityscapes/ACDC)"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def reset(self) -> None:
        """Sets all counts to zero."""
        self.matrix.zero_()

    @torch.no_grad()
    def update(self, pred: ArrayLike, gt: ArrayLike) -> None:
        """Adds a batch of label maps.

        Args:
            pred: Predicted class ids (any integer dtype), any shape, e.g.
                ``logits.argmax(1)`` of shape (B, H, W).
            gt: Ground-truth class ids of the same shape; pixels equal to
                ``ignore_index`` are skipped.

        Raises:
            ValueError: if the shapes differ, a map is floating point (pass
                ``argmax`` class ids, not logits), or a value lies outside
                ``[0, num_classes)`` (other than ``ignore_index`` in ``gt``).
        """
        pred = torch.as_tensor(pred, device=self.device)
        gt = torch.as_tensor(gt, device=self.device)
        if pred.shape != gt.shape:
            raise ValueError(
                f"prediction shape {tuple(pred.shape)} differs from ground "
                f"truth shape {tuple(gt.shape)}; resize the prediction to the "
                "label size before updating the metric"
            )
        for name, tensor in (("prediction", pred), ("ground truth", gt)):
            if tensor.is_floating_point() or tensor.is_complex():
                raise ValueError(
                    f"{name} has dtype {tensor.dtype}; pass class ids (e.g. logits.argmax(dim=1)), not scores"
                )
        # int64 before any arithmetic: uint8 maps would overflow gt * C.
        pred = pred.reshape(-1).long()
        gt = gt.reshape(-1).long()
        valid = gt != self.ignore_index
        pred, gt = pred[valid], gt[valid]
        if pred.numel() == 0:
            return
        bad = (pred < 0) | (pred >= self.num_classes) | (gt < 0) | (gt >= self.num_classes)
        if bool(bad.any()):
            raise ValueError(
                f"label values must lie in [0, {self.num_classes}) or equal "
                f"ignore_index={self.ignore_index} (ground truth only); got "
                f"prediction values in [{int(pred.min())}, {int(pred.max())}] "
                f"and ground-truth values in [{int(gt.min())}, "
                f"{int(gt.max())}]. Are these trainIds?"
            )
        counts = torch.bincount(gt * self.num_classes + pred, minlength=self.num_classes**2)
        self.matrix += counts.view(self.num_classes, self.num_classes)

    def _check_compatible(self, other: ConfusionMatrix) -> None:
        if not isinstance(other, ConfusionMatrix):
            raise TypeError(f"cannot merge a ConfusionMatrix with {type(other).__name__}")
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                "cannot merge confusion matrices with different settings: "
                f"num_classes={self.num_classes}/ignore_index="
                f"{self.ignore_index} vs num_classes={other.num_classes}/"
                f"ignore_index={other.ignore_index}"
            )

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Adds the counts of ``other`` into this matrix (in place); returns self."""
        self._check_compatible(other)
        self.matrix += other.matrix.to(self.device)
        return self

    def __iadd__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        return self.merge(other)

    def __add__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        return self.clone().merge(other)

    def clone(self) -> ConfusionMatrix:
        """An independent copy (same device)."""
        copy = ConfusionMatrix(self.num_classes, self.ignore_index, self.device)
        copy.matrix.copy_(self.matrix)
        return copy

    def all_reduce(self) -> ConfusionMatrix:
        """Sums the matrix over all processes of the default process group.

        A no-op when ``torch.distributed`` is not initialised, so the same
        evaluation code runs with and without ``torchrun``. With the NCCL
        backend the matrix must be on the process's GPU.
        """
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)
        return self

    # --- results (computed in float64 on the host, like mmseg) ---------------
    def _areas(self):
        matrix = self.matrix.detach().cpu().double()
        intersection = matrix.diagonal()
        gt_area = matrix.sum(dim=1)
        pred_area = matrix.sum(dim=0)
        union = gt_area + pred_area - intersection
        return intersection, union, gt_area

    def iou(self) -> torch.Tensor:
        """Per-class IoU (float64, CPU); NaN where the union is empty."""
        intersection, union, _ = self._areas()
        return intersection / union  # 0/0 -> NaN, as in mmseg

    def accuracy(self) -> torch.Tensor:
        """Per-class accuracy (float64, CPU); NaN where the class has no GT pixel."""
        intersection, _, gt_area = self._areas()
        return intersection / gt_area

    def miou(self) -> float:
        """Mean IoU over classes with a non-empty union (NaN if none)."""
        return _nanmean(self.iou())

    def mean_accuracy(self) -> float:
        """Mean per-class accuracy over classes present in the ground truth."""
        return _nanmean(self.accuracy())

    def pixel_accuracy(self) -> float:
        """Correctly classified / all counted pixels (NaN if none counted)."""
        intersection, _, gt_area = self._areas()
        total = float(gt_area.sum())
        return float(intersection.sum()) / total if total else math.nan

    def summary(self) -> SegMetrics:
        """All metrics at once."""
        return SegMetrics(
            miou=self.miou(),
            pixel_accuracy=self.pixel_accuracy(),
            mean_accuracy=self.mean_accuracy(),
            iou=self.iou().tolist(),
            accuracy=self.accuracy().tolist(),
            num_pixels=int(self.matrix.sum()),
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_classes={self.num_classes}, "
            f"ignore_index={self.ignore_index}, device={self.device}, "
            f"pixels={int(self.matrix.sum())})"
        )


@dataclass(frozen=True)
class ConditionTable:
    """Evaluation result over all images and per condition.

    Attributes:
        overall: Metrics of all conditions together (the ACDC benchmark number).
        per_condition: Metrics of each condition, in the order given to
            :class:`PerConditionMetrics`.
        class_names: Names of the classes, in class-id order.
    """

    overall: SegMetrics
    per_condition: dict[str, SegMetrics]
    class_names: Sequence[str] = field(default=CLASSES)

    @property
    def miou(self) -> float:
        return self.overall.miou

    @property
    def per_condition_miou(self) -> dict[str, float]:
        return {name: m.miou for name, m in self.per_condition.items()}

    def per_class_iou(self) -> dict[str, float]:
        """Overall IoU of each class, keyed by class name."""
        return dict(zip(self.class_names, self.overall.iou))

    def to_flat_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat ``name → value`` mapping, ready for ``mlflow.log_metrics``.

        Keys: ``mIoU``, ``aAcc``, ``mAcc``, ``IoU.<class>``,
        ``mIoU.<condition>``, ``aAcc.<condition>`` (class names with spaces
        become underscores). NaN entries (undefined metrics) are left out,
        because a tracking store cannot plot them meaningfully.
        """
        values: dict[str, float] = {
            "mIoU": self.overall.miou,
            "aAcc": self.overall.pixel_accuracy,
            "mAcc": self.overall.mean_accuracy,
        }
        for name, iou in self.per_class_iou().items():
            values[f"IoU.{name.replace(' ', '_')}"] = iou
        for condition, metrics in self.per_condition.items():
            values[f"mIoU.{condition}"] = metrics.miou
            values[f"aAcc.{condition}"] = metrics.pixel_accuracy
        return {prefix + key: float(value) for key, value in values.items() if not math.isnan(value)}

    def rows(self) -> list[dict[str, object]]:
        """One row per class (name, overall IoU and Acc, IoU per condition).

        Handy for ``mlflow.log_table`` or a pandas DataFrame; values are
        fractions, NaN where undefined.
        """
        table = []
        for class_id, name in enumerate(self.class_names):
            row: dict[str, object] = {
                "class": name,
                "IoU": self.overall.iou[class_id],
                "Acc": self.overall.accuracy[class_id],
            }
            for condition, metrics in self.per_condition.items():
                row[f"IoU.{condition}"] = metrics.iou[class_id]
            table.append(row)
        return table


class PerConditionMetrics:
    """One :class:`ConfusionMatrix` per condition; the overall one is their sum.

    Args:
        conditions: Condition names (ACDC: fog, night, rain, snow).
        num_classes: Number of classes.
        ignore_index: Ground-truth value that is not evaluated.
        device: Device of the matrices.
        class_names: Class names for the result table (default: the 19
            Cityscapes classes when ``num_classes`` is 19, else the ids).

    Example:
        >>> metrics = PerConditionMetrics()
        >>> metrics.update(logits.argmax(1), labels, ['fog', 'night'])
        >>> table = metrics.compute()
        >>> table.miou, table.per_condition_miou['night']
    """

    def __init__(
        self,
        conditions: Sequence[str] = ACDC_CONDITIONS,
        num_classes: int = NUM_CLASSES,
        ignore_index: int = IGNORE_INDEX,
        device: str | torch.device | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        conditions = tuple(conditions)
        if not conditions or len(set(conditions)) != len(conditions):
            raise ValueError(f"conditions must be non-empty and unique, got {conditions}")
        if class_names is None:
            class_names = (
                CLASSES if num_classes == len(CLASSES) else tuple(str(i) for i in range(num_classes))
            )
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names given for num_classes={num_classes}")
        self.class_names = tuple(class_names)
        self.matrices: dict[str, ConfusionMatrix] = {
            name: ConfusionMatrix(num_classes, ignore_index, device) for name in conditions
        }

    @property
    def conditions(self) -> tuple:
        return tuple(self.matrices)

    def _matrix_for(self, condition: str) -> ConfusionMatrix:
        try:
            return self.matrices[condition]
        except KeyError:
            raise ValueError(
                f"unknown condition {condition!r}; expected one of {list(self.matrices)}"
            ) from None

    def update(self, pred: ArrayLike, gt: ArrayLike, conditions: str | Sequence[str]) -> None:
        """Adds a batch.

        Args:
            pred: Predicted class ids, shape (B, H, W) or (H, W).
            gt: Ground truth of the same shape.
            conditions: One condition for the whole batch, or one per image
                (length B).
        """
        if isinstance(conditions, str):
            self._matrix_for(conditions).update(pred, gt)
            return
        conditions = list(conditions)
        if len(conditions) != len(pred) or len(pred) != len(gt):
            raise ValueError(
                f"got {len(conditions)} conditions for a batch of "
                f"{len(pred)} predictions and {len(gt)} labels; give one "
                "condition per image or a single string"
            )
        for condition, pred_map, gt_map in zip(conditions, pred, gt):
            self._matrix_for(condition).update(pred_map, gt_map)

    def overall(self) -> ConfusionMatrix:
        """Sum of all condition matrices (a new object)."""
        matrices = iter(self.matrices.values())
        total = next(matrices).clone()
        for matrix in matrices:
            total.merge(matrix)
        return total

    def merge(self, other: PerConditionMetrics) -> PerConditionMetrics:
        """Adds another accumulator's counts (same conditions); returns self."""
        if other.conditions != self.conditions:
            raise ValueError(f"cannot merge conditions {other.conditions} into {self.conditions}")
        for name, matrix in self.matrices.items():
            matrix.merge(other.matrices[name])
        return self

    def all_reduce(self) -> PerConditionMetrics:
        """Sums every condition matrix over processes (no-op if not distributed)."""
        for matrix in self.matrices.values():
            matrix.all_reduce()
        return self

    def reset(self) -> None:
        for matrix in self.matrices.values():
            matrix.reset()

    def compute(self) -> ConditionTable:
        """Overall and per-condition metrics."""
        return ConditionTable(
            overall=self.overall().summary(),
            per_condition={name: matrix.summary() for name, matrix in self.matrices.items()},
            class_names=self.class_names,
        )
