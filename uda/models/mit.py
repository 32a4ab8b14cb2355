"""Mix Transformer (MiT) encoder of SegFormer, as used by DAFormer / HRDA / MIC.

Paper: "SegFormer: Simple and Efficient Design for Semantic Segmentation with
Transformers", Xie et al., NeurIPS 2021 (https://arxiv.org/abs/2105.15203).

This is an independent re-implementation whose module and parameter names
follow the MiT of lhoyer/MIC (``seg/mmseg/models/backbones/mix_transformer.py``,
itself taken from NVlabs/SegFormer), so that SegFormer's ImageNet files
(``mit_b5.pth``) and the ``backbone.*`` weights of a MIC checkpoint load key
for key. Facts matched to that reference:

* overlapping patch embeddings: 7x7 conv stride 4 (stage 1), 3x3 stride 2
  (stages 2-4), padding ``kernel // 2``, followed by a LayerNorm with the
  PyTorch default eps 1e-5;
* efficient self-attention: keys/values from a ``sr_ratio`` x ``sr_ratio``
  strided conv + LayerNorm (eps 1e-5) of the tokens (sr 8, 4, 2, 1);
* Mix-FFN: fc1 -> 3x3 depth-wise conv -> exact GELU -> fc2;
* block norms and the final per-stage norms: LayerNorm eps 1e-6;
* stochastic depth linearly increasing from 0 to ``drop_path_rate`` over all
  blocks (MIC's default 0.1);
* no classification head (SegFormer's ``head.*`` keys are dropped at load).

Attention runs through ``torch.nn.functional.scaled_dot_product_attention``
(fused kernels on GPU); an explicit softmax path is kept for checking it.

One model family per file, as in timm (~600 lines): blocks, encoder, presets and the
``checkpoint_filter_fn`` that adapts SegFormer files change together.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, to_2tuple, trunc_normal_

from .recompute import checkpointed

__all__ = [
    "MixVisionTransformer",
    "MIT_VARIANTS",
    "create_mit",
    "checkpoint_filter_fn",
    "mit_nano",
    "mit_b0",
    "mit_b1",
    "mit_b2",
    "mit_b3",
    "mit_b4",
    "mit_b5",
]

_logger = logging.getLogger(__name__)

# Stride of each stage's output with respect to the input image.
MIT_STRIDES = [4, 8, 16, 32]


class DWConv(nn.Module):
    """3x3 depth-wise convolution applied to a token sequence.

    Args:
        dim: Number of channels (one filter per channel).
    """

    def __init__(self, dim: int = 768) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, _, channels = x.shape
        x = x.transpose(1, 2).reshape(batch, channels, height, width)
        x = self.dwconv(x)
        return x.flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """Mix-FFN: Linear -> depth-wise 3x3 conv -> GELU -> Linear.

    The depth-wise conv leaks positional information into the tokens, which
    is why MiT needs no positional embedding.

    Args:
        in_features: Input (and default output) channels.
        hidden_features: Hidden channels; defaults to ``in_features``.
        out_features: Output channels; defaults to ``in_features``.
        act_layer: Activation module class.
        drop: Dropout after the activation and after ``fc2``.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = self.fc1(x)
        x = self.dwconv(x, height, width)
        x = self.drop(self.act(x))
        return self.drop(self.fc2(x))


class Attention(nn.Module):
    """Multi-head self-attention with spatial reduction of keys and values.

    With ``sr_ratio > 1`` the keys/values come from the token map shrunk by
    a strided ``sr_ratio`` x ``sr_ratio`` conv, which makes attention cost
    ``N * N / sr_ratio**2`` instead of ``N * N``.

    Args:
        dim: Token channels.
        num_heads: Attention heads; must divide ``dim``.
        qkv_bias: Whether ``q`` and ``kv`` projections have a bias.
        qk_scale: Override of the ``head_dim ** -0.5`` logit scale.
        attn_drop: Dropout on the attention probabilities (training only).
        proj_drop: Dropout after the output projection.
        sr_ratio: Spatial-reduction ratio for keys and values.
        fused_attn: Use ``F.scaled_dot_product_attention``; ``False`` runs
            the explicit softmax formulation (same result, more memory).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        sr_ratio: int = 1,
        fused_attn: bool = True,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}.")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5
        self.fused_attn = fused_attn

        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            # Default eps (1e-5) here, unlike the blocks' 1e-6 (reference).
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, num_tokens, channels = x.shape
        # (B, N, C) -> (B, heads, N, head_dim)
        q = self.q(x).reshape(batch, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)

        if self.sr_ratio > 1:
            if height < self.sr_ratio or width < self.sr_ratio:
                raise ValueError(
                    f"Feature map {height}x{width} is smaller than the "
                    f"spatial-reduction ratio {self.sr_ratio}; the input "
                    f"image is too small for MiT (use at least 32x32)."
                )
            x_map = x.transpose(1, 2).reshape(batch, channels, height, width)
            x = self.norm(self.sr(x_map).flatten(2).transpose(1, 2))
        # (B, M, 2C) -> (2, B, heads, M, head_dim)
        kv = self.kv(x).reshape(batch, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)

        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale
            )
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v

        x = x.transpose(1, 2).reshape(batch, num_tokens, channels)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: efficient attention + Mix-FFN.

    Args:
        dim: Token channels.
        num_heads: Attention heads.
        mlp_ratio: Hidden/in channels ratio of the Mix-FFN.
        qkv_bias: Bias in the ``q``/``kv`` projections.
        qk_scale: Override of the attention logit scale.
        drop: Dropout after projections.
        attn_drop: Dropout on attention probabilities.
        drop_path: Stochastic-depth probability of both residual branches.
        act_layer: Activation of the Mix-FFN.
        norm_layer: Norm for ``norm1``/``norm2``.
        sr_ratio: Spatial-reduction ratio of the attention.
        fused_attn: Attention through SDPA (see :class:`Attention`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        sr_ratio: int = 1,
        fused_attn: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            attn_drop=attn_drop,
            proj_drop=drop,
            sr_ratio=sr_ratio,
            fused_attn=fused_attn,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), height, width))
        x = x + self.drop_path(self.mlp(self.norm2(x), height, width))
        return x


class OverlapPatchEmbed(nn.Module):
    """Overlapping patch embedding: strided conv + LayerNorm (eps 1e-5).

    Args:
        patch_size: Conv kernel size (7 in stage 1, 3 after).
        stride: Conv stride (4 in stage 1, 2 after).
        in_chans: Input channels.
        embed_dim: Output channels.
    """

    def __init__(
        self, patch_size: int | tuple[int, int] = 7, stride: int = 4, in_chans: int = 3, embed_dim: int = 768
    ) -> None:
        super().__init__()
        patch_size = to_2tuple(patch_size)
        self.patch_size = patch_size
        self.proj = nn.Conv2d(
            in_chans,
            embed_dim,
            kernel_size=patch_size,
            stride=stride,
            padding=(patch_size[0] // 2, patch_size[1] // 2),
        )
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        _, _, height, width = x.shape
        x = self.norm(x.flatten(2).transpose(1, 2))
        return x, height, width


class MixVisionTransformer(nn.Module):
    """Hierarchical MiT encoder returning four feature maps.

    Module names (``patch_embed{i}``, ``block{i}``, ``norm{i}`` for stages
    i = 1..4) are those of the SegFormer/MIC reference so its checkpoints
    load unchanged.

    Args:
        in_chans: Input image channels.
        embed_dims: Channels of the four stages.
        num_heads: Attention heads per stage.
        mlp_ratios: Mix-FFN expansion per stage.
        qkv_bias: Bias in the ``q``/``kv`` projections.
        qk_scale: Override of the attention logit scale.
        drop_rate: Dropout after projections.
        attn_drop_rate: Dropout on attention probabilities.
        drop_path_rate: Stochastic depth of the last block; increases
            linearly from 0 over all blocks (MIC uses 0.1).
        norm_layer: Norm of the blocks and of the stage outputs (all MiT
            variants use LayerNorm eps 1e-6; patch-embedding and attention
            norms always use eps 1e-5).
        depths: Blocks per stage.
        sr_ratios: Attention spatial-reduction ratio per stage.
        fused_attn: Attention through ``F.scaled_dot_product_attention``.

    Attributes:
        out_channels: Channels of the four outputs (= ``embed_dims``).
        strides: Output strides ``[4, 8, 16, 32]``.
    """

    def __init__(
        self,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        num_heads: Sequence[int] = (1, 2, 4, 8),
        mlp_ratios: Sequence[float] = (4, 4, 4, 4),
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        norm_layer: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=1e-6),
        depths: Sequence[int] = (3, 4, 6, 3),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        fused_attn: bool = True,
    ) -> None:
        super().__init__()
        for name, values in (
            ("embed_dims", embed_dims),
            ("num_heads", num_heads),
            ("mlp_ratios", mlp_ratios),
            ("depths", depths),
            ("sr_ratios", sr_ratios),
        ):
            if len(values) != 4:
                raise ValueError(f"{name} must have 4 entries (one per stage), got {list(values)}.")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}.")
        self.embed_dims = list(embed_dims)
        self.depths = list(depths)
        #: Recompute each block in backward instead of keeping its
        #: activations (training only): less memory, one more forward.
        self.use_checkpoint = False
        self.out_channels = list(embed_dims)
        self.strides = list(MIT_STRIDES)

        # Registration order (all patch embeddings, then block/norm per
        # stage) follows the reference so state-dict key order matches too.
        in_dims = [in_chans] + list(embed_dims[:-1])
        for stage in range(4):
            is_first = stage == 0
            self.add_module(
                f"patch_embed{stage + 1}",
                OverlapPatchEmbed(
                    patch_size=7 if is_first else 3,
                    stride=4 if is_first else 2,
                    in_chans=in_dims[stage],
                    embed_dim=embed_dims[stage],
                ),
            )

        # Stochastic-depth rate of every block, in forward order (on CPU
        # explicitly so the model can be built under torch.device('meta')).
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        block_start = 0
        for stage in range(4):
            self.add_module(
                f"block{stage + 1}",
                nn.ModuleList(
                    [
                        Block(
                            dim=embed_dims[stage],
                            num_heads=num_heads[stage],
                            mlp_ratio=mlp_ratios[stage],
                            qkv_bias=qkv_bias,
                            qk_scale=qk_scale,
                            drop=drop_rate,
                            attn_drop=attn_drop_rate,
                            drop_path=dpr[block_start + i],
                            norm_layer=norm_layer,
                            sr_ratio=sr_ratios[stage],
                            fused_attn=fused_attn,
                        )
                        for i in range(depths[stage])
                    ]
                ),
            )
            self.add_module(f"norm{stage + 1}", norm_layer(embed_dims[stage]))
            block_start += depths[stage]

        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Reference init: trunc-normal Linear, fan-out normal conv."""
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            fan_out = (module.kernel_size[0] * module.kernel_size[1] * module.out_channels) // module.groups
            nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def set_fused_attn(self, enable: bool) -> None:
        """Switch every attention layer between SDPA and explicit softmax.

        Args:
            enable: ``True`` for ``F.scaled_dot_product_attention``.
        """
        for module in self.modules():
            if isinstance(module, Attention):
                module.fused_attn = enable

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encode an image batch.

        Args:
            x: Images ``(B, in_chans, H, W)``; any H, W >= 32 (sizes not
                divisible by 32 give floor-rounded maps, as the reference).

        Returns:
            Four maps ``(B, out_channels[i], ~H / strides[i], ~W / strides[i])``.
        """
        if x.ndim != 4:
            raise ValueError(f"MiT expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}.")
        batch = x.shape[0]
        outs = []
        for stage in range(1, 5):
            x, height, width = getattr(self, f"patch_embed{stage}")(x)
            for block in getattr(self, f"block{stage}"):
                if self.use_checkpoint and self.training and torch.is_grad_enabled():
                    x = checkpointed(block, x, height, width)
                else:
                    x = block(x, height, width)
            x = getattr(self, f"norm{stage}")(x)
            x = x.reshape(batch, height, width, -1).permute(0, 3, 1, 2).contiguous()
            outs.append(x)
        return outs


def checkpoint_filter_fn(
    state_dict: Mapping[str, torch.Tensor], model: MixVisionTransformer
) -> dict[str, torch.Tensor]:
    """Adapt a foreign MiT checkpoint to ``model``'s keys.

    Handles SegFormer's ImageNet files (``mit_b*.pth``: flat dict whose
    classification ``head.*`` keys the encoder lacks) and mmseg-style dicts
    whose keys carry a ``backbone.`` prefix (a MIC ``model.backbone.*`` dict
    with ``model.`` already stripped). Every key that does not fit is
    logged at WARNING level, never dropped silently.

    Args:
        state_dict: Raw state dict (already unwrapped from ``state_dict`` /
            ``model`` containers).
        model: The model the weights are for.

    Returns:
        The filtered state dict, keyed like ``model.state_dict()``.

    Raises:
        ValueError: When a kept tensor's shape differs from the model's
            (typically a checkpoint of another MiT variant).
    """
    if any(k.startswith("backbone.") for k in state_dict):
        prefix_dropped = [k for k in state_dict if not k.startswith("backbone.")]
        if prefix_dropped:
            _logger.warning(
                "checkpoint_filter_fn: dropped %d non-backbone keys: %s",
                len(prefix_dropped),
                _summarise_keys(prefix_dropped),
            )
        state_dict = {k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")}

    model_state = model.state_dict()
    filtered: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    mismatched: list[str] = []
    for key, value in state_dict.items():
        if key not in model_state:
            dropped.append(key)
            continue
        if tuple(value.shape) != tuple(model_state[key].shape):
            mismatched.append(
                f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(model_state[key].shape)}"
            )
            continue
        filtered[key] = value
    if mismatched:
        raise ValueError(
            f"{len(mismatched)} checkpoint tensors have shapes that do not "
            f"fit this MiT (is it a checkpoint of another variant?): " + "; ".join(mismatched[:5])
        )
    if dropped:
        _logger.warning(
            "checkpoint_filter_fn: dropped %d keys the MiT encoder does not have: %s",
            len(dropped),
            _summarise_keys(dropped),
        )
    return filtered


def _summarise_keys(keys: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


# Architecture of each variant (SegFormer Table 6 / MIC presets). All use
# qkv_bias=True and LayerNorm eps 1e-6 in blocks, mlp ratio 4, sr 8/4/2/1.
_MIT_ARCHS: dict[str, dict] = {
    # Ours, not in the paper: tiny encoder for the CPU embedded default.
    "mit_nano": dict(embed_dims=[16, 32, 64, 128], num_heads=[1, 1, 2, 4], depths=[1, 1, 1, 1]),
    "mit_b0": dict(embed_dims=[32, 64, 160, 256], num_heads=[1, 2, 5, 8], depths=[2, 2, 2, 2]),
    "mit_b1": dict(embed_dims=[64, 128, 320, 512], num_heads=[1, 2, 5, 8], depths=[2, 2, 2, 2]),
    "mit_b2": dict(embed_dims=[64, 128, 320, 512], num_heads=[1, 2, 5, 8], depths=[3, 4, 6, 3]),
    "mit_b3": dict(embed_dims=[64, 128, 320, 512], num_heads=[1, 2, 5, 8], depths=[3, 4, 18, 3]),
    "mit_b4": dict(embed_dims=[64, 128, 320, 512], num_heads=[1, 2, 5, 8], depths=[3, 8, 27, 3]),
    "mit_b5": dict(embed_dims=[64, 128, 320, 512], num_heads=[1, 2, 5, 8], depths=[3, 6, 40, 3]),
}


def _create(name: str, **kwargs) -> MixVisionTransformer:
    arch = dict(_MIT_ARCHS[name], mlp_ratios=[4, 4, 4, 4], sr_ratios=[8, 4, 2, 1], qkv_bias=True)
    clash = sorted(set(arch) & set(kwargs))
    if clash:
        raise ValueError(
            f"{name} fixes {clash}; build MixVisionTransformer directly for a custom architecture."
        )
    return MixVisionTransformer(**arch, **kwargs)


def mit_nano(**kwargs) -> MixVisionTransformer:
    """Tiny MiT (dims 16-128, one block per stage) for CPU smoke runs."""
    return _create("mit_nano", **kwargs)


def mit_b0(**kwargs) -> MixVisionTransformer:
    """MiT-B0 (3.3M parameters)."""
    return _create("mit_b0", **kwargs)


def mit_b1(**kwargs) -> MixVisionTransformer:
    """MiT-B1 (13.2M parameters)."""
    return _create("mit_b1", **kwargs)


def mit_b2(**kwargs) -> MixVisionTransformer:
    """MiT-B2 (24.2M parameters)."""
    return _create("mit_b2", **kwargs)


def mit_b3(**kwargs) -> MixVisionTransformer:
    """MiT-B3 (44.1M parameters)."""
    return _create("mit_b3", **kwargs)


def mit_b4(**kwargs) -> MixVisionTransformer:
    """MiT-B4 (60.8M parameters)."""
    return _create("mit_b4", **kwargs)


def mit_b5(**kwargs) -> MixVisionTransformer:
    """MiT-B5 (81.4M parameters), the DAFormer/HRDA/MIC backbone."""
    return _create("mit_b5", **kwargs)


MIT_VARIANTS: dict[str, Callable[..., MixVisionTransformer]] = {
    "mit_nano": mit_nano,
    "mit_b0": mit_b0,
    "mit_b1": mit_b1,
    "mit_b2": mit_b2,
    "mit_b3": mit_b3,
    "mit_b4": mit_b4,
    "mit_b5": mit_b5,
}


def create_mit(name: str, **kwargs) -> MixVisionTransformer:
    """Build a MiT variant by name, randomly initialised.

    SegFormer's ImageNet weights are loaded by :func:`uda.models.checkpoint.load_checkpoint`
    (through :func:`checkpoint_filter_fn`), the one loader of every checkpoint format.

    Args:
        name: One of :data:`MIT_VARIANTS` (``mit_nano``, ``mit_b0`` ...
            ``mit_b5``).
        **kwargs: Passed to :class:`MixVisionTransformer` (e.g.
            ``drop_path_rate=0.1``, ``fused_attn``).

    Returns:
        The encoder.

    Raises:
        ValueError: For an unknown ``name``.
    """
    if name not in MIT_VARIANTS:
        raise ValueError(f"Unknown MiT variant {name!r}; valid names: {', '.join(MIT_VARIANTS)}.")
    return MIT_VARIANTS[name](**kwargs)
