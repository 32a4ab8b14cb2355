"""The Optuna samplers of the weight search, seeded per trial so that processes sharing a study agree.

``tpe`` (multivariate TPE, half the budget at most as random start-up
trials) or ``qmc`` (scrambled Sobol'); see :func:`make_sampler`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from .mixing import SoupError

__all__ = ["make_sampler"]


def _trial_seeded(factory: Callable[[int], Any], seed: int):
    """A sampler that hands each trial to ``factory(s)``, ``s`` derived from
    ``(seed, trial number)``.

    Why: with one seeded random stream per process, two runs sharing a study
    (same study name, hence same seed) draw the same start-up points, and a
    resumed study draws other points than an uninterrupted one. Seeded per
    trial, trial ``k`` gets the same random numbers whichever process asks it
    (TPE itself is stateless: it refits on the study's trials every time).
    """
    import numpy as np
    import optuna

    class TrialSeededSampler(optuna.samplers.BaseSampler):
        def __init__(self) -> None:
            self._number: int | None = None
            self._inner: Any = None

        def _for(self, trial) -> Any:
            if self._number != trial.number or self._inner is None:
                state = np.random.SeedSequence([seed, trial.number])
                self._inner = factory(int(state.generate_state(1)[0]))
                self._number = trial.number
            return self._inner

        def infer_relative_search_space(self, study, trial):
            return self._for(trial).infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self._for(trial).sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

        def before_trial(self, study, trial) -> None:
            self._for(trial).before_trial(study, trial)

        def after_trial(self, study, trial, state, values) -> None:
            self._for(trial).after_trial(study, trial, state, values)

        def reseed_rng(self) -> None:  # deterministic by design
            pass

    return TrialSeededSampler()


def make_sampler(sampler: str, seed: int, trials: int):
    """The Optuna sampler of a weight search.

    Args:
        sampler: ``'tpe'`` or ``'qmc'``.
        seed: The search's seed.
        trials: The study's total (TPE's start-up trials are at most half).

    Raises:
        SoupError: another sampler name.
    """
    import optuna

    if sampler == "tpe":
        # Optuna's default of 10 random start-up trials would leave no TPE
        # trials at all in a small budget; use at most half of the budget.
        startup = max(1, min(10, trials // 2))
        return _trial_seeded(
            lambda s: optuna.samplers.TPESampler(seed=s, multivariate=True, n_startup_trials=startup), seed
        )
    if sampler == "qmc":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # Scrambled Sobol': seeded, and does not start at the u = 0 corner.
            # Its point index comes from the study, not the process.
            return optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=seed)
    raise SoupError(f"unknown sampler {sampler!r}; use 'tpe' or 'qmc'")
