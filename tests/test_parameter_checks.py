"""Every parameter is checked before any work (issue 14).

A registered-model name MLflow refuses, a teacher or model reference that
does not exist, an alias MLflow would refuse, a checkpoint that cannot be
one: each ends the entry point at once with one ``error:`` line saying what
is wrong and how to fix it, exit status 2, no traceback, no MLflow run and
no registered version. The entry points run as real subprocesses against a
real SQLite store (``MLFLOW_TRACKING_URI``); the remaining forms run
in-process through the same ``cli.run_cli``.
"""

from __future__ import annotations

import os
import subprocess
import time

import mlflow
import pytest
import torch

from budgets import TINY_TRAINING_OPTIONS
from entry_modules import load_entry_module
from project_processes import PROJECT_ROOT, entry_point_command, process_env
from uda import cli
from uda.config import load_config
from uda.models import build_segmentor, save_checkpoint
from uda.registry import log_and_register

EMBEDDED = PROJECT_ROOT / "data" / "embedded"
EXPERIMENT = "parameter-checks"
TEACHER = "cs2acdc-teacher"
#: A failed check returns before data preparation: Python start-up and
#: imports only (about 3-8 s on 2 busy cores), never a training run.
FAST_S = 45.0
UNKNOWN_MODEL_ID = "m-" + "0" * 32
UNKNOWN_RUN_ID = "f" * 32
# If a check ever regresses, training stays tiny: 2 iterations.
TINY = ["--cfg-options", " ".join(TINY_TRAINING_OPTIONS), "--iterations", "2", "--checkpoint-interval", "1"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store with one registered teacher (``iter-4``) and its run,
    so that, apart from the parameter under test, every run would start."""
    from uda.data.synthetic import ensure_embedded

    ensure_embedded(EMBEDDED)
    root = tmp_path_factory.mktemp("parameter-checks")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        patch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        patch.chdir(root)
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.create_experiment(EXPERIMENT, artifact_location=(root / "mlruns").as_uri())
        torch.manual_seed(0)
        teacher = build_segmentor(load_config("default")["teacher"]["model"])
        path = save_checkpoint(root / "teacher.pth", teacher)
        with mlflow.start_run(experiment_id=experiment) as run:
            log_and_register(path, TEACHER, iteration=4)
        text = root / "notes.pth"
        text.write_text("not weights, a text file\n")
        yield {
            "root": root,
            "uri": uri,
            "experiment": experiment,
            "run_id": run.info.run_id,
            "text_file": text,
        }
        mlflow.set_tracking_uri(None)


def roots() -> list[str]:
    return ["--source-root", str(EMBEDDED / "cityscapes"), "--target-root", str(EMBEDDED / "acdc")]


def run_entry(store, name: str, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = process_env(store["uri"], MLFLOW_EXPERIMENT_NAME=EXPERIMENT, OMP_NUM_THREADS="2")
    started = time.monotonic()
    result = subprocess.run(
        entry_point_command(name, *args),
        env=env,
        cwd=store["root"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    return result, time.monotonic() - started


def runs(store) -> list:
    return mlflow.MlflowClient().search_runs([store["experiment"]])


def versions() -> dict[str, list[str]]:
    client = mlflow.MlflowClient()
    return {
        m.name: sorted(v.version for v in client.search_model_versions(f"name='{m.name}'"))
        for m in client.search_registered_models()
    }


def assert_one_clear_error(err: str, expected: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith("error: "), err
    assert [line for line in lines if line.startswith("error: ")] == [lines[-1]], err
    assert expected in lines[-1], err
    assert "weights_only=False" not in err


# ------------------------------------------------------------ subprocesses
@pytest.mark.parametrize("entry_point", ["teacher", "distill"])
def test_invalid_model_name_fails_before_training(store, entry_point):
    """Before: a traceback at the first checkpoint, after training (4000
    iterations lost on the full recipe), with weights already logged."""
    before_runs, before_versions = len(runs(store)), versions()
    teacher = ["--teacher", f"models:/{TEACHER}@iter-4"] if entry_point == "distill" else []
    result, seconds = run_entry(store, entry_point, *roots(), *TINY, *teacher, "--model-name", "team/student")
    assert result.returncode == 2
    assert_one_clear_error(
        result.stderr,
        "model_name 'team/student' is not a valid registered "
        "model name: MLflow does not allow '/' or ':' in names; use e.g. "
        "'team-student'.",
    )
    assert seconds < FAST_S, seconds
    assert len(runs(store)) == before_runs  # no run, so no logged checkpoint
    assert versions() == before_versions


@pytest.mark.parametrize(
    "teacher, expected",
    [
        (
            f"models:/{UNKNOWN_MODEL_ID}",
            f"teacher 'models:/{UNKNOWN_MODEL_ID}': No logged model '{UNKNOWN_MODEL_ID}' in sqlite:///",
        ),
        (
            f"runs:/{UNKNOWN_RUN_ID}/model",
            f"teacher 'runs:/{UNKNOWN_RUN_ID}/model': No run '{UNKNOWN_RUN_ID}' in sqlite:///",
        ),
    ],
)
def test_distill_teacher_that_does_not_exist_fails_before_training(store, teacher, expected):
    before_runs = len(runs(store))
    result, seconds = run_entry(store, "distill", *roots(), *TINY, "--teacher", teacher)
    assert result.returncode == 2
    assert_one_clear_error(result.stderr, expected)
    assert seconds < FAST_S, seconds
    assert len(runs(store)) == before_runs
    assert "cs2acdc-student" not in versions()


def test_soup_invalid_model_name_is_one_error(store):
    before_runs = len(runs(store))
    result, _ = run_entry(
        store, "soup", "--target-root", str(EMBEDDED / "acdc"), "--model-name", "a/b", "--weights", "1,1"
    )
    assert result.returncode == 2
    assert_one_clear_error(
        result.stderr,
        "model_name 'a/b' is not a valid registered model "
        "name: MLflow does not allow '/' or ':' in names; use e.g. 'a-b'.",
    )
    assert len(runs(store)) == before_runs


def test_evaluate_model_that_does_not_exist_is_one_error(store):
    before_runs = len(runs(store))
    result, _ = run_entry(
        store, "evaluate", "--target-root", str(EMBEDDED / "acdc"), "--model", f"models:/{UNKNOWN_MODEL_ID}"
    )
    assert result.returncode == 2
    assert_one_clear_error(result.stderr, f"error: No logged model '{UNKNOWN_MODEL_ID}' in ")
    assert len(runs(store)) == before_runs


def test_teacher_import_of_a_malicious_checkpoint_names_the_refused_global(store, tmp_path):
    class RunsShell:  # pickled as a call of os.system; never unpickled unsafely
        def __reduce__(self):
            return (os.system, ("echo should-never-run",))

    evil = tmp_path / "mic_latest.pth"
    torch.save({"state_dict": {}, "meta": RunsShell()}, evil)
    before_runs = len(runs(store))
    result, _ = run_entry(store, "teacher", *roots(), "--checkpoint", str(evil))
    assert result.returncode == 2
    assert_one_clear_error(
        result.stderr,
        f"error: checkpoint: Checkpoint {str(evil)!r} contains "
        "Python objects that are not allowed: posix.system;",
    )
    assert "should-never-run" not in result.stdout + result.stderr
    assert len(runs(store)) == before_runs


# ------------------------------------------------------------ in-process
@pytest.fixture
def in_store(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    monkeypatch.chdir(store["root"])
    mlflow.set_tracking_uri(store["uri"])
    return store


def run_in_process(name: str, argv: list[str], capsys) -> tuple[int, str]:
    code = cli.run_cli(load_entry_module(name).main, argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "teacher, expected",
    [
        (
            "runs:/{run_id}/model",
            "has no model at 'model'; its logged models: iter-4 (e.g. runs:/{run_id}/iter-4).",
        ),
        (
            f"models:/{TEACHER}",
            f"names no version of '{TEACHER}': use models:/{TEACHER}@ALIAS "
            f"(aliases: iter-4), models:/{TEACHER}/VERSION or "
            f"models:/{TEACHER}/latest.",
        ),
        (f"models:/{TEACHER}/9", f"Registered model '{TEACHER}' has no version '9'; versions: 1"),
        ("models:/cs2acdc-techer/latest", "No registered model 'cs2acdc-techer' in sqlite:///"),
        (f"models:/{TEACHER}/Production", "'Production' is neither a version number nor \"latest\""),
        ("models:/a:b@iter-4", "The model name 'a:b' is not a valid registered model name"),
        ("no/such/mic.pth", "No such checkpoint or model folder: 'no/such/mic.pth'"),
        ("{text_file}", "is not a PyTorch checkpoint: it is a text file"),
    ],
)
def test_other_teacher_mistakes_stop_distill_before_any_work(in_store, capsys, teacher, expected):
    teacher = teacher.format(text_file=in_store["text_file"], run_id=in_store["run_id"])
    expected = expected.format(run_id=in_store["run_id"])
    before_runs = len(runs(in_store))
    code, err = run_in_process("distill", roots() + ["--teacher", teacher], capsys)
    assert code == 2
    assert_one_clear_error(err, f"error: teacher {teacher!r}: ")
    assert expected in err, err
    assert len(runs(in_store)) == before_runs


def test_missing_teacher_model_says_to_train_or_import_one(in_store, capsys):
    code, err = run_in_process("distill", roots() + ["--teacher", "models:/other-teacher/latest"], capsys)
    assert code == 2
    assert_one_clear_error(err, "No registered model 'other-teacher'")
    assert "Train or import a teacher first (mlflow run . -e teacher)" in err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["--aliases", "iter-4,iter 8"],
            "aliases 'iter 8' is not a valid alias: MLflow aliases have only letters, digits",
        ),
        (
            ["--aliases", "iter-4,iter-8"],
            f"Registered model '{TEACHER}' has no alias 'iter-8'. Aliases: iter-4 -> 1",
        ),
        (
            [
                "--aliases",
                "iter-4,iter-4b",
                "--objective",
                "teacher-agreement",
                "--teacher",
                f"runs:/{UNKNOWN_RUN_ID}/teacher",
            ],
            f"teacher 'runs:/{UNKNOWN_RUN_ID}/teacher': No run ",
        ),
    ],
)
def test_soup_aliases_and_teacher_are_checked_before_the_run(in_store, capsys, argv, expected):
    before_runs = len(runs(in_store))
    code, err = run_in_process(
        "soup",
        ["--target-root", str(EMBEDDED / "acdc"), "--model-name", TEACHER, "--weights", "1,1"] + argv,
        capsys,
    )
    assert code == 2
    assert_one_clear_error(err, expected)
    assert len(runs(in_store)) == before_runs


def test_soup_teacher_is_not_checked_when_the_objective_does_not_use_it(in_store, capsys):
    code, err = run_in_process(
        "soup",
        [
            "--target-root",
            str(EMBEDDED / "acdc"),
            "--model-name",
            TEACHER,
            "--aliases",
            "iter-4,iter-8",
            "--weights",
            "1,1",
            "--teacher",
            "models:/nobody/latest",
        ],
        capsys,
    )
    assert code == 2
    assert_one_clear_error(err, "has no alias 'iter-8'")  # not the teacher


@pytest.mark.parametrize(
    "model, expected",
    [
        (f"runs:/{UNKNOWN_RUN_ID}/model", f"error: No run '{UNKNOWN_RUN_ID}' in sqlite:///"),
        ("runs:/{run_id}/checkpoint", "has no model at 'checkpoint'; its logged models: iter-4"),
        (
            f"models:/{TEACHER}@serving",
            f"error: Registered model '{TEACHER}' has no alias 'serving'. Aliases: iter-4 -> 1",
        ),
        ("models:/", "error: models:/ is not a model URI"),
    ],
)
def test_evaluate_model_is_checked_before_any_work(in_store, capsys, model, expected):
    model = model.format(run_id=in_store["run_id"])
    before_runs = len(runs(in_store))
    code, err = run_in_process(
        "evaluate", ["--target-root", str(EMBEDDED / "acdc"), "--model", model], capsys
    )
    assert code == 2
    assert_one_clear_error(err, expected)
    assert len(runs(in_store)) == before_runs
