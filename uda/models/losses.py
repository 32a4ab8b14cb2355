"""Decode-head losses: pixel-wise cross-entropy and the logit-constraint loss.

Both follow mmsegmentation 0.16's ``CrossEntropyLoss`` as used by MIC
(``seg/mmseg/models/losses/cross_entropy_loss.py`` + ``utils.py``
``weight_reduce_loss``): the per-pixel loss is computed with
``reduction='none'`` (ignored pixels give 0), multiplied by the optional
per-pixel weight, and averaged over ALL pixels of the batch, ignored ones
included (``avg_non_ignore=False``).

The logit-constraint loss of the distilled student comes from VBLC
(leoil/ACDC_UDA_seg ``mmseg/models/losses/logit_constraint_loss.py``): logits
are divided by their L2 norm over the class dimension plus ``eps = 1e-7``
(no temperature) and then go through the same cross-entropy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "IGNORE_INDEX",
    "LOSSES",
    "cross_entropy_loss",
    "logit_constraint_loss",
    "get_loss",
    "pixel_accuracy",
]

#: Label value that marks pixels without supervision (Cityscapes trainIds).
IGNORE_INDEX = 255

LossFn = Callable[..., torch.Tensor]


def _check_inputs(logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Validate shapes and return the label as ``(B, H, W)`` int64."""
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, C, H, W), got shape {tuple(logits.shape)}.")
    if label.dim() == 4:
        if label.shape[1] != 1:
            raise ValueError(f"label must be (B, H, W) or (B, 1, H, W), got shape {tuple(label.shape)}.")
        label = label[:, 0]
    if label.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"label shape {tuple(label.shape)} does not match "
            f"logits shape {tuple(logits.shape)} (resize the "
            f"logits to the label size first)."
        )
    if weight is not None and weight.numel() != label.numel():
        raise ValueError(
            f"seg_weight must have one value per pixel {tuple(label.shape)}, got {tuple(weight.shape)}."
        )
    return label.long()


def cross_entropy_loss(
    logits: torch.Tensor,
    label: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Pixel-wise softmax cross-entropy, mean over all pixels.

    Args:
        logits: ``(B, C, H, W)`` class scores (any float dtype; computed in
            fp32, like mmseg's ``force_fp32`` on ``losses``).
        label: ``(B, H, W)`` or ``(B, 1, H, W)`` class indices; pixels equal
            to ``ignore_index`` contribute 0.
        weight: Optional per-pixel weight with ``B*H*W`` elements (e.g. the
            pseudo-label confidence weight), multiplied in before the mean.
        ignore_index: Label value that is ignored.

    Returns:
        Scalar loss: ``sum(weight * ce) / (B * H * W)``.
    """
    label = _check_inputs(logits, label, weight)
    loss = F.cross_entropy(logits.float(), label, reduction="none", ignore_index=ignore_index)
    if weight is not None:
        loss = loss * weight.reshape(loss.shape).float()
    return loss.mean()


def logit_constraint_loss(
    logits: torch.Tensor,
    label: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Cross-entropy on L2-normalised logits (VBLC's logit constraint).

    Args:
        logits: ``(B, C, H, W)`` class scores.
        label: ``(B, H, W)`` or ``(B, 1, H, W)`` class indices.
        weight: Optional per-pixel weight (see :func:`cross_entropy_loss`).
        ignore_index: Label value that is ignored.
        eps: Added to the per-pixel L2 norm before dividing (VBLC: 1e-7).

    Returns:
        Scalar loss.
    """
    logits = logits.float()
    norms = torch.linalg.vector_norm(logits, ord=2, dim=1, keepdim=True) + eps
    return cross_entropy_loss(logits / norms, label, weight, ignore_index)


#: Loss names accepted by the model config's ``decode_head.loss``.
LOSSES: dict[str, LossFn] = {
    "ce": cross_entropy_loss,
    "logit_constraint": logit_constraint_loss,
}


def get_loss(name: str) -> LossFn:
    """Return the loss function registered under ``name``.

    Args:
        name: ``'ce'`` or ``'logit_constraint'``.

    Raises:
        ValueError: For an unknown name (lists the valid ones).
    """
    if name not in LOSSES:
        raise ValueError(f"Unknown decode-head loss {name!r}; valid: {', '.join(LOSSES)}.")
    return LOSSES[name]


@torch.no_grad()
def pixel_accuracy(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy in percent over ALL pixels, like mmseg 0.16's
    ``accuracy`` used by MIC (ignored pixels count as misses).

    Args:
        logits: ``(B, C, H, W)`` class scores.
        label: ``(B, H, W)`` or ``(B, 1, H, W)`` class indices.

    Returns:
        Scalar tensor in ``[0, 100]``.
    """
    label = _check_inputs(logits, label, None)
    correct = (logits.argmax(dim=1) == label).float().sum()
    return correct * (100.0 / label.numel())
