"""Numeric precision of forward passes, shared by training and evaluation.

``fp32`` is what MIC trains and evaluates in and stays every default;
``bf16`` runs the forward passes under ``torch.autocast`` with bfloat16
(weights, optimizer state and losses stay fp32; bf16 needs no loss scaling).
Only torch is imported, so the training loop keeps running where MLflow and
mmcv are not installed.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["PRECISIONS", "autocast"]

PRECISIONS = ("fp32", "bf16")


def autocast(device: str | torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The context for forward passes on ``device`` in ``precision``.

    Raises:
        ValueError: ``precision`` is not one of :data:`PRECISIONS` (callers
            check user input earlier and say which setting was wrong).
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
