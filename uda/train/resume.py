"""Resume state of a training run, and which run a ``resume`` request means.

Weights live in one place: every checkpoint is a registered model version
(:func:`uda.registry.log_and_register` stores the file once, inside the
logged pyfunc model). What else a run needs to continue *exactly* (optimizer
and scheduler state, the MIC EMA teacher, the iteration, the logged model
holding the weights) is the **resume state**: one file, the run artifact
``resume/state.pth``, overwritten at every checkpoint and never registered.

* With a local artifact store (the default ``mlflow.db`` + ``mlruns/``) the
  file is written straight into the run's artifact folder: temporary file,
  ``fsync``, ``os.replace``, so a kill leaves the previous state intact.
* With a remote store it is uploaded with ``mlflow.log_artifact`` (object
  stores replace objects whole).

The state is written *after* its checkpoint is registered, so it never
names a missing version; a kill between the two re-trains from the previous
state and re-registers the same ``(run, iteration)``, which the registry
answers with the existing version.

Which run to continue (:func:`find_resumable_run`): ``resume=auto`` takes
the newest run of the same entry point and the same *fingerprint* (hash of
the resolved config and the parameters that change the result) that did not
finish, has a resume state and is not alive (status FAILED/KILLED, or
RUNNING with a dead process on this host, which is what a SIGKILLed direct
run leaves). ``resume=<run id>`` names one; ``resume=none`` starts afresh.
:func:`interrupted_runs` lists the dead unfinished runs of a config, resume
state or not, whose half-logged (PENDING) models the runner discards.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any
from collections.abc import Mapping
from urllib.parse import unquote, urlparse

import torch

from uda.errors import UserError
from uda.models.checkpoint import atomic_torch_save

__all__ = [
    "RESUME_ARTIFACT",
    "RESUME_FORMAT",
    "TAG_FINGERPRINT",
    "TAG_STATE",
    "TAG_RESUME_ITERATION",
    "TAG_HOST",
    "TAG_PID",
    "ResumeError",
    "fingerprint",
    "parse_resume",
    "write_resume_state",
    "read_resume_state",
    "find_resumable_run",
    "check_resumable",
    "config_differences",
    "interrupted_runs",
]

RESUME_ARTIFACT = "resume/state.pth"
RESUME_FORMAT = "cs2acdc-uda-resume/1"
TAG_FINGERPRINT = "uda.fingerprint"
TAG_STATE = "uda.train.state"  # running | finished
TAG_RESUME_ITERATION = "uda.resume.iteration"
TAG_HOST = "uda.host"
TAG_PID = "uda.pid"
TAG_RESUMED_INTO = "uda.resumed_into"
TAG_RESUMES = "uda.resumes"

_FRESH = ("", "none", "never", "false", "no", "off")


class ResumeError(UserError):
    """A resume request that cannot be honoured (unknown run, other
    config, finished run)."""


def fingerprint(entry_point: str, cfg: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> str:
    """A short hash of what decides a run's numbers: entry point, resolved
    config and ``extra`` (teacher URI, model name, source-only flag)."""
    payload = json.dumps(
        {"entry_point": entry_point, "cfg": cfg, "extra": dict(extra or {})}, sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def parse_resume(value: str | None) -> str | None:
    """``'auto'``, a run id, or None (start afresh).

    Raises:
        ResumeError: Neither ``auto``, ``none`` nor a run id.
    """
    text = (value or "").strip()
    if text.lower() in _FRESH:
        return None
    if text.lower() == "auto":
        return "auto"
    if all(c in "0123456789abcdef" for c in text.lower()) and 16 <= len(text) <= 64:
        return text.lower()
    raise ResumeError(f"resume must be auto, none or an MLflow run id (32 hex digits), got {value!r}.")


# ----------------------------------------------------------------------
# Reading and writing the state
# ----------------------------------------------------------------------
def _local_artifact_dir(artifact_uri: str) -> Path | None:
    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(artifact_uri)
    return None


def write_resume_state(run_id: str, state: Mapping[str, Any]) -> str:
    """Store ``state`` as the run's ``resume/state.pth`` (atomically).

    Args:
        run_id: The training run.
        state: Plain values and tensors (loadable with ``weights_only``).

    Returns:
        Where it went (local path or artifact URI).
    """
    import mlflow

    payload = dict(state, format=RESUME_FORMAT)
    run = mlflow.MlflowClient().get_run(run_id)
    local = _local_artifact_dir(run.info.artifact_uri)
    if local is not None:
        path = local / RESUME_ARTIFACT
        atomic_torch_save(payload, path)
        return str(path)
    with tempfile.TemporaryDirectory(prefix="uda-resume-") as tmp:
        path = Path(tmp) / Path(RESUME_ARTIFACT).name
        atomic_torch_save(payload, path)
        mlflow.MlflowClient().log_artifact(run_id, str(path), str(Path(RESUME_ARTIFACT).parent))
    return f"{run.info.artifact_uri}/{RESUME_ARTIFACT}"


def read_resume_state(run_id: str) -> dict[str, Any] | None:
    """The run's resume state, or None when it has none yet."""
    import mlflow
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="uda-resume-") as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=RESUME_ARTIFACT, dst_path=tmp
            )
        except (MlflowException, OSError):
            return None
        if not Path(path).is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated by a crash of a remote upload
            raise ResumeError(
                f"The resume state of run {run_id} is "
                f"unreadable ({type(err).__name__}: {err}); "
                f"start afresh with resume=none."
            ) from None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise ResumeError(
            f"Run {run_id} has a resume state of another format; start afresh with resume=none."
        )
    return state


# ----------------------------------------------------------------------
# Which run
# ----------------------------------------------------------------------
def _alive_here(tags: Mapping[str, str]) -> bool:
    """Whether the process that ran it is still alive on this machine."""
    if tags.get(TAG_HOST) != socket.gethostname():
        return True  # cannot tell: treat a RUNNING run elsewhere as alive
    try:
        pid = int(tags.get(TAG_PID, ""))
    except ValueError:
        return False
    try:
        import psutil

        return psutil.pid_exists(pid) and pid != os.getpid()
    except ImportError:  # pragma: no cover - psutil ships with the env
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return pid != os.getpid()


def _dead_unfinished(run: Any, exclude: str | None) -> bool:
    """Not finished, and its process is gone: FAILED/KILLED, or RUNNING with
    a dead process on this host."""
    tags = run.data.tags
    if run.info.run_id == exclude or run.info.lifecycle_stage != "active":
        return False
    if tags.get(TAG_STATE) == "finished":
        return False
    if run.info.status == "RUNNING":
        return not _alive_here(tags)
    return run.info.status in ("FAILED", "KILLED")


def _runs_of_config(experiment_id: str, entry_point: str, print_: str) -> list[Any]:
    """Runs of ``entry_point`` with fingerprint ``print_``, newest first."""
    import mlflow

    return mlflow.MlflowClient().search_runs(
        [experiment_id],
        filter_string=(f"tags.entry_point = '{entry_point}' and tags.`{TAG_FINGERPRINT}` = '{print_}'"),
        order_by=["attributes.start_time DESC"],
        max_results=50,
    )


def find_resumable_run(
    experiment_id: str, entry_point: str, print_: str, exclude: str | None = None
) -> Any | None:
    """Newest unfinished, dead run of ``entry_point`` with fingerprint
    ``print_`` that has a resume state (see module docstring), or None."""
    return next(
        (
            run
            for run in _runs_of_config(experiment_id, entry_point, print_)
            if _dead_unfinished(run, exclude) and TAG_RESUME_ITERATION in run.data.tags
        ),
        None,
    )


def interrupted_runs(
    experiment_id: str, entry_point: str, print_: str, exclude: str | None = None
) -> list[Any]:
    """Unfinished runs of ``entry_point`` with fingerprint ``print_`` whose
    process is gone, with or without a resume state: the runs whose
    half-logged models nobody will finish."""
    return [
        run for run in _runs_of_config(experiment_id, entry_point, print_) if _dead_unfinished(run, exclude)
    ]


def config_differences(run: Any, flat_cfg: Mapping[str, Any], limit: int = 6) -> list[str]:
    """``key: run value -> now`` for ``cfg.*`` params that differ."""
    params = run.data.params
    diffs = []
    for key, value in flat_cfg.items():
        logged = params.get(f"cfg.{key}")
        if logged is not None and logged != str(value)[: len(logged)]:
            diffs.append(f"{key}: {logged} -> {value}")
    return diffs[:limit]


def check_resumable(run_id: str, entry_point: str, print_: str, flat_cfg: Mapping[str, Any]) -> Any:
    """The run ``resume=<run_id>`` names, after checking it fits.

    Raises:
        ResumeError: Unknown or deleted run, another entry point, another
            config, or a run that already finished.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        raise ResumeError(f"No run {run_id} in {mlflow.get_tracking_uri()} to resume.") from None
    if run.info.lifecycle_stage != "active":
        raise ResumeError(f"Run {run_id} is deleted; restore it in the UI or start afresh with resume=none.")
    tags = run.data.tags
    if tags.get("entry_point") != entry_point:
        raise ResumeError(f"Run {run_id} is a {tags.get('entry_point')!r} run, not {entry_point!r}.")
    if tags.get(TAG_FINGERPRINT) != print_:
        diffs = config_differences(run, flat_cfg)
        detail = ("; ".join(diffs)) if diffs else "teacher, model name or source-only flag"
        raise ResumeError(
            f"Run {run_id} was started with other settings "
            f"({detail}); resume needs the same preset and "
            f"parameters, or use resume=none."
        )
    if tags.get(TAG_STATE) == "finished":
        raise ResumeError(f"Run {run_id} already finished all its iterations; nothing to resume.")
    if run.info.status == "RUNNING" and _alive_here(tags) and tags.get(TAG_HOST) == socket.gethostname():
        raise ResumeError(f"Run {run_id} is still running (process {tags.get(TAG_PID)} on this machine).")
    return run
