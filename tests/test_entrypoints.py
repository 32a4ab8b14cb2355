"""Every entry point starts under `mlflow run . --env-manager local` against a temp SQLite store."""

from __future__ import annotations

import subprocess
from pathlib import Path

import mlflow
import pytest

from project_processes import PROJECT_ROOT, mlflow_run_command, process_env
from uda.registry import version_model_id


def mlflow_run(entry_point: str, tracking_uri: str, *params: str, timeout: int = 600):
    # MLflow resolves `path` parameters against the working directory, so run from the
    # project (as users do: `mlflow run .`) with the experiment's artifacts in the temp store.
    client = mlflow.MlflowClient(tracking_uri)
    if client.get_experiment_by_name("entrypoint-tests") is None:
        store_dir = Path(tracking_uri.removeprefix("sqlite:///")).parent
        client.create_experiment("entrypoint-tests", artifact_location=(store_dir / "mlruns").as_uri())
    cmd = mlflow_run_command(entry_point, "entrypoint-tests", params)
    env = process_env(tracking_uri)
    return subprocess.run(cmd, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout)


def only_run(tracking_uri: str):
    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("entrypoint-tests")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


@pytest.mark.slow
def test_bad_parameter_is_one_clear_error(tracking_uri):
    result = mlflow_run("teacher", tracking_uri, "iterations=0")
    assert result.returncode != 0
    assert "error: iterations must be at least 1, got 0." in result.stderr
    assert "Traceback" not in result.stderr.split("mlflow.exceptions")[0]


@pytest.mark.slow
def test_unknown_cfg_option_is_rejected(tracking_uri):
    result = mlflow_run("distill", tracking_uri, "cfg_options=uda.pseudo_treshold=0.9")
    assert result.returncode != 0
    assert "Unknown config key 'uda.pseudo_treshold'. Did you mean pseudo_threshold" in result.stderr


# A pipeline small enough for a test: a few iterations, checkpoints every 2, two Optuna trials.
TINY_PIPELINE = [
    "cfg_options=runner.max_iters=4 checkpoint_config.interval=2 evaluation.interval=2 "
    "log_config.interval=2 log_config.img_interval=2 lr_config.warmup_iters=1",
    "soup_trials=2",
]


@pytest.mark.slow
def test_main_runs_the_pipeline_then_reuses_finished_steps(tracking_uri):
    result = mlflow_run("main", tracking_uri, *TINY_PIPELINE)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "mlflow models serve -m models:/cs2acdc-student@serving" in result.stdout
    assert "Downloading artifacts" not in result.stdout + result.stderr  # no bar per model load
    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("entrypoint-tests")
    runs = client.search_runs([exp.experiment_id])
    main_run = next(r for r in runs if r.data.tags.get("entry_point") == "main")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == main_run.info.run_id]
    assert sorted(r.data.tags["mlflow.project.entryPoint"] for r in children) == [
        "distill",
        "evaluate",
        "soup",
        "teacher",
        "teacher",
    ]
    assert all(r.info.status == "FINISHED" for r in children)
    # readable child runs; the source-only baseline is the teacher entry point on the source alone
    names = {r.info.run_name: r for r in children}
    assert set(names) == {
        f"{step} · default" for step in ("source-only", "teacher", "distill", "soup", "evaluate")
    }
    baseline = names["source-only · default"]
    assert baseline.data.tags["uda.mode"] == "source_only"
    assert baseline.data.params["model_name"] == "cs2acdc-source-only"
    assert "uda.source_only=true checkpoint_config.interval=4" in baseline.data.params["cfg_options"]
    assert names["teacher · default"].data.tags["uda.mode"] == "mic"
    assert [v.tags["iteration"] for v in client.search_model_versions("name = 'cs2acdc-source-only'")] == [
        "4"
    ]

    # MLflow 3: each checkpoint's validation is a metric of its logged model, at its iteration,
    # and the runs' inputs name the models they used (teacher → distill, ingredients → soup,
    # the soup → evaluate; search_runs leaves model inputs out, get_run has them)
    distill = names["distill · default"]
    checkpoints = [
        v
        for v in client.search_model_versions("name = 'cs2acdc-student'")
        if v.tags.get("kind") == "checkpoint" and v.tags.get("run_id") == distill.info.run_id
    ]
    assert sorted(int(v.tags["iteration"]) for v in checkpoints) == [2, 4]
    for version in checkpoints:
        metrics = {m.key: m for m in client.get_logged_model(version_model_id(version)).metrics}
        assert metrics["val_mIoU"].step == int(version.tags["iteration"])
        assert metrics["val_mIoU"].value == pytest.approx(float(version.tags["val_mIoU"]), abs=1e-6)
    teacher_version = client.get_model_version("cs2acdc-teacher", main_run.data.tags["teacher_version"])
    assert [m.model_id for m in client.get_run(distill.info.run_id).inputs.model_inputs] == [
        version_model_id(teacher_version)
    ]
    soup_run = names["soup · default"]
    soup_version = client.get_model_version("cs2acdc-student", main_run.data.tags["soup_version"])
    ingredients = [
        version_model_id(client.get_model_version("cs2acdc-student", v))
        for v in soup_version.tags["soup.ingredient_versions"].split(",")
    ]
    assert sorted(m.model_id for m in client.get_run(soup_run.info.run_id).inputs.model_inputs) == sorted(
        ingredients
    )
    evaluate_inputs = client.get_run(names["evaluate · default"].info.run_id).inputs.model_inputs
    assert [m.model_id for m in evaluate_inputs] == [version_model_id(soup_version)]

    # the story: one table of the four models on target val, on the parent run and in the printout
    assert "The method on target val" in result.stdout
    for row in ("source-only", "MIC teacher", "distilled student", "soup (serving)"):
        assert f"| {row} |" in result.stdout
    assert "serving → cs2acdc-student version" in result.stdout
    for key in ("source_only", "teacher", "distill", "evaluate"):
        assert 0 <= main_run.data.metrics[f"method.{key}.mIoU"] <= 1
    assert main_run.data.metrics["method.source_only.mIoU"] == pytest.approx(
        client.get_metric_history(baseline.info.run_id, "val.mIoU")[-1].value
    )
    assert {"method/summary.json", "method/summary.md"} <= {
        f.path for f in client.list_artifacts(main_run.info.run_id, "method")
    }

    # system metrics on every entry point's run, not only training (main is long enough to sample)
    assert any(k.startswith("system/cpu_utilization") for k in main_run.data.metrics), main_run.data.metrics

    # the data step: sizes, class shares, examples, datasets as inputs
    assert main_run.data.metrics["images.cityscapes.train"] > 0
    artifacts = {f.path for f in client.list_artifacts(main_run.info.run_id, "data")}
    assert {"data/class_pixel_share.json", "data/class_pixel_share.png", "data/examples_0.png"} <= artifacts
    assert {i.dataset.name for i in main_run.inputs.dataset_inputs} == {"cityscapes", "acdc"}
    assert (PROJECT_ROOT / "data/embedded/acdc/README.md").is_file()

    # serving points at the soup that the evaluate step measured
    serving = client.get_model_version_by_alias("cs2acdc-student", "serving")
    assert serving.tags["kind"] == "soup"
    assert main_run.data.tags["soup_version"] == str(serving.version)
    evaluate = next(r for r in children if r.data.tags["mlflow.project.entryPoint"] == "evaluate")
    assert evaluate.data.params["model"] == f"models:/cs2acdc-student/{serving.version}"
    assert 0 <= evaluate.data.metrics["mIoU"] <= 1

    # a second `mlflow run .` with the same parameters and code reuses every step
    versions_before = len(client.search_model_versions("name = 'cs2acdc-student'"))
    again = mlflow_run("main", tracking_uri, *TINY_PIPELINE)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stdout.count("reusing finished run") == 5, again.stdout
    assert len(client.search_model_versions("name = 'cs2acdc-student'")) == versions_before
