"""The training loop around :class:`~uda.train.trainer.UDATrainer`:
:func:`fit` runs a span of iterations on their batches and calls its hooks
after each, and :func:`evaluate` is the validation those hooks run (ACDC-val
mIoU, overall and per condition, summed over the ranks).

The order of the iterations and their batches decide a resumed run's numbers
(see :mod:`uda.train.trainer`): :func:`fit` refuses a batch of another
iteration.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from uda import cpu_threads
from uda.metrics import ConditionTable, PerConditionMetrics, logits_to_labels

from .teacher import unwrap_model
from .trainer import StepOutput, UDATrainer

__all__ = ["evaluate", "FitHooks", "fit"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    device: str | torch.device,
    conditions: Sequence[str],
    mode: str | None = None,
) -> ConditionTable:
    """mIoU of ``model`` on labelled target images, overall and per condition.

    Predictions are made in the preset's test mode (``mode`` None: the
    model's ``test_cfg.mode``) on the resized image and scored at the label's
    size after a bilinear resize of the logits, as mmseg does. Under
    ``torchrun`` each rank scores its share and the confusion matrices are
    summed (all ranks must call this).

    Args:
        model: The segmentor (DDP wrappers are unwrapped).
        loader: Items with ``img`` (3, h, w), ``gt`` (H, W), ``condition``.
        device: Where to run.
        conditions: Every condition that can occur (same on all ranks).
        mode: ``'slide'`` or ``'whole'``.
    """
    model = unwrap_model(model)
    was_training = model.training
    model.eval()
    metrics = PerConditionMetrics(tuple(conditions), device=device)
    try:
        for item in loader:
            cpu_threads.rebalance()
            img = item["img"][None].to(device)
            gt = item["gt"].to(device)
            pred = logits_to_labels(model.inference(img, mode), gt.shape[-2:])[0]
            metrics.update(pred, gt, item["condition"])
    finally:
        model.train(was_training)
    return metrics.all_reduce().compute()


@dataclass
class FitHooks:
    """Callbacks of :func:`fit` (all optional), called on every rank.

    Attributes:
        after_step: ``(iteration_done, StepOutput, seconds) -> None`` after
            each iteration (``iteration_done`` counts from 1).
        wants_debug: ``iteration_done -> bool``: return the debug images of
            that iteration.
    """

    after_step: Callable[[int, StepOutput, float], None] | None = None
    wants_debug: Callable[[int], bool] | None = None


def fit(
    trainer: UDATrainer,
    batches: Iterable[Mapping[str, Any]],
    start: int,
    stop: int,
    hooks: FitHooks | None = None,
) -> int:
    """Train iterations ``start .. stop - 1`` on the matching batches.

    Args:
        trainer: The trainer.
        batches: Batches of exactly those iterations, in order (e.g.
            :func:`~uda.train.batches.train_loader`).
        start: First iteration index.
        stop: One past the last.
        hooks: Logging / checkpoint callbacks.

    Returns:
        Iterations done when it stopped (``stop``).
    """
    hooks = hooks or FitHooks()
    iteration = start
    tick = time.perf_counter()
    for batch in batches:
        if iteration >= stop:
            break
        if batch.get("iteration", iteration) != iteration:
            raise RuntimeError(f"Batch of iteration {batch['iteration']} arrived at iteration {iteration}.")
        cpu_threads.rebalance()  # other jobs may have started or ended
        debug = bool(hooks.wants_debug and hooks.wants_debug(iteration + 1))
        out = trainer.train_step(batch, iteration, debug=debug)
        iteration += 1
        now = time.perf_counter()
        if hooks.after_step is not None:
            hooks.after_step(iteration, out, now - tick)
        tick = time.perf_counter()
    return iteration
