"""Periodic reporting of a training run: on the preset's schedule, every rank
averages the losses (``log_config.interval``) and validates
(``evaluation.interval`` and each checkpoint); rank 0 logs them to MLflow with
the learning rates, throughput and debug images (``log_config.img_interval``),
registers each checkpoint (``checkpoint_config.interval`` and the end) then
writes the resume state that points at it, and shows the progress on the
console (a tqdm bar, or one line per log interval when stderr is not a
terminal).
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import torch

from . import resume
from .loop import FitHooks, evaluate, fit
from .trainer import StepOutput, UDATrainer

__all__ = ["LogAccumulator", "Progress", "Reporter", "is_due", "fit_and_report"]


class LogAccumulator:
    """Running sums of scalar log tensors between two log points (no host
    sync until :meth:`means`)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, values: Mapping[str, torch.Tensor]) -> None:
        for key, value in values.items():
            value = value.detach().double()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.count += 1

    def means(self) -> dict[str, float]:
        """Averages since the last reset, then reset."""
        out = {k: float(v) / max(self.count, 1) for k, v in self.sums.items()}
        self.sums, self.count = {}, 0
        return out


class Progress:
    """tqdm bar on a terminal; one line per log interval otherwise.

    Args:
        enabled: Show anything at all.
        start: Iterations done before this process started.
        total: Iterations of the whole run.
    """

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


class Reporter:
    """Rank 0's MLflow logging, registration and console output.

    Args:
        entry_point: ``teacher`` or ``distill`` (a tag of each version).
        cfg: The resolved preset.
        trainer: The trainer being run.
        run_id: The active run.
        model_name: The registered model the checkpoints become versions of.
        teacher_uri: The pinned distillation teacher, or None.
        start: Iterations done before this process started.

    Attributes:
        versions: Iteration -> registered version, of this process.
        val_miou: The last ACDC-val mIoU, or None before any validation.
        progress: The console display.
    """

    def __init__(
        self,
        entry_point: str,
        cfg: Mapping[str, Any],
        trainer: UDATrainer,
        run_id: str,
        model_name: str,
        teacher_uri: str | None,
        start: int,
    ) -> None:
        self.entry_point = entry_point
        self.cfg = cfg
        self.trainer = trainer
        self.run_id = run_id
        self.model_name = model_name
        self.teacher_uri = teacher_uri
        self.versions: dict[int, str] = {}
        self.val_miou: float | None = None
        self.progress = Progress(True, start, int(cfg["runner"]["max_iters"]))
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

        from uda.visualize import train_debug_image

        image = train_debug_image(debug, self.cfg["data"]["img_norm_cfg"])
        mlflow.log_image(image, key="train_debug", step=done)

    def log_validation(self, done: int, table: Any) -> None:
        import mlflow

        mlflow.log_metrics(table.to_flat_dict("val."), step=done)
        self.val_miou = table.miou
        self.progress.note(
            f"iter {done}: ACDC val mIoU {100 * table.miou:.2f} ("
            + ", ".join(f"{c} {100 * v:.1f}" for c, v in table.per_condition_miou.items() if math.isfinite(v))
            + ")"
        )

    def checkpoint(self, done: int, table: Any) -> None:
        """Register the model at ``done`` (alias ``iter-<done>``), then write
        the resume state that names that version (see :mod:`uda.train.resume`)."""
        import mlflow

        from uda.models import save_checkpoint
        from uda.registry import log_and_register, version_model_id

        metrics = {"val_mIoU": round(table.miou, 6)}
        metrics.update(
            {f"val_mIoU.{c}": round(v, 6) for c, v in table.per_condition_miou.items() if math.isfinite(v)}
        )
        extra = {"entry_point": self.entry_point, "mode": self.trainer.mode}
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
        # On the logged model too, so the Models tab sorts and charts checkpoints by them.
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
        self.versions[done] = str(version.version)
        self.progress.note(
            f"iter {done}: registered {self.model_name} version {version.version} (alias iter-{done})."
        )


def is_due(done: int, interval: int, last: int) -> bool:
    """Whether a periodic action runs after iteration ``done`` (counted from
    1): every ``interval`` iterations and after the ``last``."""
    return done % interval == 0 or done == last


def fit_and_report(
    trainer: UDATrainer,
    loader: Any,
    vals: Any,
    conditions: list[str],
    start: int,
    cfg: Mapping[str, Any],
    reporter: Reporter | None,
) -> None:
    """Train iterations ``start .. runner.max_iters - 1`` with the periodic
    reporting; identical collective calls on every rank.

    Args:
        trainer: The trainer.
        loader: The batches of those iterations
            (:func:`~uda.train.batches.train_loader`).
        vals: This rank's share of the validation set.
        conditions: Every validation condition (same on all ranks).
        start: First iteration.
        cfg: The resolved preset (the intervals).
        reporter: Rank 0's; None on the other ranks.
    """
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
        if is_due(done, log_every, max_iters):
            values = trainer.ctx.all_reduce_mean(accumulator.means())
            if reporter is not None:
                reporter.log_scalars(done, values)
        is_checkpoint = is_due(done, ckpt_every, max_iters)
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
