"""Foreign checkpoints: layouts, iterations, and every bad input of the
``import`` entry point (one ``error:`` line, exit 2, the registry unchanged).

The entry point's ``main`` runs in-process against a real SQLite store; the
files are real ``torch.save`` files in the original's and MIC's layouts."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch

import original_layouts as layouts
from entry_modules import load_entry_module
from uda import cli
from uda.config import load_config
from uda.models import build_segmentor, save_checkpoint
from uda.models.foreign import describe, iteration_from_name, load_segmentor_file, normalize_prefix

# A unique file name: an unsafe unpickling would create it.
PWNED = Path("/tmp/cs2acdc-uda-import-test-was-unpickled")


class Exploit:
    def __reduce__(self):
        return (open, (str(PWNED), "w"))


@pytest.fixture(scope="module")
def models():
    cfg = load_config("default")
    torch.manual_seed(0)
    return {
        "cfg": cfg,
        "student": build_segmentor(cfg["student"]["model"]).state_dict(),
        "teacher": build_segmentor(cfg["teacher"]["model"]).state_dict(),
    }


@pytest.fixture(scope="module")
def files(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("foreign")
    student, teacher = models["student"], models["teacher"]
    made = {
        "distill": layouts.ckd_distill(folder / "fan_iter_24k.pth", student, teacher, student, 24000),
        "distill_b": layouts.ckd_distill(
            folder / "iter_32000.pth", layouts.perturbed(student, 1), teacher, None, 32000
        ),
        # Another run's 32k file: the same automatic alias as distill_b.
        "distill_c": layouts.ckd_distill(
            folder / "fan_iter_32k.pth", layouts.perturbed(student, 2), teacher, None, 32000
        ),
        "mic": layouts.mic(folder / "latest.pth", teacher),
        "segmentor": folder / "plain.pth",
        "module": folder / "ddp.pth",
        "ours": save_checkpoint(folder / "ours.pth", build_segmentor(models["cfg"]["student"]["model"])),
    }
    torch.save(student, made["segmentor"])
    torch.save({"state_dict": {f"module.{k}": v for k, v in student.items()}}, made["module"])
    made["soup"] = layouts.ckd_soup(
        folder / "soup_fan_334.pth", [made["distill"], made["distill_b"]], [0.5, 0.5]
    )
    backbone = {k[len("backbone.") :]: v for k, v in student.items() if k.startswith("backbone.")}
    backbone.update({"head.weight": torch.zeros(1000, 8), "head.bias": torch.zeros(1000)})
    made["imagenet"] = folder / "fan_hybrid_tiny.pth.tar"
    torch.save(backbone, made["imagenet"])
    made["corrupt"] = folder / "corrupt.pth"
    made["corrupt"].write_bytes(b"\x80\x04not really a pickle" * 100)
    made["truncated"] = folder / "truncated.pth"
    made["truncated"].write_bytes(made["distill"].read_bytes()[:50000])
    made["pickled"] = folder / "pickled.pth"
    torch.save({"state_dict": student, "meta": {"hook": Exploit()}}, made["pickled"])
    return made


@pytest.mark.parametrize(
    "name, iteration",
    [
        ("iter_40000.pth", 40000),
        ("fan_iter_40k.pth", 40000),
        ("fan_iter_24k.pth", 24000),
        ("iter-4000.pth", 4000),
        ("latest.pth", None),
        ("soup_fan_334.pth", None),
        ("iteration.pth", None),
    ],
)
def test_iteration_from_file_names(name, iteration):
    assert iteration_from_name(name) == iteration


def test_layouts_and_iterations_are_recognised(files):
    expected = {
        "distill": ("ckd-distill", 24000, "meta"),
        "distill_b": ("ckd-distill", 32000, "meta"),
        "mic": ("mic", 40000, "meta"),
        "soup": ("ckd-soup", None, None),
        "segmentor": ("segmentor", None, None),
        "module": ("segmentor", None, None),
        "ours": ("cs2acdc-uda/1", None, None),
        "imagenet": ("backbone", None, None),
    }
    for key, (layout, iteration, origin) in expected.items():
        summary = describe(files[key])
        assert (summary.layout, summary.iteration, summary.iteration_from) == (layout, iteration, origin), key
    assert set(describe(files["distill"]).prefixes) == {"model.", "ca_model.", "imnet_model."}


def test_every_layout_loads_strictly_into_the_role(files, models):
    cfg = models["cfg"]
    student_cfg = cfg["student"]["model"]
    for key in ("distill", "segmentor", "module", "ours"):
        model, _, report = load_segmentor_file(files[key], student_cfg)
        assert report.exact, key
        for name, value in model.state_dict().items():
            if key != "ours":
                assert torch.equal(value, models["student"][name]), (key, name)
    teacher, _, _ = load_segmentor_file(files["distill"], cfg["teacher"]["model"], "ca_model.")
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, models["teacher"][name]), name
    # The original soup averages integer buffers too (they become floats).
    soup, _, _ = load_segmentor_file(files["soup"], student_cfg)
    key = "decode_head.head.conv_seg.weight"
    b = layouts.perturbed(models["student"], 1)[key]
    torch.testing.assert_close(soup.state_dict()[key], 0.5 * models["student"][key] + 0.5 * b)


@pytest.mark.parametrize(
    "text, prefix",
    [
        ("auto", "auto"),
        ("", "auto"),
        ("none", ""),
        ("ema_model", "ema_model."),
        ("ca_model.", "ca_model."),
        ("model", "model."),
    ],
)
def test_prefix_words(text, prefix):
    assert normalize_prefix(text) == prefix


# ------------------------------------------------------------- bad input
def _store_state():
    """Registered models with their aliases, and every version's tags."""
    client = mlflow.MlflowClient()
    models = sorted((m.name, sorted((m.aliases or {}).items())) for m in client.search_registered_models())
    versions = sorted((v.name, v.version, sorted(v.tags.items())) for v in client.search_model_versions(""))
    return models, versions


def _run(argv):
    module = load_entry_module("import")
    return cli.run_cli(module.main, ["--preset", "default", *argv])


def test_a_good_import_and_a_duplicate_in_one_call(tracking_uri, files, capsys):
    argv = ["--checkpoints", f"{files['distill']},{files['distill']}"]
    assert _run(argv) == 0
    out = capsys.readouterr().out
    assert "imported once" in out
    [version] = mlflow.MlflowClient().search_model_versions("name='cs2acdc-student'")
    assert version.tags["iteration"] == "24000"
    aliases = mlflow.MlflowClient().get_registered_model("cs2acdc-student").aliases
    assert str(aliases["iter-24000"]) == str(version.version)


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "corrupt",
        "truncated",
        "pickled",
        "role",
        "imagenet",
        "prefix",
        "same_alias",
        "same_auto_alias",
        "same_file_two_aliases",
        "own_format_wrong_role",
        "alias_count",
        "bad_alias",
        "bad_role",
        "bad_prefix",
        "folder",
        "empty",
    ],
)
def test_bad_input_is_one_error_line_and_registers_nothing(tracking_uri, files, capsys, case):
    # One version exists already: it must stay the only one.
    assert _run(["--checkpoints", str(files["distill"])]) == 0
    capsys.readouterr()
    before = _store_state()
    argv, expected = {
        "missing": (["--checkpoints", f"{files['distill']},/no/such.pth"], "not found"),
        "corrupt": (["--checkpoints", str(files["corrupt"])], "corrupt.pth"),
        "truncated": (["--checkpoints", str(files["truncated"])], "truncated"),
        "pickled": (["--checkpoints", str(files["pickled"])], "not allowed: io.open"),
        "role": (["--checkpoints", str(files["mic"]), "--role", "student"], "tensors differ in shape"),
        "imagenet": (["--checkpoints", str(files["imagenet"])], "student.model.pretrained"),
        "prefix": (
            ["--checkpoints", str(files["distill_b"]), "--prefix", "imnet_model"],
            "the sub-models it holds: model, ca_model (pick one",
        ),
        "same_alias": (
            ["--checkpoints", f"{files['distill_b']},{files['soup']}", "--aliases", "iter-1,iter-1"],
            "gives iter-1 to more than one file",
        ),
        "same_auto_alias": (
            ["--checkpoints", f"{files['distill_b']},{files['distill_c']}"],
            "would both get the alias 'iter-32000'",
        ),
        "same_file_two_aliases": (
            ["--checkpoints", f"{files['soup']},{files['soup']}", "--aliases", "a,b"],
            "are the same file",
        ),
        "own_format_wrong_role": (
            ["--checkpoints", str(files["ours"]), "--role", "teacher"],
            "holds another model than the preset",
        ),
        "alias_count": (["--checkpoints", str(files["soup"]), "--aliases", "a,b"], "give one per file"),
        "bad_alias": (["--checkpoints", str(files["soup"]), "--aliases", "v3"], "MLflow reserves"),
        "bad_role": (
            ["--checkpoints", str(files["soup"]), "--role", "pupil"],
            "role must be student or teacher",
        ),
        "bad_prefix": (
            ["--checkpoints", str(files["soup"]), "--prefix", "emma"],
            "prefix must be auto, none",
        ),
        "folder": (["--checkpoints", str(files["soup"].parent)], "folder"),
        "empty": (["--checkpoints", " , "], "comma-separated list"),
    }[case]
    PWNED.unlink(missing_ok=True)
    assert _run(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], err[-2000:]
    assert "Traceback" not in err
    assert _store_state() == before
    assert not PWNED.exists()  # never unpickled unsafely


def test_a_teacher_file_imports_as_the_teacher(tracking_uri, files, models):
    argv = ["--checkpoints", str(files["mic"]), "--role", "teacher"]
    assert _run(argv) == 0
    [version] = mlflow.MlflowClient().search_model_versions("name='cs2acdc-teacher'")
    assert version.tags["source_format"] == "mic"
    assert version.tags["iteration"] == "40000"
    from uda.registry import load_segmentor

    model, _ = load_segmentor("models:/cs2acdc-teacher@iter-40000")
    for name, value in model.state_dict().items():
        assert torch.equal(value, models["teacher"][name]), name


def test_pickle_refusal_names_the_object_without_running_it(files):
    from uda.models.checkpoint import CheckpointError, read_checkpoint

    PWNED.unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="not allowed: io.open"):
        read_checkpoint(files["pickled"])
    assert not PWNED.exists()
    # The file really runs code when it is unpickled unsafely.
    torch.load(files["pickled"], weights_only=False)
    assert PWNED.exists()
    PWNED.unlink()


def _aliases(name="cs2acdc-student"):
    return {a: str(v) for a, v in mlflow.MlflowClient().get_registered_model(name).aliases.items()}


def test_aliases_on_reimport_and_from_other_versions(tracking_uri, files, capsys):
    assert _run(["--checkpoints", str(files["distill"])]) == 0
    first = _aliases()["iter-24000"]
    # A file without an iteration gets no alias.
    assert _run(["--checkpoints", str(files["soup"])]) == 0
    soup_version = max(
        int(v.version) for v in mlflow.MlflowClient().search_model_versions("name='cs2acdc-student'")
    )
    assert str(soup_version) not in _aliases().values()
    # An explicit alias moves from another version, and says so.
    capsys.readouterr()
    assert _run(["--checkpoints", str(files["soup"]), "--aliases", "iter-24000"]) == 0
    assert "iter-24000 moved from version" in capsys.readouterr().out
    assert _aliases()["iter-24000"] == str(soup_version)
    # Re-importing the 24k file reuses its version and leaves the alias.
    assert _run(["--checkpoints", str(files["distill"])]) == 0
    out = capsys.readouterr().out
    assert "reusing it" in out and "stays on version" in out
    assert _aliases()["iter-24000"] == str(soup_version)
    # ... unless the alias is asked for.
    assert _run(["--checkpoints", str(files["distill"]), "--aliases", "iter-24000"]) == 0
    assert _aliases()["iter-24000"] == first
    assert len(mlflow.MlflowClient().search_model_versions("name='cs2acdc-student'")) == 2


def test_a_frozen_teacher_out_of_a_distillation_file(tracking_uri, files, models):
    argv = ["--checkpoints", str(files["distill"]), "--role", "teacher", "--prefix", "ca_model"]
    assert _run(argv) == 0
    [version] = mlflow.MlflowClient().search_model_versions("name='cs2acdc-teacher'")
    # Frozen: the file's iteration is the student's, not the teacher's.
    assert "iteration" not in version.tags and not _aliases("cs2acdc-teacher")
    assert version.tags["source_prefix"] == "ca_model."
    from uda.registry import load_segmentor

    model, _ = load_segmentor(f"models:/cs2acdc-teacher/{version.version}")
    for name, value in model.state_dict().items():
        assert torch.equal(value, models["teacher"][name]), name


@pytest.mark.parametrize("case", ["role", "preset", "bad_role"])
def test_evaluate_a_foreign_file_with_the_wrong_architecture(tracking_uri, files, capsys, case):
    from uda.data.synthetic import ensure_embedded

    acdc = ensure_embedded().acdc_root
    argv, expected = {
        "role": (["--role", "teacher"], "does not fit this segmentor"),
        "preset": (["--preset", "cs2acdc"], "does not fit this segmentor"),
        "bad_role": (["--role", "pupil"], "role must be student or teacher"),
    }[case]
    module = load_entry_module("evaluate")
    assert cli.run_cli(module.main, ["--target-root", str(acdc), "--model", str(files["soup"]), *argv]) == 2
    err = capsys.readouterr().err
    [line] = [x for x in err.splitlines() if x.startswith("error:")]
    assert expected in line and "Traceback" not in err
    assert not mlflow.MlflowClient().search_runs(
        [e.experiment_id for e in mlflow.MlflowClient().search_experiments()]
    )
