"""The default SQLite store with several writers: what tests/test_team_server.py
checks against a tracking server, on `sqlite:///…/mlflow.db`, and the one-line
error (naming the server setup) when SQLite's write lock is held too long."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import mlflow
import pytest

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
            [
                sys.executable,
                "entrypoints/teacher.py",
                "--source-root=data/embedded/cityscapes",
                "--target-root=data/embedded/acdc",
                "--iterations=1",
            ],
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
