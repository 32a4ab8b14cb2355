"""Tests for the FAN hybrid backbone (uda/models/fan.py).

Reference data (tests/data), produced once by throw-away scripts outside the repository:

* ``fan_reference.pt`` — NVlabs/FAN @ ee1b7df1016205ed26e28c0683b14238f3530a84,
  ``segmentation/mmseg/models/backbones/fan.py`` + ``convnext_utils.py``, run unmodified under
  timm 1.0.31 / torch 2.13 (CPU) with three shims: ``mmseg.models.builder.BACKBONES`` and
  ``mmseg.utils.get_root_logger`` / ``mmcv.runner.load_checkpoint`` stubbed (only used as a
  registry decorator / for file loading), and timm's ``build_model_with_cfg`` replaced by a direct
  constructor call (timm 1.0 rejects the ``default_cfg`` kwarg of timm 0.5). Script outline:
  ``backbone = _create_hybrid_backbone(depths=[1, 2], dims=[16, 32, 64, 128], use_head=False)``;
  ``ref = FAN(patch_size=16, embed_dim=32, depth=3, backbone=backbone, out_idx=1, num_heads=4,
  mlp_ratio=2., qkv_bias=True, cls_attn_layers=2, tokens_norm=True)`` (rates 0, eta 1);
  every state-dict entry ``v + 0.1 * randn`` (BN ``running_var`` ``0.5 + rand``; generator seed 1)
  so that no block is near identity; inputs ``x_a`` (2x3x64x96) and ``x_b`` (1x3x70x100, not a
  multiple of 16); outputs in eval mode for both and in train mode (batch-statistics BN) for
  ``x_a``. The same weights in leoil/ACDC_UDA_seg @ b69db66 (the distillation's copy, BatchNorm2d
  instead of SyncBatchNorm) gave bit-identical eval outputs. Stored: ``sd.*`` (weights),
  ``x_*``, ``out_<input>_<mode>_<i>``, ``cfg_*``.
* ``fan_imagenet_keys.json`` — from NVlabs/FAN @ ee1b7df ``models/fan.py`` (ImageNet classifier,
  the definition behind ``fan_hybrid_*_in22k_1k.pth.tar``): key names and shapes of the
  ``fan_large_16_p4_hybrid`` classifier state dict, and parameter counts of the four hybrid
  classifiers and of the four segmentation backbones.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from uda.models.builder import build_backbone
from uda.models.checkpoint import CheckpointMismatchError, load_checkpoint
from uda.models.checkpoint_files import CheckpointError
from uda.models.fan import FAN, FAN_VARIANTS, PositionalEncodingFourier, checkpoint_filter_fn, create_fan

DATA = Path(__file__).parent / "data"
FULL_VARIANTS = [
    "fan_tiny_8_p4_hybrid",
    "fan_small_12_p4_hybrid",
    "fan_base_16_p4_hybrid",
    "fan_large_16_p4_hybrid",
]
EXPECTED_CHANNELS = {
    "fan_nano_p4_hybrid": [32, 64, 64, 64],
    "fan_tiny_8_p4_hybrid": [128, 256, 192, 192],
    "fan_small_12_p4_hybrid": [128, 256, 384, 384],
    "fan_base_16_p4_hybrid": [128, 256, 448, 448],
    "fan_large_16_p4_hybrid": [128, 256, 480, 480],
}


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return torch.load(DATA / "fan_reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def imagenet_keys() -> dict:
    return json.loads((DATA / "fan_imagenet_keys.json").read_text())


def _reference_model(reference: dict[str, torch.Tensor]) -> FAN:
    cfg = {k[4:]: v for k, v in reference.items() if k.startswith("cfg_")}
    model = FAN(
        conv_depths=tuple(cfg["conv_depths"].tolist()),
        conv_dims=tuple(cfg["conv_dims"].tolist()),
        embed_dim=int(cfg["embed_dim"]),
        depth=int(cfg["depth"]),
        num_heads=int(cfg["num_heads"]),
        out_index=int(cfg["out_idx"]),
        cls_attn_layers=int(cfg["cls_attn_layers"]),
        mlp_ratio=float(cfg["mlp_ratio"]),
    )
    state = {k[3:]: v for k, v in reference.items() if k.startswith("sd.")}
    model.load_state_dict(state, strict=True)  # same key set as NVlabs' segmentation backbone
    return model


def _nano(**kwargs) -> FAN:
    torch.manual_seed(0)
    return create_fan("fan_nano_p4_hybrid", **kwargs)


def _imagenet_file_from(model: FAN) -> dict[str, torch.Tensor]:
    """A classifier-style state dict: the backbone's entries plus the ImageNet-only norm/head."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dim = model.embed_dim
    state.update(
        {
            "norm.weight": torch.ones(dim),
            "norm.bias": torch.zeros(dim),
            "head.weight": torch.randn(1000, dim),
            "head.bias": torch.zeros(1000),
        }
    )
    return state


# --- numerical faithfulness ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "b"])
def test_eval_outputs_match_nvlabs_segmentation_backbone(reference, name):
    model = _reference_model(reference).eval()
    with torch.no_grad():
        outs = model(reference[f"x_{name}"])
    assert len(outs) == 4
    for i, out in enumerate(outs):
        expected = reference[f"out_{name}_eval_{i}"]
        assert out.shape == expected.shape
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=f"map {i}")


def test_train_mode_outputs_match_nvlabs_segmentation_backbone(reference):
    model = _reference_model(reference).train()  # BatchNorm on batch statistics, all drop rates 0
    with torch.no_grad():
        outs = model(reference["x_a"])
    for i, out in enumerate(outs):
        torch.testing.assert_close(out, reference[f"out_a_train_{i}"], atol=1e-5, rtol=1e-5, msg=f"map {i}")


def test_positional_encoding_uses_true_division_in_exponent():
    pe = PositionalEncodingFourier(hidden_dim=4, dim=8)
    with torch.no_grad():  # identity projection exposes the raw sin/cos channels
        pe.token_projection.weight.copy_(torch.eye(8)[:, :, None, None])
        pe.token_projection.bias.zero_()
        enc = pe(2, 3)[0]  # (8, 2, 3): 4 y-channels then 4 x-channels
    x = 2.0 / (3 + 1e-6) * 2 * torch.pi  # column index 1 of 3, normalised
    dim_t = 10000.0 ** (torch.arange(4.0) / 4)  # i / d, not floor(i / 2) * 2 / d
    expected = torch.stack(
        [(x / dim_t[0]).sin(), (x / dim_t[1]).cos(), (x / dim_t[2]).sin(), (x / dim_t[3]).cos()]
    )
    torch.testing.assert_close(enc[4:, 0, 1], expected)
    floor_dim_t = 10000.0 ** (torch.tensor([0.0, 0.0, 2.0, 2.0]) / 4)
    assert not torch.allclose(enc[5, 0, 1], (x / floor_dim_t[1]).cos())


def test_layernorm_eps_as_reference():
    model = _nano()
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            expected = 1e-5 if name.endswith("mlp.norm_v") else 1e-6
            assert module.eps == expected, name


# --- shapes, presets -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", FULL_VARIANTS)
def test_full_presets_shapes_on_meta_device(name):
    with torch.device("meta"):
        model = create_fan(name).eval()
        outs = model(torch.empty(2, 3, 96, 160))
    assert model.out_channels == EXPECTED_CHANNELS[name]
    assert model.strides == [4, 8, 16, 16]
    assert [tuple(o.shape) for o in outs] == [
        (2, c, 96 // s, 160 // s) for c, s in zip(model.out_channels, model.strides)
    ]


def test_fan_large_third_map_comes_from_block_18_without_norm():
    with torch.device("meta"):
        model = create_fan("fan_large_16_p4_hybrid")
    assert len(model.blocks) == 22 and model.out_index == 18 and len(model.cls_attn_blocks) == 2


def test_nano_preset_runs_on_cpu_with_backward():
    model = _nano()
    x = torch.randn(1, 3, 128, 256, requires_grad=True)
    outs = model(x)
    assert [tuple(o.shape) for o in outs] == [
        (1, 32, 32, 64),
        (1, 64, 16, 32),
        (1, 64, 8, 16),
        (1, 64, 8, 16),
    ]
    sum(o.square().mean() for o in outs).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_nano_preset_is_fast_on_cpu():
    """128x256 forward+backward well under 0.2 s of CPU (about 0.03 s on one core here).

    Measured as CPU time of this thread with one intra-op thread, best of 5, so that other
    processes on a shared machine do not make the test flaky.
    """
    model = _nano()
    x = torch.randn(1, 3, 128, 256)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        timings = []
        for _ in range(5):
            start = time.thread_time()
            outs = model(x)
            sum(o.mean() for o in outs).backward()
            timings.append(time.thread_time() - start)
    finally:
        torch.set_num_threads(threads)
    assert min(timings) < 0.1, timings


@pytest.mark.parametrize("size", [(70, 100), (16, 16), (33, 47)])
def test_non_divisible_sizes_floor_like_the_reference(size):
    model = _nano().eval()
    h, w = size
    with torch.no_grad():
        outs = model(torch.randn(1, 3, h, w))
    h4, w4 = h // 4, w // 4
    expected = [(h4, w4), (h4 // 2, w4 // 2), (h4 // 4, w4 // 4), (h4 // 4, w4 // 4)]
    assert [tuple(o.shape[-2:]) for o in outs] == expected


@pytest.mark.parametrize("shape", [(1, 3, 15, 64), (1, 1, 64, 64), (3, 64, 64)])
def test_bad_input_shape_raises_clear_error(shape):
    with pytest.raises(ValueError, match="expects images"):
        _nano()(torch.randn(*shape))


def test_eval_is_deterministic_and_batch_independent():
    model = _nano().eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        first, second = model(x), model(x)
        single = model(x[1:])
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b)
        torch.testing.assert_close(a[1:], c, atol=1e-5, rtol=1e-5)


def test_drop_path_rate_is_applied_to_every_fan_block():
    model = _nano(drop_path_rate=0.2)
    assert all(block.drop_path.drop_prob == 0.2 for block in model.blocks)
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x), model(x)))
    with pytest.raises(ValueError, match="drop_path_rate"):
        _nano(drop_path_rate=1.5)


def test_activation_checkpointing_gives_same_gradients():
    plain, ckpt = _nano(), _nano(use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 64, 64)
    for model in (plain, ckpt):
        sum(o.square().mean() for o in model(x)).backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_unknown_variant_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        create_fan("fan_huge_p4_hybrid")
    for name in FAN_VARIANTS:
        assert name in str(info.value)


def test_invalid_out_index_raises():
    with pytest.raises(ValueError, match="out_index"):
        create_fan("fan_nano_p4_hybrid", out_index=2)


# --- parameter counts ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FULL_VARIANTS)
def test_parameter_counts_equal_nvlabs(name, imagenet_keys):
    with torch.device("meta"):
        model = create_fan(name)
    backbone = sum(p.numel() for p in model.parameters())
    dim = model.embed_dim
    classifier_only = 2 * dim + dim * 1000 + 1000  # norm + head of the ImageNet classifier
    counts = imagenet_keys["params"][name]
    print(
        f"{name}: backbone {backbone:,} (NVlabs segmentation {counts['segmentation_backbone']:,}); "
        f"+ norm/head {classifier_only:,} = {backbone + classifier_only:,} (NVlabs classifier {counts['classifier']:,})"
    )
    assert backbone == counts["segmentation_backbone"]
    assert backbone + classifier_only == counts["classifier"]
    if name == "fan_large_16_p4_hybrid":
        assert round(counts["classifier"] / 1e6, 1) in (76.8, 76.9)  # published as 76.8M
        assert counts["classifier"] == 76_855_140


# --- ImageNet checkpoints ----------------------------------------------------------------------------


def test_fan_large_imagenet_keys_load_key_for_key(imagenet_keys, caplog):
    """A checkpoint with exactly the key names and shapes of NVlabs' FAN-L ImageNet classifier."""
    file_keys = imagenet_keys["fan_large_16_p4_hybrid_state_dict"]
    checkpoint = {"state_dict": {k: torch.empty(shape, device="meta") for k, shape in file_keys}}
    with torch.device("meta"):
        model = create_fan("fan_large_16_p4_hybrid")
    with caplog.at_level(logging.INFO, logger="uda.models.fan"):
        loaded = checkpoint_filter_fn(checkpoint, model)
    unused = sorted(k for k, _ in file_keys if k not in loaded)
    assert unused == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    assert sorted(loaded) == sorted(model.state_dict())  # nothing missing
    assert "head.weight" in caplog.text and "classifier-only" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("wrapper", ["flat", "state_dict", "model"])
def test_imagenet_file_roundtrip(tmp_path, wrapper):
    source = _nano()
    weights = _imagenet_file_from(source)
    payload = (
        weights
        if wrapper == "flat"
        else {wrapper: weights, "epoch": 300, "args": argparse.Namespace(lr=1e-3)}
    )
    path = tmp_path / "fan_hybrid_nano_in1k.pth.tar"
    torch.save(payload, path)
    torch.manual_seed(123)  # different init, so equality below proves loading
    model = build_backbone("fan_nano_p4_hybrid", pretrained=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_filter_fn_reports_unused_and_splits_fused_qkv(caplog):
    source = _nano()
    weights = _imagenet_file_from(source)
    prefix = "cls_attn_blocks.0.attn."
    for kind in ("weight", "bias"):  # older files: one fused qkv projection, older pos-encoding name
        weights[prefix + f"qkv.{kind}"] = torch.cat([weights.pop(prefix + f"{n}.{kind}") for n in "qkv"])
    for key in [k for k in weights if k.startswith("pos_embed.")]:
        weights["pos_embeder." + key[len("pos_embed.") :]] = weights.pop(key)
    weights["some.unknown.key"] = torch.zeros(3)
    with caplog.at_level(logging.INFO, logger="uda.models.fan"):
        filtered = checkpoint_filter_fn(weights, source)
    assert sorted(filtered) == sorted(source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(filtered[key], value), key
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "some.unknown.key" in warnings[0]
    assert any("head.weight" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_wrong_variant_checkpoint_is_rejected():
    with torch.device("meta"):
        tiny = create_fan("fan_tiny_8_p4_hybrid")
    with pytest.raises(CheckpointMismatchError, match="another size"):
        load_checkpoint(_nano(), {k: torch.zeros(v.shape) for k, v in tiny.state_dict().items()})


def test_missing_keys_raise_unless_not_strict():
    model = _nano()
    partial_weights = {k: v for k, v in model.state_dict().items() if not k.startswith("blocks.1.")}
    with pytest.raises(CheckpointMismatchError, match="missing keys, e.g. blocks.1."):
        load_checkpoint(model, partial_weights)
    report = load_checkpoint(model, partial_weights, strict=False)
    assert report.missing and all(k.startswith("blocks.1.") for k in report.missing)


def test_non_fan_checkpoint_is_rejected():
    with pytest.raises(CheckpointMismatchError, match="no key of a FAN"):
        load_checkpoint(_nano(), {"layer1.weight": torch.zeros(1)})


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(_nano(), tmp_path / "absent.pth.tar")
    corrupt = tmp_path / "corrupt.pth.tar"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint: it is a text file") as error:
        load_checkpoint(_nano(), corrupt)
    assert "\n" not in str(error.value)  # one sentence, not torch's weights_only essay
