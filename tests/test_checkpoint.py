"""Checkpoint formats: ours, MIC/mmcv UDA, CKD distillation, backbone files;
damaged and unsafe files, each one sentence saying what is wrong."""

import io
import os
import pickle
import posix
import re
import struct
import zipfile

import numpy as np
import pytest
import torch

from uda.models import (
    FORMAT_TAG,
    CheckpointError,
    CheckpointMismatchError,
    build_from_checkpoint,
    build_segmentor,
    load_checkpoint,
    read_checkpoint,
    read_model_cfg,
    save_checkpoint,
)
from uda.models.checkpoint import check_checkpoint_file


def tiny_cfg(backbone="mit_nano", num_classes=5):
    return {
        "backbone": backbone,
        "drop_path_rate": 0.0,
        "num_classes": num_classes,
        "decode_head": {"channels": 8, "dilations": [1, 2]},
        "hr_crop_size": [32, 32],
        "test_cfg": {"mode": "whole", "crop_size": [64, 64], "stride": [32, 32], "batched_slide": True},
    }


def build(seed, **kw):
    torch.manual_seed(seed)
    return build_segmentor(tiny_cfg(**kw)).eval()


def assert_same_weights(model, state_dict):
    own = model.state_dict()
    assert own.keys() == state_dict.keys()
    for key, value in state_dict.items():
        torch.testing.assert_close(own[key], value, msg=key)


def prefixed(state_dict, prefix):
    return {prefix + k: v.clone() for k, v in state_dict.items()}


@pytest.fixture(scope="module")
def weights():
    """Three distinct MiT-nano segmentor state dicts."""
    return [build(seed).state_dict() for seed in (1, 2, 3)]


# ------------------------------------------------------------ our format
def test_own_format_round_trip(tmp_path):
    model = build(0)
    path = save_checkpoint(
        tmp_path / "ckpt" / "iter_8.pth",
        model,
        meta={"iteration": 8, "miou": 0.5, "run_id": "abc", "weights": [0.3, 0.7]},
    )
    assert os.listdir(path.parent) == ["iter_8.pth"]  # no temp file left
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT_TAG and set(raw) == {"format", "model_cfg", "state_dict", "meta"}
    assert read_model_cfg(path)["backbone"] == "mit_nano"
    rebuilt = build_from_checkpoint(path)
    assert_same_weights(rebuilt, model.state_dict())
    assert rebuilt.checkpoint_meta["iteration"] == 8
    img = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(img), model(img))
    report = load_checkpoint(build(5), path)
    assert report.format == FORMAT_TAG and report.exact
    assert report.loaded == len(model.state_dict())


def test_save_state_dict_needs_cfg_and_plain_meta(tmp_path):
    model = build(0)
    with pytest.raises(ValueError, match="model_cfg"):
        save_checkpoint(tmp_path / "a.pth", model.state_dict())
    save_checkpoint(tmp_path / "soup.pth", model.state_dict(), tiny_cfg())
    with pytest.raises(ValueError, match="meta.when"):
        save_checkpoint(tmp_path / "b.pth", model, meta={"when": object()})
    assert sorted(os.listdir(tmp_path)) == ["soup.pth"]


def test_optimizer_state_round_trip(tmp_path):
    model = build(0)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-5)
    model.forward_train(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.long))[
        "decode.loss_seg"
    ].backward()
    opt.step()
    path = save_checkpoint(tmp_path / "resume.pth", model, meta={"iteration": 1}, optimizer=opt.state_dict())
    fresh = torch.optim.AdamW(build(0).parameters(), lr=6e-5)
    fresh.load_state_dict(read_checkpoint(path)["optimizer"])
    assert fresh.state_dict()["state"][0]["step"] == 1


def test_save_replaces_existing_file_atomically(tmp_path):
    path = tmp_path / "latest.pth"
    save_checkpoint(path, build(0), meta={"iteration": 1})
    save_checkpoint(path, build(1), meta={"iteration": 2})
    assert build_from_checkpoint(path).checkpoint_meta == {"iteration": 2}
    assert os.listdir(tmp_path) == ["latest.pth"]


# ------------------------------------------------------------ MIC / mmcv
def _mic_file(tmp_path, weights):
    model_sd, ema_sd, imnet_sd = weights
    state = {
        **prefixed(model_sd, "model."),
        **prefixed(ema_sd, "ema_model."),
        **prefixed(imnet_sd, "imnet_model."),
    }
    ckpt = {
        # mmcv meta with numpy scalars, as real MIC checkpoints carry
        "meta": {
            "mmcv_version": "1.3.7",
            "iter": np.int64(40000),
            "CLASSES": ("road", "sidewalk"),
            "seed": np.int64(2),
        },
        "state_dict": state,
        "optimizer": {"state": {}, "param_groups": [{"lr": 6e-5}]},
    }
    path = tmp_path / "iter_40000.pth"
    torch.save(ckpt, path)
    return path


def test_mic_checkpoint_model_prefix_by_default(tmp_path, weights):
    path = _mic_file(tmp_path, weights)
    model = build(9)
    report = load_checkpoint(model, path)
    assert report.format == "mmcv-uda" and report.prefix == "model."
    assert report.exact and report.loaded == len(weights[0])
    assert report.other_models == {"ema_model.": len(weights[1]), "imnet_model.": len(weights[2])}
    assert_same_weights(model, weights[0])
    assert "ema_model. " in str(report) and "mmcv-uda" in str(report)


def test_mic_checkpoint_ema_prefix_selectable(tmp_path, weights):
    path = _mic_file(tmp_path, weights)
    model = build(9)
    load_checkpoint(model, path, prefix="ema_model.")
    assert_same_weights(model, weights[1])
    with pytest.raises(
        CheckpointMismatchError, match="no 'ca_model.' weights.*model, ema_model, imnet_model"
    ):
        load_checkpoint(model, path, prefix="ca_model.")
    with pytest.raises(ValueError, match="prefix must be"):
        load_checkpoint(model, path, prefix="teacher.")


def test_distillation_checkpoint_student_and_teacher(tmp_path, weights):
    torch.manual_seed(4)
    student = build_segmentor(tiny_cfg("fan_nano_p4_hybrid")).state_dict()
    state = {
        **prefixed(student, "model."),
        **prefixed(weights[0], "ca_model."),
        **prefixed(weights[2], "imnet_model."),
    }
    path = tmp_path / "distill.pth"
    torch.save({"meta": {}, "state_dict": state}, path)
    fan = build_segmentor(tiny_cfg("fan_nano_p4_hybrid"))
    assert load_checkpoint(fan, path).exact  # 'model.' = the student
    assert_same_weights(fan, student)
    teacher = build(9)
    report = load_checkpoint(teacher, path, prefix="ca_model.")
    assert report.exact and report.other_models["model."] == len(student)
    assert_same_weights(teacher, weights[0])


def test_bare_segmentor_state_dicts(weights):
    model = build(9)
    report = load_checkpoint(model, {"state_dict": weights[1]})
    assert report.format == "segmentor" and report.prefix == ""
    assert_same_weights(model, weights[1])
    load_checkpoint(model, prefixed(weights[2], "module."))  # DDP wrapper
    assert_same_weights(model, weights[2])


# ------------------------------------------------------------ backbones
def test_segformer_imagenet_file_reports_classifier_keys(tmp_path, weights):
    backbone_sd = {k[len("backbone.") :]: v for k, v in weights[0].items() if k.startswith("backbone.")}
    path = tmp_path / "mit_nano.pth"
    torch.save({**backbone_sd, "head.weight": torch.zeros(1000, 128), "head.bias": torch.zeros(1000)}, path)
    model = build(9)
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("decode_head.")}
    report = load_checkpoint(model, path)
    assert report.format == "backbone"
    assert report.unused == ["head.weight", "head.bias"]
    assert report.exact and report.loaded == len(backbone_sd)
    for key, value in backbone_sd.items():
        torch.testing.assert_close(model.state_dict()["backbone." + key], value)
    for key, value in head_before.items():
        torch.testing.assert_close(model.state_dict()[key], value)


def test_nvlabs_fan_file_renames_are_not_unused(tmp_path):
    torch.manual_seed(6)
    source = build_segmentor(tiny_cfg("fan_nano_p4_hybrid")).backbone
    nvlabs = {}
    for key, value in source.state_dict().items():
        if key.startswith("pos_embed."):  # NVlabs' name of the encoding
            key = "pos_embeder." + key[len("pos_embed.") :]
        nvlabs[key] = value.clone()
    for kind in ("weight", "bias"):  # fused class-attention qkv
        parts = [nvlabs.pop(f"cls_attn_blocks.0.attn.{n}.{kind}") for n in "qkv"]
        nvlabs[f"cls_attn_blocks.0.attn.qkv.{kind}"] = torch.cat(parts)
    nvlabs["norm.weight"] = torch.ones(64)
    nvlabs["head.weight"] = torch.zeros(1000, 64)
    path = tmp_path / "fan_nano.pth.tar"
    torch.save({"state_dict": nvlabs}, path)
    model = build_segmentor(tiny_cfg("fan_nano_p4_hybrid"))
    report = load_checkpoint(model, path)
    assert sorted(report.unused) == ["head.weight", "norm.weight"]
    assert report.exact
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[key], value)


def test_builder_pretrained_loads_backbone(tmp_path, weights):
    backbone_sd = {k[len("backbone.") :]: v for k, v in weights[1].items() if k.startswith("backbone.")}
    path = tmp_path / "mit_nano.pth"
    torch.save(backbone_sd, path)
    model = build_segmentor({**tiny_cfg(), "pretrained": str(path)})
    for key, value in backbone_sd.items():
        torch.testing.assert_close(model.backbone.state_dict()[key], value)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_segmentor({**tiny_cfg(), "pretrained": str(tmp_path / "missing.pth")})


# ------------------------------------------------------------ rejections
def test_wrong_backbone_is_rejected_with_keys(tmp_path, weights):
    path = tmp_path / "mit.pth"
    torch.save({"state_dict": prefixed(weights[0], "model.")}, path)
    fan = build_segmentor(tiny_cfg("fan_nano_p4_hybrid"))
    with pytest.raises(
        CheckpointMismatchError,
        match=r"prefix 'model.'\) does not fit this segmentor"
        r".*differ in shape.*missing keys, e\.g\. "
        r"backbone\..*unexpected keys, e\.g\. "
        r"backbone\.patch_embed1",
    ):
        load_checkpoint(fan, path)


def test_partial_load_reports_missing(weights):
    backbone_only = {k: v for k, v in weights[0].items() if k.startswith("backbone.")}
    model = build(9)
    with pytest.raises(CheckpointMismatchError, match="missing keys, e.g. decode_head.head.conv_seg.weight"):
        load_checkpoint(model, backbone_only)
    report = load_checkpoint(model, backbone_only, strict=False)
    assert report.loaded == len(backbone_only) and not report.unexpected
    assert report.missing == [k for k in weights[0] if k.startswith("decode_head.")]
    assert "missing (" in str(report)


def test_wrong_num_classes_names_shapes(weights):
    model = build(9, num_classes=7)
    with pytest.raises(
        CheckpointMismatchError,
        match=r"conv_seg\.weight: checkpoint \(5, 8, 1, 1\) "
        r"vs model \(7, 8, 1, 1\)",
    ):
        load_checkpoint(model, weights[0], strict=False)


def test_missing_file_and_no_state_dict(tmp_path):
    model = build(1)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(model, tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="is a folder"):
        load_checkpoint(model, tmp_path)
    with pytest.raises(CheckpointError, match="no state dict"):
        load_checkpoint(model, {"meta": {}})
    plain = tmp_path / "plain.pth"
    torch.save({"state_dict": build(0).state_dict()}, plain)
    with pytest.raises(CheckpointError, match="not a cs2acdc-uda/1"):
        build_from_checkpoint(plain)


# ------------------------------------------------------------ damaged files
class _RunsShell:
    """Pickles as a call of os.system (never unpickled here except by the
    weights_only loader, which must refuse it)."""

    def __reduce__(self):
        return (os.system, ("echo should-never-run",))


def _torch_bytes(obj, legacy=False) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def _plain_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("weights/readme.txt", "not a checkpoint")
    return buffer.getvalue()


def _system_opcodes() -> bytes:
    """os.system('echo …') written opcode by opcode (protocol 2): PROTO 2,
    GLOBAL 'posix system', BINUNICODE argument, TUPLE1, REDUCE, STOP."""
    argument = b"echo should-never-run"
    return (
        b"\x80\x02"
        + b"cposix\nsystem\n"
        + b"X"
        + struct.pack("<I", len(argument))
        + argument
        + b"\x85"
        + b"R"
        + b"."
    )


@pytest.fixture(scope="module")
def real_files(tmp_path_factory):
    """A real checkpoint in the zip format and in the legacy format."""
    folder = tmp_path_factory.mktemp("real")
    model = build(0)
    zipped = save_checkpoint(folder / "zip.pth", model)
    legacy = folder / "legacy.pth"
    legacy.write_bytes(_torch_bytes({"state_dict": model.state_dict()}, legacy=True))
    return {"zip": zipped.read_bytes(), "legacy": legacy.read_bytes()}


#: Damaged file -> the one sentence it must produce (after the file name).
DAMAGED = {
    "empty": r"is empty \(0 bytes\): it was never written completely; copy "
    r"or download it again\.$",
    "random": r"is not a PyTorch checkpoint: it is neither a zip archive "
    r"\(torch\.save\) nor a pickle",
    "text": r"is not a PyTorch checkpoint: it is a text file \(it starts "
    r"with 'model: mit_b5",
    "zip_not_torch": r"is not a PyTorch checkpoint: it is a zip archive "
    r"without the data\.pkl that torch\.save writes\.$",
    "plain_pickle": r"is not a PyTorch checkpoint: it is a Python pickle that "
    r"torch\.save did not write\.$",
    "truncated_zip": r"is truncated: its zip archive ends after \d+ bytes, "
    r"before its table of contents; copy or download it",
    "truncated_legacy": r"is truncated: its data ends after \d+ bytes; copy "
    r"or download it again\.$",
    "truncated_legacy_header": r"is truncated: its data ends after 300 bytes",
    "system_opcodes": r"contains Python objects that are not allowed: "
    r"posix\.system;",
    "system_reduce_protocol4": r"contains Python objects that are not "
    r"allowed: posix\.system;",
    "system_in_torch_zip": r"contains Python objects that are not allowed: "
    r"posix\.system;",
    "system_in_torch_legacy": r"contains Python objects that are not "
    r"allowed: posix\.system;",
    "exception_object": r"contains Python objects that are not allowed: "
    r"builtins\.Exception;",
}


def _damaged_bytes(case: str, real: dict) -> bytes:
    if case == "empty":
        return b""
    if case == "random":
        return np.random.default_rng(0).bytes(4096)
    if case == "text":
        return b"model: mit_b5\nthis is a config, not weights\n"
    if case == "zip_not_torch":
        return _plain_zip()
    if case == "plain_pickle":
        return pickle.dumps({"state_dict": {}}, protocol=2)
    if case == "truncated_zip":
        return real["zip"][: len(real["zip"]) // 2]
    if case == "truncated_legacy":
        return real["legacy"][: len(real["legacy"]) // 2]
    if case == "truncated_legacy_header":  # cut inside its pickled header
        return real["legacy"][:300]
    if case == "system_opcodes":
        return _system_opcodes()
    if case == "system_reduce_protocol4":
        return pickle.dumps(_RunsShell(), protocol=4)
    if case == "system_in_torch_zip":
        return _torch_bytes({"state_dict": {}, "hook": _RunsShell()})
    if case == "system_in_torch_legacy":
        return _torch_bytes({"state_dict": {}, "hook": _RunsShell()}, legacy=True)
    if case == "exception_object":
        return _torch_bytes({"state_dict": {}, "hook": Exception("x")})
    raise AssertionError(case)


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_damaged_file_is_one_sentence_saying_what_is_wrong(tmp_path, real_files, case):
    path = tmp_path / f"{case}.pth"
    path.write_bytes(_damaged_bytes(case, real_files))
    model = build(1)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(model, path)
    message = str(info.value)
    assert message.startswith(f"Checkpoint {str(path)!r} "), message
    assert re.search(DAMAGED[case], message), message
    # One sentence, and never the advice to turn the safety check off.
    assert "\n" not in message and message.count(". ") == 0, message
    assert "weights_only" not in message and "WeightsUnpickler" not in message
    # The same sentence from the pre-flight check when it can see the
    # problem without reading tensors (all but a cut legacy file).
    if case.startswith("truncated_legacy"):
        assert check_checkpoint_file(path) == path
    else:
        with pytest.raises(CheckpointError) as early:
            check_checkpoint_file(path)
        assert str(early.value) == message


def test_damaged_checkpoint_runs_no_code(tmp_path, monkeypatch, real_files):
    cases = ("system_opcodes", "system_reduce_protocol4", "system_in_torch_zip", "system_in_torch_legacy")
    paths = []
    for case in cases:  # written before os.system is replaced below
        paths.append(tmp_path / f"{case}.pth")
        paths[-1].write_bytes(_damaged_bytes(case, real_files))
    called = []
    # posix.system is what an unsafe unpickler would look up.
    monkeypatch.setattr(posix, "system", lambda *a: called.append(a) or 0)
    monkeypatch.setattr(os, "system", posix.system)
    for path in paths:
        with pytest.raises(CheckpointError, match="posix.system"):
            read_checkpoint(path)
    assert called == []


def test_preflight_accepts_real_checkpoints_of_both_formats(tmp_path, real_files):
    for name, data in real_files.items():
        path = tmp_path / f"{name}.pth"
        path.write_bytes(data)
        assert check_checkpoint_file(path) == path
        assert torch.is_tensor(next(iter(read_checkpoint(path)["state_dict"].values())))
    with_numpy = tmp_path / "numpy_meta.pth"  # mmcv meta: numpy scalars
    with_numpy.write_bytes(
        _torch_bytes(
            {"state_dict": build(0).state_dict(), "meta": {"iter": np.int64(4), "mIoU": np.float64(0.5)}}
        )
    )
    assert check_checkpoint_file(with_numpy) == with_numpy
    assert read_checkpoint(with_numpy)["meta"]["iter"] == 4
