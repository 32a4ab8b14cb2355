"""CPU threads per process (uda/cpu_threads.py): the cores shared among the
jobs running on the machine, re-counted as jobs start and end, and the
`threads` parameter checked before any work. Real processes stand in for the
other jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import pytest
import torch

from entry_modules import load_entry_module
from uda import cli, cpu_threads

CORES = torch.get_num_threads()


@pytest.fixture
def share(tmp_path, monkeypatch):
    """A fresh jobs folder; torch's threads and the module's state restored after."""
    before = torch.get_num_threads()
    monkeypatch.setattr(cpu_threads, "_share", None)
    monkeypatch.setattr(cpu_threads, "REBALANCE_EVERY_S", 0.0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield tmp_path / "jobs"
    torch.set_num_threads(before)


def _register_other_job(folder, process) -> None:
    """What `configure` in that process would have written."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{cpu_threads._host()}-{process.pid}.json").write_text(
        json.dumps({"pid": process.pid, "start": cpu_threads._start_time(process.pid)})
    )


def test_parse_threads():
    assert cpu_threads.parse_threads("auto") is None
    assert cpu_threads.parse_threads("") is None
    assert cpu_threads.parse_threads(" 3 ") == 3
    for bad in ("0", "-1", "1.5", "many"):
        with pytest.raises(cpu_threads.ThreadsError, match="auto or a positive integer"):
            cpu_threads.parse_threads(bad)


def test_jobs_share_the_cores_and_rebalance_when_one_ends(share, capsys):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _register_other_job(share, other)
        threads = cpu_threads.configure("auto", folder=share)
        assert threads == max(1, CORES // 2) == torch.get_num_threads()
        assert f"CPU threads: {threads} (2 cs2acdc jobs on {CORES} cores" in capsys.readouterr().out
        assert cpu_threads.rebalance() == threads  # the other job still runs
    finally:
        other.kill()
        other.wait()
    # the other job is gone: its file is removed, the cores are this job's again
    assert cpu_threads.rebalance() == CORES == torch.get_num_threads()
    assert not (share / f"{cpu_threads._host()}-{other.pid}.json").exists()
    assert (share / f"{cpu_threads._host()}-{os.getpid()}.json").exists()
    if CORES > 1:
        assert f"CPU threads: {max(1, CORES // 2)} → {CORES} (1 cs2acdc job" in capsys.readouterr().out


def test_a_reused_pid_is_not_a_live_job(share):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        share.mkdir(parents=True)
        slot = share / f"{cpu_threads._host()}-{other.pid}.json"
        slot.write_text(json.dumps({"pid": other.pid, "start": "1"}))
        assert cpu_threads.configure("auto", folder=share) == CORES
        assert not slot.exists()
    finally:
        other.kill()
        other.wait()


def test_a_fixed_number_or_omp_num_threads_is_kept(share, monkeypatch):
    assert cpu_threads.configure("1", folder=share) == 1 == torch.get_num_threads()
    monkeypatch.setattr(cpu_threads, "_share", None)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads.configure("auto", folder=share) == 1
    assert cpu_threads.rebalance() == 1


def test_other_hosts_jobs_do_not_count_and_are_left_alone(share):
    share.mkdir(parents=True)
    elsewhere = share / "another-host-1234.json"
    elsewhere.write_text(json.dumps({"pid": 1234, "start": "1"}))
    assert cpu_threads.configure("auto", folder=share) == CORES
    assert elsewhere.exists()


def test_a_gpu_job_does_not_register(share):
    before = torch.get_num_threads()
    assert cpu_threads.configure("auto", folder=share, device="cuda") == before
    assert not share.exists() or not list(share.iterdir())


def test_rebalance_without_configure_does_nothing(monkeypatch):
    monkeypatch.setattr(cpu_threads, "_share", None)
    before = torch.get_num_threads()
    assert cpu_threads.rebalance() == 0
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    "entry_point, argv",
    [
        ("teacher", ["--source-root", "x", "--target-root", "y"]),
        ("distill", ["--source-root", "x", "--target-root", "y"]),
        ("soup", ["--target-root", "y", "--weights", "1,1"]),
        ("evaluate", ["--target-root", "y"]),
        ("main", ["--source-root", "x", "--target-root", "y"]),
    ],
)
def test_a_bad_threads_value_is_one_error_before_any_work(tracking_uri, capsys, entry_point, argv):
    code = cli.run_cli(load_entry_module(entry_point).main, argv + ["--threads", "0"])
    err = capsys.readouterr().err
    assert code == 2
    assert "error: threads must be auto or a positive integer, got '0'." in err
    assert "Traceback" not in err
    assert not mlflow.MlflowClient().search_runs(
        [e.experiment_id for e in mlflow.MlflowClient().search_experiments()]
    )


def test_a_training_job_keeps_its_share_of_the_cores(share, tmp_path):
    """The bug that made a default source-only run 10x slower beside the teacher: training
    set torch's threads to all cores after the share was set, so two jobs ran 3 threads on
    2 cores. Now training leaves the share alone, and a rebalance restores a changed count."""
    from uda.train.runner import TrainRequest, train

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _register_other_job(share, other)
        threads = cpu_threads.configure("auto", folder=share)
        seen = []
        original = cpu_threads.rebalance

        def spy():  # what the training loop runs with, before each re-count
            seen.append(torch.get_num_threads())
            return original()

        from uda.config import load_config
        from uda.data.paths import EMBEDDED_ROOT
        from budgets import TINY_TRAINING_OPTIONS

        cfg = load_config(
            "default",
            TINY_TRAINING_OPTIONS
            + [
                f"data.source.root={EMBEDDED_ROOT / 'cityscapes'}",
                f"data.target.root={EMBEDDED_ROOT / 'acdc'}",
                "runner.max_iters=2",
                "checkpoint_config.interval=2",
                "evaluation.interval=2",
                "uda.source_only=true",
            ],
        )
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
        import uda.train.loop as loop

        loop.cpu_threads.rebalance = spy
        try:
            from uda.data.roots import prepare_roots

            prepare_roots(cfg["data"]["source"]["root"], cfg["data"]["target"]["root"], progress=False)
            train(TrainRequest("teacher", cfg, {}, device="cpu", model_name="threads-test"))
        finally:
            loop.cpu_threads.rebalance = original
            mlflow.set_tracking_uri(None)
    finally:
        other.kill()
        other.wait()
    assert seen and set(seen) == {threads}, seen
    # a count changed behind the share's back is put back at the next re-count
    torch.set_num_threads(CORES + 1)
    assert cpu_threads.rebalance() == torch.get_num_threads() == CORES  # the other job is gone
