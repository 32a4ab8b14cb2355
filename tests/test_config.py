"""Presets: the embedded default derives from the full recipe, overrides are strict."""

from __future__ import annotations

import pytest

from uda.cli import resolve_config
from uda.config import ConfigError, dump_config, list_presets, load_config


def test_presets_ship_default_and_full_recipe():
    assert {"default", "cs2acdc"} <= set(list_presets())


def test_full_recipe_numbers_from_the_design():
    cfg = load_config("cs2acdc")
    assert cfg["data"]["source"]["img_scale"] == [2048, 1024]
    assert cfg["data"]["target"]["img_scale"] == [1920, 1080]
    assert cfg["data"]["source"]["crop_size"] == [1024, 1024]
    assert cfg["data"]["source"]["cat_max_ratio"] == 0.75
    assert cfg["data"]["rare_class_sampling"] == {
        "class_temp": 0.01,
        "min_pixels": 3000,
        "min_crop_ratio": 2.0,
    }
    teacher, student = cfg["teacher"]["model"], cfg["student"]["model"]
    assert teacher["backbone"] == "mit_b5" and student["backbone"] == "fan_large_16_p4_hybrid"
    for model in (teacher, student):
        assert model["scales"] == [1, 0.5]
        assert model["hr_crop_size"] == [512, 512]
        assert model["hr_loss_weight"] == 0.1
        assert model["crop_coord_divisible"] == 8
        assert model["decode_head"]["channels"] == 256
        assert model["decode_head"]["dilations"] == [1, 6, 12, 18]
        assert model["test_cfg"] == {
            "mode": "slide",
            "crop_size": [1024, 1024],
            "stride": [512, 512],
            "batched_slide": True,
            "max_windows_per_batch": None,
        }
    assert student["decode_head"]["loss"] == "logit_constraint"
    uda = cfg["uda"]
    assert uda["pseudo_threshold"] == 0.968 and uda["alpha"] == 0.999
    assert uda["color_jitter_strength"] == 0.2 and uda["color_jitter_probability"] == 0.2
    assert uda["mask_generator"] == {"type": "block", "mask_ratio": 0.7, "mask_block_size": 64}
    assert uda["mask_mode"] == "separate" and uda["mask_lambda"] == 1.0
    assert uda["imnet_feature_dist_lambda"] == 0.005
    assert uda["imnet_feature_dist_classes"] == [6, 7, 11, 12, 13, 14, 15, 16, 17, 18]
    opt = cfg["optimizer"]
    assert (opt["lr"], opt["weight_decay"], opt["head_lr_mult"]) == (6e-5, 0.01, 10.0)
    assert cfg["lr_config"]["warmup_iters"] == 1500 and cfg["lr_config"]["power"] == 1.0
    assert cfg["data"]["samples_per_gpu"] == 2
    assert cfg["runner"]["max_iters"] == 40000 and cfg["checkpoint_config"]["interval"] == 4000
    assert cfg["soup"]["aliases"] == ["iter-24000", "iter-32000", "iter-40000"]


def test_default_only_changes_values_of_the_full_recipe():
    full, tiny = load_config("cs2acdc"), load_config("default")

    def keys(d, prefix=""):
        out = set()
        for k, v in d.items():
            out.add(prefix + k)
            if isinstance(v, dict):
                out |= keys(v, prefix + k + ".")
        return out

    assert keys(full) == keys(tiny)
    assert tiny["name"] == "default"
    assert tiny["data"]["source"]["root"] == "data/embedded/cityscapes"
    # untouched values are inherited
    assert tiny["uda"]["pseudo_threshold"] == 0.968
    assert tiny["uda"]["mask_generator"]["mask_ratio"] == 0.7


def test_overrides_apply_with_yaml_values():
    cfg = load_config(
        "default",
        ["runner.max_iters=7", "student.model.hr_crop_size=[32, 32]", "uda.blur=false", "optimizer.lr=1e-4"],
    )
    assert cfg["runner"]["max_iters"] == 7
    assert cfg["student"]["model"]["hr_crop_size"] == [32, 32]
    assert cfg["uda"]["blur"] is False
    assert cfg["optimizer"]["lr"] == pytest.approx(1e-4)


def test_cfg_options_string_is_split_like_a_shell_line():
    # -P cfg_options="..." arrives as one string: a value with spaces is quoted whole
    cfg = resolve_config("default", "runner.max_iters=9 student.model.hr_crop_size='[32, 32]'")
    assert cfg["runner"]["max_iters"] == 9
    assert cfg["student"]["model"]["hr_crop_size"] == [32, 32]
    with pytest.raises(ConfigError, match="No closing quotation.*quote a value with spaces whole"):
        resolve_config("default", "student.model.hr_crop_size='[32, 32]")


def test_entry_point_parameters_then_cfg_options():
    cfg = resolve_config("default", "runner.max_iters=9", runner__max_iters=5, seed=None)
    assert cfg["runner"]["max_iters"] == 9  # cfg_options are applied last
    assert cfg["seed"] == 0  # None means "the preset's value"


@pytest.mark.parametrize(
    "override, message",
    [
        ("runner.max_iter=3", "Did you mean max_iters"),
        ("uda.mask_generatr.mask_ratio=0.5", "mask_generator"),
        ("nonsense=1", "Unknown config key 'nonsense'"),
        ("runner.max_iters=many", "expects a int"),
        ("uda.blur=3", "expects a bool"),
        ("runner", "must look like key.subkey=value"),
    ],
)
def test_unknown_keys_and_bad_values_are_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("default", [override])


def test_unknown_key_in_a_preset_file_is_an_error(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text(
        f"_base_: {load_config.__globals__['PRESETS_DIR'] / 'cs2acdc.yaml'}\nrunner: {{max_itrs: 5}}\n"
    )
    with pytest.raises(ConfigError, match="max_itrs"):
        load_config(bad)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="Available presets: .*cs2acdc"):
        load_config("cs2acdc-large")


def test_dump_is_reloadable(tmp_path):
    cfg = load_config("default", ["runner.max_iters=3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


# --- user presets that extend the built-in ones (issue 9) ---------------------------------------


def _without_max_iters(cfg):
    cfg = {**cfg, "runner": dict(cfg["runner"])}
    del cfg["runner"]["max_iters"]
    return cfg


@pytest.mark.parametrize("base", ["cs2acdc", "cs2acdc.yaml"])
def test_user_preset_extends_a_built_in_by_name_or_file_name(tmp_path, base):
    mine = tmp_path / "my.yaml"
    mine.write_text(f"_base_: {base}\nrunner: {{max_iters: 123}}\n")
    cfg, full = load_config(mine), load_config("cs2acdc")
    assert cfg["runner"]["max_iters"] == 123
    assert _without_max_iters(cfg) == _without_max_iters(full)


def test_user_preset_extends_the_embedded_default(tmp_path):
    mine = tmp_path / "my.yaml"
    mine.write_text("_base_: default\nrunner: {max_iters: 4}\n")
    cfg = load_config(mine)
    assert cfg["runner"]["max_iters"] == 4
    assert _without_max_iters(cfg) == _without_max_iters(load_config("default"))


def test_base_by_absolute_and_home_path(tmp_path, monkeypatch):
    (tmp_path / "base.yaml").write_text("_base_: cs2acdc\nseed: 5\n")
    other = tmp_path / "elsewhere"
    other.mkdir()
    absolute = other / "abs.yaml"
    absolute.write_text(f"_base_: {tmp_path / 'base'}\n")  # no suffix: .yaml is appended
    assert load_config(absolute)["seed"] == 5
    monkeypatch.setenv("HOME", str(tmp_path))
    home = other / "home.yaml"
    home.write_text("_base_: ~/base.yaml\n")
    assert load_config(home)["seed"] == 5


def test_local_base_wins_over_a_built_in_of_the_same_name(tmp_path):
    # A local cs2acdc.yaml naming "cs2acdc" would be itself: it extends the built-in one.
    (tmp_path / "cs2acdc.yaml").write_text("_base_: cs2acdc\nseed: 11\n")
    mine = tmp_path / "my.yaml"
    mine.write_text("_base_: cs2acdc\nrunner: {max_iters: 9}\n")
    cfg = load_config(mine)
    assert cfg["seed"] == 11 and cfg["runner"]["max_iters"] == 9
    assert load_config(tmp_path / "cs2acdc.yaml")["seed"] == 11
    full = load_config("cs2acdc")
    assert {**_without_max_iters(cfg), "seed": full["seed"]} == _without_max_iters(full)


def test_chain_user_then_local_base_then_built_in(tmp_path):
    (tmp_path / "mybase.yaml").write_text("_base_: cs2acdc.yaml\nseed: 3\nrunner: {max_iters: 50}\n")
    mine = tmp_path / "my.yaml"
    mine.write_text("_base_: mybase\nrunner: {max_iters: 7}\n")
    cfg = load_config(mine)
    assert (cfg["seed"], cfg["runner"]["max_iters"]) == (3, 7)
    assert cfg["teacher"] == load_config("cs2acdc")["teacher"]


def test_built_in_default_still_extends_cs2acdc_yaml():
    assert "_base_: cs2acdc.yaml" in (load_config.__globals__["PRESETS_DIR"] / "default.yaml").read_text()
    assert load_config("default")["uda"]["pseudo_threshold"] == 0.968


def test_missing_base_is_one_clear_error(tmp_path):
    mine = tmp_path / "my.yaml"
    mine.write_text("_base_: cs2acdc-large\n")
    with pytest.raises(ConfigError) as info:
        load_config(mine)
    message = str(info.value)
    assert str(mine.resolve()) in message  # the file that asked for it
    assert str(tmp_path.resolve() / "cs2acdc-large.yaml") in message  # where it looked
    assert "uda/configs/cs2acdc-large.yaml" in message.replace("\\", "/")
    assert f"Built-in presets: {', '.join(list_presets())}." in message
    assert {"cs2acdc", "default"} <= set(list_presets())


@pytest.mark.parametrize("base", ["[cs2acdc.yaml, default.yaml]", "3", "''"])
def test_base_must_be_one_string(tmp_path, base):
    mine = tmp_path / "my.yaml"
    mine.write_text(f"_base_: {base}\n")
    with pytest.raises(ConfigError, match="only one base file is supported"):
        load_config(mine)


def test_circular_chains_are_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: b\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="Circular _base_ chain"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "self.yaml").write_text("_base_: self\n")  # not a built-in: no fallback
    with pytest.raises(ConfigError, match="Circular _base_ chain"):
        load_config(tmp_path / "self.yaml")


def test_entry_point_prints_a_missing_base_as_one_error_line(tmp_path):
    import subprocess

    from project_processes import PROJECT_ROOT, entry_point_command, process_env

    bad = tmp_path / "bad.yaml"
    bad.write_text("_base_: nowhere\n")
    proc = subprocess.run(
        entry_point_command("evaluate", "--preset", str(bad), "--target-root", "data/embedded/acdc"),
        cwd=PROJECT_ROOT,
        env=process_env(f"sqlite:///{tmp_path / 'mlflow.db'}"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "nowhere" in errors[0] and ", ".join(list_presets()) in errors[0]
