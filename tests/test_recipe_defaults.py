"""The full preset does not silently differ from the original recipe: its
ImageNet weights are the original's files under ``pretrained/`` (a missing
file is one clear error before any work; ``pretrained: null`` trains from
scratch on purpose), and its seed is the original's 29, which the entry
points keep unless ``-P seed=`` says otherwise."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import yaml

from entry_modules import PROJECT_ROOT, load_entry_module
from uda import cli
from uda.config import load_config
from uda.models import build_backbone
from uda.models.pretrained import PretrainedWeightsMissing, resolve_pretrained


def test_full_preset_names_the_originals_files_and_seed():
    cfg = load_config("cs2acdc")
    assert cfg["seed"] == 29
    assert cfg["student"]["model"]["pretrained"] == "pretrained/fan_large_16_p4_hybrid.pth.tar"
    assert cfg["teacher"]["model"]["pretrained"] == "pretrained/mit_b5.pth"
    tiny = load_config("default")
    assert tiny["seed"] == 0
    assert tiny["student"]["model"]["pretrained"] is None
    assert tiny["teacher"]["model"]["pretrained"] is None


def test_entry_points_default_to_the_presets_seed():
    project = yaml.safe_load((PROJECT_ROOT / "MLproject").read_text())
    for name, entry in project["entry_points"].items():
        if "seed" in entry["parameters"]:
            assert entry["parameters"]["seed"]["default"] == "", name
    parser = argparse.ArgumentParser()
    cli.add_training_args(parser, default_model="x")
    args = parser.parse_args(["--source-root", "a", "--target-root", "b", "--preset", "cs2acdc"])
    assert cli.training_config(args)["seed"] == 29
    args = parser.parse_args(
        ["--source-root", "a", "--target-root", "b", "--preset", "cs2acdc", "--seed", "3"]
    )
    assert cli.training_config(args)["seed"] == 3


@pytest.mark.parametrize(
    "entry_point, key, published",
    [
        ("distill", "student.model.pretrained", "fan_hybrid_large_in22k_1k.pth.tar"),
        ("teacher", "teacher.model.pretrained", "mit_b5.pth"),
    ],
)
def test_missing_imagenet_weights_are_one_error_before_any_work(
    tracking_uri, tmp_path, capsys, entry_point, key, published
):
    module = load_entry_module(entry_point)
    argv = [
        "--preset",
        "cs2acdc",
        "--source-root",
        str(tmp_path / "none"),
        "--target-root",
        str(tmp_path / "none"),
    ]
    assert cli.run_cli(module.main, argv) == 2
    err = capsys.readouterr().err
    [line] = [x for x in err.splitlines() if x.startswith("error:")]
    assert key in line and published in line and f"{key}=null" in line
    assert str(PROJECT_ROOT / "pretrained") in line
    assert "Traceback" not in err


def test_main_checks_both_files_first(tracking_uri, tmp_path, capsys):
    module = load_entry_module("main")
    argv = [
        "--preset",
        "cs2acdc",
        "--source-root",
        str(tmp_path / "none"),
        "--target-root",
        str(tmp_path / "none"),
    ]
    assert cli.run_cli(module.main, argv) == 2
    assert "teacher.model.pretrained" in capsys.readouterr().err


def test_explicit_null_trains_from_scratch():
    cfg = load_config("cs2acdc", ["student.model.pretrained=null", "teacher.model.pretrained=null"])
    cli.check_pretrained(cfg, ["teacher", "student"])  # no error


def test_a_relative_file_is_found_in_the_working_folder(tmp_path, monkeypatch):
    torch.manual_seed(0)
    weights = build_backbone("mit_nano").state_dict()
    (tmp_path / "pretrained").mkdir()
    torch.save(weights, tmp_path / "pretrained" / "mit_nano.pth")
    monkeypatch.chdir(tmp_path)
    found = resolve_pretrained("pretrained/mit_nano.pth", "mit_nano")
    assert Path(found) == tmp_path / "pretrained" / "mit_nano.pth"
    loaded = build_backbone("mit_nano", pretrained="pretrained/mit_nano.pth")
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, weights[name]), name
    with pytest.raises(PretrainedWeightsMissing, match="model.pretrained"):
        build_backbone("mit_nano", pretrained="pretrained/other.pth")
