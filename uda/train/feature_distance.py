"""ImageNet feature distance on thing classes (DAFormer / MIC regulariser).

Independent re-implementation of ``calc_feat_dist`` / ``masked_feat_dist`` of
lhoyer/MIC ``seg/mmseg/models/uda/dacs.py`` and ``downscale_label_ratio`` of
``seg/mmseg/utils/utils.py``, for HRDA with ``feature_scale = 0.5``:

1. A frozen copy of the ImageNet-pretrained backbone (MIC's ``imnet_model``,
   always in eval mode, no grad) encodes the source crop resized by
   ``feature_scale``; so does the student (``forward_train(...,
   return_feat=True)`` returns those features).
2. Only the last (coarsest) feature level is compared: the per-pixel L2 norm
   over channels of ``student - imagenet``.
3. The source label is pooled to the feature grid with
   :func:`downscale_label_ratio` (``scale = label width // feature width``;
   a cell takes its majority class if that class covers at least
   ``scale_min_ratio`` (0.75) of it, else 255); the distance is averaged over
   the cells of the thing classes (6, 7, 11-18).
4. Loss = ``lambda`` (0.005) × that mean.

If a batch has no thing cell, MIC's mean is NaN (with zero gradients); here
the loss is 0 (still attached to the graph, zero gradients), so logs stay
finite.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from uda.data.labels import IGNORE_INDEX, NUM_CLASSES, THING_CLASSES

from .teacher import unwrap_model

__all__ = ["downscale_label_ratio", "ImageNetFeatureDistance"]


def downscale_label_ratio(
    label: torch.Tensor,
    scale_factor: int,
    min_ratio: float,
    num_classes: int = NUM_CLASSES,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Majority-vote label pooling with a purity threshold (MIC).

    Each ``scale_factor × scale_factor`` cell (non-overlapping, remainder
    cropped) gets the class (ignore counted as an extra class) with the
    largest share, or ``ignore_index`` if that share is below ``min_ratio``
    or the winner is the ignore class. Ties go to the lowest class id.

    Args:
        label: ``(B, 1, H, W)`` integer labels.
        scale_factor: Cell size, > 1.
        min_ratio: Minimum share of the winning class.
        num_classes: Number of real classes.
        ignore_index: Ignore label value.

    Returns:
        ``(B, 1, H // scale_factor, W // scale_factor)`` int64 labels.
    """
    if scale_factor <= 1:
        raise ValueError(f"scale_factor must be > 1, got {scale_factor}.")
    if label.dim() != 4 or label.shape[1] != 1:
        raise ValueError(f"label must have shape (B, 1, H, W), got {tuple(label.shape)}.")
    label = label.long()
    substitute = num_classes  # the ignore label as class `num_classes`
    label = torch.where(label == ignore_index, torch.full_like(label, substitute), label)
    onehot = F.one_hot(label[:, 0], num_classes + 1).permute(0, 3, 1, 2)
    shares = F.avg_pool2d(onehot.float(), kernel_size=scale_factor)
    ratio, out = shares.max(dim=1, keepdim=True)
    ignore = (out == substitute) | (ratio < min_ratio)
    return torch.where(ignore, torch.full_like(out, ignore_index), out)


class ImageNetFeatureDistance(nn.Module):
    """``λ ·`` mean L2 distance to frozen ImageNet features on thing pixels.

    Args:
        imnet_backbone: The ImageNet-pretrained backbone (a frozen copy is
            kept; pass it before any training step changes it).
        feature_scale: Input scale of both feature extractors (HRDA's
            ``feature_scale``, 0.5).
        lambda_: Loss weight ``imnet_feature_dist_lambda`` (0.005).
        classes: Label classes whose cells count
            (``imnet_feature_dist_classes``; None = every cell).
        scale_min_ratio: ``imnet_feature_dist_scale_min_ratio`` (0.75).
        num_classes: Number of classes.
        ignore_index: Ignore label value.

    Example:
        >>> fdist = ImageNetFeatureDistance.from_segmentor(student)  # at start
        >>> out = student.forward_train(img, gt, return_feat=True)
        >>> loss, value = fdist(img, gt, out.pop('features'))
    """

    def __init__(
        self,
        imnet_backbone: nn.Module,
        feature_scale: float = 0.5,
        lambda_: float = 0.005,
        classes: Sequence[int] | None = THING_CLASSES,
        scale_min_ratio: float = 0.75,
        num_classes: int = NUM_CLASSES,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__()
        if lambda_ < 0:
            raise ValueError(f"imnet_feature_dist_lambda must be >= 0, got {lambda_}.")
        if not 0 <= scale_min_ratio <= 1:
            raise ValueError(f"imnet_feature_dist_scale_min_ratio must be in [0, 1], got {scale_min_ratio}.")
        if classes is not None and any(not 0 <= int(c) < num_classes for c in classes):
            raise ValueError(
                f"imnet_feature_dist_classes must be class ids in [0, {num_classes}), got {list(classes)}."
            )
        self.backbone = copy.deepcopy(imnet_backbone)
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.feature_scale = float(feature_scale)
        self.lambda_ = float(lambda_)
        self.register_buffer(
            "classes",
            torch.tensor([] if classes is None else list(classes), dtype=torch.long),
            persistent=False,
        )
        self.use_all_classes = classes is None
        self.scale_min_ratio = float(scale_min_ratio)
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)

    @classmethod
    def from_segmentor(cls, model: nn.Module, **kwargs) -> ImageNetFeatureDistance:
        """Copy ``model.backbone`` and ``model.feature_scale`` of a freshly
        built (ImageNet-initialised) segmentor; ``kwargs`` as ``__init__``."""
        model = unwrap_model(model)
        kwargs.setdefault("feature_scale", getattr(model, "feature_scale", 0.5))
        kwargs.setdefault("num_classes", getattr(model, "num_classes", NUM_CLASSES))
        return cls(model.backbone, **kwargs)

    def train(self, mode: bool = True) -> ImageNetFeatureDistance:
        """The ImageNet backbone always stays in eval mode."""
        self.training = mode
        self.backbone.eval()
        return self

    @torch.no_grad()
    def imagenet_features(self, img: torch.Tensor) -> torch.Tensor:
        """Last-level frozen features of ``img`` at ``feature_scale``."""
        if self.feature_scale != 1:
            img = F.interpolate(img, scale_factor=self.feature_scale, mode="bilinear", align_corners=False)
        return self.backbone(img)[-1].detach()

    def thing_mask(self, label: torch.Tensor, feature_hw: Sequence[int]) -> torch.Tensor:
        """``(B, h, w)`` bool mask of the feature cells of the chosen classes.

        Args:
            label: ``(B, 1, H, W)`` or ``(B, H, W)`` source labels.
            feature_hw: ``(h, w)`` of the feature map.
        """
        if label.dim() == 3:
            label = label[:, None]
        scale = label.shape[-1] // int(feature_hw[-1])
        pooled = downscale_label_ratio(
            label, scale, self.scale_min_ratio, self.num_classes, self.ignore_index
        )
        if tuple(pooled.shape[-2:]) != tuple(feature_hw):
            raise ValueError(
                f"Label {tuple(label.shape[-2:])} pooled by "
                f"{scale} gives {tuple(pooled.shape[-2:])}, not "
                f"the feature grid {tuple(feature_hw)}."
            )
        pooled = pooled[:, 0]
        if self.use_all_classes:
            return pooled != self.ignore_index
        return torch.isin(pooled, self.classes.to(pooled.device))

    def forward(
        self, img: torch.Tensor, label: torch.Tensor, student_features: torch.Tensor | Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The weighted feature-distance loss.

        Args:
            img: ``(B, 3, H, W)`` normalised source crops (full resolution).
            label: Their ``(B, 1, H, W)`` / ``(B, H, W)`` labels.
            student_features: The student's features at ``feature_scale``
                (list of levels; the last is used) or the last level.

        Returns:
            ``(loss, value)``: the loss tensor (``λ ·`` mean distance, 0 when
            no cell qualifies) and a detached copy for logging (MIC's
            ``src.loss_imnet_feat_dist``; no device sync here).
        """
        feat = student_features if isinstance(student_features, torch.Tensor) else student_features[-1]
        feat_imnet = self.imagenet_features(img)
        if feat.shape != feat_imnet.shape:
            raise ValueError(
                f"Student features {tuple(feat.shape)} and "
                f"ImageNet features {tuple(feat_imnet.shape)} "
                f"differ; are both taken at feature_scale "
                f"{self.feature_scale}?"
            )
        distance = torch.norm(feat.float() - feat_imnet.float(), p=2, dim=1)
        mask = self.thing_mask(label, feat.shape[-2:])
        count = mask.sum()
        # where(), not a product: non-finite values outside the mask must not
        # leak in (MIC indexes the selected cells).
        masked = torch.where(mask, distance, torch.zeros_like(distance))
        loss = self.lambda_ * masked.sum() / count.clamp(min=1)
        return loss, loss.detach()
