"""The default SQLite store with several writers: what tests/test_team_server.py
checks against a tracking server, on `sqlite:///…/mlflow.db`, and the one-line
error (naming the server setup) when SQLite's write lock is held too long."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import mlflow
import pytest

from project_processes import entry_point_command
from concurrent_runs import (
    PROJECT_ROOT,
    TINY_DISTILL,
    env_for,
    finish,
    start,
    two_distills_at_once,
    two_promotions_at_once,
)

EXPERIMENT = "sqlite-writers"
pytestmark = pytest.mark.slow


@pytest.fixture
def store(tracking_uri, tmp_path):
    mlflow.MlflowClient().create_experiment(EXPERIMENT, artifact_location=(tmp_path / "mlruns").as_uri())
    log = tmp_path / "teacher.log"
    teacher = start(
        tracking_uri, EXPERIMENT, log, "teacher", "iterations=2", "checkpoint_interval=2", TINY_DISTILL[-1]
    )
    finish({"teacher": teacher}, {"teacher": log})
    return tracking_uri


def test_two_distills_and_two_promotions_at_once_on_sqlite(store, tmp_path):
    client = mlflow.MlflowClient(store)
    two_distills_at_once(client, store, EXPERIMENT, tmp_path)
    two_promotions_at_once(client, store, EXPERIMENT, tmp_path)


def test_a_store_locked_too_long_is_one_error_naming_the_server_setup(tracking_uri, tmp_path):
    """Another process holds SQLite's write lock for longer than MLflow's
    SQLite driver waits (5 s): one line, no traceback, the way out named."""
    database = tracking_uri.removeprefix("sqlite:///")
    mlflow.MlflowClient().create_experiment(EXPERIMENT, artifact_location=(tmp_path / "mlruns").as_uri())
    holder = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")  # held until the entry point has given up
    try:
        result = subprocess.run(
            entry_point_command(
                "teacher",
                "--source-root=data/embedded/cityscapes",
                "--target-root=data/embedded/acdc",
                "--iterations=1",
            ),
            env=env_for(tracking_uri, MLFLOW_EXPERIMENT_NAME=EXPERIMENT),
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "is locked" in errors[0] and "tracking server on PostgreSQL" in errors[0]
    assert "tools/team_services.py" in errors[0]
    assert "Traceback" not in result.stderr


_LOG_DATASETS = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import mlflow
from uda import tracking
mlflow.set_tracking_uri(sys.argv[2])
mlflow.set_experiment("datasets-race")
start = float(sys.argv[3])
with mlflow.start_run():
    for k in range(int(sys.argv[5])):  # all processes log dataset k at the same instant
        while time.time() < start + 0.4 * k:
            time.sleep(0.0005)
        tracking.log_dataset_inputs({f"cityscapes/part{k}": sys.argv[4]})
"""


def test_runs_logging_the_same_new_datasets_at_once_all_succeed(tmp_path):
    """main's teacher and source-only baseline log the same datasets at the same moment:
    the store's insert of a new dataset races on its unique key (seen in CI as
    "UNIQUE constraint failed: datasets..." from one of the two)."""
    import time

    from conftest import PROJECT_ROOT

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    client.create_experiment("datasets-race", artifact_location=(tmp_path / "mlruns").as_uri())
    folder = tmp_path / "data"
    folder.mkdir()
    start = time.time() + 8  # both processes imported and inside their runs by then
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _LOG_DATASETS, str(PROJECT_ROOT), uri, str(start), str(folder), "12"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outcomes = [p.communicate(timeout=120) for p in processes]
    for process, (_, err) in zip(processes, outcomes):
        assert process.returncode == 0, err[-3000:]
    experiment = client.get_experiment_by_name("datasets-race")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 4
    for run in runs:
        assert sorted(i.dataset.name for i in run.inputs.dataset_inputs) == sorted(
            f"cityscapes/part{k}" for k in range(12)
        )
