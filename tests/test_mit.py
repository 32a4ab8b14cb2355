"""Tests of the MiT (SegFormer) encoder in ``uda.models.mit``.

``tests/data/mit_reference.pt`` holds outputs of the *reference*
implementation, lhoyer/MIC @ 2f932a98b5dd9f598aaeb32411863ceea0809314,
``seg/mmseg/models/backbones/mix_transformer.py`` (the file is recorded under
the ``reference`` key). It was produced by a throw-away script outside the
repo (no mmcv was installed then, so ``mmcv.runner.BaseModule`` was shimmed by
a plain ``nn.Module`` and ``mmseg.models.builder.BACKBONES`` /
``mmseg.utils.get_root_logger`` by no-op stand-ins; the MiT code itself ran
unchanged):

1. ``torch.manual_seed(0)``; build the reference ``MixVisionTransformer``
   with ``embed_dims=[8, 16, 32, 64], num_heads=[1, 2, 2, 4],
   depths=[2, 1, 1, 1], sr_ratios=[8, 4, 2, 1], mlp_ratios=[4]*4,
   qkv_bias=True, drop_path_rate=0.1, norm_layer=LayerNorm(eps=1e-6)``
   (the MiT-B* settings, smaller) and call its ``init_weights()``;
2. add ``0.1 * randn`` to every state-dict tensor (so LayerNorm affine
   parameters and biases are not the trivial 1/0) and load it back;
3. in ``eval()`` mode, run it on ``x = randn(2, 3, 67, 97)`` (a size not
   divisible by 32, which exercises the floor-rounded stage sizes);
4. ``torch.save`` plain tensors/primitives: ``config``, ``state_dict``,
   ``input``, ``outputs`` (4 maps), ``layernorm_eps`` (eps of every
   LayerNorm by module name) and ``reference``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from uda.models.builder import build_backbone
from uda.models.checkpoint import CheckpointMismatchError, load_checkpoint
from uda.models.checkpoint_files import CheckpointError
from uda.models.mit import MIT_VARIANTS, MixVisionTransformer, checkpoint_filter_fn, create_mit

REFERENCE_FILE = Path(__file__).parent / "data" / "mit_reference.pt"

# Exact parameter counts of the reference architecture (MIC's mit_b0..b5,
# no classification head), counted from its module definitions. SegFormer
# publishes 3.4M / 13.1M / 24.2M / 44.0M / 60.8M / 81.4M.
REFERENCE_PARAM_COUNTS = {
    "mit_b0": 3_319_392,
    "mit_b1": 13_151_424,
    "mit_b2": 24_196_288,
    "mit_b3": 44_072_128,
    "mit_b4": 60_842_688,
    "mit_b5": 81_443_008,
}


@pytest.fixture(scope="module")
def reference() -> dict:
    return torch.load(REFERENCE_FILE, map_location="cpu", weights_only=True)


def _reference_model(reference: dict) -> MixVisionTransformer:
    model = MixVisionTransformer(**reference["config"])
    model.load_state_dict(reference["state_dict"], strict=True)
    return model.eval()


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_outputs_match_mic_reference(reference: dict) -> None:
    model = _reference_model(reference)
    with torch.no_grad():
        outputs = model(reference["input"])
    assert len(outputs) == len(reference["outputs"]) == 4
    for ours, theirs in zip(outputs, reference["outputs"]):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_keys_order_and_layernorm_eps_match_reference(reference: dict) -> None:
    model = _reference_model(reference)
    # Same keys in the same order: position-paired tools (the original soup)
    # see the same tensors.
    assert list(model.state_dict()) == list(reference["state_dict"])
    eps = {name: module.eps for name, module in model.named_modules() if isinstance(module, nn.LayerNorm)}
    assert eps == reference["layernorm_eps"]
    # The facts behind it, spelt out: 1e-6 in blocks and stage norms,
    # PyTorch default 1e-5 in patch embeddings and attention sr-norms.
    assert eps["block1.0.norm1"] == eps["norm4"] == 1e-6
    assert eps["patch_embed1.norm"] == eps["block1.0.attn.norm"] == 1e-5


def test_mic_parameter_names() -> None:
    keys = set(create_mit("mit_nano").state_dict())
    for key in [
        "patch_embed1.proj.weight",
        "patch_embed4.norm.bias",
        "block1.0.norm1.weight",
        "block1.0.attn.q.weight",
        "block1.0.attn.q.bias",
        "block1.0.attn.kv.weight",
        "block1.0.attn.proj.weight",
        "block1.0.attn.sr.weight",
        "block1.0.attn.norm.weight",
        "block1.0.norm2.weight",
        "block1.0.mlp.fc1.weight",
        "block1.0.mlp.dwconv.dwconv.weight",
        "block1.0.mlp.fc2.weight",
        "norm1.weight",
        "norm4.bias",
    ]:
        assert key in keys, key
    # sr_ratio 1 in stage 4: no spatial reduction layers there.
    assert not any(k.startswith("block4.0.attn.sr") for k in keys)


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAM_COUNTS))
def test_parameter_count_equals_reference(name: str) -> None:
    with torch.device("meta"):  # no memory, no init cost
        model = create_mit(name)
    count = _count(model)
    print(f"{name}: {count:,} parameters")
    assert count == REFERENCE_PARAM_COUNTS[name]


@pytest.mark.parametrize("name", list(MIT_VARIANTS))
def test_output_shapes_and_strides(name: str) -> None:
    height, width = 64, 96
    if name in ("mit_nano", "mit_b0"):
        model = create_mit(name).eval()
        images = torch.randn(1, 3, height, width)
        with torch.no_grad():
            outputs = model(images)
        assert all(torch.isfinite(o).all() for o in outputs)
    else:  # shape propagation only: real B1-B5 are too slow for CI
        with torch.device("meta"):
            model = create_mit(name).eval()
            outputs = model(torch.empty(1, 3, height, width))
    assert model.strides == [4, 8, 16, 32]
    assert [o.shape[1] for o in outputs] == model.out_channels
    assert [tuple(o.shape[2:]) for o in outputs] == [(height // s, width // s) for s in model.strides]
    if name != "mit_nano":
        expected = [32, 64, 160, 256] if name == "mit_b0" else [64, 128, 320, 512]
        assert model.out_channels == expected


def test_non_divisible_input_size() -> None:
    model = create_mit("mit_nano").eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 100, 130))
    # 7x7/s4/p3 then 3x3/s2/p1 convs: each stage is ceil(previous / stride).
    assert [tuple(o.shape[2:]) for o in outputs] == [(25, 33), (13, 17), (7, 9), (4, 5)]


def test_too_small_input_raises_clear_error() -> None:
    model = create_mit("mit_nano").eval()
    with pytest.raises(ValueError, match="too small"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(3, 64, 64))


def test_eval_is_deterministic_train_is_stochastic() -> None:
    torch.manual_seed(0)
    model = create_mit("mit_nano", drop_path_rate=0.5, drop_rate=0.1)
    images = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        first, second = model(images), model(images)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    model.train()
    with torch.no_grad():
        trained = model(images)
    assert not torch.allclose(trained[-1], first[-1])


def test_stochastic_depth_schedule() -> None:
    model = create_mit("mit_b0", drop_path_rate=0.1)
    blocks = [b for i in range(1, 5) for b in getattr(model, f"block{i}")]
    assert isinstance(blocks[0].drop_path, nn.Identity)  # rate 0 first
    assert blocks[-1].drop_path.drop_prob == pytest.approx(0.1)
    rates = [0.0] + [b.drop_path.drop_prob for b in blocks[1:]]
    assert rates == sorted(rates)


def test_reference_init() -> None:
    torch.manual_seed(0)
    model = create_mit("mit_nano")
    fc1 = model.block4[0].mlp.fc1
    assert fc1.weight.std().item() == pytest.approx(0.02, rel=0.1)
    # (timm's trunc_normal_ cuts at absolute +-2, i.e. 100 std: as the
    # reference, this is effectively a plain normal.)
    assert torch.count_nonzero(fc1.bias) == 0
    assert torch.equal(model.norm4.weight, torch.ones_like(model.norm4.weight))
    dw = model.block4[0].mlp.dwconv.dwconv  # groups: fan_out = 9 * 512 / 512
    assert dw.weight.std().item() == pytest.approx((2 / 9) ** 0.5, rel=0.1)
    assert torch.count_nonzero(dw.bias) == 0


@pytest.mark.parametrize("training", [False, True])
def test_sdpa_matches_explicit_attention(reference: dict, training: bool) -> None:
    model = _reference_model(reference).train(training)
    model.set_fused_attn(False)  # no dropout configured: train is exact too
    images = reference["input"].clone().requires_grad_(True)

    def run(fused: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        model.set_fused_attn(fused)
        torch.manual_seed(0)  # same stochastic-depth draws in train mode
        outputs = model(images)
        (grad,) = torch.autograd.grad(sum(o.square().mean() for o in outputs), images)
        return [o.detach() for o in outputs], grad

    fused_out, fused_grad = run(True)
    explicit_out, explicit_grad = run(False)
    for a, b in zip(fused_out, explicit_out):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_grad, explicit_grad, atol=1e-5, rtol=1e-4)


def test_unknown_variant_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="mit_b5") as info:
        create_mit("mit_b6")
    assert "mit_b6" in str(info.value) and "mit_nano" in str(info.value)


def test_preset_architecture_cannot_be_overridden() -> None:
    with pytest.raises(ValueError, match="depths"):
        create_mit("mit_nano", depths=[2, 2, 2, 2])


def _segformer_style_checkpoint(model: nn.Module) -> dict[str, torch.Tensor]:
    """A SegFormer ImageNet-style flat dict: encoder + classification head."""
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    state["head.weight"] = torch.randn(1000, model.out_channels[-1])
    state["head.bias"] = torch.randn(1000)
    return state


def test_filter_drops_head_keys_and_reports(caplog) -> None:
    model = create_mit("mit_nano")
    state = _segformer_style_checkpoint(model)
    with caplog.at_level(logging.WARNING, logger="uda.models.mit"):
        filtered = checkpoint_filter_fn(state, model)
    assert set(filtered) == set(model.state_dict())
    assert "head.weight" in caplog.text and "head.bias" in caplog.text
    assert "dropped 2 keys" in caplog.text


def test_filter_strips_backbone_prefix_and_reports(caplog) -> None:
    model = create_mit("mit_nano")
    state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    state["decode_head.conv_seg.weight"] = torch.zeros(19, 256, 1, 1)
    with caplog.at_level(logging.WARNING, logger="uda.models.mit"):
        filtered = checkpoint_filter_fn(state, model)
    assert list(filtered) == list(model.state_dict())
    assert "decode_head.conv_seg.weight" in caplog.text


def test_filter_rejects_other_variant() -> None:
    model = create_mit("mit_nano")
    with torch.device("meta"):
        other = create_mit("mit_b0")
    with pytest.raises(ValueError, match="another variant"):
        checkpoint_filter_fn(other.state_dict(), model)


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_pretrained_loads_through_filter(tmp_path: Path, caplog, wrap: str | None) -> None:
    source = create_mit("mit_nano")
    state = _segformer_style_checkpoint(source)
    path = tmp_path / "mit_nano.pth"
    torch.save(state if wrap is None else {wrap: state}, path)
    with caplog.at_level(logging.WARNING, logger="uda.models.mit"):
        model = build_backbone("mit_nano", pretrained=str(path))
    assert "head.weight" in caplog.text
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_pretrained_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model.pretrained=null"):
        build_backbone("mit_nano", pretrained=str(tmp_path / "missing.pth"))
    partial_state = dict(list(create_mit("mit_nano").state_dict().items())[:5])
    path = tmp_path / "partial.pth"
    torch.save(partial_state, path)
    with pytest.raises(CheckpointMismatchError, match="missing keys"):
        load_checkpoint(create_mit("mit_nano"), path)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint: it is a text file") as error:
        load_checkpoint(create_mit("mit_nano"), corrupt)
    assert "\n" not in str(error.value)  # one sentence, not torch's weights_only essay
