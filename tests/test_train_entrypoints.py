"""`teacher` / `distill` end to end against a real SQLite store: every
checkpoint a registered version, a MIC checkpoint import, resume after a
real SIGKILL (same losses, no duplicate versions, continued in the same
run under `mlflow run`), and clear errors that register nothing."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import torch

from uda import cli
from uda.config import load_config
from uda.models import build_segmentor, save_checkpoint
from uda.registry import load_segmentor
from budgets import TINY_TRAINING_OPTIONS
from entry_modules import load_entry_module
from project_processes import PROJECT_ROOT, entry_point_command, mlflow_run_command, process_env

EMBEDDED = PROJECT_ROOT / "data" / "embedded"
EXPERIMENT = "train-entrypoints"
TINY = " ".join(TINY_TRAINING_OPTIONS)


def roots() -> list[str]:
    return ["--source-root", str(EMBEDDED / "cityscapes"), "--target-root", str(EMBEDDED / "acdc")]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store with one experiment for every run of this file."""
    from uda.data.synthetic import ensure_embedded

    ensure_embedded(EMBEDDED)
    root = tmp_path_factory.mktemp("train-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        patch.chdir(root)
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.create_experiment(EXPERIMENT, artifact_location=(root / "mlruns").as_uri())
        yield {"root": root, "uri": uri, "experiment": experiment}
        mlflow.set_tracking_uri(None)


def env_for(store) -> dict[str, str]:
    return process_env(store["uri"], MLFLOW_EXPERIMENT_NAME=EXPERIMENT, OMP_NUM_THREADS="2")


def entry(name: str, *args: str) -> list[str]:
    return entry_point_command(name, *roots(), *args)


def run_entry(store, name: str, *args: str, timeout: int = 600):
    return subprocess.run(
        entry(name, *args),
        env=env_for(store),
        cwd=store["root"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def versions(name: str) -> list:
    try:
        found = mlflow.MlflowClient().search_model_versions(f"name='{name}'")
    except mlflow.exceptions.MlflowException:
        return []
    return sorted(found, key=lambda v: int(v.version))


def aliases(name: str) -> dict[str, str]:
    model = mlflow.MlflowClient().get_registered_model(name)
    return {a: str(v) for a, v in model.aliases.items()}


def runs(store, **tags) -> list:
    filters = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return mlflow.MlflowClient().search_runs(
        [store["experiment"]], filter_string=filters, order_by=["attributes.start_time ASC"]
    )


def history(run_id: str, key: str) -> dict[int, float]:
    """Last logged value per step (a resumed run logs some steps twice)."""
    values = {}
    for metric in sorted(mlflow.MlflowClient().get_metric_history(run_id, key), key=lambda m: m.timestamp):
        values[metric.step] = metric.value
    return values


@pytest.fixture(scope="module")
def teacher_run(store):
    """A 4-iteration MIC teacher, checkpoints at 2 and 4."""
    result = run_entry(
        store,
        "teacher",
        "--iterations",
        "4",
        "--checkpoint-interval",
        "2",
        "--cfg-options",
        TINY + " evaluation.interval=2 log_config.img_interval=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = runs(store, entry_point="teacher")
    return run


# ------------------------------------------------------------------ teacher
@pytest.mark.slow
def test_teacher_registers_every_checkpoint_with_alias_and_tags(store, teacher_run):
    run_id = teacher_run.info.run_id
    found = versions("cs2acdc-teacher")
    assert [v.tags["iteration"] for v in found] == ["2", "4"]
    assert aliases("cs2acdc-teacher") == {"iter-2": str(found[0].version), "iter-4": str(found[1].version)}
    for version in found:
        assert version.tags["run_id"] == run_id
        assert version.tags["preset"] == "default"
        assert version.tags["kind"] == "checkpoint"
        assert 0 <= float(version.tags["val_mIoU"]) <= 1
        assert "val_mIoU.fog" in version.tags
    assert teacher_run.info.status == "FINISHED"
    assert teacher_run.data.tags["uda.train.state"] == "finished"
    assert teacher_run.data.tags["uda.mode"] == "mic"

    metrics = teacher_run.data.metrics
    for key in (
        "loss",
        "src.decode.loss_seg",
        "mix.decode.loss_seg",
        "masked.decode.loss_seg",
        "pseudo.confident_fraction",
        "lr.default",
        "lr.head",
        "throughput.it_per_s",
        "throughput.img_per_s",
        "val.mIoU",
        "val.mIoU.night",
    ):
        assert key in metrics, key
    assert sorted(history(run_id, "loss")) == [1, 2, 3, 4]
    assert sorted(history(run_id, "val.mIoU")) == [2, 4]
    inputs = {d.dataset.name for d in teacher_run.inputs.dataset_inputs}
    assert {"cityscapes/train", "acdc/train", "acdc/val"} <= inputs

    client = mlflow.MlflowClient()
    images = [f.path for f in client.list_artifacts(run_id, "images")]
    assert any("train_debug" in p for p in images), images
    # The resume state is a run artifact, not a model version.
    assert [f.path for f in client.list_artifacts(run_id, "resume")] == ["resume/state.pth"]
    state = torch.load(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="resume/state.pth", dst_path=str(store["root"] / "dl")
        ),
        weights_only=True,
    )
    assert state["iteration"] == 4 and "ema" in state and "optimizer" in state
    assert "state_dict" not in state  # weights live in the version only
    # Weights stored once: one checkpoint file per version under mlruns.
    checkpoints = [p for p in (store["root"] / "mlruns").rglob("*.pth") if "resume" not in p.parts]
    assert len(checkpoints) == len(versions("cs2acdc-teacher"))


@pytest.mark.slow
def test_registered_checkpoint_loads_as_pyfunc_and_as_torch(store, teacher_run):
    from uda.serving import decode_png, example_image_png, input_frame

    model = mlflow.pyfunc.load_model("models:/cs2acdc-teacher@iter-4")
    out = model.predict(input_frame(example_image_png(64, 96)))
    assert decode_png(out["label_map"][0]).shape == (64, 96)
    segmentor, model_cfg = load_segmentor("models:/cs2acdc-teacher@iter-4")
    assert model_cfg["backbone"] == "mit_nano"


def _mic_file(path: Path, model_cfg: dict, seed: int) -> dict:
    """A checkpoint in MIC's mmcv layout (model./ema_model./imnet_model.)."""
    torch.manual_seed(seed)
    model = build_segmentor(model_cfg).state_dict()
    ema = build_segmentor(model_cfg).state_dict()
    state = {f"model.{k}": v for k, v in model.items()}
    state.update({f"ema_model.{k}": v for k, v in ema.items()})
    torch.save({"meta": {"iter": 40000}, "state_dict": state}, path)
    return model


@pytest.mark.slow
def test_teacher_imports_a_mic_checkpoint_as_an_import_version(store, teacher_run):
    cfg = load_config("default")
    weights = _mic_file(store["root"] / "mic.pth", cfg["teacher"]["model"], 3)
    before = len(versions("cs2acdc-teacher"))
    teacher = load_entry_module("teacher")
    argv = roots() + ["--checkpoint", str(store["root"] / "mic.pth")]
    assert cli.run_cli(teacher.main, argv) == 0
    found = versions("cs2acdc-teacher")
    assert len(found) == before + 1
    imported = found[-1]
    assert imported.tags["kind"] == "import"
    # The iteration and its alias come from MIC's meta.iter.
    assert imported.tags["iteration"] == "40000"
    assert imported.tags["source_format"] == "mic"
    assert str(mlflow.MlflowClient().get_registered_model("cs2acdc-teacher").aliases["iter-40000"]) == str(
        imported.version
    )
    loaded, _ = load_segmentor(f"models:/cs2acdc-teacher/{imported.version}")
    for key, value in loaded.state_dict().items():  # model.*, not ema_model.*
        assert torch.equal(value, weights[key]), key


# ----------------------------------------------------------------- bad input
@pytest.mark.slow
@pytest.mark.parametrize(
    "case", ["alias", "architecture", "mic_arch", "roots", "iterations", "interval", "resume"]
)
def test_bad_input_is_one_error_line_and_registers_nothing(store, teacher_run, capsys, case):
    distill = load_entry_module("distill")
    cfg = load_config("default")
    argv = roots() + ["--teacher", "models:/cs2acdc-teacher@iter-4"]
    expected = {
        "alias": "has no alias 'iter-999'. Aliases: iter-2 -> ",
        "architecture": "is not the architecture of the preset",
        "mic_arch": "does not fit this segmentor",
        "roots": "Cityscapes",
        "iterations": "iterations must be at least 1, got 0.",
        "interval": "evaluation.interval must be a positive integer",
        "resume": "resume must be auto, none or an MLflow run id",
    }[case]
    if case == "alias":
        argv[-1] = "models:/cs2acdc-teacher@iter-999"
    elif case == "architecture":  # a FAN student where a MiT teacher goes
        torch.manual_seed(0)
        path = save_checkpoint(store["root"] / "fan.pth", build_segmentor(cfg["student"]["model"]))
        argv[-1] = str(path)
    elif case == "mic_arch":
        _mic_file(store["root"] / "fan_mic.pth", cfg["student"]["model"], 0)
        argv[-1] = str(store["root"] / "fan_mic.pth")
    elif case == "roots":
        argv[1] = str(store["root"] / "no-such-cityscapes")
    elif case == "iterations":
        argv += ["--iterations", "0"]
    elif case == "interval":
        argv += ["--cfg-options", "evaluation.interval=0"]
    elif case == "resume":
        argv += ["--resume", "yesterday"]
    runs_before = len(mlflow.MlflowClient().search_runs([store["experiment"]]))
    assert cli.run_cli(distill.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") or "\nerror: " in err, err
    assert expected in err
    assert "Traceback" not in err
    assert versions("cs2acdc-student") == []
    assert len(mlflow.MlflowClient().search_runs([store["experiment"]])) == runs_before


# ------------------------------------------------------------------ resume
DISTILL = [
    "--teacher",
    "models:/cs2acdc-teacher@iter-4",
    "--iterations",
    "9",
    "--cfg-options",
    TINY + " evaluation.interval=100 log_config.img_interval=100",
]


def _wait_for_checkpoint(store, proc, timeout: float = 300) -> str:
    """Poll until the distill run wrote a resume state; returns its id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        for run in runs(store, entry_point="distill"):
            if (
                run.data.tags.get("uda.resume.iteration")
                and run.data.tags.get("uda.model_name") == "cs2acdc-student"
            ):
                return run.info.run_id
        time.sleep(0.2)
    raise AssertionError("no checkpoint within the timeout")


@pytest.mark.slow
def test_sigkilled_distill_resumes_with_identical_losses_and_no_duplicates(store, teacher_run):
    # The reference: the same 9 iterations without interruption.
    result = run_entry(
        store,
        "distill",
        *DISTILL,
        "--checkpoint-interval",
        "9",
        "--model-name",
        "reference-student",
        "--resume",
        "none",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (reference,) = runs(store, entry_point="distill")

    proc = subprocess.Popen(
        entry("distill", *DISTILL, "--checkpoint-interval", "3"),
        env=env_for(store),
        cwd=store["root"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        killed_id = _wait_for_checkpoint(store, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed = mlflow.MlflowClient().get_run(killed_id)
    assert killed.data.tags["uda.train.state"] == "running"
    resume_point = int(killed.data.tags["uda.resume.iteration"])
    assert resume_point in (3, 6)

    # Resume under `mlflow run` (resume=auto finds the killed run).
    params = [f"source_root={EMBEDDED / 'cityscapes'}", f"target_root={EMBEDDED / 'acdc'}"]
    params += ["teacher=models:/cs2acdc-teacher@iter-4", "iterations=9", "checkpoint_interval=3"]
    cmd = mlflow_run_command("distill", EXPERIMENT, [*params, f"cfg_options={DISTILL[-1]}"])
    result = subprocess.run(
        cmd, env=env_for(store), cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]

    resumed = mlflow.MlflowClient().get_run(killed_id)
    assert resumed.data.tags["uda.train.state"] == "finished"
    assert resumed.data.tags["uda.resumes"] == "1"
    pointer = [
        r for r in runs(store, entry_point="distill") if r.data.tags.get("uda.resumed_into") == killed_id
    ]
    assert len(pointer) == 1  # the run `mlflow run` created points at it

    # Identical losses after the resume point (same seed, same batches).
    keys = [k for k in reference.data.metrics if "loss" in k]
    assert "mix.decode.loss_seg" in keys
    for key in keys:
        want = history(reference.info.run_id, key)
        got = history(killed_id, key)
        assert sorted(got) == list(range(1, 10)), key
        for step in range(resume_point + 1, 10):
            assert got[step] == want[step], (key, step)

    # One version per checkpoint, one alias each, all from the killed run.
    found = versions("cs2acdc-student")
    assert [v.tags["iteration"] for v in found] == ["3", "6", "9"]
    assert {v.tags["run_id"] for v in found} == {killed_id}
    assert aliases("cs2acdc-student") == {f"iter-{v.tags['iteration']}": str(v.version) for v in found}
    assert found[0].tags["teacher"].startswith("models:/cs2acdc-teacher/")
