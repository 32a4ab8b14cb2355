"""HRDA multi-resolution segmentor with a DAFormer decoder.

Paper: "HRDA: Context-Aware High-Resolution Domain-Adaptive Semantic
Segmentation", Hoyer et al., ECCV 2022.

Independent re-implementation of MIC's ``HRDAEncoderDecoder`` + ``HRDAHead``
(lhoyer/MIC ``seg/mmseg/models/segmentors/hrda_encoder_decoder.py``,
``seg/mmseg/models/decode_heads/hrda_head.py``,
``seg/mmseg/models/segmentors/encoder_decoder.py``). Parameter names match
MIC's state dicts: ``backbone.*``, ``decode_head.head.*`` (segmentation
head), ``decode_head.scale_attention.*`` (scale-attention head).

Training (``forward_train``): the context input is the whole crop resized by
the low scale (0.5); the detail input is a random ``hr_crop_size`` crop of
the full-resolution crop whose corner is a multiple of
``crop_coord_divisible``. The learned (class-wise) scale attention ``a``
fuses the two predictions as::

    fused = up(a) * detail_inserted + up((1 - a) * context)

(``up``: bilinear, ``align_corners=False``, by scale factor ``1 / 0.5``; the
attention is zeroed outside the detail crop). Losses: fused output weighted
``1 - hr_loss_weight``, detail output weighted ``hr_loss_weight``.

Inference: ``whole`` (one pass; the detail branch optionally by overlapping
slide of ``hr_crop_size`` windows, ``hr_slide_inference``) or ``slide``
(overlapping ``test_cfg.crop_size`` windows, optionally batched,
count-normalised), always returning logits at the input resolution.

Bounded memory: ``test_cfg.max_windows_per_batch`` (null: MIC's behaviour,
every slide window and every detail window of an image in one forward pass)
caps the images of one backbone pass: slide windows per forward, and detail
windows per backbone + head pass. The logits are the same up to float
batch-size effects. :func:`default_windows_per_batch` is the bound the
evaluate and serving paths pick for a device (CPU: a small one; CUDA: none),
applied with :func:`bounded_slide` or
:meth:`HRDASegmentor.limit_windows_per_batch` without changing the preset.
"""

from __future__ import annotations

import contextlib
from typing import Any
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .daformer_head import DAFormerHead
from .losses import IGNORE_INDEX, get_loss, pixel_accuracy

__all__ = [
    "HRDAHead",
    "HRDASegmentor",
    "get_crop_bbox",
    "crop",
    "slide_windows",
    "DEFAULT_TEST_CFG",
    "CPU_PASS_PIXELS",
    "windows_for_pixels",
    "check_windows_per_batch",
    "default_windows_per_batch",
    "bounded_slide",
]

Box = tuple[int, int, int, int]  # (y1, y2, x1, x2), like MIC
Features = list[torch.Tensor]

#: MIC's HRDA test configuration (gtaHR2csHR_mic_hrda.py).
DEFAULT_TEST_CFG: dict[str, Any] = {
    "mode": "slide",
    "crop_size": [1024, 1024],
    "stride": [512, 512],
    "batched_slide": True,
    # Most images per backbone pass in inference (slide windows per forward,
    # detail windows per pass); None: all at once, as MIC.
    "max_windows_per_batch": None,
}

#: Input pixels per backbone pass that :func:`default_windows_per_batch`
#: allows off-GPU: one 512x512 image, i.e. one window of the full recipe
#: (a 1024x1024 window at the context scale 0.5, or one 512x512 detail
#: window; ~0.4 GB of activations for FAN-L), 64 of the default preset's
#: (64x64 each). Never less than one window.
CPU_PASS_PIXELS = 2**18

# "Use test_cfg.max_windows_per_batch" (None already means "no bound").
_FROM_CFG: Any = object()


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
    :meth:`HRDASegmentor.device_windows_per_batch`) as fit in
    :data:`CPU_PASS_PIXELS`: 1 for the full recipe, 64 for the default
    preset; 1 without ``image_pixels``. All at once costs ~20 GB of RAM per
    1920x1080 frame of the full recipe.
    """
    if device is not None and torch.device(device).type == "cuda":
        return None
    if image_pixels is None:
        return 1
    return windows_for_pixels(CPU_PASS_PIXELS, image_pixels)


@contextlib.contextmanager
def bounded_slide(model: nn.Module, device: str | torch.device | None) -> Iterator[int | None]:
    """Run ``model`` with its device default ``max_windows_per_batch``
    inside the block, restoring its ``test_cfg`` afterwards.

    The model's own value wins when it is set (not None); otherwise
    :func:`default_windows_per_batch` of ``device``. A model without the
    key (not an :class:`HRDASegmentor`) runs unchanged. Not for a model
    shared between threads (it changes ``model.test_cfg`` for the block).

    Yields:
        The bound in force (None: unbounded).
    """
    if not isinstance(model, HRDASegmentor):
        yield None
        return
    bound = model.device_windows_per_batch(device)
    with model.limit_windows_per_batch(bound):
        yield bound


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


def _scale_box(box: Box, factor: float) -> Box:
    """Divide box coordinates by ``factor`` and truncate (MIC ``scale_box``)."""
    return tuple(int(v / factor) for v in box)  # type: ignore[return-value]


class _WindowSums:
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


def _stitch(
    logits: torch.Tensor, boxes: Sequence[Box], batch_size: int, height: int, width: int
) -> torch.Tensor:
    """Average window logits into a ``(B, C, height, width)`` map.

    ``logits`` holds the windows crop-major: rows ``i*B:(i+1)*B`` belong to
    ``boxes[i]``. Each pixel is divided by the number of windows covering it.
    """
    sums = _WindowSums(batch_size, logits.shape[1], height, width, logits.device)
    sums.add(boxes, logits)
    return sums.mean()


class HRDAHead(nn.Module):
    """Two-scale decode head with a learned scale attention (MIC ``HRDAHead``).

    Args:
        in_channels: Backbone output channels (finest first).
        num_classes: Number of classes.
        channels: DAFormer width of the segmentation head (256).
        dilations: Separable-ASPP dilation rates.
        dropout_ratio: Dropout before each classifier.
        attention_classwise: One attention map per class (True) or a single
            map (False).
        attention_embed_dim: Width of the scale-attention head (MIC: 256).
        lr_scale: Scale of the context input (0.5).
        output_stride: Stride of the DAFormer output w.r.t. its input (4).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 256,
        dilations: Sequence[int] = (1, 6, 12, 18),
        dropout_ratio: float = 0.1,
        attention_classwise: bool = True,
        attention_embed_dim: int = 256,
        lr_scale: float = 0.5,
        output_stride: int = 4,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.lr_scale = lr_scale
        self.os = output_stride
        self.head = DAFormerHead(in_channels, num_classes, channels, dilations, dropout_ratio, fusion="aspp")
        # MIC builds the attention head as a DAFormerHead whose ASPP fusion
        # is replaced by a 1x1 ConvModule (hrda_head.py).
        self.scale_attention = DAFormerHead(
            in_channels,
            num_classes if attention_classwise else 1,
            attention_embed_dim,
            dilations,
            dropout_ratio,
            fusion="conv",
        )

    def decode_hr(self, hr_input: Features | Mapping[str, Any], batch_size: int) -> torch.Tensor:
        """Detail logits from whole-input features or from slide windows.

        Args:
            hr_input: Backbone features of the detail input, or a dict
                ``{'features': crop-major window features, 'boxes': windows
                in detail-image pixels}`` (see
                :meth:`HRDASegmentor.extract_slide_feat`), or ``{'logits':
                crop-major window logits of :attr:`head`, 'boxes': ...}``
                (see :meth:`HRDASegmentor.slide_detail_logits`).
            batch_size: Images per window.
        """
        if not isinstance(hr_input, Mapping):
            return self.head(hr_input)
        boxes = [_scale_box(b, self.os) for b in hr_input["boxes"]]
        height = max(b[1] for b in boxes)
        width = max(b[3] for b in boxes)
        if "logits" in hr_input:
            window_logits = hr_input["logits"]
        else:
            window_logits = self.head(hr_input["features"])
        return _stitch(window_logits, boxes, batch_size, height, width)

    def forward(
        self, lr_features: Features, hr_input: Features | Mapping[str, Any], hr_crop_box: Box | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fuse context and detail predictions.

        Args:
            lr_features: Backbone features of the context (low-scale) input.
            hr_input: Detail features (see :meth:`decode_hr`).
            hr_crop_box: Detail crop in full-resolution pixels (training);
                None when the detail input covers the whole image.

        Returns:
            ``(fused, lr_seg, hr_seg)``: fused logits at 1/os of the full
            resolution, the attention-weighted context logits ``(1 - a) *
            lr`` at the context resolution (as MIC returns them), and the
            detail logits.
        """
        batch_size = lr_features[0].shape[0]
        lr_seg = self.head(lr_features)
        hr_seg = self.decode_hr(hr_input, batch_size)
        att = torch.sigmoid(self.scale_attention(lr_features))
        if hr_crop_box is not None:
            # Attention is only defined where detail exists.
            mask = lr_seg.new_zeros([lr_seg.shape[0], 1, *lr_seg.shape[2:]])
            y1, y2, x1, x2 = _scale_box(hr_crop_box, self.os / self.lr_scale)
            mask[:, :, y1:y2, x1:x2] = 1
            att = att * mask
        lr_seg = (1 - att) * lr_seg
        up_scale = 1 / self.lr_scale
        up_lr_seg = resize_by(lr_seg, up_scale)
        att = resize_by(att, up_scale)
        if hr_crop_box is not None:
            hr_inserted = torch.zeros_like(up_lr_seg)
            y1, y2, x1, x2 = _scale_box(hr_crop_box, self.os)
            hr_inserted[:, :, y1:y2, x1:x2] = hr_seg
        else:
            hr_inserted = hr_seg
            if up_lr_seg.shape[2:] != hr_seg.shape[2:]:
                # Only for input sizes that are not multiples of 8, where
                # MIC would fail on the shape mismatch: align the context
                # terms to the detail grid.
                up_lr_seg = resize_to(up_lr_seg, hr_seg.shape[2:])
                att = resize_to(att, hr_seg.shape[2:])
        fused = att * hr_inserted + up_lr_seg
        return fused, lr_seg, hr_seg


class HRDASegmentor(nn.Module):
    """Backbone + HRDA/DAFormer decode head, training and inference.

    Args:
        backbone: Module mapping ``(B, 3, H, W)`` to four feature maps (finest
            first) with an ``out_channels`` attribute.
        num_classes: Number of classes.
        channels: DAFormer width (256).
        dilations: Separable-ASPP dilation rates (1, 6, 12, 18).
        dropout_ratio: Dropout before the classifiers (0.1).
        loss: Decode-head loss, ``'ce'`` or ``'logit_constraint'``.
        scales: The two input scales; 1 is the detail scale, the other the
            context scale (MIC: ``[1, 0.5]``).
        hr_crop_size: ``(h, w)`` of the detail crop in training; None trains
            the detail branch on the whole input.
        hr_loss_weight: Weight of the detail loss (0.1); the fused loss gets
            ``1 - hr_loss_weight``.
        attention_classwise: Class-wise scale attention.
        attention_embed_dim: Width of the scale-attention head; defaults to
            ``channels`` (MIC: 256 for both).
        crop_coord_divisible: Detail crop corners are multiples of this (8 =
            output stride 4 x context downscale 2, so crops align).
        hr_slide_inference: Infer the detail branch of a whole input by
            overlapping slide of ``hr_crop_size`` windows (stride half the
            window).
        feature_scale: Scale whose backbone features ``forward_train``
            returns with ``return_feat`` and :meth:`extract_feat` computes
            (MIC: 0.5, the context features, for the ImageNet feature
            distance).
        test_cfg: ``{'mode': 'slide'|'whole', 'crop_size', 'stride',
            'batched_slide', 'max_windows_per_batch'}`` (see
            :data:`DEFAULT_TEST_CFG`; ``max_windows_per_batch``: most images
            per backbone pass in inference, None = all at once as MIC).
        ignore_index: Label value without supervision.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        channels: int = 256,
        dilations: Sequence[int] = (1, 6, 12, 18),
        dropout_ratio: float = 0.1,
        loss: str = "ce",
        scales: Sequence[float] = (1, 0.5),
        hr_crop_size: Sequence[int] | None = (512, 512),
        hr_loss_weight: float = 0.1,
        attention_classwise: bool = True,
        attention_embed_dim: int | None = None,
        crop_coord_divisible: int = 8,
        hr_slide_inference: bool = True,
        feature_scale: float = 0.5,
        test_cfg: Mapping[str, Any] | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__()
        scales = sorted(float(s) for s in scales)
        if len(scales) != 2 or scales[1] != 1 or not 0 < scales[0] < 1:
            raise ValueError(
                f"scales must be [1, r] with 0 < r < 1 (HRDA supports exactly two scales), got {scales}."
            )
        if feature_scale not in scales:
            raise ValueError(f"feature_scale must be one of scales {scales}, got {feature_scale}.")
        if not hasattr(backbone, "out_channels"):
            raise ValueError("backbone must expose `out_channels` (the channels of its four outputs).")
        self.backbone = backbone
        self.num_classes = num_classes
        self.scales = scales
        self.lr_scale = scales[0]
        self.hr_crop_size = None if hr_crop_size is None else tuple(int(v) for v in hr_crop_size)
        self.hr_loss_weight = float(hr_loss_weight)
        self.crop_coord_divisible = int(crop_coord_divisible)
        self.hr_slide_inference = bool(hr_slide_inference)
        self.feature_scale = float(feature_scale)
        self.ignore_index = ignore_index
        self.loss_name = loss
        self.loss_fn = get_loss(loss)
        self.test_cfg = dict(DEFAULT_TEST_CFG)
        self.test_cfg.update(test_cfg or {})
        if self.test_cfg["mode"] not in ("slide", "whole"):
            raise ValueError(f"test_cfg.mode must be 'slide' or 'whole', got {self.test_cfg['mode']!r}.")
        check_windows_per_batch(self.test_cfg["max_windows_per_batch"])
        if self.hr_slide_inference and self.hr_crop_size is None:
            raise ValueError("hr_slide_inference needs hr_crop_size (the detail window size).")
        self.decode_head = HRDAHead(
            list(backbone.out_channels),
            num_classes,
            channels,
            dilations,
            dropout_ratio,
            attention_classwise,
            attention_embed_dim or channels,
            lr_scale=self.lr_scale,
        )
        #: Detail crop of the last ``forward_train`` call (full-res pixels).
        self.last_train_crop_box: Box | None = None

    # ------------------------------------------------------------------
    # Features
    # ------------------------------------------------------------------
    def extract_unscaled_feat(self, img: torch.Tensor) -> Features:
        """Backbone features of ``img`` as it is."""
        return list(self.backbone(img))

    def extract_feat(self, img: torch.Tensor) -> Features:
        """Backbone features at ``feature_scale`` (the ImageNet feature
        distance input; MIC ``extract_feat`` with ``feature_scale=0.5``)."""
        return self.extract_unscaled_feat(resize_by(img, self.feature_scale))

    def extract_slide_feat(self, img: torch.Tensor) -> dict[str, Any]:
        """Features of overlapping ``hr_crop_size`` windows (stride = half a
        window), batched crop-major in one backbone pass."""
        assert self.hr_crop_size is not None
        stride = [v // 2 for v in self.hr_crop_size]
        boxes = slide_windows(img.shape[2], img.shape[3], self.hr_crop_size, stride)
        windows = torch.cat([crop(img, b) for b in boxes], dim=0)
        return {"features": self.extract_unscaled_feat(windows), "boxes": boxes}

    def slide_detail_logits(
        self, img: torch.Tensor, max_windows_per_batch: int | None = None
    ) -> dict[str, Any]:
        """Segmentation-head logits of the overlapping ``hr_crop_size``
        windows (stride = half a window), crop-major, at most
        ``max_windows_per_batch`` windows per backbone + head pass (None:
        all in one pass, as MIC). Returns ``{'logits', 'boxes'}`` for
        :meth:`HRDAHead.decode_hr`."""
        assert self.hr_crop_size is not None
        stride = [v // 2 for v in self.hr_crop_size]
        boxes = slide_windows(img.shape[2], img.shape[3], self.hr_crop_size, stride)
        windows = torch.cat([crop(img, b) for b in boxes], dim=0)
        step = windows.shape[0] if max_windows_per_batch is None else max_windows_per_batch
        logits = [
            self.decode_head.head(self.extract_unscaled_feat(windows[start : start + step]))
            for start in range(0, windows.shape[0], step)
        ]
        return {"logits": logits[0] if len(logits) == 1 else torch.cat(logits, dim=0), "boxes": boxes}

    # ------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------
    def _decode_losses(
        self, logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor | None, factor: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = resize_to(logits, label.shape[-2:])
        loss = self.loss_fn(logits, label, weight, self.ignore_index)
        return loss * factor, pixel_accuracy(logits.detach(), label)

    def forward_train(
        self,
        img: torch.Tensor,
        gt_semantic_seg: torch.Tensor,
        seg_weight: torch.Tensor | None = None,
        return_feat: bool = False,
        return_logits: bool = False,
        crop_box: Box | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Any]:
        """Multi-resolution training forward with losses.

        Args:
            img: ``(B, 3, H, W)`` normalised training crops.
            gt_semantic_seg: ``(B, 1, H, W)`` or ``(B, H, W)`` labels (255 =
                ignore).
            seg_weight: Optional ``(B, H, W)`` per-pixel loss weight.
            return_feat: Also return ``'features'``: the backbone features at
                ``feature_scale`` (context features by default).
            return_logits: Also return ``'decode.logits'``: ``(fused, lr,
                hr)``.
            crop_box: Detail crop ``(y1, y2, x1, x2)`` to use instead of a
                random one (tests, reproducing a run).
            generator: RNG for the random detail crop.

        Returns:
            ``{'decode.loss_seg', 'decode.acc_seg', 'decode.hr.loss_seg',
            'decode.hr.acc_seg'}`` (MIC names; the loss entries are already
            weighted, sum every key containing ``loss`` for the total), plus
            the optional entries.
        """
        if gt_semantic_seg.dim() == 3:
            gt_semantic_seg = gt_semantic_seg[:, None]
        lr_img = resize_by(img, self.lr_scale)
        hr_img = img
        box: Box | None = None
        if self.hr_crop_size is not None:
            if img.shape[2] < self.hr_crop_size[0] or img.shape[3] < self.hr_crop_size[1]:
                raise ValueError(
                    f"Training crops {tuple(img.shape[2:])} are smaller than "
                    f"hr_crop_size {self.hr_crop_size}; use larger crops or "
                    f"a smaller model.hr_crop_size."
                )
            box = (
                crop_box
                if crop_box is not None
                else get_crop_bbox(
                    img.shape[2], img.shape[3], self.hr_crop_size, self.crop_coord_divisible, generator
                )
            )
            hr_img = crop(img, box)
        self.last_train_crop_box = box
        lr_feats = self.extract_unscaled_feat(lr_img)
        hr_feats = self.extract_unscaled_feat(hr_img)

        fused, lr_seg, hr_seg = self.decode_head(lr_feats, hr_feats, box)

        out: dict[str, Any] = {}
        if return_feat:
            out["features"] = lr_feats if self.feature_scale == self.lr_scale else hr_feats
        loss, acc = self._decode_losses(fused, gt_semantic_seg, seg_weight, 1 - self.hr_loss_weight)
        out["decode.loss_seg"] = loss
        out["decode.acc_seg"] = acc
        if self.hr_loss_weight > 0:
            hr_label, hr_weight = gt_semantic_seg, seg_weight
            if box is not None:
                hr_label = crop(gt_semantic_seg, box)
                hr_weight = None if seg_weight is None else crop(seg_weight, box)
            loss, acc = self._decode_losses(hr_seg, hr_label, hr_weight, self.hr_loss_weight)
            out["decode.hr.loss_seg"] = loss
            out["decode.hr.acc_seg"] = acc
        if return_logits:
            out["decode.logits"] = (fused, lr_seg, hr_seg)
        return out

    # ------------------------------------------------------------------
    # Inference
    # ------------------------------------------------------------------
    def encode_decode(self, img: torch.Tensor, max_windows_per_batch: int | None = _FROM_CFG) -> torch.Tensor:
        """Fused logits of whole inputs, at the input resolution.

        The detail branch runs on the full-resolution input, by overlapping
        ``hr_crop_size`` windows when ``hr_slide_inference`` is set.

        Args:
            img: ``(N, 3, H, W)`` inputs.
            max_windows_per_batch: Most images per backbone pass: more
                inputs are run in groups of that many, and the detail
                windows of a group that many per pass. Default:
                ``test_cfg.max_windows_per_batch``; None: all at once.
        """
        limit = self._windows_limit(max_windows_per_batch)
        if limit is not None and img.shape[0] > limit:
            return torch.cat(
                [
                    self._encode_decode(img[start : start + limit], limit)
                    for start in range(0, img.shape[0], limit)
                ]
            )
        return self._encode_decode(img, limit)

    def _encode_decode(self, img: torch.Tensor, limit: int | None) -> torch.Tensor:
        lr_feats = self.extract_unscaled_feat(resize_by(img, self.lr_scale))
        if self.hr_slide_inference:
            hr_input: Any = self.slide_detail_logits(img, limit)
        else:
            hr_input = self.extract_unscaled_feat(img)
        fused = self.decode_head(lr_feats, hr_input)[0]
        return resize_to(fused, img.shape[2:])

    #: Pseudo-labels of MIC's DACS are ``encode_decode`` of the target crop.
    generate_pseudo_label = encode_decode

    def whole_inference(self, img: torch.Tensor) -> torch.Tensor:
        """Logits of the whole image in one pass (``test_cfg.mode='whole'``)."""
        return self.encode_decode(img)

    # -- bounded slide inference ------------------------------------------
    @property
    def max_windows_per_batch(self) -> int | None:
        """``test_cfg.max_windows_per_batch`` (None: all at once)."""
        return self.test_cfg.get("max_windows_per_batch")

    def set_windows_per_batch(self, value: int | None) -> None:
        """Set ``test_cfg.max_windows_per_batch`` of this model (a positive
        int, or None for MIC's all at once). Inference only: checkpoints
        save ``model.model_cfg``, which keeps the configured value."""
        self.test_cfg["max_windows_per_batch"] = check_windows_per_batch(value)

    @contextlib.contextmanager
    def limit_windows_per_batch(self, value: int | None) -> Iterator[None]:
        """``max_windows_per_batch = value`` inside the block only (it
        changes ``test_cfg`` meanwhile: not for a model that other threads
        run at the same time)."""
        saved = self.test_cfg.get("max_windows_per_batch")
        self.set_windows_per_batch(value)
        try:
            yield
        finally:
            self.test_cfg["max_windows_per_batch"] = saved

    def pass_image_pixels(self) -> int:
        """Pixels of the largest image of one backbone pass in slide
        inference: a ``test_cfg.crop_size`` window at the context scale, or
        a detail window (``hr_crop_size``; the whole window without
        ``hr_slide_inference``). Full recipe: 512 x 512 for both."""
        h, w = (int(v) for v in self.test_cfg["crop_size"])
        context = int(h * self.lr_scale) * int(w * self.lr_scale)
        if self.hr_slide_inference and self.hr_crop_size is not None:
            detail = min(self.hr_crop_size[0], h) * min(self.hr_crop_size[1], w)
        else:
            detail = h * w
        return max(context, detail, 1)

    def device_windows_per_batch(self, device: str | torch.device | None) -> int | None:
        """The model's own ``max_windows_per_batch`` when set, else
        :func:`default_windows_per_batch` of ``device`` for its passes
        (CPU: 1 for the full recipe, 64 for the default preset; CUDA:
        None)."""
        if self.max_windows_per_batch is not None:
            return self.max_windows_per_batch
        return default_windows_per_batch(device, self.pass_image_pixels())

    def _windows_limit(self, value: Any) -> int | None:
        if value is _FROM_CFG:
            value = self.max_windows_per_batch
        return check_windows_per_batch(value, "max_windows_per_batch")

    def slide_batches(
        self,
        height: int,
        width: int,
        batch_size: int = 1,
        max_windows_per_batch: int | None = _FROM_CFG,
        windows_per_forward: int | None = None,
    ) -> list[list[Box]]:
        """The slide windows of an image in the groups run per forward.

        :func:`slide_windows` of ``test_cfg.crop_size``/``stride``, in that
        order, one window per group without ``test_cfg.batched_slide``,
        else ``max_windows_per_batch // batch_size`` (at least one; None:
        all windows in one group), and at most ``windows_per_forward``.
        """
        boxes = slide_windows(height, width, self.test_cfg["crop_size"], self.test_cfg["stride"])
        limit = self._windows_limit(max_windows_per_batch)
        if not self.test_cfg.get("batched_slide", False):
            per_forward = 1
        elif limit is None:
            per_forward = len(boxes)
        else:
            per_forward = max(1, limit // max(int(batch_size), 1))
        if windows_per_forward is not None:
            per_forward = max(1, min(per_forward, int(windows_per_forward)))
        return [boxes[start : start + per_forward] for start in range(0, len(boxes), per_forward)]

    def slide_forward(
        self,
        height: int,
        width: int,
        windows_of: Callable[[Sequence[Box]], torch.Tensor],
        consume: Callable[[Sequence[Box], torch.Tensor], None],
        batch_size: int = 1,
        max_windows_per_batch: int | None = _FROM_CFG,
        windows_per_forward: int | None = None,
        around_batch: Callable[[int, int], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> None:
        """Run the slide windows of an image group by group.

        The one window loop of slide inference: :meth:`slide_inference`
        averages the window logits into a logit map, the serving module
        into label-map strips (:mod:`uda.serving`).

        Args:
            height, width: Image size.
            windows_of: Boxes -> their crops, crop-major ``(len(boxes) *
                batch_size, 3, h, w)``, normalised.
            consume: Called with each group's boxes and its
                :meth:`encode_decode` logits (same layout).
            batch_size: Images per window.
            max_windows_per_batch: See :meth:`encode_decode`; default:
                ``test_cfg.max_windows_per_batch``.
            windows_per_forward: A further cap on the windows per forward
                (serving's pixel budget).
            around_batch: ``(first window index, number of windows)`` -> a
                context manager entered before each group's forward and
                exited once ``consume`` returned (serving: its turn on the
                device and its deadline check; raising there stops).
        """
        groups = self.slide_batches(height, width, batch_size, max_windows_per_batch, windows_per_forward)
        total = sum(len(group) for group in groups)
        start = 0
        for group in groups:
            context = around_batch(start, total) if around_batch is not None else contextlib.nullcontext()
            with context:
                windows = windows_of(group)
                if max_windows_per_batch is _FROM_CFG:
                    logits = self.encode_decode(windows)
                else:
                    logits = self.encode_decode(windows, max_windows_per_batch)
                del windows
                consume(group, logits)
                del logits
            start += len(group)

    def slide_inference(
        self,
        img: torch.Tensor,
        max_windows_per_batch: int | None = _FROM_CFG,
        around_batch: Callable[[int, int], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> torch.Tensor:
        """Logits from overlapping ``test_cfg.crop_size`` windows.

        Windows are run as one batch when ``test_cfg.batched_slide`` is set
        (in groups of at most ``max_windows_per_batch`` images per backbone
        pass when that is not None; default ``test_cfg``); overlapping
        logits are averaged. ``around_batch``: see :meth:`slide_forward`.
        """
        batch_size, _, height, width = img.shape
        sums = _WindowSums(batch_size, self.num_classes, height, width, img.device)
        self.slide_forward(
            height,
            width,
            lambda boxes: torch.cat([crop(img, b) for b in boxes], dim=0),
            sums.add,
            batch_size,
            max_windows_per_batch,
            around_batch=around_batch,
        )
        return sums.mean()

    def inference(self, img: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """Logits ``(B, num_classes, H, W)`` at the input resolution.

        Args:
            img: ``(B, 3, H, W)`` normalised images.
            mode: ``'slide'`` or ``'whole'``; defaults to ``test_cfg.mode``.
        """
        mode = mode or self.test_cfg["mode"]
        if mode == "slide":
            return self.slide_inference(img)
        if mode == "whole":
            return self.whole_inference(img)
        raise ValueError(f"mode must be 'slide' or 'whole', got {mode!r}.")

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Inference in the configured test mode (logits at input size)."""
        if img.dim() != 4 or img.shape[1] != 3:
            raise ValueError(f"Expected a (B, 3, H, W) image batch, got shape {tuple(img.shape)}.")
        return self.inference(img)
