"""The MLflow run a training job trains in: which run (a new one, or the
interrupted one a ``resume`` request means, with what it left: resume state,
model weights, teacher), opening it, and what is tagged, tidied and logged
when it opens. Rank 0 only; the other ranks receive :meth:`ResumePlan.shared`.

Resuming reopens the *original* run: under ``mlflow run`` the run MLflow
created for this launch is tagged ``uda.resumed_into=<original>`` and closed,
and training continues in the original run, so versions, metrics and the
resume state stay with one run id. Which run that is, and the resume state
itself, are :mod:`uda.train.resume`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any
from collections.abc import Iterator, Mapping

import torch

from . import resume
from .teacher_source import load_teacher

__all__ = [
    "ResumePlan",
    "plan_run",
    "training_run",
    "mark_running",
    "mark_finished",
    "discard_half_logged",
    "log_inputs",
]

log = logging.getLogger(__name__)


@dataclass
class ResumePlan:
    """What rank 0 decided before training (see :func:`plan_run`).

    Attributes:
        resume_run_id: The run to continue, or None for a new run.
        resume_state: Its resume state (None: nothing to restore).
        model_state: The weights of its last checkpoint (CPU tensors).
        teacher_uri: The distillation teacher, pinned to a version.
        teacher_cfg: The teacher's model config.
        teacher_state: The teacher's weights (CPU tensors).
    """

    resume_run_id: str | None = None
    resume_state: dict[str, Any] | None = None
    model_state: dict[str, torch.Tensor] | None = None
    teacher_uri: str | None = None
    teacher_cfg: dict[str, Any] | None = None
    teacher_state: dict[str, torch.Tensor] | None = None

    def shared(self) -> dict[str, Any]:
        """What the other ranks need (tensors, no MLflow objects)."""
        return {
            "resume_state": self.resume_state,
            "model_state": self.model_state,
            "teacher_cfg": self.teacher_cfg,
            "teacher_state": self.teacher_state,
        }


def _experiment_id() -> str | None:
    import mlflow

    from uda.tracking import DEFAULT_EXPERIMENT

    client = mlflow.MlflowClient()
    launched = os.environ.get("MLFLOW_RUN_ID")
    if launched:
        return client.get_run(launched).info.experiment_id
    # The experiment uda.tracking.entry_point_run will start the run in.
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else None


def plan_run(
    entry_point: str,
    resume_request: str,
    teacher: str | None,
    print_: str,
    flat_cfg: Mapping[str, Any],
    teacher_model_cfg: Mapping[str, Any] | None,
) -> ResumePlan:
    """Rank 0: the resume decision, the resume state, model weights, teacher.

    Args:
        entry_point: ``teacher`` or ``distill``.
        resume_request: ``auto``, ``none`` or a run id.
        teacher: The distillation teacher asked for (a resumed run keeps its own).
        print_: The run's fingerprint (:func:`uda.train.resume.fingerprint`).
        flat_cfg: The flattened preset (to explain a fingerprint mismatch).
        teacher_model_cfg: The preset's ``teacher.model``; None: no teacher
            to load (MIC, source only).

    Raises:
        UserError: A resume request that cannot be honoured, or a teacher
            that cannot be used.
    """
    from uda.registry import load_segmentor

    plan = ResumePlan()
    wanted = resume.parse_resume(resume_request)
    run = None
    if wanted == "auto":
        experiment_id = _experiment_id()
        if experiment_id is not None:
            run = resume.find_resumable_run(
                experiment_id, entry_point, print_, exclude=os.environ.get("MLFLOW_RUN_ID")
            )
    elif wanted is not None:
        run = resume.check_resumable(wanted, entry_point, print_, flat_cfg)
    if run is not None:
        plan.resume_run_id = run.info.run_id
        plan.resume_state = resume.read_resume_state(run.info.run_id)
        if plan.resume_state is not None:
            model, _ = load_segmentor(plan.resume_state["model_uri"])
            plan.model_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        teacher_uri = run.data.tags.get("uda.teacher.uri")
    else:
        teacher_uri = None
    if teacher_model_cfg is not None:
        # A resumed distillation keeps the teacher version it started with.
        model, plan.teacher_uri = load_teacher(teacher_uri or teacher or "", teacher_model_cfg)
        plan.teacher_cfg = dict(model.model_cfg)
        plan.teacher_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return plan


@contextlib.contextmanager
def training_run(
    entry_point: str, params: Mapping[str, Any], cfg: Mapping[str, Any], resume_run_id: str | None
) -> Iterator[Any]:
    """The MLflow run to train in: the entry point's, or the one resumed.

    Args:
        entry_point: ``teacher`` or ``distill``.
        params: The entry point's parameters.
        cfg: The resolved preset.
        resume_run_id: The run to reopen (see the module docstring), or None.

    Yields:
        The active MLflow run.
    """
    import mlflow

    from uda.tracking import entry_point_run

    launched = os.environ.get("MLFLOW_RUN_ID")
    if resume_run_id and launched and launched != resume_run_id:
        # `mlflow run` made a run for this launch: point it at the original.
        with entry_point_run(entry_point, params, cfg):
            mlflow.set_tags(
                {
                    resume.TAG_RESUMED_INTO: resume_run_id,
                    "mlflow.note.content": f"Resumed run {resume_run_id}; training, metrics and "
                    f"model versions continue there.",
                }
            )
    with entry_point_run(entry_point, params, cfg, run_id=resume_run_id) as run:
        yield run  # system metrics: entry_point_run starts them for every entry point


def mark_running(run: Any, print_: str, resumed: bool, tags: Mapping[str, str]) -> None:
    """Tag the active run as training here, in this process: what
    :func:`uda.train.resume.find_resumable_run` reads to tell a dead run
    from a live one, and ``tags``.

    Args:
        run: The active run (as opened, for its resume count).
        print_: The run's fingerprint.
        resumed: Training continues from a resume state (counts a resume).
        tags: Further tags (mode, model name, world size, teacher).
    """
    import mlflow

    values = {
        resume.TAG_FINGERPRINT: print_,
        resume.TAG_STATE: "running",
        resume.TAG_HOST: socket.gethostname(),
        resume.TAG_PID: str(os.getpid()),
        **tags,
    }
    if resumed:
        values[resume.TAG_RESUMES] = str(int(run.data.tags.get(resume.TAG_RESUMES, "0")) + 1)
    mlflow.set_tags(values)


def mark_finished() -> None:
    """Tag the active run as having trained all its iterations (never resumed)."""
    import mlflow

    mlflow.set_tag(resume.TAG_STATE, "finished")


def discard_half_logged(run: Any, resumed: bool, entry_point: str, print_: str) -> list[str]:
    """Hide the logged models that interrupted runs of this config left
    PENDING (a kill inside ``log_model``): those of the run being resumed,
    and of dead runs that cannot be resumed (killed in their first
    checkpoint, before any resume state).

    Args:
        run: The active run.
        resumed: It reopens an interrupted run.
        entry_point: ``teacher`` or ``distill``.
        print_: The run's fingerprint.

    Returns:
        What was discarded, one line each.
    """
    from uda.registry import discard_unfinished_models

    run_id = run.info.run_id
    targets = {run_id: "left by the interrupted process of this run, which was resumed"} if resumed else {}
    for other in resume.interrupted_runs(run.info.experiment_id, entry_point, print_, exclude=run_id):
        targets[other.info.run_id] = f"left by an interrupted run of this config (found by run {run_id})"
    discarded: list[str] = []
    for target, reason in targets.items():
        try:
            discarded += discard_unfinished_models(target, reason)
        except Exception as err:  # tidying up must not stop the training
            log.warning("Could not discard the half-logged models of run %s: %s", target, err)
    return discarded


def log_inputs(cfg: Mapping[str, Any], teacher_uri: str | None) -> None:
    """The run's inputs: its datasets, and the logged model of a registered teacher.

    Args:
        cfg: The resolved preset (``data.source.root``, ``data.target.root``).
        teacher_uri: The pinned teacher, or None.
    """
    from uda.registry import check_model_uri
    from uda.tracking import log_dataset_inputs, log_model_inputs

    data = cfg["data"]
    log_dataset_inputs(
        {"cityscapes/train": data["source"]["root"], "acdc/train": data["target"]["root"]}, "training"
    )
    log_dataset_inputs({"acdc/val": data["target"]["root"]}, "evaluation")
    if teacher_uri and teacher_uri.startswith(("models:/", "runs:/")):
        log_model_inputs([check_model_uri(teacher_uri, None).model_id])
