"""FAN hybrid backbones (Fully Attentional Networks) for semantic segmentation.

Paper: "Understanding The Robustness in Vision Transformers", D. Zhou et al., ICML 2022,
https://arxiv.org/abs/2204.12451

Architecture read off NVlabs/FAN's segmentation backbone
(``segmentation/mmseg/models/backbones/fan.py`` and ``convnext_utils.py`` at commit
ee1b7df1016205ed26e28c0683b14238f3530a84), which the Cityscapes→ACDC distillation
(leoil/ACDC_UDA_seg @ b69db6691884b0a431024b16f578c03b453fcd59) used unchanged except for
``BatchNorm2d`` in place of ``SyncBatchNorm``. Written from scratch on timm layers; module
and parameter names match the reference so that NVlabs' ImageNet files and the
distilled segmentation checkpoints load key for key.

A hybrid FAN is:

* two ConvNeXt stages (stride 4 and 8) -> feature maps 1 and 2,
* a 2x2 patch projection to stride 16, plus a Fourier positional encoding,
* ``depth`` FAN blocks (softmax token mixing + attentive channel processing)
  -> feature map 3 is the output of block ``out_index`` (no norm),
* two class-attention blocks over [cls token, patch tokens]
  -> feature map 4 is their patch tokens (no norm, no upsampling).

For FAN-L the maps have channels [128, 256, 480, 480] at strides [4, 8, 16, 16].
Input sizes that are not multiples of 16 are floored at every strided layer, as
in the reference.

Faithfulness details kept on purpose (they decide whether published weights
reproduce published numbers):

* Fourier encoding uses true division in the exponent, ``10000 ** (i / 32)``
  (the segmentation code; NVlabs' ImageNet code floors ``i / 2``).
* LayerNorm eps: 1e-6 in ConvNeXt and block / class-attention norms, 1e-5 (the
  ``nn.LayerNorm`` default) in the channel-processing ``norm_v``.
* ConvNeXt norms after the stem divide the channel variance by C - 1, not C
  (``BesselLayerNorm2d``): what the reference's memory-layout-dependent ``LayerNorm2d``
  computes in practice (stem norm: plain LayerNorm).
* The channel-processing MLP has no activation after ``fc1`` (its ``act`` is
  never called in the reference); the only GELU is inside its depthwise block.
* Class-attention blocks use ``tokens_norm=True`` and add the normed patch tokens
  to themselves (``x_res + x``), i.e. patch tokens leave each block doubled.
* Stochastic depth uses the same rate in every FAN block (the reference does not
  ramp it); the class-attention blocks and ConvNeXt stages get none.

One model family per file, as in timm (~800 lines): the blocks, the backbone, its presets
and the ``checkpoint_filter_fn`` that adapts NVlabs' files change together, and every
faithfulness detail above is checked against the same file.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from collections.abc import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, Mlp, trunc_normal_
from timm.models.convnext import ConvNeXtStage

from .recompute import checkpointed

__all__ = [
    "FAN",
    "FAN_VARIANTS",
    "checkpoint_filter_fn",
    "create_fan",
    "fan_base_16_p4_hybrid",
    "fan_large_16_p4_hybrid",
    "fan_nano_p4_hybrid",
    "fan_small_12_p4_hybrid",
    "fan_tiny_8_p4_hybrid",
]

_logger = logging.getLogger(__name__)

# Keys of NVlabs' ImageNet classifier files that the segmentation backbone has no use for:
# the final LayerNorm over the cls token and the linear classifier.
CLASSIFIER_ONLY_PREFIXES = ("norm.", "head.")


class PositionalEncodingFourier(nn.Module):
    """2-D sine/cosine encoding of normalised pixel coordinates, projected by a 1x1 conv.

    Args:
        hidden_dim: Number of frequencies per axis (the projection sees ``2 * hidden_dim`` channels).
        dim: Output channels (the token width).
        temperature: Base of the geometric frequency progression.
    """

    def __init__(self, hidden_dim: int = 32, dim: int = 768, temperature: float = 10000.0) -> None:
        super().__init__()
        self.token_projection = nn.Conv2d(hidden_dim * 2, dim, kernel_size=1)
        self.hidden_dim = hidden_dim
        self.temperature = temperature
        self.scale = 2 * math.pi
        self.eps = 1e-6

    def forward(self, height: int, width: int) -> torch.Tensor:
        """Returns the encoding of a ``height`` x ``width`` grid, shape (1, dim, height, width)."""
        device = self.token_projection.weight.device
        # Coordinates 1..n, normalised so the last row / column sits at 2*pi.
        y = torch.arange(1, height + 1, dtype=torch.float32, device=device)
        x = torch.arange(1, width + 1, dtype=torch.float32, device=device)
        y = y / (y[-1:] + self.eps) * self.scale
        x = x / (x[-1:] + self.eps) * self.scale
        # True division in the exponent, as in the segmentation reference (see module docstring).
        freq_index = torch.arange(self.hidden_dim, dtype=torch.float32, device=device)
        dim_t = self.temperature ** (freq_index / self.hidden_dim)
        pos_y = self._sin_cos(y[:, None] / dim_t)  # (H, hidden_dim)
        pos_x = self._sin_cos(x[:, None] / dim_t)  # (W, hidden_dim)
        pos = torch.cat(
            (pos_y[:, None, :].expand(height, width, -1), pos_x[None, :, :].expand(height, width, -1)), dim=-1
        )
        return self.token_projection(pos.permute(2, 0, 1).unsqueeze(0))

    @staticmethod
    def _sin_cos(angles: torch.Tensor) -> torch.Tensor:
        # sin on even frequencies, cos on odd ones, interleaved back in frequency order
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=-1).flatten(-2)


class BesselLayerNorm2d(nn.LayerNorm):
    """Channel LayerNorm of NCHW maps that divides the variance by C - 1 (Bessel's correction).

    This is what NVlabs' ConvNeXt ``LayerNorm2d`` (timm 0.5 era) effectively computes for every
    norm after the stem: the stem's norm hands on a channels-last-strided tensor, convolutions
    keep that layout, and on a non-contiguous input the reference normalises with
    ``torch.var_mean`` (unbiased by default) instead of ``F.layer_norm``. Verified against the
    reference on CPU (``tests/test_fan.py``); timm PR #1340 reports the same layout effect on GPU,
    where the published weights were trained (NVlabs: timm 0.5.4; distillation: torch 1.10 / CUDA).

    Args:
        num_channels: Channels (C).
        eps: Added to the variance.
        **factory_kwargs: ``device`` / ``dtype`` of the affine parameters.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6, **factory_kwargs) -> None:
        super().__init__(num_channels, eps=eps, **factory_kwargs)  # factory: device / dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in fp32 so bf16/fp16 autocast does not degrade them (no-op in fp32)
        x_float = x.float()
        var, mean = torch.var_mean(x_float, dim=1, keepdim=True, correction=1)
        x_float = (x_float - mean) * torch.rsqrt(var + self.eps)
        return (x_float * self.weight[:, None, None] + self.bias[:, None, None]).to(x.dtype)


class HybridConvStem(nn.Module):
    """ConvNeXt patchify stem plus ConvNeXt stages, returning every stage's map.

    Reference: NVlabs' ``ConvNeXt(depths=[3, 3 or 5], dims=[128, 256, ...], use_head=False)``
    (only as many stages as ``depths``). The first stage keeps stride 4, each further one halves.
    The stem norm is a plain channel LayerNorm; all later ones are ``BesselLayerNorm2d`` (see there).

    Args:
        in_chans: Image channels.
        depths: ConvNeXt blocks per stage.
        dims: Channels per stage.
        ls_init_value: Initial ConvNeXt layer-scale value.
    """

    def __init__(
        self,
        in_chans: int = 3,
        depths: tuple[int, ...] = (3, 3),
        dims: tuple[int, ...] = (128, 256),
        ls_init_value: float = 1e-6,
    ) -> None:
        super().__init__()
        if len(depths) != len(dims):
            raise ValueError(f"conv depths {tuple(depths)} and dims {tuple(dims)} must have the same length")
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=1e-6)
        )
        norm_layer = partial(BesselLayerNorm2d, eps=1e-6)
        stages = []
        prev_chs = dims[0]
        for i, (depth, chs) in enumerate(zip(depths, dims)):
            stages.append(
                ConvNeXtStage(
                    prev_chs,
                    chs,
                    stride=1 if i == 0 else 2,
                    depth=depth,
                    ls_init_value=ls_init_value,
                    conv_mlp=True,
                    act_layer="gelu",
                    norm_layer=norm_layer,
                )
            )
            prev_chs = chs
        self.stages = nn.Sequential(*stages)
        self.out_channels = list(dims)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # ConvNeXt init (timm): truncated normal convs, zero bias
        if isinstance(module, nn.Conv2d):
            trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class HybridEmbed(nn.Module):
    """Convolutional stages followed by a non-overlapping patch projection into tokens.

    Args:
        backbone: Convolutional stem returning a list of maps (the last is projected).
        embed_dim: Token width.
        patch_size: Projection kernel and stride on the last conv map (2: stride 8 -> 16).
    """

    def __init__(self, backbone: HybridConvStem, embed_dim: int, patch_size: int = 2) -> None:
        super().__init__()
        self.backbone = backbone
        self.patch_size = patch_size
        self.proj = nn.Conv2d(backbone.out_channels[-1], embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], list[torch.Tensor]]:
        """Returns tokens (B, N, C), the token grid (H, W) and the conv maps."""
        conv_features = self.backbone(x)
        x = self.proj(conv_features[-1])
        grid = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), grid, conv_features


class TokenMixing(nn.Module):
    """Multi-head softmax self-attention over tokens (fused via SDPA).

    Args:
        dim: Token width.
        num_heads: Attention heads.
        qkv_bias: Bias in the query / key-value projections.
        attn_drop: Dropout on attention weights (training only).
        proj_drop: Dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # default SDPA scale is head_dim ** -0.5, the reference's qk scale
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class TokenDWConv(nn.Module):
    """Depthwise 3x3 conv -> GELU -> BatchNorm -> depthwise 3x3 conv on a token grid.

    Args:
        dim: Channels.
        kernel_size: Depthwise kernel size.
    """

    def __init__(self, dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        padding = kernel_size // 2
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=padding, groups=dim)
        self.act = nn.GELU()
        # BatchNorm2d as in the distillation code (NVlabs: SyncBatchNorm; same keys, same eval maths)
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=padding, groups=dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        B, N, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, height, width)
        x = self.conv2(self.bn(self.act(self.conv1(x))))
        return x.reshape(B, C, N).transpose(1, 2)


class ConvFFN(nn.Module):
    """``fc1`` -> gated depthwise-conv residual -> ``fc2``; the value path of channel processing.

    There is deliberately no activation after ``fc1`` (the reference defines one but never
    applies it).

    Args:
        in_features: Input and output width.
        hidden_features: Hidden width.
        drop: Dropout after the conv branch and after ``fc2``.
    """

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = TokenDWConv(hidden_features)
        self.gamma = nn.Parameter(torch.ones(hidden_features))
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = self.fc1(x)
        x = self.drop(self.gamma * self.dwconv(x, height, width)) + x
        return self.drop(self.fc2(x))


class ChannelProcessing(nn.Module):
    """Attentive channel processing: a per-channel sigmoid gate on a ConvFFN-processed value.

    Per head, the gate for channel c is ``sigmoid(sum_n softmax_n(q)[n, c] * mean_c'(softmax_n(x))[n])``
    times a learned per-head temperature.

    Args:
        dim: Token width.
        num_heads: Heads (the gate is computed per head's channel group).
        qkv_bias: Bias in the query projection.
        attn_drop: Dropout on the gate.
        mlp_hidden_dim: Hidden width of the value ConvFFN.
        drop: Dropout inside the ConvFFN.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        mlp_hidden_dim: int | None = None,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.mlp_v = ConvFFN(dim, mlp_hidden_dim or dim, drop=drop)
        self.norm_v = nn.LayerNorm(dim, eps=1e-5)  # nn.LayerNorm default in the reference, not 1e-6
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        B, N, C = x.shape
        head_dim = C // self.num_heads
        q = self.q(x).reshape(B, N, self.num_heads, head_dim).transpose(1, 2)  # (B, h, N, d)
        k = x.reshape(B, N, self.num_heads, head_dim).transpose(1, 2)
        # token-softmaxed keys averaged over each head's channels -> one weight per token
        k = k.softmax(dim=-2).mean(dim=-1, keepdim=True)  # (B, h, N, 1)
        gate = torch.sigmoid(q.softmax(dim=-2).transpose(-1, -2) @ k) * self.temperature  # (B, h, d, 1)
        gate = self.attn_drop(gate)
        v = self.norm_v(self.mlp_v(x, height, width))
        v = v.reshape(B, N, self.num_heads, head_dim)
        return (v * gate.reshape(B, 1, self.num_heads, head_dim)).reshape(B, N, C)


class FANBlock(nn.Module):
    """Pre-norm FAN block: token mixing then channel processing, both with layer scale.

    Args:
        dim: Token width.
        num_heads: Heads for both sub-layers.
        mlp_ratio: ConvFFN hidden width over ``dim``.
        qkv_bias: Bias in query / key-value projections.
        drop: Dropout after projections.
        attn_drop: Dropout on attention weights and channel gates.
        drop_path: Stochastic depth rate of both residual branches.
        eta: Initial layer-scale value.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        eta: float = 1.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = TokenMixing(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ChannelProcessing(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            mlp_hidden_dim=int(dim * mlp_ratio),
            drop=drop,
        )
        self.gamma1 = nn.Parameter(eta * torch.ones(dim))
        self.gamma2 = nn.Parameter(eta * torch.ones(dim))

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x)))
        x = x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x), height, width))
        return x


class ClassAttention(nn.Module):
    """Attention of the cls token (first token) over all tokens, as in CaiT (fused via SDPA).

    Args:
        dim: Token width.
        num_heads: Attention heads.
        qkv_bias: Bias in the q / k / v projections.
        attn_drop: Dropout on attention weights (training only).
        proj_drop: Dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the updated cls token, shape (B, 1, C)."""
        B, N, C = x.shape
        q = self.q(x[:, :1]).reshape(B, 1, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        x_cls = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x_cls.transpose(1, 2).reshape(B, 1, C)))


class ClassAttentionBlock(nn.Module):
    """CaiT class-attention block with FAN's ``tokens_norm=True`` token path.

    Only the cls token attends and goes through the MLP; the patch tokens are carried as
    ``2 * norm2(x + gamma1 * norm1(x))`` (the reference's residual arithmetic, kept so
    published weights give published outputs).

    Args:
        dim: Token width.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden width over ``dim``.
        qkv_bias: Bias in the q / k / v projections.
        drop: Dropout after projections.
        attn_drop: Dropout on attention weights.
        eta: Initial layer-scale value.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        eta: float = 1.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ClassAttention(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop
        )
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.gamma1 = nn.Parameter(eta * torch.ones(dim))
        self.gamma2 = nn.Parameter(eta * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_norm = self.norm1(x)
        x_attn = torch.cat((self.attn(x_norm), x_norm[:, 1:]), dim=1)
        x = self.norm2(x + self.gamma1 * x_attn)
        cls_token = self.gamma2 * self.mlp(x[:, :1])
        return x + torch.cat((cls_token, x[:, 1:]), dim=1)


class FAN(nn.Module):
    """Hybrid FAN segmentation backbone: ConvNeXt stages + FAN blocks + class attention.

    ``forward`` returns four NCHW maps with ``out_channels`` channels at ``strides``
    (see the module docstring for where each comes from).

    Args:
        conv_depths: ConvNeXt blocks per convolutional stage.
        conv_dims: Channels per convolutional stage (maps 1 and 2).
        embed_dim: Token width (maps 3 and 4).
        depth: Number of FAN blocks.
        num_heads: Heads in FAN and class-attention blocks.
        out_index: Index of the FAN block whose output is map 3.
        cls_attn_layers: Number of class-attention blocks.
        mlp_ratio: Hidden width over ``embed_dim`` in both MLP kinds.
        qkv_bias: Bias in attention projections.
        in_chans: Image channels.
        drop_rate: Dropout after the positional encoding and projections.
        attn_drop_rate: Dropout on attention weights and channel gates.
        drop_path_rate: Stochastic depth rate of every FAN block (not ramped, as in the reference).
        eta: Initial layer-scale value of FAN and class-attention blocks.
        use_checkpoint: Recompute FAN blocks in backward (activation checkpointing) to save memory.
    """

    def __init__(
        self,
        conv_depths: tuple[int, ...] = (3, 5),
        conv_dims: tuple[int, ...] = (128, 256),
        embed_dim: int = 480,
        depth: int = 22,
        num_heads: int = 10,
        out_index: int = 18,
        cls_attn_layers: int = 2,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        eta: float = 1.0,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if not 0 <= out_index < depth:
            raise ValueError(
                f"out_index must index one of the {depth} FAN blocks (0..{depth - 1}), got {out_index}"
            )
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.out_index = out_index
        self.use_checkpoint = use_checkpoint
        conv = HybridConvStem(in_chans, tuple(conv_depths), tuple(conv_dims))
        self.patch_embed = HybridEmbed(conv, embed_dim=embed_dim, patch_size=2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = PositionalEncodingFourier(dim=embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList(
            FANBlock(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop=drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=drop_path_rate,
                eta=eta,
            )
            for _ in range(depth)
        )
        self.cls_attn_blocks = nn.ModuleList(
            ClassAttentionBlock(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop=drop_rate,
                attn_drop=attn_drop_rate,
                eta=eta,
            )
            for _ in range(cls_attn_layers)
        )
        conv_stride = 4 * 2 ** (len(conv_dims) - 1)
        self.out_channels: list[int] = [*conv_dims, embed_dim, embed_dim]
        self.strides: list[int] = [4 * 2**i for i in range(len(conv_dims))] + [conv_stride * 2] * 2
        self._init_weights()

    def _init_weights(self) -> None:
        # As the reference: truncated-normal linears, unit LayerNorms, He-normal (fan-out) convs
        # in the ConvFFN; ConvNeXt convs keep their own init; pos / patch projections keep torch's.
        trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, TokenDWConv):
                for conv in (module.conv1, module.conv2):
                    fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
                    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / fan_out))
                    nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Returns [stride-4 conv map, stride-8 conv map, block ``out_index`` map, final map].

        Args:
            x: Images (B, in_chans, H, W) with H, W >= 16.
        """
        if x.ndim != 4 or x.shape[1] != self.in_chans or min(x.shape[-2:]) < 16:
            raise ValueError(
                f"FAN expects images of shape (B, {self.in_chans}, H, W) with H, W >= 16, got {tuple(x.shape)}"
            )
        tokens, (height, width), outs = self.patch_embed(x)
        B = tokens.shape[0]
        pos = self.pos_embed(height, width).flatten(2).transpose(1, 2)  # (1, N, C)
        x = self.pos_drop(tokens + pos.to(tokens.dtype))
        for index, block in enumerate(self.blocks):
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpointed(block, x, height, width)
            else:
                x = block(x, height, width)
            if index == self.out_index:
                outs.append(self._tokens_to_map(x, height, width))
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        for block in self.cls_attn_blocks:
            x = block(x)
        outs.append(self._tokens_to_map(x[:, 1:], height, width))
        return outs

    @staticmethod
    def _tokens_to_map(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return x.transpose(1, 2).reshape(x.shape[0], -1, height, width).contiguous()


# ---------------------------------------------------------------------------------------------
# Presets. Sizes from NVlabs' segmentation backbones (depth, embed_dim, heads, out_idx); note
# that fan_small_12 has 10 blocks there and in the ImageNet definition.
# ---------------------------------------------------------------------------------------------


def _create(**kwargs) -> FAN:
    return FAN(**kwargs)


def fan_tiny_8_p4_hybrid(**kwargs) -> FAN:
    """FAN-T hybrid: 8 blocks of width 192; maps [128, 256, 192, 192]."""
    cfg = dict(conv_depths=(3, 3), conv_dims=(128, 256), embed_dim=192, depth=8, num_heads=8, out_index=7)
    return _create(**{**cfg, **kwargs})


def fan_small_12_p4_hybrid(**kwargs) -> FAN:
    """FAN-S hybrid: 10 blocks of width 384; maps [128, 256, 384, 384]."""
    cfg = dict(conv_depths=(3, 3), conv_dims=(128, 256), embed_dim=384, depth=10, num_heads=8, out_index=9)
    return _create(**{**cfg, **kwargs})


def fan_base_16_p4_hybrid(**kwargs) -> FAN:
    """FAN-B hybrid: 16 blocks of width 448; maps [128, 256, 448, 448]."""
    cfg = dict(conv_depths=(3, 3), conv_dims=(128, 256), embed_dim=448, depth=16, num_heads=8, out_index=15)
    return _create(**{**cfg, **kwargs})


def fan_large_16_p4_hybrid(**kwargs) -> FAN:
    """FAN-L hybrid: 22 blocks of width 480, map 3 from block 18; maps [128, 256, 480, 480]."""
    cfg = dict(conv_depths=(3, 5), conv_dims=(128, 256), embed_dim=480, depth=22, num_heads=10, out_index=18)
    return _create(**{**cfg, **kwargs})


def fan_nano_p4_hybrid(**kwargs) -> FAN:
    """Tiny CPU preset for the embedded default (not in the paper): maps [32, 64, 64, 64]."""
    cfg = dict(
        conv_depths=(1, 1),
        conv_dims=(32, 64),
        embed_dim=64,
        depth=2,
        num_heads=4,
        out_index=1,
        cls_attn_layers=1,
        mlp_ratio=2.0,
    )
    return _create(**{**cfg, **kwargs})


FAN_VARIANTS: dict[str, Callable[..., FAN]] = {
    "fan_nano_p4_hybrid": fan_nano_p4_hybrid,
    "fan_tiny_8_p4_hybrid": fan_tiny_8_p4_hybrid,
    "fan_small_12_p4_hybrid": fan_small_12_p4_hybrid,
    "fan_base_16_p4_hybrid": fan_base_16_p4_hybrid,
    "fan_large_16_p4_hybrid": fan_large_16_p4_hybrid,
}


def create_fan(name: str, drop_path_rate: float = 0.0, **kwargs) -> FAN:
    """Builds a FAN hybrid backbone by preset name, randomly initialised.

    ImageNet weights are loaded by :func:`uda.models.checkpoint.load_checkpoint` (through
    :func:`checkpoint_filter_fn`), the one loader of every checkpoint format.

    Args:
        name: One of ``FAN_VARIANTS`` (MIC vocabulary, e.g. ``fan_large_16_p4_hybrid``).
        drop_path_rate: Stochastic depth rate of every FAN block (the reference segmentation
            configs use 0).
        **kwargs: Further ``FAN`` arguments overriding the preset (e.g. ``use_checkpoint``).

    Raises:
        ValueError: Unknown ``name``.
    """
    if name not in FAN_VARIANTS:
        raise ValueError(f"unknown FAN variant {name!r}; valid variants: {', '.join(sorted(FAN_VARIANTS))}")
    return FAN_VARIANTS[name](drop_path_rate=drop_path_rate, **kwargs)


# ---------------------------------------------------------------------------------------------
# NVlabs ImageNet checkpoints
# ---------------------------------------------------------------------------------------------


def _unwrap(checkpoint: Mapping) -> Mapping[str, torch.Tensor]:
    # timm training scripts wrap the weights in {"state_dict": ...}; some releases use {"model": ...}
    for wrapper in ("state_dict", "model"):
        inner = checkpoint.get(wrapper)
        if isinstance(inner, Mapping):
            return inner
    return checkpoint


def _adapt_keys(state_dict: Mapping[str, torch.Tensor], num_cls_attn_blocks: int) -> dict[str, torch.Tensor]:
    """Applies NVlabs' own renames: ``pos_embeder.`` -> ``pos_embed.``; fused cls-attn qkv -> q, k, v."""
    adapted = {}
    for key, value in state_dict.items():
        if key.startswith("pos_embeder."):
            key = "pos_embed." + key[len("pos_embeder.") :]
        adapted[key] = value
    for i in range(num_cls_attn_blocks):
        for kind in ("weight", "bias"):
            fused = adapted.pop(f"cls_attn_blocks.{i}.attn.qkv.{kind}", None)
            if fused is not None:
                for name, part in zip("qkv", fused.chunk(3, dim=0)):
                    adapted[f"cls_attn_blocks.{i}.attn.{name}.{kind}"] = part
    return adapted


def _split_checkpoint(state_dict: Mapping, model: FAN) -> tuple[dict[str, torch.Tensor], list[str]]:
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"expected a state dict (a mapping of names to tensors), got {type(state_dict).__name__}"
        )
    adapted = _adapt_keys(_unwrap(state_dict), len(model.cls_attn_blocks))
    own = model.state_dict()
    used, unused, mismatched = {}, [], []
    for key, value in adapted.items():
        if key not in own:
            unused.append(key)
        elif not isinstance(value, torch.Tensor) or value.shape != own[key].shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            mismatched.append(f"{key}: file {shape} vs model {tuple(own[key].shape)}")
        else:
            used[key] = value
    if mismatched:
        raise ValueError(
            "checkpoint does not fit this FAN variant (is it the file of another size?); mismatched entries: "
            + "; ".join(mismatched[:5])
            + (f" ... ({len(mismatched)} in all)" if len(mismatched) > 5 else "")
        )
    if not used:
        raise ValueError(
            "checkpoint has no key of a FAN hybrid backbone (first keys: "
            f"{list(adapted)[:5]}); expected NVlabs FAN names such as 'blocks.0.attn.q.weight'"
        )
    return used, unused


def checkpoint_filter_fn(state_dict: Mapping, model: FAN) -> dict[str, torch.Tensor]:
    """Adapts an NVlabs FAN ImageNet state dict to this backbone (timm's filter-fn contract).

    Accepts flat state dicts or ones wrapped in ``state_dict`` / ``model``. Keys the backbone
    does not use (the classifier's ``norm.*`` / ``head.*``, anything unknown) are left out of
    the result and reported through this module's logger: expected classifier keys at INFO,
    any other key at WARNING.

    Args:
        state_dict: The loaded checkpoint.
        model: The backbone that will receive the weights.

    Returns:
        The entries to pass to ``model.load_state_dict``.

    Raises:
        ValueError: Not a state dict, no FAN key at all, or shapes of another variant.
    """
    used, unused = _split_checkpoint(state_dict, model)
    _report_unused(unused)
    return used


def _report_unused(unused: list[str]) -> None:
    classifier = [k for k in unused if k.startswith(CLASSIFIER_ONLY_PREFIXES)]
    unknown = [k for k in unused if not k.startswith(CLASSIFIER_ONLY_PREFIXES)]
    if classifier:
        _logger.info(
            "FAN checkpoint: %d classifier-only keys unused by the backbone: %s", len(classifier), classifier
        )
    if unknown:
        _logger.warning("FAN checkpoint: %d unknown keys unused by the backbone: %s", len(unknown), unknown)
