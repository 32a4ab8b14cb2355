"""`mlflow run` processes started side by side against one tracking store, and the
registry checks that must hold whatever order their writes took.

Shared by tests/test_team_server.py (a real `mlflow server` on PostgreSQL) and
tests/test_sqlite_concurrency.py (the default SQLite store).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from project_processes import PROJECT_ROOT, mlflow_run_command, process_env
from uda.registry import find_versions, source_run_id

STUDENT, TEACHER = "cs2acdc-student", "cs2acdc-teacher"
# Tiny trainings: 4 iterations, a checkpoint (a version) every 2.
TINY_DISTILL = [
    "iterations=4",
    "checkpoint_interval=2",
    "cfg_options=evaluation.interval=2 log_config.interval=2 log_config.img_interval=100 "
    "lr_config.warmup_iters=1",
]


def env_for(tracking_uri: str, **extra: str) -> dict:
    # No OMP_NUM_THREADS: see two_distills_at_once (the jobs must share the cores themselves).
    return process_env(tracking_uri, OMP_NUM_THREADS=None, **extra)


def start(tracking_uri: str, experiment: str, log: Path, entry_point: str, *params: str) -> subprocess.Popen:
    """`mlflow run` in the background (its own process group), output to
    ``log`` (a pipe could fill up and block it)."""
    with open(log, "w") as out:
        return subprocess.Popen(
            mlflow_run_command(entry_point, experiment, params),
            env=env_for(tracking_uri),
            cwd=PROJECT_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the process and everything it started (its own session)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=60)


def finish(processes: dict, logs: dict, timeout_s: float = 600) -> dict:
    """Waits for every process; their output by name. Fails on a non-zero exit."""
    deadline = time.monotonic() + timeout_s
    outputs = {}
    try:
        for name, process in processes.items():
            try:
                process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} did not finish in {timeout_s:.0f} s:\n" + logs[name].read_text()[-3000:])
            outputs[name] = logs[name].read_text()
            assert process.returncode == 0, f"{name}:\n" + outputs[name][-4000:]
    finally:
        for process in processes.values():
            if process.poll() is None:
                kill_group(process)
    return outputs


def run_id_of(output: str) -> str:
    """The run id `mlflow run` prints for the entry point it ran (the last
    one: `main` prints its steps' first)."""
    line = [line for line in output.splitlines() if "=== Run (ID '" in line and "succeeded" in line][-1]
    return line.split("ID '")[1].split("'")[0]


def assert_aliases_name_complete_versions(client, name: str) -> dict:
    """Every alias of ``name`` points at a READY version whose logged model is
    READY and holds its files; returns the aliases."""
    aliases = dict(client.get_registered_model(name).aliases)
    for alias, number in aliases.items():
        version = client.get_model_version(name, str(number))
        assert version.status == "READY", (alias, version)
        model_id = version.model_id or version.source.removeprefix("models:/")
        assert str(client.get_logged_model(model_id).status) == "READY", (alias, model_id)
        files = [f.path for f in client.list_logged_model_artifacts(model_id)]
        assert "MLmodel" in files, (alias, files)
    return aliases


def two_distills_at_once(client, tracking_uri: str, experiment: str, folder: Path) -> dict:
    """Two `distill` runs (seeds 1 and 2, 2 checkpoints each) registering into the student at once;
    checks that no version is lost or doubled and every alias names a complete
    version. Returns the outputs by seed."""
    before = find_versions(STUDENT, client=client)
    logs = {seed: folder / f"distill-{seed}.log" for seed in ("1", "2")}
    started = time.perf_counter()
    processes = {
        seed: start(tracking_uri, experiment, logs[seed], "distill", f"seed={seed}", *TINY_DISTILL)
        for seed in logs
    }
    outputs = finish(processes, logs)
    seconds = time.perf_counter() - started
    # the processes saw each other (the one that registered second at its start)
    assert any("2 cs2acdc jobs on " in out for out in outputs.values()), outputs

    run_ids = {run_id_of(out) for out in outputs.values()}
    last = int(before[-1].version) if before else 0
    new = [v for v in find_versions(STUDENT, client=client) if int(v.version) > last]
    # no lost and no duplicated versions: 2 checkpoints per run, numbers dense
    assert [int(v.version) for v in new] == list(range(last + 1, last + 5)), new
    for run_id in run_ids:
        mine = sorted(int(v.tags["iteration"]) for v in new if source_run_id(v) == run_id)
        assert mine == [2, 4], (run_id, mine)
    assert all(v.status == "READY" for v in new)
    aliases = assert_aliases_name_complete_versions(client, STUDENT)
    for iteration in (2, 4):  # iter-N: the version of whichever run registered it last
        version = client.get_model_version(STUDENT, str(aliases[f"iter-{iteration}"]))
        assert source_run_id(version) in run_ids and version.tags["iteration"] == str(iteration)
    print(
        f"\ntwo concurrent distills: {seconds:.0f} s, 2 runs, {len(new)} versions "
        f"(v{new[0].version}-v{new[-1].version}), 0 errors; iter-2/4 -> "
        + "/".join(f"v{aliases[f'iter-{i}']}" for i in (2, 4))
    )
    return outputs


def two_promotions_at_once(client, tracking_uri: str, experiment: str, folder: Path) -> dict:
    """Two `soup -P promote=true` runs at once: `serving` ends on one of the two
    soups, complete; the winner replaced the loser's soup and both runs say so."""
    logs = {n: folder / f"promote-{n}.log" for n in ("a", "b")}
    started = time.perf_counter()
    processes = {
        n: start(tracking_uri, experiment, logs[n], "soup", "method=uniform", "promote=true") for n in logs
    }
    outputs = finish(processes, logs)
    seconds = time.perf_counter() - started
    runs = {n: client.get_run(run_id_of(out)) for n, out in outputs.items()}
    soups = {n: r.data.tags["soup.version"] for n, r in runs.items()}
    serving = client.get_model_version_by_alias(STUDENT, "serving")
    assert str(serving.version) in soups.values()
    assert_aliases_name_complete_versions(client, STUDENT)
    winner = next(n for n in runs if soups[n] == str(serving.version))
    loser = next(n for n in runs if n != winner)
    assert runs[winner].data.tags["soup.serving_before"] == soups[loser]
    replaced = runs[loser].data.tags["serving.replaced_by"]
    assert replaced.startswith(f"version {serving.version} (run {runs[winner].info.run_id}) at ")
    assert client.get_model_version(STUDENT, soups[loser]).tags["serving.replaced_by"] == replaced
    assert f"moved from version {soups[loser]} to {serving.version}" in outputs[winner]
    assert f"{STUDENT}.promotion-lock" not in {m.name for m in client.search_registered_models()}
    print(
        f"\ntwo concurrent promotions: {seconds:.0f} s; serving -> v{serving.version} "
        f"(run {runs[winner].info.run_id[:8]}), which replaced v{soups[loser]} "
        f"(run {runs[loser].info.run_id[:8]}, tagged serving.replaced_by)"
    )
    return {"winner": runs[winner], "loser": runs[loser]}
