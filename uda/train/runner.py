"""What the ``teacher`` and ``distill`` entry points do: a tracked,
resumable, possibly distributed training run whose checkpoints become
registered model versions.

:func:`train` is the whole job of both entry points:

1. check everything a user can get wrong *before* a run starts or a model
   is registered: intervals and iteration counts, dataset roots (the
   readers raise ``DatasetLayoutError``), the teacher (unknown alias →
   the existing aliases; a checkpoint of another architecture →
   ``CheckpointMismatchError``), the resume request;
2. open the MLflow run (rank 0 only): the entry point's run, or, when
   resuming, the *original* run again (:mod:`uda.train.tracked_run`), with
   MLflow system metrics and the datasets as run inputs;
3. train with :class:`~uda.train.trainer.UDATrainer` (DDP under torchrun),
   logging losses, learning rates, pseudo-label confidence and throughput
   every ``log_config.interval`` iterations, debug images every
   ``log_config.img_interval``, ACDC-val mIoU (overall and per condition)
   every ``evaluation.interval`` and at each checkpoint
   (:mod:`uda.train.reporting`);
4. at every ``checkpoint_config.interval`` iterations and at the end:
   register the checkpoint (``iter-<N>`` alias, tags: iteration, run id,
   preset, val mIoU) through :func:`uda.registry.log_and_register`, then
   write the resume state (:mod:`uda.train.resume`).

The teacher of a distillation is resolved by :mod:`uda.train.teacher_source`.

Importing a published checkpoint instead of training is :mod:`uda.importing`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Mapping

from uda import cpu_threads
from uda.errors import UserError
from uda.registry import ROLE_MODEL_NAMES

from . import resume
from .batches import build_train_data, build_val_dataset, seed_everything, train_loader, val_loader
from .distributed import DistContext, configure_threads, init_distributed
from .reporting import Reporter, fit_and_report
from .settings import check_schedule
from .trainer import UDATrainer
from .tracked_run import (
    ResumePlan,
    discard_half_logged,
    log_inputs,
    mark_finished,
    mark_running,
    plan_run,
    training_run,
)

__all__ = ["TrainRequest", "TrainResult", "train"]

log = logging.getLogger(__name__)

# Registered model of each entry point (``--model-name`` overrides).
_ROLES = {"teacher": "teacher", "distill": "student"}  # entry point -> the role it trains


@dataclass
class TrainRequest:
    """One ``teacher`` / ``distill`` run.

    Attributes:
        entry_point: ``'teacher'`` (MIC: EMA teacher) or ``'distill'``
            (frozen teacher).
        cfg: The resolved preset.
        params: The entry point's parameters (logged as given).
        device: ``cpu``, ``cuda``, ``cuda:N`` (resolved).
        resume: ``auto``, ``none`` or a run id.
        model_name: Registered model; default ``cs2acdc-teacher`` /
            ``cs2acdc-student``.
        teacher: Distill only: ``models:/NAME@ALIAS``,
            ``models:/NAME/VERSION|latest``, ``runs:/…``, or a checkpoint
            file (ours, or a MIC checkpoint: its ``model.*`` weights, built
            from the preset's ``teacher.model``).
        source_only: Train on the source only (no pseudo-labels, mixing or
            masking): the baseline. Also set by ``uda.source_only`` in the
            preset when that key exists.
    """

    entry_point: str
    cfg: dict
    params: Mapping[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    resume: str = "auto"
    model_name: str | None = None
    teacher: str | None = None
    source_only: bool = False


@dataclass
class TrainResult:
    """Outcome on rank 0 (other ranks get None)."""

    run_id: str
    model_name: str
    iterations: int
    start_iteration: int
    versions: dict[int, str] = field(default_factory=dict)
    val_miou: float | None = None


def _absolute_roots(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` with absolute dataset roots, so a direct run and an
    ``mlflow run`` (which makes ``path`` parameters absolute) of the same
    data share a fingerprint."""
    import copy

    out = copy.deepcopy(dict(cfg))
    for side in ("source", "target"):
        root = out["data"][side]["root"]
        out["data"][side]["root"] = str(Path(root).expanduser().resolve())
    return out


def _prepare_data_roots(cfg: Mapping[str, Any]) -> None:
    from uda.data.roots import prepare_roots

    prepare_roots(cfg["data"]["source"]["root"], cfg["data"]["target"]["root"])


def train(request: TrainRequest) -> TrainResult | None:
    """Run a ``teacher`` (MIC) or ``distill`` training job end to end.

    Args:
        request: What to train (see :class:`TrainRequest`).

    Returns:
        A :class:`TrainResult` on rank 0, None on the other ranks.

    Raises:
        UserError: Bad settings, data roots, teacher or resume request,
            before any run is started or model registered.
    """
    if request.entry_point not in _ROLES:
        raise ValueError(f"entry_point must be teacher or distill, got {request.entry_point!r}.")
    ctx = init_distributed(request.device)
    if not cpu_threads.is_configured():  # library use; the entry points share the cores
        configure_threads(ctx.local_world_size)
    try:
        return _train(request, ctx)
    finally:
        ctx.shutdown()


def _train(request: TrainRequest, ctx: DistContext) -> TrainResult | None:
    from uda.models import build_segmentor
    from uda.tracking import flatten

    cfg = request.cfg
    role = _ROLES[request.entry_point]
    model_name = request.model_name or ROLE_MODEL_NAMES[role]
    source_only = bool(request.source_only or cfg["uda"].get("source_only", False))
    distill = request.entry_point == "distill" and not source_only
    model_cfg = cfg[role]["model"]
    seed = int(cfg["seed"])
    max_iters = int(cfg["runner"]["max_iters"])
    print_ = resume.fingerprint(
        request.entry_point,
        _absolute_roots(cfg),
        {
            "teacher": request.teacher if distill else None,
            "model_name": model_name,
            "source_only": source_only,
        },
    )

    plan: ResumePlan | None = None
    if ctx.is_main:
        try:
            check_schedule(cfg)
            _prepare_data_roots(cfg)
            batches = build_train_data(cfg, seed, ctx.rank)
            val_set = build_val_dataset(cfg)
            plan = plan_run(
                request.entry_point,
                request.resume,
                request.teacher,
                print_,
                flatten(cfg),
                cfg["teacher"]["model"] if distill else None,
            )
        except UserError as err:
            ctx.broadcast(err)  # every rank stops with the same message
            raise
        shared = ctx.broadcast(plan.shared())
    else:
        shared = ctx.broadcast(None)
        batches = build_train_data(cfg, seed, ctx.rank)
        val_set = build_val_dataset(cfg)

    # Same initial weights on every rank and in a resumed run.
    seed_everything(seed)
    model = build_segmentor(model_cfg)
    teacher: Any = None if source_only else "ema"
    if distill:
        teacher = build_segmentor(dict(shared["teacher_cfg"], pretrained=None))
        teacher.load_state_dict(shared["teacher_state"])
    trainer = UDATrainer(model, cfg, teacher=teacher, seed=seed, ctx=ctx)
    start = 0
    if shared["resume_state"] is not None:
        state = shared["resume_state"]
        trainer.load_resume_state(state, shared["model_state"])
        start = int(state["iteration"])
        if int(state.get("world_size", 1)) != ctx.world_size:
            log.warning(
                "Resuming a run trained on %s process(es) with %s: "
                "the batches after the resume point differ.",
                state.get("world_size"),
                ctx.world_size,
            )
    del shared

    conditions = sorted(set(val_set.conditions))
    workers = int(cfg["data"].get("workers_per_gpu", 0))
    on_cuda = ctx.device.type == "cuda"
    loader = train_loader(batches, start, max_iters, workers, on_cuda)
    vals = val_loader(val_set, ctx.rank, ctx.world_size, workers)

    if not ctx.is_main:
        fit_and_report(trainer, loader, vals, conditions, start, cfg, None)
        return None

    assert plan is not None
    with training_run(request.entry_point, request.params, cfg, plan.resume_run_id) as run:
        run_id = run.info.run_id
        tags = {"uda.mode": trainer.mode, "uda.model_name": model_name, "uda.world_size": str(ctx.world_size)}
        if plan.teacher_uri:
            tags["uda.teacher.uri"] = plan.teacher_uri
        mark_running(run, print_, resumed=bool(start), tags=tags)
        if start == 0 and plan.resume_state is None:
            log_inputs(cfg, plan.teacher_uri)
        reporter = Reporter(request.entry_point, cfg, trainer, run_id, model_name, plan.teacher_uri, start)
        if start:
            reporter.progress.note(f"Resuming run {run_id} at iteration {start}/{max_iters}.")
        discarded = discard_half_logged(run, plan.resume_run_id is not None, request.entry_point, print_)
        if discarded:
            reporter.progress.note(
                f"Discarded {len(discarded)} half-logged model(s) left by an "
                f"interrupted run (marked FAILED and deleted): "
                f"{', '.join(discarded)}."
            )
        try:
            fit_and_report(trainer, loader, vals, conditions, start, cfg, reporter)
        finally:
            reporter.progress.close()
        mark_finished()
    result = TrainResult(run_id, model_name, max_iters, start, reporter.versions, reporter.val_miou)
    _print_summary(result)
    return result


def _print_summary(result: TrainResult) -> None:
    if result.versions:
        listed = ", ".join(f"iter-{i} -> v{v}" for i, v in sorted(result.versions.items()))
        print(f"Registered {result.model_name}: {listed}.")
    if result.val_miou is not None:
        print(f"Final ACDC val mIoU: {100 * result.val_miou:.2f}. Run {result.run_id}.")
