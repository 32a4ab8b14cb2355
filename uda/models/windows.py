"""Window geometry of HRDA training and inference: crop boxes, overlapping slide windows,
stitching window logits back into one map, and how many windows one backbone pass may take.

Boxes are ``(y1, y2, x1, x2)``, like MIC. The rules follow lhoyer/MIC
``seg/mmseg/models/segmentors/hrda_encoder_decoder.py`` (``get_crop_bbox``,
``crop``), ``seg/mmseg/models/decode_heads/hrda_head.py`` (``scale_box``) and
mmseg 0.30 ``EncoderDecoder.slide_inference`` (window placement, count-normalised
averaging).
"""

from __future__ import annotations

from typing import Any
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "Box",
    "CPU_PASS_PIXELS",
    "WindowSums",
    "check_windows_per_batch",
    "crop",
    "default_windows_per_batch",
    "get_crop_bbox",
    "resize_by",
    "resize_to",
    "scale_box",
    "slide_windows",
    "stitch",
    "windows_for_pixels",
]

Box = tuple[int, int, int, int]  # (y1, y2, x1, x2), like MIC

#: Input pixels per backbone pass that :func:`default_windows_per_batch`
#: allows off-GPU: one 512x512 image, i.e. one window of the full recipe
#: (a 1024x1024 window at the context scale 0.5, or one 512x512 detail
#: window; ~0.4 GB of activations for FAN-L), 64 of the default preset's
#: (64x64 each). Never less than one window.
CPU_PASS_PIXELS = 2**18


def windows_for_pixels(pixel_budget: int, window_pixels: int) -> int:
    """Windows of ``window_pixels`` that fit in ``pixel_budget`` (>= 1)."""
    return max(1, int(pixel_budget) // max(int(window_pixels), 1))


def check_windows_per_batch(value: Any, key: str = "test_cfg.max_windows_per_batch") -> int | None:
    """``value`` if it is a positive int or None, else a ``ValueError``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{key} must be a positive integer or null (null: "
            f"every window in one batch, as MIC), got "
            f"{value!r}."
        )
    return int(value)


def default_windows_per_batch(
    device: str | torch.device | None, image_pixels: int | None = None
) -> int | None:
    """The ``max_windows_per_batch`` to run inference with on ``device``.

    CUDA: None (MIC's one batch; a 1920x1080 frame of the full recipe fits a
    32 GB GPU). Any other device (CPU): as many images of ``image_pixels``
    (the largest input of one backbone pass, see
    :meth:`~uda.models.hrda.HRDASegmentor.device_windows_per_batch`) as fit in
    :data:`CPU_PASS_PIXELS`: 1 for the full recipe, 64 for the default
    preset; 1 without ``image_pixels``. All at once costs ~20 GB of RAM per
    1920x1080 frame of the full recipe.
    """
    if device is not None and torch.device(device).type == "cuda":
        return None
    if image_pixels is None:
        return 1
    return windows_for_pixels(CPU_PASS_PIXELS, image_pixels)


def resize_by(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Bilinear resize by a scale factor (``align_corners=False``), like
    mmseg's ``resize(..., scale_factor=s)``; identity for ``scale == 1``."""
    if scale == 1:
        return x
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)


def resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize to ``size`` (``align_corners=False``)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def get_crop_bbox(
    img_h: int,
    img_w: int,
    crop_size: Sequence[int],
    divisible: int = 1,
    generator: torch.Generator | None = None,
) -> Box:
    """Random crop box whose corner is a multiple of ``divisible``.

    Same distribution as MIC's ``get_crop_bbox``: the offset is
    ``randint(0, (margin + 1) // divisible) * divisible`` (upper bound
    exclusive), so the crop always lies inside the image.

    Args:
        img_h: Image height.
        img_w: Image width.
        crop_size: ``(h, w)`` of the crop; larger than the image means the
            crop is clipped to it.
        divisible: Corner coordinates are multiples of this.
        generator: Optional torch RNG for reproducible crops.

    Returns:
        ``(y1, y2, x1, x2)``.
    """
    crop_h, crop_w = int(crop_size[0]), int(crop_size[1])
    if crop_h <= 0 or crop_w <= 0:
        raise ValueError(f"crop_size must be positive, got {crop_size}.")
    if img_h == crop_h and img_w == crop_w:
        return 0, img_h, 0, img_w

    def offset(margin: int) -> int:
        choices = max((margin + 1) // divisible, 1)
        return int(torch.randint(0, choices, (1,), generator=generator)) * divisible

    off_h = offset(max(img_h - crop_h, 0))
    off_w = offset(max(img_w - crop_w, 0))
    return off_h, off_h + crop_h, off_w, off_w + crop_w


def crop(x: torch.Tensor, box: Box) -> torch.Tensor:
    """Crop the last two dimensions of ``x`` to ``box = (y1, y2, x1, x2)``."""
    y1, y2, x1, x2 = box
    return x[..., y1:y2, x1:x2]


def slide_windows(height: int, width: int, crop_size: Sequence[int], stride: Sequence[int]) -> list[Box]:
    """Overlapping windows covering an image, as mmseg's ``slide_inference``.

    The last window in each direction is shifted back to end at the border;
    windows larger than the image are clipped to it.

    Args:
        height: Image height.
        width: Image width.
        crop_size: Window ``(h, w)``.
        stride: Step ``(h, w)`` between window corners.

    Returns:
        ``(y1, y2, x1, x2)`` per window, row-major.
    """
    h_crop, w_crop = int(crop_size[0]), int(crop_size[1])
    h_stride, w_stride = int(stride[0]), int(stride[1])
    h_grids = max(height - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(width - w_crop + w_stride - 1, 0) // w_stride + 1
    boxes = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2 = min(h_idx * h_stride + h_crop, height)
            x2 = min(w_idx * w_stride + w_crop, width)
            boxes.append((max(y2 - h_crop, 0), y2, max(x2 - w_crop, 0), x2))
    return boxes


def scale_box(box: Box, factor: float) -> Box:
    """Divide box coordinates by ``factor`` and truncate (MIC ``scale_box``)."""
    return tuple(int(v / factor) for v in box)  # type: ignore[return-value]


class WindowSums:
    """Sums of window logits and window counts over a ``(B, C, H, W)`` map,
    filled batch by batch; :meth:`mean` divides each pixel by the number of
    windows covering it. Sums are in fp32 even under autocast and are added
    in window order, so any batching gives the same sums of the same
    logits."""

    def __init__(self, batch_size: int, channels: int, height: int, width: int, device: torch.device) -> None:
        self.batch_size = batch_size
        self.sums = torch.zeros((batch_size, channels, height, width), dtype=torch.float32, device=device)
        self.count = torch.zeros((batch_size, 1, height, width), dtype=torch.float32, device=device)

    def add(self, boxes: Sequence[Box], logits: torch.Tensor) -> None:
        """Add window logits held crop-major: rows ``i*B:(i+1)*B`` belong to
        ``boxes[i]``."""
        b = self.batch_size
        for i, (y1, y2, x1, x2) in enumerate(boxes):
            self.sums[:, :, y1:y2, x1:x2] += logits[i * b : (i + 1) * b]
            self.count[:, :, y1:y2, x1:x2] += 1

    def mean(self) -> torch.Tensor:
        if bool((self.count == 0).any()):
            raise RuntimeError("Slide windows do not cover the whole image; check crop_size and stride.")
        return self.sums / self.count


def stitch(
    logits: torch.Tensor, boxes: Sequence[Box], batch_size: int, height: int, width: int
) -> torch.Tensor:
    """Average window logits into a ``(B, C, height, width)`` map.

    ``logits`` holds the windows crop-major: rows ``i*B:(i+1)*B`` belong to
    ``boxes[i]``. Each pixel is divided by the number of windows covering it.
    """
    sums = WindowSums(batch_size, logits.shape[1], height, width, logits.device)
    sums.add(boxes, logits)
    return sums.mean()
