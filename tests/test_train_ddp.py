"""`torchrun --nproc_per_node=2` on the CPU (gloo): DDP training where rank 0
alone logs and registers, and the validation metric is all-reduced."""

from __future__ import annotations

import subprocess

import mlflow
import pytest
import torch

from uda.config import load_config
from uda.models import build_segmentor, save_checkpoint
from uda.registry import load_segmentor
from uda.train.batches import build_val_dataset, val_loader
from uda.train.loop import evaluate
from budgets import TINY_TRAINING_OPTIONS
from project_processes import PROJECT_ROOT, VENV_BIN, process_env

EMBEDDED = PROJECT_ROOT / "data" / "embedded"


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_and_register_once(tracking_uri, tmp_path):
    from uda.data.synthetic import ensure_embedded

    ensure_embedded(EMBEDDED)
    torch.manual_seed(0)
    teacher = save_checkpoint(
        tmp_path / "teacher.pth", build_segmentor(load_config("default")["teacher"]["model"])
    )
    env = process_env(tracking_uri, MLFLOW_EXPERIMENT_NAME="ddp", OMP_NUM_THREADS="1")
    cmd = [
        str(VENV_BIN / "torchrun"),
        "--standalone",
        "--nproc_per_node=2",
        str(PROJECT_ROOT / "entrypoints" / "distill.py"),
        "--source-root",
        str(EMBEDDED / "cityscapes"),
        "--target-root",
        str(EMBEDDED / "acdc"),
        "--teacher",
        str(teacher),
        "--iterations",
        "2",
        "--checkpoint-interval",
        "2",
        "--device",
        "cpu",
        "--cfg-options",
        " ".join(TINY_TRAINING_OPTIONS),
    ]
    result = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("ddp")
    (run,) = client.search_runs([experiment.experiment_id])  # rank 0 only
    assert run.data.tags["uda.world_size"] == "2"
    assert run.data.tags["uda.train.state"] == "finished"
    assert "mix.decode.loss_seg" in run.data.metrics
    # two ranks x 2 crops x (source + target) per iteration
    assert run.data.metrics["throughput.img_per_s"] > 0
    (version,) = client.search_model_versions("name='cs2acdc-student'")
    assert version.tags["iteration"] == "2"
    assert version.tags["run_id"] == run.info.run_id

    # The logged mIoU is over the whole val set (each rank scored half).
    cfg = load_config("default", [f"data.target.root={EMBEDDED / 'acdc'}", *TINY_TRAINING_OPTIONS])
    model, _ = load_segmentor("models:/cs2acdc-student/1")
    val = build_val_dataset(cfg)
    table = evaluate(model, val_loader(val), "cpu", sorted(set(val.conditions)))
    assert run.data.metrics["val.mIoU"] == pytest.approx(table.miou, abs=1e-9)
