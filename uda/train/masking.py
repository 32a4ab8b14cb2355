"""MIC masked image consistency: block masks and the masked training batch.

Independent re-implementation of lhoyer/MIC
``seg/mmseg/models/utils/masking_transforms.py`` (``BlockMaskGenerator``) and
of the batch selection of
``seg/mmseg/models/uda/masking_consistency_module.py``.

Block masking: a ``(B, 1, round(H / b), round(W / b))`` grid of uniform draws,
a block is *kept* where its draw exceeds ``mask_ratio`` (so ~``1 - ratio`` of
the blocks survive), upsampled to ``(H, W)`` by nearest neighbour; masked
pixels are set to 0 in the normalised image (the dataset mean colour).

``mask_mode`` (MIC's vocabulary) decides which images are masked:

* ``separate`` / ``separateaug``: the *first source* image and the *first
  target* image of the batch (a batch of two), with the source label
  (weight 1) and the target pseudo-label (its pseudo weight). This is the
  cs2acdc setting (``mask_mode: separate``).
* ``separatesrc`` / ``separatesrcaug``: the source images with their labels.
* ``separatetrg`` / ``separatetrgaug``: the target images with their
  pseudo-labels and weights (MIC's GTA→Cityscapes setting uses
  ``separatetrgaug``).

The ``aug`` variants run the DACS colour jitter and blur
(:meth:`uda.train.augment.DACSAugmentation.augment`) on the selected images
*before* masking; the plain variants mask the clean images. MIC scales only
the fused ``decode.loss_seg`` of the masked forward by ``mask_lambda`` (the
detail loss keeps weight 1); with ``mask_lambda = 1`` nothing changes.

The target weight of the masked loss depends on the teacher
(:func:`masked_pseudo_weight`): MIC (EMA teacher) passes the *unmixed*
pseudo-label weight, as lhoyer/MIC ``dacs.py``; the distillation (frozen
teacher) passes the *ClassMix-mixed* weight (1 where source pixels were
pasted, the confidence weight elsewhere), as the original CKD
(leoil/ACDC_UDA_seg ``mmseg/models/uda/ckd_single.py``, which overwrites its
pseudo weight with the mixed one before calling the MIC module). The pseudo
*label* stays the unmixed teacher label in both.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Mapping

import torch
import torch.nn.functional as F

__all__ = [
    "MASK_MODES",
    "BlockMaskGenerator",
    "build_mask_generator",
    "mask_mode_uses_aug",
    "masked_pseudo_weight",
    "select_masked_batch",
]

#: Every ``uda.mask_mode`` MIC accepts.
MASK_MODES = ("separate", "separatesrc", "separatetrg", "separateaug", "separatesrcaug", "separatetrgaug")


class BlockMaskGenerator:
    """Random square-block masks (MIC ``BlockMaskGenerator``).

    Args:
        mask_ratio: Probability that a block is masked out (0.7).
        mask_block_size: Block side in pixels (64 at 1024 px crops).
    """

    def __init__(self, mask_ratio: float = 0.7, mask_block_size: int = 64) -> None:
        if isinstance(mask_ratio, bool) or not 0 <= mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio!r}.")
        if isinstance(mask_block_size, bool) or not isinstance(mask_block_size, int) or mask_block_size < 1:
            raise ValueError(f"mask_block_size must be a positive integer, got {mask_block_size!r}.")
        self.mask_ratio = float(mask_ratio)
        self.mask_block_size = mask_block_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mask_ratio={self.mask_ratio}, mask_block_size={self.mask_block_size})"

    @torch.no_grad()
    def generate_mask(self, imgs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A ``(B, 1, H, W)`` mask of ``imgs`` (1 = keep), in their dtype.

        Args:
            imgs: ``(B, C, H, W)`` images (only the shape/device are used).
            generator: RNG for the block draws (on its own device; the mask
                is moved to the images' device).
        """
        batch, _, height, width = imgs.shape
        # Python's round (banker's rounding), as MIC.
        grid = (
            batch,
            1,
            max(round(height / self.mask_block_size), 1),
            max(round(width / self.mask_block_size), 1),
        )
        device = generator.device if generator is not None else imgs.device
        draws = torch.rand(grid, generator=generator, device=device)
        keep = (draws > self.mask_ratio).float()
        keep = F.interpolate(keep, size=(height, width), mode="nearest")
        return keep.to(device=imgs.device, dtype=imgs.dtype)

    @torch.no_grad()
    def mask_image(self, imgs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``imgs`` with the masked-out blocks set to 0."""
        return imgs * self.generate_mask(imgs, generator)


def build_mask_generator(cfg: Mapping[str, Any] | None) -> BlockMaskGenerator | None:
    """Build from ``uda.mask_generator`` (``{type: block, mask_ratio,
    mask_block_size}``); None gives None (no masking)."""
    if cfg is None:
        return None
    cfg = dict(cfg)
    kind = cfg.pop("type", "block")
    if kind != "block":
        raise ValueError(
            f"uda.mask_generator.type must be 'block' (the only generator MIC has), got {kind!r}."
        )
    unknown = set(cfg) - {"mask_ratio", "mask_block_size"}
    if unknown:
        raise ValueError(
            f"Unknown uda.mask_generator keys {sorted(unknown)}; valid: type, mask_ratio, mask_block_size."
        )
    return BlockMaskGenerator(**cfg)


def _check_mode(mask_mode: str) -> None:
    if mask_mode not in MASK_MODES:
        raise ValueError(f"uda.mask_mode must be one of {', '.join(MASK_MODES)}, got {mask_mode!r}.")


def mask_mode_uses_aug(mask_mode: str) -> bool:
    """Whether ``mask_mode`` colour-augments the images before masking."""
    _check_mode(mask_mode)
    return mask_mode.endswith("aug")


def masked_pseudo_weight(
    teacher_mode: str, pseudo_weight: torch.Tensor, mixed_weight: torch.Tensor
) -> torch.Tensor:
    """The target weight the masked (MIC) loss trains with.

    Args:
        teacher_mode: :attr:`uda.train.trainer.UDATrainer.mode`: ``'mic'`` (EMA
            teacher) or ``'distill'`` (frozen teacher).
        pseudo_weight: ``(B, H, W)`` unmixed pseudo-label weight.
        mixed_weight: ``(B, H, W)`` ClassMix weight of the same batch
            (:attr:`uda.train.augment.MixedBatch.weight`: 1 under the mix
            mask, ``pseudo_weight`` elsewhere).

    Returns:
        ``mixed_weight`` for ``'distill'``: the original CKD
        (leoil/ACDC_UDA_seg ``ckd_single.py`` ``forward_train``) overwrites
        ``pseudo_weight[i]`` by the ``strong_transform`` of
        ``(gt_pixel_weight[i], pseudo_weight[i])`` and passes that to
        ``self.mic(...)``. ``pseudo_weight`` for ``'mic'``: lhoyer/MIC
        ``dacs.py`` passes the unmixed weight.
    """
    if teacher_mode == "distill":
        return mixed_weight
    if teacher_mode == "mic":
        return pseudo_weight
    raise ValueError(f"teacher_mode must be 'mic' or 'distill', got {teacher_mode!r}.")


def select_masked_batch(
    mask_mode: str,
    source_img: torch.Tensor,
    source_label: torch.Tensor,
    target_img: torch.Tensor,
    pseudo_label: torch.Tensor,
    pseudo_weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The images, labels and weights MIC trains on, before masking.

    Args:
        mask_mode: One of :data:`MASK_MODES`.
        source_img: ``(B, 3, H, W)`` source crops.
        source_label: ``(B, 1, H, W)`` or ``(B, H, W)`` source labels.
        target_img: ``(B, 3, H, W)`` target crops.
        pseudo_label: ``(B, H, W)`` target pseudo-labels.
        pseudo_weight: ``(B, H, W)`` their weights.

    Returns:
        ``(img, label, weight)``: images to (augment and) mask, ``(N, 1, H,
        W)`` int64 labels and a ``(N, H, W)`` weight (None = unweighted).
    """
    _check_mode(mask_mode)
    if source_label.dim() == 3:
        source_label = source_label[:, None]
    source_label = source_label.long()
    if mask_mode in ("separate", "separateaug"):
        img = torch.stack([source_img[0], target_img[0]])
        label = torch.stack([source_label[0], pseudo_label[0][None].long()])
        weight = torch.stack([torch.ones_like(pseudo_weight[0]), pseudo_weight[0]])
        return img, label, weight
    if mask_mode in ("separatesrc", "separatesrcaug"):
        return source_img, source_label, None
    return target_img, pseudo_label[:, None].long(), pseudo_weight
