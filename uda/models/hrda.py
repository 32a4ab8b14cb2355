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
batch-size effects. :func:`~uda.models.windows.default_windows_per_batch` is the bound the
evaluate and serving paths pick for a device (CPU: a small one; CUDA: none),
applied with :func:`bounded_slide` or
:meth:`HRDASegmentor.limit_windows_per_batch` without changing the preset.

Files: the decode head is :mod:`uda.models.hrda_head`, the crop and window geometry
:mod:`uda.models.windows`. This module is MIC's ``HRDAEncoderDecoder`` alone; it stays
one file (~540 lines) because training forward and both inference modes share the
window-batching state of one segmentor.
"""

from __future__ import annotations

import contextlib
from typing import Any
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from .hrda_head import HRDAHead
from .losses import IGNORE_INDEX, get_loss, pixel_accuracy
from .windows import (
    Box,
    WindowSums,
    check_windows_per_batch,
    crop,
    default_windows_per_batch,
    get_crop_bbox,
    resize_by,
    resize_to,
    slide_windows,
)

__all__ = ["HRDASegmentor", "DEFAULT_TEST_CFG", "bounded_slide"]

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

# "Use test_cfg.max_windows_per_batch" (None already means "no bound").
_FROM_CFG: Any = object()


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
            returns with ``return_feat``
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
        sums = WindowSums(batch_size, self.num_classes, height, width, img.device)
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
