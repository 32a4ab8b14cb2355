"""The evaluate entry point end to end: `mlflow run . -e evaluate` on val, the
test-split submission, a registered model URI, and bad input as one error line."""

from __future__ import annotations

import importlib.util
import subprocess
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from project_processes import PROJECT_ROOT, entry_point_command, mlflow_run_command, process_env
from uda.config import load_config
from uda.data.synthetic import ensure_embedded
from uda.models import build_segmentor, save_checkpoint

EXPERIMENT = "evaluate-tests"


def _load_entry_point():
    spec = importlib.util.spec_from_file_location(
        "evaluate_entry_point", PROJECT_ROOT / "entrypoints" / "evaluate.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


entry_point = _load_entry_point()


@pytest.fixture(scope="module")
def acdc_root(tmp_path_factory) -> Path:
    data = ensure_embedded(
        tmp_path_factory.mktemp("embedded"),
        num_source_train=1,
        num_source_val=0,
        num_target_train=0,
        num_target_val=1,
        num_target_test=1,
        target_size=(128, 72),
    )
    return data.acdc_root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_segmentor(load_config("default")["student"]["model"])
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "student.pth", model)


def _runs(tracking_uri: str):
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client, ([] if experiment is None else client.search_runs([experiment.experiment_id]))


def _main(tracking_uri, monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    from uda import cli

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    code = cli.run_cli(entry_point.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_mlflow_run_val_end_to_end(tracking_uri, acdc_root, checkpoint):
    env = process_env(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    store = Path(tracking_uri.removeprefix("sqlite:///")).parent
    client.create_experiment(EXPERIMENT, artifact_location=(store / "mlruns").as_uri())
    cmd = mlflow_run_command(
        "evaluate", EXPERIMENT, [f"model={checkpoint}", f"target_root={acdc_root}", "batch_size=2"]
    )
    result = subprocess.run(cmd, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "images/s" in result.stdout + result.stderr
    client, runs = _runs(tracking_uri)
    (run,) = runs
    assert run.info.status == "FINISHED"
    assert run.data.params["split"] == "val" and run.data.params["batch_size"] == "2"
    assert run.data.tags["entry_point"] == "evaluate"
    assert run.data.tags["model_uri"] == str(checkpoint)
    metrics = run.data.metrics
    assert 0 <= metrics["mIoU"] <= 1 and metrics["num_images"] == 4
    assert {"mIoU.fog", "mIoU.night", "mIoU.rain", "mIoU.snow", "aAcc", "IoU.road"} <= set(metrics)
    names = {f.path for f in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {
        "evaluation/confusion_matrix.png",
        "evaluation/per_class_iou.png",
        "evaluation/per_class.json",
        "evaluation/overlays",
    } <= names
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == ["acdc/val"]


def test_test_split_logs_a_submission_zip(tracking_uri, monkeypatch, capsys, acdc_root, checkpoint):
    code, out, err = _main(
        tracking_uri,
        monkeypatch,
        capsys,
        "--target-root",
        str(acdc_root),
        "--model",
        str(checkpoint),
        "--split",
        "test",
        "--batch-size",
        "3",
        "--label-ids",
        "true",
    )
    assert code == 0, err
    assert "4 labelIds PNGs" in out
    client, (run,) = _runs(tracking_uri)
    zip_path = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/submission/labelIds.zip")
    with zipfile.ZipFile(zip_path) as archive:
        names = sorted(archive.namelist())
        expected = sorted(p.name for p in acdc_root.glob("rgb_anon/*/test/*/*_rgb_anon.png"))
        assert names == expected
        with Image.open(archive.open(names[0])) as png:
            assert png.mode == "L" and png.size == (128, 72)
            assert set(np.unique(np.asarray(png))) <= {
                7,
                8,
                11,
                12,
                13,
                17,
                19,
                20,
                21,
                22,
                23,
                24,
                25,
                26,
                27,
                28,
                31,
                32,
                33,
            }
    assert run.data.tags["submission.encoding"] == "labelIds"


def test_registered_model_alias(tracking_uri, monkeypatch, capsys, acdc_root, checkpoint):
    from uda.registry import log_and_register

    mlflow.set_experiment("registry")
    with mlflow.start_run():
        version = log_and_register(checkpoint, "eval-student", iteration=40, alias="serving")
    code, out, err = _main(
        tracking_uri,
        monkeypatch,
        capsys,
        "--target-root",
        str(acdc_root),
        "--model",
        "models:/eval-student@serving",
        "--mode",
        "whole",
    )
    assert code == 0, err
    _, (run,) = _runs(tracking_uri)
    assert run.data.params["mode"] == "whole"
    # The metrics are linked to the registered version's logged model as well.
    model_id = version.source.removeprefix("models:/")
    linked = {m.key: m.value for m in mlflow.get_logged_model(model_id).metrics}
    assert linked["mIoU"] == pytest.approx(run.data.metrics["mIoU"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--split", "train"], "error: split must be val (mIoU against the labels) or test"),
        (["--batch-size", "0"], "error: batch_size must be at least 1, got 0."),
        (["--batch-size", "two"], "error: batch_size must be an integer, got 'two'."),
        (["--mode", "sliding"], "error: mode must be whole or slide"),
        (["--label-ids", "maybe"], "error: label_ids must be true or false, got 'maybe'."),
        (["--precision", "fp16"], "error: precision must be fp32 or bf16"),
    ],
)
def test_bad_parameter_is_one_error_line(tmp_path, monkeypatch, capsys, acdc_root, argv, message):
    from uda import cli

    monkeypatch.chdir(tmp_path)  # nothing may be written; if it were, it lands here
    args = ["--target-root", str(acdc_root), "--model", "unused.pth"] + argv
    code = cli.run_cli(entry_point.main, args)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "models:/nobody@serving"], "error: No registered model 'nobody'"),
        (["--model", "no/such/file.pth"], "error: No such checkpoint or model folder"),
        (["--target-root", "no/such/acdc"], "error: ACDC root does not exist."),
    ],
)
def test_bad_model_or_data_is_an_error_and_logs_nothing(
    tracking_uri, monkeypatch, capsys, acdc_root, checkpoint, argv, message
):
    args = ["--target-root", str(acdc_root), "--model", str(checkpoint)] + argv
    code, _, err = _main(tracking_uri, monkeypatch, capsys, *args)
    assert code == 2 and err.startswith(message), err
    assert "Traceback" not in err
    assert _runs(tracking_uri)[1] == []


def test_bad_input_from_the_command_line(tracking_uri, acdc_root):
    result = subprocess.run(
        entry_point_command("evaluate", "--target-root", str(acdc_root), "--model", "models:/nobody@serving"),
        env=process_env(tracking_uri),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "error: No registered model 'nobody'" in result.stderr
    assert "Traceback" not in result.stderr
