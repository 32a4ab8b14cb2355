"""Half-logged models: a logged model left PENDING (a kill inside
`log_model`) is never registered nor aliased, and is marked FAILED and
deleted when its run is resumed or when logging fails in-process — against
a real SQLite store, with a real SIGKILL of a training run."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException

from budgets import TINY_TRAINING_OPTIONS
from project_processes import PROJECT_ROOT, process_env
from uda.config import load_config
from uda.models import build_segmentor
from uda.registry import (
    RegistryError,
    discard_unfinished_models,
    log_and_register,
    register_checkpoint,
    set_alias_safely,
)

EMBEDDED = PROJECT_ROOT / "data" / "embedded"
NAME = "orphan-student"


def _tiny_model():
    return build_segmentor(load_config("default")["student"]["model"]).eval()


def _models_of(run_id: str) -> list:
    """The run's logged models as searches (and `mlflow ui`) list them."""
    client = mlflow.MlflowClient()
    experiment = client.get_run(run_id).info.experiment_id
    return list(client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'"))


def _stored(model_id: str):
    """The logged model as the store holds it, deleted or not."""
    store = mlflow.tracking._tracking_service.utils._get_store()
    return store.get_logged_model(model_id, allow_deleted=True)


def _assert_discarded(model_id: str) -> None:
    client = mlflow.MlflowClient()
    with pytest.raises(MlflowException, match="not found"):
        client.get_logged_model(model_id)
    stored = _stored(model_id)
    assert str(stored.status) == "FAILED"
    assert "uda.discarded" in stored.tags


def _model_id(version) -> str:
    """The logged model a version was registered from."""
    return version.model_id or version.source[len("models:/") :]


def _aliases() -> dict:
    model = mlflow.MlflowClient().get_registered_model(NAME)
    return {a: str(v) for a, v in model.aliases.items()}


def test_a_pending_model_is_never_registered_and_is_discarded(tracking_uri):
    with mlflow.start_run() as run:
        ready = log_and_register(_tiny_model(), NAME, iteration=1)
        # What a kill inside log_model leaves: a PENDING logged model.
        pending = mlflow.initialize_logged_model(
            name="iter-2", source_run_id=run.info.run_id, tags={"kind": "checkpoint", "iteration": "2"}
        )
        assert str(pending.status) == "PENDING"

        with pytest.raises(RegistryError, match="is PENDING"):
            register_checkpoint(f"models:/{pending.model_id}", NAME, iteration=2)
        versions = mlflow.MlflowClient().search_model_versions(f"name='{NAME}'")
        assert [v.tags["iteration"] for v in versions] == ["1"]
        assert "iter-2" not in _aliases()

        assert discard_unfinished_models(run.info.run_id, "test") == [pending.model_id]
        _assert_discarded(pending.model_id)
        assert [m.model_id for m in _models_of(run.info.run_id)] == [_model_id(ready)]  # READY models stay
        # The next registration of iteration 2 logs and registers normally.
        second = log_and_register(_tiny_model(), NAME, iteration=2)
    assert _aliases() == {"iter-1": str(ready.version), "iter-2": str(second.version)}
    assert str(mlflow.MlflowClient().get_logged_model(_model_id(second)).status) == "READY"
    assert discard_unfinished_models(run.info.run_id, "again") == []


def test_serving_never_points_at_a_version_of_a_deleted_model(tracking_uri):
    with mlflow.start_run():
        version = log_and_register(_tiny_model(), NAME, iteration=1)
    mlflow.MlflowClient().delete_logged_model(_model_id(version))
    with pytest.raises(RegistryError, match="No logged model"):
        set_alias_safely(NAME, "serving", version.version)
    assert "serving" not in _aliases()


def test_a_failure_inside_log_model_leaves_no_half_logged_model(tracking_uri, tmp_path):
    # The experiment's artifact folder cannot be created (its parent is a
    # file), so log_model fails after creating its logged model.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    experiment = mlflow.create_experiment("unwritable", artifact_location=str(blocker / "artifacts"))
    with mlflow.start_run(experiment_id=experiment) as run:
        with pytest.raises((OSError, MlflowException)):
            log_and_register(_tiny_model(), NAME, iteration=1)
    assert _models_of(run.info.run_id) == []  # nothing shown half-logged
    deleted = _stored_of_run(run.info.run_id)
    assert [str(m.status) for m in deleted] == ["FAILED"]
    assert deleted[0].tags["uda.discarded"].startswith("logging failed: ")


def _stored_of_run(run_id: str) -> list:
    store = mlflow.tracking._tracking_service.utils._get_store()
    experiment = mlflow.MlflowClient().get_run(run_id).info.experiment_id
    with store.ManagedSessionMaker() as session:
        from mlflow.store.tracking.dbmodels.models import SqlLoggedModel

        rows = (
            session.query(SqlLoggedModel)
            .filter(SqlLoggedModel.experiment_id == int(experiment), SqlLoggedModel.source_run_id == run_id)
            .all()
        )
        return [row.to_mlflow_entity() for row in rows]


# ------------------------------------------------------ a real SIGKILL
# The teacher entry point, in a process that holds still inside the
# log_model of one iteration (after MLflow created the PENDING logged model,
# before it uploads the files) and says so in a file, so that the test's
# SIGKILL lands there every time; everything else is the real entry point.
_PAUSED_TEACHER = """
import os, runpy, sys, time
from mlflow import MlflowClient

upload = MlflowClient.log_model_artifacts

def paused(self, model_id, local_dir):
    if self.get_logged_model(model_id).tags.get('iteration') == \\
            os.environ['PAUSE_ITERATION']:
        with open(os.environ['PAUSE_FLAG'], 'w') as flag:
            flag.write(model_id)
        time.sleep(600)  # SIGKILLed here
    return upload(self, model_id, local_dir)

MlflowClient.log_model_artifacts = paused
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def _teacher_args() -> list[str]:
    return [
        str(PROJECT_ROOT / "entrypoints" / "teacher.py"),
        "--source-root",
        str(EMBEDDED / "cityscapes"),
        "--target-root",
        str(EMBEDDED / "acdc"),
        "--model-name",
        NAME,
        "--iterations",
        "4",
        "--checkpoint-interval",
        "2",
        "--cfg-options",
        " ".join(TINY_TRAINING_OPTIONS) + " evaluation.interval=100 log_config.img_interval=100",
    ]


def _env(tracking_uri: str, **extra: str) -> dict[str, str]:
    return process_env(
        tracking_uri,
        MLFLOW_EXPERIMENT_NAME="orphans",
        OMP_NUM_THREADS="2",
        MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
        **extra,
    )


def _wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 400) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text():
            return path.read_text()
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.05)
    raise AssertionError(f"the run never reached {path.name}")


@pytest.mark.slow
def test_a_run_killed_inside_log_model_resumes_without_its_orphan(tracking_uri, tmp_path):
    from uda.data.synthetic import ensure_embedded

    ensure_embedded(EMBEDDED)
    mlflow.create_experiment("orphans", artifact_location=(tmp_path / "mlruns").as_uri())
    flag = tmp_path / "inside-log-model"
    log = tmp_path / "killed-teacher.log"  # a file: a full pipe would block the child
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", _PAUSED_TEACHER, *_teacher_args()],
            env=_env(tracking_uri, PAUSE_ITERATION="4", PAUSE_FLAG=str(flag)),
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
        )
    try:
        orphan = _wait_for(flag, proc, log)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    run_id = mlflow.MlflowClient().get_logged_model(orphan).source_run_id
    killed = mlflow.MlflowClient().get_run(run_id)
    assert killed.data.tags["uda.resume.iteration"] == "2"
    assert (
        str(mlflow.MlflowClient().get_logged_model(orphan).status) == "PENDING"
    )  # what the kill left behind

    # resume=auto continues the killed run.
    result = subprocess.run(
        [sys.executable, *_teacher_args()],
        env=_env(tracking_uri),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Discarded 1 half-logged model(s)" in result.stdout + result.stderr
    resumed = mlflow.MlflowClient().get_run(run_id)
    assert resumed.data.tags["uda.train.state"] == "finished"
    assert resumed.data.tags["uda.resumes"] == "1"
    _assert_discarded(orphan)
    assert "interrupted process" in _stored(orphan).tags["uda.discarded"]

    # Registered normally: one version per checkpoint, aliases on READY
    # models, none of them the orphan.
    client = mlflow.MlflowClient()
    versions = sorted(client.search_model_versions(f"name='{NAME}'"), key=lambda v: int(v.version))
    assert [v.tags["iteration"] for v in versions] == ["2", "4"]
    assert _aliases() == {f"iter-{v.tags['iteration']}": str(v.version) for v in versions}
    for version in versions:
        assert _model_id(version) != orphan
        assert str(client.get_logged_model(_model_id(version)).status) == "READY"
    assert {m.tags["iteration"] for m in _models_of(run_id)} == {"2", "4"}
    assert all(str(m.status) == "READY" for m in _models_of(run_id))
