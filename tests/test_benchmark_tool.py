"""tools/benchmark_models.py: the numbers in docs/benchmarks.md come from it,
so it must run end to end and report every mode with a real timing."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def benchmark(monkeypatch):
    # Imported by name (not from a file spec) so that the processes it spawns
    # per mode, which inherit sys.path, can import it too.
    monkeypatch.syspath_prepend(str(PROJECT_ROOT / "tools"))
    module = importlib.import_module("benchmark_models")
    yield module
    sys.modules.pop("benchmark_models", None)


def test_distill_iteration_benchmark_reports_every_mode(benchmark, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert (
        benchmark.main(
            [
                "--preset",
                "tiny",
                "--device",
                "cpu",
                "--jobs",
                "distill",
                "--warmup",
                "0",
                "--repeats",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    results = json.loads(out.read_text())
    rows = results["rows"]
    assert [r["mode"] for r in rows] == list(benchmark.DISTILL_MODES)
    for row in rows:
        assert row["error"] is None, row
        assert math.isfinite(row["seconds"]) and row["seconds"] > 0
        assert row["memory"] == "RSS" and row["peak_mem_bytes"] > 2**20
        assert row["task"] == "UDATrainer.train_step"
    assert rows[0]["speedup"] == pytest.approx(1.0)
    table = capsys.readouterr().out
    assert "bf16+fused-adamw+channels-last" in table and "GiB RSS" in table


def test_unknown_job_is_a_usage_error(benchmark, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--jobs", "student,train"])
    assert exit_info.value.code == 2
    assert "unknown train" in capsys.readouterr().err


def test_full_preset_needs_no_imagenet_files(benchmark):
    # A benchmark machine has no pretrained/ files; timing needs none.
    cfg = benchmark._config("full")
    assert cfg["student"]["model"]["backbone"] == "fan_large_16_p4_hybrid"
    assert cfg["student"]["model"]["pretrained"] is None
    assert cfg["teacher"]["model"]["pretrained"] is None
