"""Random draws of the DACS augmentations from an optional ``torch.Generator``.

The trainer reseeds one generator per iteration (on the training device); the
augmentations take every draw from it through these helpers, which draw where
the generator lives (the global CPU RNG when it is None) and hand the numbers
back on the CPU, where the per-image factors and per-step decisions are made.
"""

from __future__ import annotations

import torch

__all__ = ["uniform", "randperm"]


def _rng_device(generator: torch.Generator | None) -> torch.device:
    """Where ``generator`` draws (CPU when it is None: the global RNG)."""
    return generator.device if generator is not None else torch.device("cpu")


def uniform(low: float, high: float, generator: torch.Generator | None, size: int = 1) -> torch.Tensor:
    """``size`` draws of ``U(low, high)`` as a CPU float64 tensor.

    Args:
        low: Lower bound.
        high: Upper bound.
        generator: RNG to draw from; None for torch's global RNG.
        size: Number of draws.
    """
    draws = torch.rand(size, generator=generator, dtype=torch.float64, device=_rng_device(generator))
    return low + (high - low) * draws.cpu()


def randperm(num: int, generator: torch.Generator | None) -> torch.Tensor:
    """A random permutation of ``0 .. num - 1`` as a CPU int64 tensor.

    Args:
        num: Length of the permutation.
        generator: RNG to draw from; None for torch's global RNG.
    """
    return torch.randperm(num, generator=generator, device=_rng_device(generator)).cpu()
