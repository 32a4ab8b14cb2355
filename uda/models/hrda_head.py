"""HRDA's decode head: a DAFormer segmentation head on two scales, fused by a learned
scale attention.

Independent re-implementation of lhoyer/MIC ``seg/mmseg/models/decode_heads/hrda_head.py``
(parameter names ``head.*`` and ``scale_attention.*`` as in MIC's state dicts); the fusion
rule is described in :mod:`uda.models.hrda`.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from .daformer_head import DAFormerHead
from .windows import Box, resize_by, resize_to, scale_box, stitch

__all__ = ["HRDAHead"]

Features = list[torch.Tensor]


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
                :meth:`~uda.models.hrda.HRDASegmentor.extract_slide_feat`), or ``{'logits':
                crop-major window logits of :attr:`head`, 'boxes': ...}``
                (see :meth:`~uda.models.hrda.HRDASegmentor.slide_detail_logits`).
            batch_size: Images per window.
        """
        if not isinstance(hr_input, Mapping):
            return self.head(hr_input)
        boxes = [scale_box(b, self.os) for b in hr_input["boxes"]]
        height = max(b[1] for b in boxes)
        width = max(b[3] for b in boxes)
        if "logits" in hr_input:
            window_logits = hr_input["logits"]
        else:
            window_logits = self.head(hr_input["features"])
        return stitch(window_logits, boxes, batch_size, height, width)

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
            y1, y2, x1, x2 = scale_box(hr_crop_box, self.os / self.lr_scale)
            mask[:, :, y1:y2, x1:x2] = 1
            att = att * mask
        lr_seg = (1 - att) * lr_seg
        up_scale = 1 / self.lr_scale
        up_lr_seg = resize_by(lr_seg, up_scale)
        att = resize_by(att, up_scale)
        if hr_crop_box is not None:
            hr_inserted = torch.zeros_like(up_lr_seg)
            y1, y2, x1, x2 = scale_box(hr_crop_box, self.os)
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
