"""MIC's DACS strong augmentation: ClassMix of source classes into the
target crops, then the photometric jitter and blur (:mod:`.photometric`).

Independent re-implementation of the behaviour of lhoyer/MIC
``seg/mmseg/models/utils/dacs_transforms.py`` and of the mixing step of
``seg/mmseg/models/uda/dacs.py`` (itself from vikolss/DACS), batched on
tensors, with every random draw taken from an optional ``torch.Generator``
(:mod:`.draws`) so that a step can be reproduced. What MIC does, and what
this module does:

* **ClassMix** (:func:`get_class_masks`): the candidate classes are the
  distinct values of the *whole source batch* (DACS/MIC call
  ``torch.unique(labels)`` on the batch, not on each image), including the
  ignore value 255; per image, ``ceil(n / 2)`` of them are drawn without
  replacement and the image's pixels of those classes form its mask. Mask = 1
  takes the source pixel, 0 the target pixel (:func:`one_mix`). Pixels taken
  from the source get loss weight 1, the others keep their pseudo-label
  weight (:func:`~uda.train.teacher.pseudo_label_and_weight`).
* **Colour jitter**: applied when ``u > color_jitter_probability`` for
  ``u ~ U(0, 1)`` drawn once per step, i.e. with probability ``1 - p`` (0.8
  for ``p = 0.2``).
* **Gaussian blur**: applied when ``u > 0.5`` (one draw per step).

Per-image random factors (jitter factors and order, blur sigma) are drawn for
each image, as MIC does for the mixed batch (it transforms image by image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple
from collections.abc import Mapping, Sequence

import torch

from .draws import randperm, uniform
from .photometric import BLUR_SIGMA_RANGE, color_jitter, gaussian_blur

__all__ = [
    "get_class_masks",
    "generate_class_mask",
    "one_mix",
    "StrongAugParams",
    "DACSAugmentation",
    "MixedBatch",
]


def _labels_b1hw(labels: torch.Tensor, name: str = "labels") -> torch.Tensor:
    if labels.dim() == 3:
        return labels[:, None]
    if labels.dim() == 4 and labels.shape[1] == 1:
        return labels
    raise ValueError(f"{name} must have shape (B, H, W) or (B, 1, H, W), got {tuple(labels.shape)}.")


# ----------------------------------------------------------------- ClassMix
def generate_class_mask(label: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Binary mask of the pixels of ``label`` whose value is in ``classes``.

    Args:
        label: ``(1, H, W)`` or ``(H, W)`` integer labels.
        classes: 1-D tensor of class values.

    Returns:
        A ``(1, H, W)`` int64 mask (1 = pixel of a chosen class).
    """
    if label.dim() == 2:
        label = label[None]
    return torch.isin(label, classes.to(label.device)).long()


def get_class_masks(labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """ClassMix masks, one per source image (DACS/MIC ``get_class_masks``).

    The candidates are the distinct values of the whole batch (ignore 255
    included, exactly as MIC); for each image ``ceil(n / 2)`` of the ``n``
    candidates are drawn without replacement.

    Args:
        labels: Source labels, ``(B, 1, H, W)`` or ``(B, H, W)``.
        generator: RNG for the class draws.

    Returns:
        ``(B, 1, H, W)`` int64 masks; 1 = take the source pixel.
    """
    labels = _labels_b1hw(labels)
    classes = torch.unique(labels)
    num = classes.numel()
    masks = []
    for label in labels:
        choice = randperm(num, generator)[: (num + 1) // 2]
        masks.append(generate_class_mask(label, classes[choice.to(classes.device)]))
    return torch.stack(masks)


def one_mix(mask: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Paste ``source`` into ``target`` where ``mask`` is 1.

    Same values as DACS' ``mask * source + (1 - mask) * target`` for a binary
    mask, for images, labels and weight maps alike (dtype of ``source``).

    Args:
        mask: ``(B, 1, H, W)`` binary mask.
        source: ``(B, C, H, W)`` or ``(B, H, W)``.
        target: Same shape as ``source``.
    """
    if source.shape != target.shape:
        raise ValueError(
            f"source and target must have the same shape, got "
            f"{tuple(source.shape)} and {tuple(target.shape)}."
        )
    keep = mask.bool()
    if source.dim() == 3:
        keep = keep[:, 0]
    return torch.where(keep, source, target.to(source.dtype))


# ------------------------------------------------------- strong transform
@dataclass(frozen=True)
class StrongAugParams:
    """The per-step decisions of MIC's ``strong_parameters``.

    Attributes:
        color_jitter: Jitter this step (``u > color_jitter_probability``).
        blur: Blur this step (``u > 0.5`` with blur enabled).
    """

    color_jitter: bool
    blur: bool


class MixedBatch(NamedTuple):
    """Output of :meth:`DACSAugmentation.mix`.

    Attributes:
        img: ``(B, 3, H, W)`` mixed, augmented images.
        label: ``(B, 1, H, W)`` int64 labels: source labels under the mask,
            pseudo-labels elsewhere.
        weight: ``(B, H, W)`` per-pixel loss weight: 1 under the mask, the
            pseudo-label weight elsewhere.
        mask: ``(B, 1, H, W)`` ClassMix masks (1 = source).
    """

    img: torch.Tensor
    label: torch.Tensor
    weight: torch.Tensor
    mask: torch.Tensor


class DACSAugmentation:
    """MIC's DACS strong augmentation: ClassMix, colour jitter, blur.

    Args:
        mean: Normalisation mean (``img_norm_cfg.mean``, 0-255 scale).
        std: Normalisation std (``img_norm_cfg.std``).
        color_jitter_strength: ``s`` of the jitter (0.2).
        color_jitter_probability: MIC's ``color_jitter_p``: jitter when a
            uniform draw *exceeds* it (so 0.2 jitters 80 % of the steps).
        blur: Enable the Gaussian blur (applied half of the steps).

    Example:
        >>> aug = DACSAugmentation.from_config(cfg)
        >>> gen = torch.Generator().manual_seed(0)
        >>> mixed = aug.mix(src_img, src_lbl, trg_img, plabel, pweight, gen)
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        color_jitter_strength: float = 0.2,
        color_jitter_probability: float = 0.2,
        blur: bool = True,
    ) -> None:
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {mean} and {std}.")
        if not 0 <= color_jitter_probability <= 1:
            raise ValueError(f"color_jitter_probability must be in [0, 1], got {color_jitter_probability}.")
        if not 0 <= color_jitter_strength <= 0.5:
            raise ValueError(f"color_jitter_strength must be in [0, 0.5], got {color_jitter_strength}.")
        self.mean = [float(v) for v in mean]
        self.std = [float(v) for v in std]
        self.color_jitter_strength = float(color_jitter_strength)
        self.color_jitter_probability = float(color_jitter_probability)
        self.blur = bool(blur)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> DACSAugmentation:
        """Build from a full preset (``uda`` and ``data.img_norm_cfg``)."""
        uda, norm = cfg["uda"], cfg["data"]["img_norm_cfg"]
        if uda.get("mix", "class") != "class":
            raise ValueError(
                f"uda.mix must be 'class' (ClassMix, the only mode MIC supports), got {uda['mix']!r}."
            )
        return cls(
            norm["mean"],
            norm["std"],
            uda["color_jitter_strength"],
            uda["color_jitter_probability"],
            uda["blur"],
        )

    def sample_params(self, generator: torch.Generator | None = None) -> StrongAugParams:
        """Draw this step's jitter/blur decisions (shared by the batch)."""
        jitter_u, blur_u = uniform(0, 1, generator, 2).tolist()
        return StrongAugParams(
            color_jitter=jitter_u > self.color_jitter_probability, blur=self.blur and blur_u > 0.5
        )

    def augment(
        self,
        img: torch.Tensor,
        params: StrongAugParams | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Colour jitter then blur, as decided by ``params`` (drawn if None).

        Labels are never touched by these photometric steps. Used on the
        mixed batch and, for the ``*aug`` MIC mask modes, on the images to be
        masked.

        Args:
            img: ``(B, 3, H, W)`` normalised images.
            params: Decisions of this step.
            generator: RNG for the decisions (if drawn) and the factors.
        """
        if params is None:
            params = self.sample_params(generator)
        out = img
        if params.color_jitter:
            out = color_jitter(out, self.mean, self.std, self.color_jitter_strength, generator).to(img.dtype)
        if params.blur:
            sigmas = uniform(*BLUR_SIGMA_RANGE, generator, img.shape[0])
            out = torch.cat([gaussian_blur(out[i : i + 1], float(sigma)) for i, sigma in enumerate(sigmas)])
        return out

    def mix(
        self,
        source_img: torch.Tensor,
        source_label: torch.Tensor,
        target_img: torch.Tensor,
        pseudo_label: torch.Tensor,
        pseudo_weight: torch.Tensor,
        generator: torch.Generator | None = None,
        params: StrongAugParams | None = None,
    ) -> MixedBatch:
        """ClassMix source into target, then jitter and blur (DACS step).

        Args:
            source_img: ``(B, 3, H, W)`` normalised source crops.
            source_label: ``(B, 1, H, W)`` or ``(B, H, W)`` source labels.
            target_img: ``(B, 3, H, W)`` normalised target crops.
            pseudo_label: ``(B, H, W)`` teacher labels of the target crops.
            pseudo_weight: ``(B, H, W)`` their per-pixel weight.
            generator: RNG for masks, decisions and factors.
            params: Jitter/blur decisions; drawn from ``generator`` if None.

        Returns:
            A :class:`MixedBatch`.
        """
        if source_img.shape != target_img.shape:
            raise ValueError(
                f"source and target images must have the same "
                f"shape, got {tuple(source_img.shape)} and "
                f"{tuple(target_img.shape)}."
            )
        source_label = _labels_b1hw(source_label, "source_label")
        pseudo_label = _labels_b1hw(pseudo_label, "pseudo_label")
        if pseudo_weight.shape != pseudo_label[:, 0].shape:
            raise ValueError(
                f"pseudo_weight must have shape (B, H, W) = "
                f"{tuple(pseudo_label[:, 0].shape)}, got "
                f"{tuple(pseudo_weight.shape)}."
            )
        if params is None:
            params = self.sample_params(generator)
        masks = get_class_masks(source_label, generator)
        img = one_mix(masks, source_img, target_img)
        label = one_mix(masks, source_label.long(), pseudo_label.long())
        weight = one_mix(masks, torch.ones_like(pseudo_weight), pseudo_weight)
        img = self.augment(img, params, generator)
        return MixedBatch(img, label, weight, masks)
