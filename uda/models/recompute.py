"""Activation checkpointing of one backbone block (``use_checkpoint``).

The block's activations are not kept for backward; backward runs the block
again to get them. A second run must not change the model's state: a
BatchNorm in training mode would update its running statistics twice per
step, so the recomputation puts the block's buffers back as the forward
left them. Gradients, outputs and buffers then equal those without
checkpointing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.utils.checkpoint

__all__ = ["checkpointed"]


def checkpointed(block: nn.Module, *inputs: Any) -> Any:
    """``block(*inputs)``, recomputed in backward instead of stored."""
    runs = [0]

    def run(*args: Any) -> Any:
        runs[0] += 1
        if runs[0] == 1:
            return block(*args)
        saved = [(buffer, buffer.detach().clone()) for buffer in block.buffers()]
        try:
            return block(*args)
        finally:
            with torch.no_grad():
                for buffer, value in saved:
                    buffer.copy_(value)

    return torch.utils.checkpoint.checkpoint(run, *inputs, use_reentrant=False)
