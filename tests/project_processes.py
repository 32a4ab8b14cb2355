"""How the tests start the project's own processes: `mlflow run .` and the entry-point scripts,
against a tracking store the test chose, in an environment cleared of what in-process runs of
other tests left behind.

Shared by every test that starts such a process, so that the command and its environment are
written once.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

# In-process runs leave these behind; `mlflow run` refuses an experiment id next to
# --experiment-name, and a stale run id would make the child log into another test's run.
_LEFTOVERS = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


def process_env(tracking_uri: str, **extra: str | None) -> dict[str, str]:
    """The environment of a child process that logs to ``tracking_uri``.

    Args:
        tracking_uri: The store the child logs to.
        **extra: Variables to set on top (e.g. ``MLFLOW_EXPERIMENT_NAME``,
            ``OMP_NUM_THREADS``); ``None`` removes a variable.
    """
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",  # the venv's mlflow and torchrun
    }
    for name in _LEFTOVERS:
        env.pop(name, None)
    for name, value in extra.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def mlflow_run_command(entry_point: str, experiment: str, params: Iterable[str] = ()) -> list[str]:
    """`mlflow run <project> -e ENTRY_POINT --env-manager local --experiment-name EXPERIMENT -P ...`.

    Args:
        entry_point: An MLproject entry point.
        experiment: The experiment the run goes to.
        params: ``name=value`` strings, one ``-P`` each.
    """
    cmd = [str(VENV_BIN / "mlflow"), "run", str(PROJECT_ROOT), "-e", entry_point]
    cmd += ["--env-manager", "local", "--experiment-name", experiment]
    for param in params:
        cmd += ["-P", param]
    return cmd


def entry_point_command(name: str, *args: str) -> list[str]:
    """The entry-point script ``entrypoints/NAME.py`` run directly, as `mlflow run` runs it."""
    return [sys.executable, str(PROJECT_ROOT / "entrypoints" / f"{name}.py"), *args]
