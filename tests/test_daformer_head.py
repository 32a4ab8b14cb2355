"""DAFormer head: MIC parameter names/shapes, forward semantics."""

import pytest
import torch
import torch.nn.functional as F

from uda.models.daformer_head import DAFormerHead, MLPEmbed
from references import reference


def _expected_mic_keys(in_channels, channels, num_classes, dilations):
    """Key -> shape of MIC's DAFormerHead with sep-ASPP fusion (written out
    from daformer_head.py / sep_aspp_head.py and mmcv ConvModule naming)."""
    keys = {"conv_seg.weight": (num_classes, channels, 1, 1), "conv_seg.bias": (num_classes,)}
    for i, c in enumerate(in_channels):
        keys[f"embed_layers.{i}.proj.weight"] = (channels, c)
        keys[f"embed_layers.{i}.proj.bias"] = (channels,)
    fused = channels * len(in_channels)

    def conv_module(prefix, cin, cout, k, groups=1):
        keys[f"{prefix}.conv.weight"] = (cout, cin // groups, k, k)
        for name in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix}.bn.{name}"] = (cout,)
        keys[f"{prefix}.bn.num_batches_tracked"] = ()

    for j, d in enumerate(dilations):
        p = f"fuse_layer.aspp_modules.{j}"
        if d == 1:
            conv_module(p, fused, channels, 1)
        else:
            conv_module(f"{p}.depthwise_conv", fused, fused, 3, groups=fused)
            conv_module(f"{p}.pointwise_conv", fused, channels, 1)
    conv_module("fuse_layer.bottleneck", len(dilations) * channels, channels, 3)
    return keys


def test_mic_keys_and_shapes_mitb5_config():
    head = DAFormerHead([64, 128, 320, 512], 19, 256, (1, 6, 12, 18))
    got = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    expected = _expected_mic_keys([64, 128, 320, 512], 256, 19, (1, 6, 12, 18))
    assert got == expected
    assert list(got) == list(expected)  # same order as MIC's state dict


def test_scale_attention_variant_uses_1x1_conv_fusion():
    head = DAFormerHead([16, 32], 1, 8, fusion="conv")
    got = {k: tuple(v.shape) for k, v in head.state_dict().items() if k.startswith("fuse_layer")}
    assert got == {
        "fuse_layer.conv.weight": (8, 16, 1, 1),
        "fuse_layer.bn.weight": (8,),
        "fuse_layer.bn.bias": (8,),
        "fuse_layer.bn.running_mean": (8,),
        "fuse_layer.bn.running_var": (8,),
        "fuse_layer.bn.num_batches_tracked": (),
    }
    with pytest.raises(ValueError, match="fusion"):
        DAFormerHead([16], 1, 8, fusion="isa")


def test_output_at_finest_level_for_fan_strides():
    # FAN-L-like pyramid: strides 4, 8, 16, 16.
    head = DAFormerHead([8, 16, 24, 24], 5, 16, (1, 2)).eval()
    feats = [
        torch.randn(2, 8, 16, 16),
        torch.randn(2, 16, 8, 8),
        torch.randn(2, 24, 4, 4),
        torch.randn(2, 24, 4, 4),
    ]
    assert head(feats).shape == (2, 5, 16, 16)
    with pytest.raises(ValueError, match="expects 4 feature maps"):
        head(feats[:3])


def test_mlp_embed_is_a_per_pixel_linear_map():
    embed = MLPEmbed(6, 4)
    x = torch.randn(2, 6, 3, 5)
    as_conv = F.conv2d(x, embed.proj.weight[:, :, None, None], embed.proj.bias)
    torch.testing.assert_close(embed(x), as_conv)


def test_forward_equals_manual_composition():
    torch.manual_seed(0)
    head = DAFormerHead([4, 6], 3, 8, (1, 2), dropout_ratio=0.0).eval()
    feats = [torch.randn(1, 4, 8, 8), torch.randn(1, 6, 4, 4)]
    e0 = head.embed_layers["0"](feats[0])
    e1 = F.interpolate(head.embed_layers["1"](feats[1]), size=(8, 8), mode="bilinear", align_corners=False)
    x = torch.cat([e0, e1], dim=1)
    aspp = head.fuse_layer
    branches = [aspp.aspp_modules[0](x), aspp.aspp_modules[1](x)]
    expected = head.conv_seg(aspp.bottleneck(torch.cat(branches, 1)))
    torch.testing.assert_close(head(feats), expected)
    # The dilated branch is depth-wise (groups = channels) then point-wise.
    dw = aspp.aspp_modules[1].depthwise_conv.conv
    assert dw.groups == 16 and dw.dilation == (2, 2) and dw.padding == (2, 2)
    assert dw.bias is None


def test_matches_mmcv_conv_module_names():
    mmcv_cnn = reference("mmcv.cnn")
    norm = dict(type="BN", requires_grad=True)
    ref = mmcv_cnn.DepthwiseSeparableConvModule(
        32, 8, 3, dilation=6, padding=6, norm_cfg=norm, act_cfg=dict(type="ReLU")
    )
    head = DAFormerHead([4, 4, 4, 4], 2, 8, (1, 6))  # fuses 4 x 8 channels
    ours = head.fuse_layer.aspp_modules[1]
    assert {k: v.shape for k, v in ref.state_dict().items()} == {
        k: v.shape for k, v in ours.state_dict().items()
    }
    ours.load_state_dict(ref.state_dict())
    ref.eval(), ours.eval()
    x = torch.randn(1, 32, 9, 9)
    torch.testing.assert_close(ours(x), ref(x))
    bottleneck = mmcv_cnn.ConvModule(16, 8, 3, padding=1, norm_cfg=norm)
    assert list(bottleneck.state_dict()) == list(head.fuse_layer.bottleneck.state_dict())
