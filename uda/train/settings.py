"""Checks of a preset's training settings: what cannot work (a non-positive
interval or iteration count, an unknown precision) is rejected before a run
starts or a model is registered, with the key that is wrong.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Mapping

from uda.errors import UserError
from uda.precision import PRECISIONS

__all__ = ["TrainConfigError", "positive_int", "check_schedule", "check_runtime"]


class TrainConfigError(UserError, ValueError):
    """A training setting that cannot work (intervals, modes, batch size)."""


def positive_int(cfg: Mapping[str, Any], dotted: str) -> int:
    """The value at ``dotted`` (``runner.max_iters``) of ``cfg``, checked.

    Raises:
        TrainConfigError: Not a positive integer (booleans are not).
    """
    node: Any = cfg
    for part in dotted.split("."):
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, int) or node < 1:
        raise TrainConfigError(f"{dotted} must be a positive integer, got {node!r}.")
    return node


def check_schedule(cfg: Mapping[str, Any]) -> None:
    """Reject non-positive iteration counts and intervals before training.

    Checks ``runner.max_iters``, ``checkpoint_config.interval``,
    ``evaluation.interval``, ``log_config.interval``,
    ``log_config.img_interval``, ``data.samples_per_gpu``,
    ``data.workers_per_gpu`` and ``runner.precision`` /
    ``runner.channels_last``.
    """
    for key in (
        "runner.max_iters",
        "checkpoint_config.interval",
        "evaluation.interval",
        "log_config.interval",
        "log_config.img_interval",
        "data.samples_per_gpu",
    ):
        positive_int(cfg, key)
    check_runtime(cfg)
    workers = cfg["data"].get("workers_per_gpu", 0)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise TrainConfigError(f"data.workers_per_gpu must be >= 0, got {workers!r}.")


def check_runtime(cfg: Mapping[str, Any]) -> tuple[str, bool]:
    """``runner.precision`` and ``runner.channels_last`` (and
    ``runner.activation_checkpointing``), validated."""
    runner = cfg["runner"]
    recompute = runner.get("activation_checkpointing", False)
    if not isinstance(recompute, bool):
        raise TrainConfigError(f"runner.activation_checkpointing must be true or false, got {recompute!r}.")
    precision = runner.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise TrainConfigError(
            f"runner.precision must be one of {', '.join(PRECISIONS)} (bf16: "
            f"autocast forward passes, fp32 weights), got {precision!r}."
        )
    channels_last = runner.get("channels_last", False)
    if not isinstance(channels_last, bool):
        raise TrainConfigError(f"runner.channels_last must be true or false, got {channels_last!r}.")
    return precision, channels_last
