"""DAFormer decode head (context-aware feature fusion with separable ASPP).

Paper: "DAFormer: Improving Network Architectures and Training Strategies for
Domain-Adaptive Semantic Segmentation", Hoyer et al., CVPR 2022.

Independent re-implementation whose module and parameter names follow MIC's
``DAFormerHead`` (lhoyer/MIC ``seg/mmseg/models/decode_heads/daformer_head.py``
with ``aspp_head.py`` / ``sep_aspp_head.py`` and mmcv 1.x ``ConvModule`` /
``DepthwiseSeparableConvModule``), so ``decode_head.head.*`` and
``decode_head.scale_attention.*`` weights of a MIC checkpoint load key for
key::

    embed_layers.<i>.proj.{weight,bias}                 per-level Linear
    fuse_layer.aspp_modules.0.{conv,bn}.*               1x1 ConvModule (dilation 1)
    fuse_layer.aspp_modules.<j>.depthwise_conv.{conv,bn}.*   dilation > 1
    fuse_layer.aspp_modules.<j>.pointwise_conv.{conv,bn}.*
    fuse_layer.bottleneck.{conv,bn}.*                   3x3 ConvModule
    fuse_layer.{conv,bn}.*                              (fusion='conv', the
                                                         HRDA scale attention)
    conv_seg.{weight,bias}                              1x1 classifier
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ConvModule", "DepthwiseSeparableConvModule", "MLPEmbed", "SeparableASPP", "DAFormerHead"]


class ConvModule(nn.Module):
    """Conv2d -> BatchNorm2d -> ReLU with mmcv's child names.

    mmcv 1.x names the children ``conv``, ``bn`` (for BN norm configs) and
    ``activate``; the conv has no bias when followed by a norm (``bias='auto'``).
    Initialisation follows mmcv: Kaiming-normal (fan_out, ReLU) convs, BN 1/0.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Square kernel size.
        padding: Zero padding.
        dilation: Dilation of the kernel.
        groups: Conv groups (``in_channels`` for a depth-wise conv).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class DepthwiseSeparableConvModule(nn.Module):
    """Depth-wise ConvModule followed by a 1x1 point-wise ConvModule.

    Both halves have BN and ReLU (mmcv's ``dw_norm_cfg``/``dw_act_cfg``
    default to the module's norm/act configs).

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Depth-wise kernel size.
        padding: Depth-wise zero padding.
        dilation: Depth-wise dilation.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0, dilation: int = 1
    ) -> None:
        super().__init__()
        self.depthwise_conv = ConvModule(
            in_channels, in_channels, kernel_size, padding=padding, dilation=dilation, groups=in_channels
        )
        self.pointwise_conv = ConvModule(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class MLPEmbed(nn.Module):
    """Per-pixel linear embedding of a feature map (SegFormer's ``MLP``).

    Args:
        in_channels: Channels of the feature map.
        embed_dim: Output channels.
    """

    def __init__(self, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_channels, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        tokens = self.proj(x.flatten(2).transpose(1, 2))  # (B, HW, E)
        return tokens.transpose(1, 2).reshape(batch, -1, height, width)


class SeparableASPP(nn.Module):
    """ASPP without image pooling, depth-wise separable for dilations > 1.

    MIC's ``ASPPWrapper(sep=True, pool=False)``: parallel branches
    ``aspp_modules`` (1x1 ConvModule for dilation 1, separable 3x3 otherwise)
    concatenated and fused by a 3x3 ``bottleneck`` ConvModule.

    Args:
        in_channels: Input channels.
        channels: Channels of every branch and of the output.
        dilations: One branch per dilation rate.
    """

    def __init__(self, in_channels: int, channels: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.aspp_modules = nn.ModuleList()
        for dilation in dilations:
            if dilation == 1:
                self.aspp_modules.append(ConvModule(in_channels, channels, 1))
            else:
                self.aspp_modules.append(
                    DepthwiseSeparableConvModule(
                        in_channels, channels, 3, padding=dilation, dilation=dilation
                    )
                )
        self.bottleneck = ConvModule(len(dilations) * channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [branch(x) for branch in self.aspp_modules]
        return self.bottleneck(torch.cat(branches, dim=1))


class DAFormerHead(nn.Module):
    """DAFormer decoder: per-level embeddings, upsample to stride 4, fuse.

    Args:
        in_channels: Channels of the four backbone outputs (finest first).
        num_classes: Output channels of ``conv_seg`` (1 for a class-agnostic
            HRDA scale attention).
        channels: Embedding and fusion width (DAFormer: 256).
        dilations: ASPP dilation rates (DAFormer: 1, 6, 12, 18).
        dropout_ratio: ``Dropout2d`` before ``conv_seg`` (0.1).
        fusion: ``'aspp'`` (separable ASPP, the segmentation head) or
            ``'conv'`` (1x1 ConvModule, HRDA's scale-attention head).
        align_corners: ``align_corners`` of the bilinear upsampling (False in
            DAFormer; kept for completeness).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 256,
        dilations: Sequence[int] = (1, 6, 12, 18),
        dropout_ratio: float = 0.1,
        fusion: str = "aspp",
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        if fusion not in ("aspp", "conv"):
            raise ValueError(f"fusion must be 'aspp' or 'conv', got {fusion!r}.")
        self.in_channels = list(in_channels)
        self.num_classes = num_classes
        self.channels = channels
        self.align_corners = align_corners
        # Classifier first: mmseg's BaseDecodeHead creates it before the
        # subclass layers, so the state-dict order matches MIC's.
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None
        # mmseg BaseDecodeHead init_cfg: Normal(std=0.01) on conv_seg.
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)
        # ModuleDict keyed by level index, as MIC ('0'..'3').
        self.embed_layers = nn.ModuleDict(
            {str(i): MLPEmbed(c, channels) for i, c in enumerate(self.in_channels)}
        )
        fused_in = channels * len(self.in_channels)
        if fusion == "aspp":
            self.fuse_layer: nn.Module = SeparableASPP(fused_in, channels, dilations)
        else:
            self.fuse_layer = ConvModule(fused_in, channels, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Decode a feature pyramid.

        Args:
            features: Backbone outputs, finest (stride 4) first.

        Returns:
            ``(B, num_classes, H0, W0)`` logits at the size of ``features[0]``.
        """
        if len(features) != len(self.in_channels):
            raise ValueError(
                f"DAFormerHead expects {len(self.in_channels)} feature maps, got {len(features)}."
            )
        out_size = features[0].shape[2:]
        embedded = []
        for i, feat in enumerate(features):
            emb = self.embed_layers[str(i)](feat)
            if emb.shape[2:] != out_size:
                emb = F.interpolate(emb, size=out_size, mode="bilinear", align_corners=self.align_corners)
            embedded.append(emb)
        x = self.fuse_layer(torch.cat(embedded, dim=1))
        if self.dropout is not None:
            x = self.dropout(x)
        return self.conv_seg(x)
