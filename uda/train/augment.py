"""DACS augmentations of MIC's self-training: ClassMix, colour jitter, blur,
and the confidence-weighted pseudo-labels.

Independent re-implementation of the behaviour of lhoyer/MIC
``seg/mmseg/models/utils/dacs_transforms.py`` and of the pseudo-label part of
``seg/mmseg/models/uda/dacs.py`` (itself from vikolss/DACS), batched on
tensors, with every random draw taken from an optional ``torch.Generator`` so
that a step can be reproduced. What MIC does, and what this module does:

* **ClassMix** (:func:`get_class_masks`): the candidate classes are the
  distinct values of the *whole source batch* (DACS/MIC call
  ``torch.unique(labels)`` on the batch, not on each image), including the
  ignore value 255; per image, ``ceil(n / 2)`` of them are drawn without
  replacement and the image's pixels of those classes form its mask. Mask = 1
  takes the source pixel, 0 the target pixel (:func:`one_mix`).
* **Colour jitter** (:func:`color_jitter`): kornia 0.5.8's
  ``ColorJitter(brightness=s, contrast=s, saturation=s, hue=s)`` (the version
  MIC pins) on images de-normalised to [0, 1], then re-normalised. Its
  semantics differ from torchvision's: brightness *adds* ``U(-s, s)``,
  contrast *multiplies* by ``U(1-s, 1+s)``, saturation multiplies the HSV
  saturation by ``U(1-s, 1+s)``, hue shifts by ``U(-s, s)`` turns; each step
  clamps to [0, 1]; the four run in a random order. MIC applies it when
  ``u > color_jitter_probability`` for ``u ~ U(0, 1)`` drawn once per step,
  i.e. with probability ``1 - p`` (0.8 for ``p = 0.2``).
* **Gaussian blur** (:func:`gaussian_blur`): applied when ``u > 0.5`` (one draw
  per step); sigma ``U(0.15, 1.15)``, kernel ``≈ 0.1 ×`` the image side and
  odd (:func:`blur_kernel_size`), reflect padding (kornia ``GaussianBlur2d``).
* **Pseudo-label weight** (:func:`pseudo_label_and_weight`): the fraction of
  pixels whose max-softmax is ``>= pseudo_threshold``, over the *whole batch*
  in MIC (one number for all images), broadcast to a per-pixel map. After
  mixing, pixels taken from the source get weight 1.

Per-image random factors (jitter factors and order, blur sigma) are drawn for
each image, as MIC does for the mixed batch (it transforms image by image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "get_class_masks",
    "generate_class_mask",
    "one_mix",
    "denorm",
    "renorm",
    "rgb_to_hsv",
    "hsv_to_rgb",
    "color_jitter",
    "blur_kernel_size",
    "gaussian_blur",
    "StrongAugParams",
    "DACSAugmentation",
    "MixedBatch",
    "pseudo_label_and_weight",
]

#: Blur sigma range of MIC's ``gaussian_blur`` (dacs_transforms.py).
BLUR_SIGMA_RANGE = (0.15, 1.15)
#: kornia's rgb_to_hsv epsilon in the saturation denominator.
_HSV_EPS = 1e-6


def _rng_device(generator: torch.Generator | None) -> torch.device:
    """Where ``generator`` draws (CPU when it is None: the global RNG)."""
    return generator.device if generator is not None else torch.device("cpu")


def _uniform(low: float, high: float, generator: torch.Generator | None, size: int = 1) -> torch.Tensor:
    """``size`` draws of ``U(low, high)`` as a CPU float64 tensor."""
    draws = torch.rand(size, generator=generator, dtype=torch.float64, device=_rng_device(generator))
    return low + (high - low) * draws.cpu()


def _randperm(num: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randperm(num, generator=generator, device=_rng_device(generator)).cpu()


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
        choice = _randperm(num, generator)[: (num + 1) // 2]
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


# ------------------------------------------------------------ colour jitter
def _mean_std(values: Any, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32, device=like.device).view(1, -1, 1, 1)


def denorm(img: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised image -> [0, 1] RGB (MIC ``denorm``: (x·std+mean)/255)."""
    return (img.float() * _mean_std(std, img) + _mean_std(mean, img)) / 255.0


def renorm(img: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[0, 1] RGB -> normalised image (MIC ``renorm_``)."""
    return (img * 255.0 - _mean_std(mean, img)) / _mean_std(std, img)


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] -> HSV with hue in radians [0, 2π) (kornia's convention).

    Args:
        rgb: ``(..., 3, H, W)``.
    """
    maxc, max_idx = rgb.max(dim=-3)  # first maximum wins: R, then G, then B
    minc = rgb.min(dim=-3)[0]
    delta = maxc - minc
    sat = delta / (maxc + _HSV_EPS)
    safe_delta = torch.where(delta == 0, torch.ones_like(delta), delta)
    dist = maxc.unsqueeze(-3) - rgb  # distance of each channel to the max
    rc, gc, bc = dist.unbind(-3)
    candidates = torch.stack([bc - gc, 2.0 * safe_delta + rc - bc, 4.0 * safe_delta + gc - rc], dim=-3)
    hue = candidates.gather(-3, max_idx.unsqueeze(-3)).squeeze(-3)
    hue = ((hue / safe_delta) / 6.0) % 1.0
    return torch.stack([2 * math.pi * hue, sat, maxc], dim=-3)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """HSV (hue in radians) -> RGB, inverse of :func:`rgb_to_hsv`."""
    hue, sat, val = hsv.unbind(-3)
    hue6 = (hue / (2 * math.pi)) * 6
    sector = torch.floor(hue6) % 6
    frac = (hue6 % 6) - sector
    p = val * (1 - sat)
    q = val * (1 - frac * sat)
    t = val * (1 - (1 - frac) * sat)
    # (r, g, b) per hue sector 0..5
    table = torch.stack(
        [
            val,
            q,
            p,
            p,
            t,
            val,  # r
            t,
            val,
            val,
            q,
            p,
            p,  # g
            p,
            p,
            t,
            val,
            val,
            q,
        ],  # b
        dim=-3,
    )
    sector = sector.long().unsqueeze(-3)
    index = torch.cat([sector, sector + 6, sector + 12], dim=-3)
    return table.gather(-3, index)


def _jitter_one(
    img: torch.Tensor, brightness: float, contrast: float, saturation: float, hue: float, order: Sequence[int]
) -> torch.Tensor:
    """kornia-0.5.8 colour jitter of a ``(3, H, W)`` image in [0, 1]."""

    def adjust_saturation(x: torch.Tensor) -> torch.Tensor:
        h, s, v = rgb_to_hsv(x).unbind(-3)
        return hsv_to_rgb(torch.stack([h, (s * saturation).clamp(0, 1), v], dim=-3))

    def adjust_hue(x: torch.Tensor) -> torch.Tensor:
        h, s, v = rgb_to_hsv(x).unbind(-3)
        h = torch.fmod(h + hue * 2 * math.pi, 2 * math.pi)
        return hsv_to_rgb(torch.stack([h, s, v], dim=-3))

    steps = [
        lambda x: (x + brightness).clamp(0, 1),  # additive, as kornia 0.5
        lambda x: (x * contrast).clamp(0, 1),  # multiplicative, no mean
        adjust_saturation,
        adjust_hue,
    ]
    for idx in order:
        img = steps[idx](img)
    return img


def color_jitter(
    img: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    strength: float = 0.2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Colour-jitter normalised images, one random draw per image.

    The caller decides *whether* to jitter (see :class:`DACSAugmentation`);
    this always jitters.

    Args:
        img: ``(B, 3, H, W)`` normalised images.
        mean: Per-channel normalisation mean (0-255 scale).
        std: Per-channel normalisation std (0-255 scale).
        strength: ``s`` of kornia's ``ColorJitter(s, s, s, s)``; at most 0.5
            (the hue range of kornia).
        generator: RNG for the factors and the order of the four steps.

    Returns:
        Jittered, re-normalised images (float32).
    """
    if not 0 <= strength <= 0.5:
        raise ValueError(
            f"color_jitter_strength must be in [0, 0.5] (kornia "
            f"bounds the hue shift to half a turn), got "
            f"{strength}."
        )
    if img.dim() != 4 or img.shape[1] != 3:
        raise ValueError(f"Expected (B, 3, H, W) images, got {tuple(img.shape)}.")
    unit = denorm(img, mean, std)
    out = []
    for one in unit:
        # kornia ranges: brightness [max(0,1-s), min(2,1+s)] - 1, contrast and
        # saturation [max(0, 1-s), 1+s], hue [-s, s] (turns).
        brightness = float(_uniform(max(0.0, 1 - strength), min(2.0, 1 + strength), generator)) - 1
        contrast = float(_uniform(max(0.0, 1 - strength), 1 + strength, generator))
        hue = float(_uniform(-strength, strength, generator))
        saturation = float(_uniform(max(0.0, 1 - strength), 1 + strength, generator))
        order = _randperm(4, generator).tolist()
        out.append(_jitter_one(one, brightness, contrast, saturation, hue, order))
    return renorm(torch.stack(out), mean, std)


# --------------------------------------------------------------------- blur
def blur_kernel_size(size: int) -> int:
    """MIC's blur kernel for an image side: ``ceil(0.1·size)``, made odd."""
    ceil = math.ceil(0.1 * size)
    return int(math.floor(ceil - 0.5 + ceil % 2))


def _gaussian_kernel1d(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    if size % 2 == 0:
        x = x + 0.5
    kernel = torch.exp(-x.pow(2) / (2 * sigma**2))
    return (kernel / kernel.sum()).float()


def gaussian_blur(img: torch.Tensor, sigma: float, kernel_size: Sequence[int] | None = None) -> torch.Tensor:
    """Separable Gaussian blur, reflect padding (kornia ``GaussianBlur2d``).

    Args:
        img: ``(B, C, H, W)`` images.
        sigma: Standard deviation in pixels (both directions).
        kernel_size: ``(kh, kw)``; defaults to :func:`blur_kernel_size` of the
            image height and width (MIC).
    """
    height, width = img.shape[-2:]
    if kernel_size is None:
        kernel_size = (blur_kernel_size(height), blur_kernel_size(width))
    k_h, k_w = int(kernel_size[0]), int(kernel_size[1])
    channels = img.shape[1]
    x = img
    for size, dim in ((k_h, 2), (k_w, 3)):
        if size <= 1:
            continue
        kernel = _gaussian_kernel1d(size, sigma).to(img.device, img.dtype)
        shape = [1, 1, 1, 1]
        shape[dim] = size
        kernel = kernel.view(shape).expand(channels, -1, -1, -1)
        before, after = (size - 1) // 2, size // 2
        pad = (0, 0, before, after) if dim == 2 else (before, after, 0, 0)
        x = F.conv2d(F.pad(x, pad, mode="reflect"), kernel, groups=channels)
    return x


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
        jitter_u, blur_u = _uniform(0, 1, generator, 2).tolist()
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
            sigmas = _uniform(*BLUR_SIGMA_RANGE, generator, img.shape[0])
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


# ------------------------------------------------------------ pseudo-labels
def pseudo_label_and_weight(
    logits: torch.Tensor, threshold: float = 0.968, reduction: str = "batch"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard pseudo-labels and their confidence weight (DACS/MIC).

    Args:
        logits: ``(B, C, H, W)`` teacher logits.
        threshold: Softmax confidence needed to count a pixel as confident
            (``pseudo_threshold``, 0.968).
        reduction: ``'batch'``: one weight for the whole batch, the fraction
            of confident pixels over all images (MIC and the original
            distillation); ``'image'``: one weight per image.

    Returns:
        ``(labels, weight)``: ``(B, H, W)`` int64 argmax labels and a
        ``(B, H, W)`` float32 weight map (constant per image/batch).
    """
    if reduction not in ("batch", "image"):
        raise ValueError(f"reduction must be 'batch' or 'image', got {reduction!r}.")
    probs = torch.softmax(logits.detach().float(), dim=1)
    confidence, labels = probs.max(dim=1)
    confident = confidence >= threshold
    if reduction == "batch":
        fraction = confident.sum() / confident.numel()
        weight = fraction.expand_as(confidence).float()
    else:
        fraction = confident.flatten(1).sum(1) / confident[0].numel()
        weight = fraction.view(-1, 1, 1).expand_as(confidence).float()
    return labels, weight.contiguous()
