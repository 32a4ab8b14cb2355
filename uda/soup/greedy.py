"""Greedy soup (Wortsman et al. 2022, Recipe 1): ingredients added best first, each kept only if it helps.

Driven by a score callable supplied by the caller (e.g. the mIoU of the
uniform soup of some ingredients on a tuning split, see
:mod:`uda.soup.scoring`), so it is independent of MLflow and of the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .mixing import SoupError

__all__ = ["GreedyStep", "GreedyResult", "greedy_soup"]


@dataclass(frozen=True)
class GreedyStep:
    """One candidate considered by :func:`greedy_soup`.

    Attributes:
        candidate: Index of the ingredient tried.
        soup: Indices of the soup that was evaluated (current soup + candidate).
        score: Its score.
        accepted: Whether the candidate stayed in the soup.
    """

    candidate: int
    soup: list[int]
    score: float
    accepted: bool


@dataclass(frozen=True)
class GreedyResult:
    """Outcome of :func:`greedy_soup`.

    Attributes:
        indices: Chosen ingredients, in the order they were added.
        weights: One weight per ingredient (all ``n`` of them): uniform over
            the chosen ones, 0 for the others — ready for
            :func:`~uda.soup.mixing.mix_state_dicts`.
        score: Score of the final soup (for a single ingredient, its own
            score as given).
        history: Every candidate tried, in order.
    """

    indices: list[int]
    weights: list[float]
    score: float
    history: list[GreedyStep] = field(default_factory=list)


def greedy_soup(ingredient_scores: Sequence[float], evaluate: Callable[[list[int]], float]) -> GreedyResult:
    """Greedy soup (Wortsman et al. 2022, Recipe 1).

    As in mlfoundations/model-soups ``main.py``: sort the ingredients by their
    own held-out score, best first; start the soup with the best one (its
    given score is the bar, it is not re-evaluated); try each remaining
    ingredient in that order and keep it only if the uniform soup of the
    current ingredients plus it scores **strictly higher** than the best so
    far. Ties in the individual scores keep the given order.

    Args:
        ingredient_scores: Each ingredient's own score on the tuning split,
            higher is better (e.g. mIoU).
        evaluate: Returns the score, on the same split, of the uniform soup of
            the given ingredient indices.

    Returns:
        A :class:`GreedyResult`.
    """
    scores = [float(s) for s in ingredient_scores]
    if not scores:
        raise SoupError("greedy soup needs at least one ingredient score")
    if not all(math.isfinite(s) for s in scores):
        raise SoupError(f"ingredient scores must be finite, got {scores}")
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    chosen = [order[0]]
    best = scores[order[0]]
    history: list[GreedyStep] = []
    for candidate in order[1:]:
        trial = chosen + [candidate]
        score = float(evaluate(list(trial)))
        if not math.isfinite(score):
            raise SoupError(f"evaluate({trial}) returned {score}; the objective must be a finite number")
        accepted = score > best
        history.append(GreedyStep(candidate, trial, score, accepted))
        if accepted:
            chosen, best = trial, score
    share = 1.0 / len(chosen)
    weights = [share if i in chosen else 0.0 for i in range(len(scores))]
    return GreedyResult(chosen, weights, best, history)
