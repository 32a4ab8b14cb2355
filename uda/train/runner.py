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
   resuming, the *original* run again (under ``mlflow run`` the run MLflow
   created for this launch is tagged ``uda.resumed_into=<original>`` and
   closed, and training continues in the original run, so versions,
   metrics and the resume state stay with one run id);
3. train with :class:`~uda.train.trainer.UDATrainer` (DDP under torchrun),
   logging losses, learning rates, pseudo-label confidence and throughput
   every ``log_config.interval`` iterations, debug images every
   ``log_config.img_interval``, ACDC-val mIoU (overall and per condition)
   every ``evaluation.interval`` and at each checkpoint, MLflow system
   metrics, and the datasets as run inputs; a tqdm bar (or one line per
   log interval when stderr is not a terminal);
4. at every ``checkpoint_config.interval`` iterations and at the end:
   register the checkpoint (``iter-<N>`` alias, tags: iteration, run id,
   preset, val mIoU) through :func:`uda.registry.log_and_register`, then
   write the resume state (:mod:`uda.train.resume`).

Importing a published checkpoint instead of training is :mod:`uda.importing`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Iterator, Mapping

import numpy as np
import torch
import torch.nn as nn

from uda import cpu_threads
from uda.errors import UserError
from uda.registry import STUDENT_MODEL_NAME, TEACHER_MODEL_NAME

from . import resume
from .batches import build_train_data, build_val_dataset, seed_everything, train_loader, val_loader
from .distributed import DistContext, configure_threads, init_distributed
from .loop import FitHooks, LogAccumulator, evaluate, fit
from .settings import check_schedule
from .trainer import StepOutput, UDATrainer

__all__ = [
    "TEACHER_MODEL_NAME",
    "STUDENT_MODEL_NAME",
    "TrainRequest",
    "TrainResult",
    "TeacherError",
    "resolve_model_uri",
    "load_teacher",
    "train",
]

log = logging.getLogger(__name__)

# Registered model of each entry point (``--model-name`` overrides).
_ROLES = {"teacher": ("teacher", TEACHER_MODEL_NAME), "distill": ("student", STUDENT_MODEL_NAME)}


class TeacherError(UserError):
    """The distillation teacher cannot be used (not found, wrong model)."""


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


# ----------------------------------------------------------------------
# Teacher
# ----------------------------------------------------------------------
def resolve_model_uri(uri: str) -> str:
    """Pin a registry URI to a version: ``models:/NAME@ALIAS`` and
    ``models:/NAME/latest`` → ``models:/NAME/<version>``; other URIs and
    files unchanged.

    Raises:
        RegistryError: Unknown model or alias (lists what exists).
    """
    from uda.registry import check_model_uri

    # One owner of every URI form and its errors: uda.registry.
    if not uri.startswith("models:/") or uri.startswith("models:/m-"):
        return uri
    return check_model_uri(uri, parameter=None).uri


def _check_teacher_arch(found: Mapping[str, Any], wanted: Mapping[str, Any], where: str) -> None:
    from uda.models.foreign import architecture_differences

    diffs = architecture_differences(found, wanted, ("teacher", "preset"))
    if diffs:
        raise TeacherError(
            f"The teacher {where} is not the architecture of the preset's "
            f"teacher.model: {'; '.join(diffs)}. Pick a teacher trained "
            f"with this preset, or the preset it was trained with."
        )


def load_teacher(uri: str, teacher_model_cfg: Mapping[str, Any]) -> tuple[nn.Module, str]:
    """Load a distillation teacher and check it against the preset.

    Args:
        uri: Registry/run URI or checkpoint file (see
            :attr:`TrainRequest.teacher`).
        teacher_model_cfg: The preset's ``teacher.model``.

    Returns:
        ``(model, resolved)``: the segmentor (eval mode, CPU) and the URI
        pinned to a version (or the file path).

    Raises:
        TeacherError / RegistryError / CheckpointError /
        CheckpointMismatchError: all ``UserError``.
    """
    from uda.models.foreign import load_segmentor_file
    from uda.registry import load_segmentor

    uri = str(uri).strip()
    if not uri:
        raise TeacherError(
            "distill needs a teacher: a registered model "
            "(models:/cs2acdc-teacher@iter-120) or a MIC "
            "checkpoint file."
        )
    local = Path(uri)
    if local.is_file():
        # A MIC / mmcv / mmseg file: the preset says what it holds.
        model, _, report = load_segmentor_file(
            local, teacher_model_cfg, architecture="the preset's teacher.model"
        )
        log.info("Teacher %s: %s", uri, report)
        _check_teacher_arch(model.model_cfg, teacher_model_cfg, repr(uri))
        return model.eval(), str(local.resolve())
    if ":/" not in uri:
        raise TeacherError(
            f"Teacher {uri!r} is neither a file nor a model "
            f"URI (models:/NAME@ALIAS, models:/NAME/latest, "
            f"runs:/RUN_ID/NAME)."
        )
    resolved = resolve_model_uri(uri)
    try:
        model, model_cfg = load_segmentor(resolved)
    except FileNotFoundError as err:
        raise TeacherError(f"Teacher {uri}: {err}") from None
    _check_teacher_arch(model_cfg, teacher_model_cfg, resolved)
    return model.eval(), resolved


# ----------------------------------------------------------------------
# MLflow run handling (rank 0)
# ----------------------------------------------------------------------
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


@contextlib.contextmanager
def _training_run(
    entry_point: str, params: Mapping[str, Any], cfg: Mapping[str, Any], resume_run_id: str | None
) -> Iterator[Any]:
    """The MLflow run to train in (see module docstring, step 2)."""
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


# ----------------------------------------------------------------------
# Preparation (rank 0 decides, every rank follows)
# ----------------------------------------------------------------------
@dataclass
class _Plan:
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


def _plan(
    request: TrainRequest,
    print_: str,
    flat_cfg: Mapping[str, Any],
    teacher_model_cfg: Mapping[str, Any] | None,
) -> _Plan:
    """Rank 0: resume decision, resume state, model weights, teacher."""
    from uda.registry import load_segmentor

    plan = _Plan()
    wanted = resume.parse_resume(request.resume)
    run = None
    if wanted == "auto":
        experiment_id = _experiment_id()
        if experiment_id is not None:
            run = resume.find_resumable_run(
                experiment_id, request.entry_point, print_, exclude=os.environ.get("MLFLOW_RUN_ID")
            )
    elif wanted is not None:
        run = resume.check_resumable(wanted, request.entry_point, print_, flat_cfg)
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
        uri = teacher_uri or request.teacher or ""
        model, plan.teacher_uri = load_teacher(uri, teacher_model_cfg)
        plan.teacher_cfg = dict(model.model_cfg)
        plan.teacher_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return plan


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


# ----------------------------------------------------------------------
# Logging helpers (rank 0)
# ----------------------------------------------------------------------
def _debug_image(debug: Mapping[str, torch.Tensor], norm: Mapping[str, Any]) -> np.ndarray:
    from uda.visualize import denormalize, grid, overlay

    mean, std = norm["mean"], norm["std"]

    def rgb(key: str) -> np.ndarray:
        return denormalize(debug[key], mean, std)

    def labels(key: str) -> np.ndarray:
        return debug[key].numpy().astype(np.int64)

    rows = [[rgb("source_img"), labels("source_gt"), labels("source_pred")]]
    captions = [["source", "source label", "student prediction"]]
    if "target_img" in debug:
        target = rgb("target_img")
        rows.append([target, labels("pseudo_label"), overlay(target, labels("pseudo_label"))])
        captions.append(["target", "pseudo-label", "pseudo-label overlay"])
        rows.append([rgb("mixed_img"), labels("mixed_label"), labels("mixed_pred")])
        captions.append(["mixed", "mixed label", "student prediction"])
    if "masked_img" in debug:
        masked = rgb("masked_img")
        rows.append([masked, labels("masked_label"), overlay(masked, labels("masked_label"))])
        captions.append(["masked target", "its pseudo-label", "overlay"])
    return grid(rows, captions)


class _Progress:
    """tqdm bar on a terminal; one line per log interval otherwise."""

    def __init__(self, enabled: bool, start: int, total: int) -> None:
        self.enabled = enabled
        self.start, self.total = start, total
        self.bar = None
        self.began = time.perf_counter()
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=start, file=sys.stderr, unit="it", dynamic_ncols=True, desc="train"
            )

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def report(self, done: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{values.get('loss', math.nan):.3f}", refresh=False)
            return
        from tqdm import tqdm

        # A log file gets one line per interval, formatted by tqdm as its bar would be.
        meter = tqdm.format_meter(
            done,
            self.total,
            time.perf_counter() - self.began,
            initial=self.start,
            unit="it",
            bar_format="{n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]",
        )
        print(
            f"iter {meter}  loss {values.get('loss', math.nan):.4f}"
            f"  lr {values.get('lr.default', math.nan):.2e}",
            file=sys.stderr,
            flush=True,
        )

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------
def _is_due(done: int, interval: int, last: int) -> bool:
    return done % interval == 0 or done == last


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
    role, default_name = _ROLES[request.entry_point]
    model_name = request.model_name or default_name
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

    plan: _Plan | None = None
    if ctx.is_main:
        try:
            check_schedule(cfg)
            _prepare_data_roots(cfg)
            batches = build_train_data(cfg, seed, ctx.rank)
            val_set = build_val_dataset(cfg)
            plan = _plan(request, print_, flatten(cfg), cfg["teacher"]["model"] if distill else None)
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
        _fit_and_checkpoint(trainer, loader, vals, conditions, start, cfg, None, None)
        return None

    assert plan is not None
    import mlflow

    with _training_run(request.entry_point, request.params, cfg, plan.resume_run_id) as run:
        run_id = run.info.run_id
        tags = {
            resume.TAG_FINGERPRINT: print_,
            resume.TAG_STATE: "running",
            resume.TAG_HOST: socket.gethostname(),
            resume.TAG_PID: str(os.getpid()),
            "uda.mode": trainer.mode,
            "uda.model_name": model_name,
            "uda.world_size": str(ctx.world_size),
        }
        if plan.teacher_uri:
            tags["uda.teacher.uri"] = plan.teacher_uri
        if start:
            tags[resume.TAG_RESUMES] = str(int(run.data.tags.get(resume.TAG_RESUMES, "0")) + 1)
        mlflow.set_tags(tags)
        if start == 0 and plan.resume_state is None:
            _log_inputs(cfg, plan.teacher_uri)
        result = TrainResult(run_id, model_name, max_iters, start)
        reporter = _Reporter(request, cfg, trainer, run_id, model_name, plan.teacher_uri, result, start)
        if start:
            reporter.progress.note(f"Resuming run {run_id} at iteration {start}/{max_iters}.")
        discarded = _discard_half_logged(run, plan.resume_run_id is not None, request.entry_point, print_)
        if discarded:
            reporter.progress.note(
                f"Discarded {len(discarded)} half-logged model(s) left by an "
                f"interrupted run (marked FAILED and deleted): "
                f"{', '.join(discarded)}."
            )
        try:
            _fit_and_checkpoint(trainer, loader, vals, conditions, start, cfg, reporter, ctx)
        finally:
            reporter.progress.close()
        mlflow.set_tag(resume.TAG_STATE, "finished")
    _print_summary(result)
    return result


def _discard_half_logged(run: Any, resumed: bool, entry_point: str, print_: str) -> list[str]:
    """Hides the logged models that interrupted runs of this config left
    PENDING (a kill inside ``log_model``): those of the run being resumed,
    and of dead runs that cannot be resumed (killed in their first
    checkpoint, before any resume state)."""
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


def _log_inputs(cfg: Mapping[str, Any], teacher_uri: str | None) -> None:
    """The run's inputs: its datasets, and the logged model of a registered teacher."""
    from uda.tracking import log_dataset_inputs, log_model_inputs

    data = cfg["data"]
    log_dataset_inputs(
        {"cityscapes/train": data["source"]["root"], "acdc/train": data["target"]["root"]}, "training"
    )
    log_dataset_inputs({"acdc/val": data["target"]["root"]}, "evaluation")
    if teacher_uri and teacher_uri.startswith(("models:/", "runs:/")):
        from uda.registry import check_model_uri

        log_model_inputs([check_model_uri(teacher_uri, None).model_id])


class _Reporter:
    """Rank 0's MLflow logging, registration and console output."""

    def __init__(
        self,
        request: TrainRequest,
        cfg: Mapping[str, Any],
        trainer: UDATrainer,
        run_id: str,
        model_name: str,
        teacher_uri: str | None,
        result: TrainResult,
        start: int,
    ) -> None:
        self.request = request
        self.cfg = cfg
        self.trainer = trainer
        self.run_id = run_id
        self.model_name = model_name
        self.teacher_uri = teacher_uri
        self.result = result
        self.progress = _Progress(True, start, int(cfg["runner"]["max_iters"]))
        self.window_start = time.perf_counter()
        self.window_iters = 0
        self.compute_s = 0.0

    def log_scalars(self, done: int, values: dict[str, float]) -> None:
        import mlflow

        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        world = self.trainer.ctx.world_size
        batch = int(self.cfg["data"]["samples_per_gpu"])
        per_iter_images = batch * (1 if self.trainer.teacher is None else 2)
        values = dict(values)
        values.update({f"lr.{k}": v for k, v in self.trainer.learning_rates().items()})
        values["throughput.it_per_s"] = self.window_iters / elapsed
        values["throughput.img_per_s"] = self.window_iters * per_iter_images * world / elapsed
        values["time.step_s"] = self.compute_s / max(self.window_iters, 1)
        if not math.isfinite(values.get("loss", 0.0)):
            raise FloatingPointError(f"The training loss is {values['loss']} at iteration {done}.")
        mlflow.log_metrics(values, step=done)
        self.progress.report(done, values)
        self.window_start = time.perf_counter()
        self.window_iters = 0
        self.compute_s = 0.0

    def log_images(self, done: int, debug: Mapping[str, torch.Tensor]) -> None:
        import mlflow

        image = _debug_image(debug, self.cfg["data"]["img_norm_cfg"])
        mlflow.log_image(image, key="train_debug", step=done)

    def log_validation(self, done: int, table: Any) -> None:
        import mlflow

        mlflow.log_metrics(table.to_flat_dict("val."), step=done)
        self.result.val_miou = table.miou
        self.progress.note(
            f"iter {done}: ACDC val mIoU {100 * table.miou:.2f} ("
            + ", ".join(f"{c} {100 * v:.1f}" for c, v in table.per_condition_miou.items() if math.isfinite(v))
            + ")"
        )

    def checkpoint(self, done: int, table: Any) -> None:
        from uda.models import save_checkpoint
        from uda.registry import log_and_register

        metrics = {"val_mIoU": round(table.miou, 6)}
        metrics.update(
            {f"val_mIoU.{c}": round(v, 6) for c, v in table.per_condition_miou.items() if math.isfinite(v)}
        )
        extra = {"entry_point": self.request.entry_point, "mode": self.trainer.mode}
        if self.teacher_uri:
            extra["teacher"] = self.teacher_uri
        model = self.trainer.model
        with tempfile.TemporaryDirectory(prefix="uda-ckpt-") as tmp:
            path = save_checkpoint(
                Path(tmp) / f"iter_{done}.pth",
                model,
                meta={
                    "iteration": done,
                    "run_id": self.run_id,
                    "preset": str(self.cfg.get("name")),
                    **metrics,
                    **extra,
                },
            )
            version = log_and_register(
                path,
                self.model_name,
                iteration=done,
                metrics=metrics,
                preset=str(self.cfg.get("name")),
                extra_tags=extra,
            )
        import mlflow

        # On the logged model too, so the Models tab sorts and charts checkpoints by them.
        from uda.registry import version_model_id

        model_id = version_model_id(version)
        if model_id:
            mlflow.log_metrics(metrics, step=done, model_id=model_id)
        state = self.trainer.resume_state()
        state.update(
            iteration=done,
            model_uri=version.source,
            registered_model=self.model_name,
            version=str(version.version),
            world_size=self.trainer.ctx.world_size,
            seed=self.trainer.seed,
        )
        resume.write_resume_state(self.run_id, state)
        mlflow.set_tag(resume.TAG_RESUME_ITERATION, str(done))
        self.result.versions[done] = str(version.version)
        self.progress.note(
            f"iter {done}: registered {self.model_name} version {version.version} (alias iter-{done})."
        )


def _fit_and_checkpoint(
    trainer: UDATrainer,
    loader: Any,
    vals: Any,
    conditions: list[str],
    start: int,
    cfg: Mapping[str, Any],
    reporter: _Reporter | None,
    ctx: DistContext | None,
) -> None:
    """The loop with its hooks; identical collective calls on every rank."""
    max_iters = int(cfg["runner"]["max_iters"])
    log_every = int(cfg["log_config"]["interval"])
    img_every = int(cfg["log_config"]["img_interval"])
    eval_every = int(cfg["evaluation"]["interval"])
    ckpt_every = int(cfg["checkpoint_config"]["interval"])
    test_mode = (trainer.model.test_cfg or {}).get("mode")
    accumulator = LogAccumulator()

    def after_step(done: int, out: StepOutput, seconds: float) -> None:
        accumulator.add(out.log_vars)
        if reporter is not None:
            reporter.window_iters += 1
            reporter.compute_s += seconds
            reporter.progress.step()
            if out.debug is not None:
                reporter.log_images(done, out.debug)
        if _is_due(done, log_every, max_iters):
            values = trainer.ctx.all_reduce_mean(accumulator.means())
            if reporter is not None:
                reporter.log_scalars(done, values)
        is_checkpoint = _is_due(done, ckpt_every, max_iters)
        if is_checkpoint or done % eval_every == 0:
            trainer.synchronize_buffers()
            table = evaluate(trainer.model, vals, trainer.device, conditions, test_mode)
            if reporter is not None:
                reporter.log_validation(done, table)
                if is_checkpoint:
                    reporter.checkpoint(done, table)
        if reporter is not None and (is_checkpoint or done % eval_every == 0):
            reporter.window_start = time.perf_counter()  # throughput: training only

    def wants_debug(done: int) -> bool:
        return reporter is not None and done % img_every == 0

    fit(trainer, loader, start, max_iters, FitHooks(after_step, wants_debug))


def _print_summary(result: TrainResult) -> None:
    if result.versions:
        listed = ", ".join(f"iter-{i} -> v{v}" for i, v in sorted(result.versions.items()))
        print(f"Registered {result.model_name}: {listed}.")
    if result.val_miou is not None:
        print(f"Final ACDC val mIoU: {100 * result.val_miou:.2f}. Run {result.run_id}.")
