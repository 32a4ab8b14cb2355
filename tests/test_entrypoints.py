"""Every entry point starts under `mlflow run . --env-manager local` against a temp SQLite store."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent

VENV_BIN = Path(sys.executable).parent


def mlflow_run(entry_point: str, tracking_uri: str, *params: str, timeout: int = 600):
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_RUN_ID", None)
    # MLflow resolves `path` parameters against the working directory, so run from the
    # project (as users do: `mlflow run .`) with the experiment's artifacts in the temp store.
    client = mlflow.MlflowClient(tracking_uri)
    if client.get_experiment_by_name("entrypoint-tests") is None:
        store_dir = Path(tracking_uri.removeprefix("sqlite:///")).parent
        client.create_experiment("entrypoint-tests", artifact_location=(store_dir / "mlruns").as_uri())
    cmd = [str(VENV_BIN / "mlflow"), "run", str(PROJECT_ROOT), "-e", entry_point, "--env-manager", "local",
           "--experiment-name", "entrypoint-tests"]
    for p in params:
        cmd += ["-P", p]
    return subprocess.run(cmd, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout)


def only_run(tracking_uri: str):
    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("entrypoint-tests")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


@pytest.mark.slow
@pytest.mark.parametrize("entry_point, params, expected", [
    ("teacher", ["iterations=5"], {"cfg.runner.max_iters": "5"}),
    ("distill", ["checkpoint_interval=2", "cfg_options=uda.mask_generator.mask_ratio=0.5"],
     {"cfg.checkpoint_config.interval": "2", "cfg.uda.mask_generator.mask_ratio": "0.5"}),
    ("soup", ["weights=3,3,4", "aliases=iter-40,iter-80,iter-120"],
     {"weights": "3,3,4", "cfg.soup.aliases": "['iter-40', 'iter-80', 'iter-120']"}),
    ("evaluate", ["split=test"], {"split": "test"}),
])
def test_entry_point_starts_logs_params_and_config(tracking_uri, entry_point, params, expected):
    result = mlflow_run(entry_point, tracking_uri, *params)
    assert result.returncode == 0, result.stderr[-3000:]
    client, run = only_run(tracking_uri)
    assert run.info.status == "FINISHED"
    for key, value in expected.items():
        assert run.data.params[key] == value
    assert run.data.tags["entry_point"] == entry_point
    assert run.data.tags.get("mlflow.source.git.commit")
    config = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.yaml"))
    assert config["name"] == "default"
    assert config["data"]["target"]["root"].endswith("data/embedded/acdc")


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


@pytest.mark.slow
def test_main_prepares_and_shows_the_embedded_data(tracking_uri):
    result = mlflow_run("main", tracking_uri)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cityscapes/train" in result.stdout
    client, run = only_run(tracking_uri)
    assert run.data.metrics["images.cityscapes.train"] > 0
    assert run.data.metrics["images.acdc.fog.val"] > 0
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "data")}
    assert {"data/class_pixel_share.json", "data/class_pixel_share.png", "data/examples_0.png",
            "data/examples_4.png"} <= artifacts
    table = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/data/class_pixel_share.json")
    assert len(table["data"]) == 19
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"cityscapes", "acdc"}
    # the embedded data was generated in the real layouts, next to the tracked READMEs
    assert (PROJECT_ROOT / "data/embedded/cityscapes/leftImg8bit/train").is_dir()
    assert (PROJECT_ROOT / "data/embedded/acdc/rgb_anon").is_dir()
    assert (PROJECT_ROOT / "data/embedded/acdc/README.md").is_file()
