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
    cmd = [str(VENV_BIN / "mlflow"), "run", str(PROJECT_ROOT), "-e", entry_point, "--env-manager", "local",
           "--experiment-name", "entrypoint-tests"]
    for p in params:
        cmd += ["-P", p]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


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
