"""The photometric half of MIC's DACS strong augmentation: colour jitter and
Gaussian blur of normalised images (labels are never touched).

Independent re-implementation of the behaviour of lhoyer/MIC
``seg/mmseg/models/utils/dacs_transforms.py``, batched on tensors, with every
random draw taken from an optional ``torch.Generator`` (:mod:`.draws`):

* **Colour jitter** (:func:`color_jitter`): kornia 0.5.8's
  ``ColorJitter(brightness=s, contrast=s, saturation=s, hue=s)`` (the version
  MIC pins) on images de-normalised to [0, 1], then re-normalised. Its
  semantics differ from torchvision's: brightness *adds* ``U(-s, s)``,
  contrast *multiplies* by ``U(1-s, 1+s)``, saturation multiplies the HSV
  saturation by ``U(1-s, 1+s)``, hue shifts by ``U(-s, s)`` turns; each step
  clamps to [0, 1]; the four run in a random order, drawn for each image.
* **Gaussian blur** (:func:`gaussian_blur`): sigma in
  :data:`BLUR_SIGMA_RANGE`, kernel ``≈ 0.1 ×`` the image side and odd
  (:func:`blur_kernel_size`), reflect padding (kornia ``GaussianBlur2d``).

*Whether* a step jitters or blurs is decided by
:class:`~uda.train.augment.DACSAugmentation`.
"""

from __future__ import annotations

import math
from typing import Any
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .draws import randperm, uniform

__all__ = [
    "BLUR_SIGMA_RANGE",
    "denorm",
    "renorm",
    "rgb_to_hsv",
    "hsv_to_rgb",
    "color_jitter",
    "blur_kernel_size",
    "gaussian_blur",
]

#: Blur sigma range of MIC's ``gaussian_blur`` (dacs_transforms.py).
BLUR_SIGMA_RANGE = (0.15, 1.15)
#: kornia's rgb_to_hsv epsilon in the saturation denominator.
_HSV_EPS = 1e-6


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

    The caller decides *whether* to jitter (see :class:`~uda.train.augment.DACSAugmentation`);
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
        brightness = float(uniform(max(0.0, 1 - strength), min(2.0, 1 + strength), generator)) - 1
        contrast = float(uniform(max(0.0, 1 - strength), 1 + strength, generator))
        hue = float(uniform(-strength, strength, generator))
        saturation = float(uniform(max(0.0, 1 - strength), 1 + strength, generator))
        order = randperm(4, generator).tolist()
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
