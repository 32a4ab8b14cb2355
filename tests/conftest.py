"""Shared fixtures: a real MLflow store (SQLite in a temp dir) per test that needs one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A fresh SQLite MLflow store (artifacts next to it) set as the tracking URI."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # New experiments put artifacts in ./mlruns: keep them in the temp dir too.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    _forget_active_experiment()
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()
    _forget_active_experiment()
    mlflow.set_tracking_uri(None)


@pytest.fixture(autouse=True)
def _cpu_threads_of_this_test():
    """A test that runs an entry point in-process registers pytest as a CPU
    job (uda.cpu_threads): unregister it, so later subprocesses keep the cores."""
    yield
    from uda import cpu_threads

    if cpu_threads._share is not None:
        import torch

        threads = cpu_threads._share.cores
        cpu_threads.release()
        torch.set_num_threads(threads)


def _forget_active_experiment() -> None:
    """`mlflow.set_experiment` remembers an experiment id (process global and
    MLFLOW_EXPERIMENT_ID) that does not exist in the next test's fresh store."""
    import mlflow.tracking.fluent as fluent

    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)
    fluent._active_experiment_id = None
