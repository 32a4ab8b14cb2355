"""Choosing soup weights: greedy soup and an Optuna search over the simplex.

Both are driven by an objective callable supplied by the caller (e.g. the
mIoU of the mixed model on a tuning split, see :mod:`uda.soup.scoring`), so
they are independent of MLflow and of the model. Optuna and matplotlib are
imported only inside the functions that need them.
"""
from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Union

from .mixing import SoupError, uniform_weights

__all__ = [
    'GreedyStep', 'GreedyResult', 'greedy_soup', 'SearchResult',
    'optuna_search', 'weights_from_unit_cube', 'save_study_plots'
]


# --------------------------------------------------------------------------
# Greedy soup
# --------------------------------------------------------------------------
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
    soup: List[int]
    score: float
    accepted: bool


@dataclass(frozen=True)
class GreedyResult:
    """Outcome of :func:`greedy_soup`.

    Attributes:
        indices: Chosen ingredients, in the order they were added.
        weights: One weight per ingredient (all ``n`` of them): uniform over
            the chosen ones, 0 for the others — ready for
            :func:`mix_state_dicts`.
        score: Score of the final soup (for a single ingredient, its own
            score as given).
        history: Every candidate tried, in order.
    """

    indices: List[int]
    weights: List[float]
    score: float
    history: List[GreedyStep] = field(default_factory=list)


def greedy_soup(ingredient_scores: Sequence[float],
                evaluate: Callable[[List[int]], float]) -> GreedyResult:
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
        raise SoupError('greedy soup needs at least one ingredient score')
    if not all(math.isfinite(s) for s in scores):
        raise SoupError(f'ingredient scores must be finite, got {scores}')
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    chosen = [order[0]]
    best = scores[order[0]]
    history: List[GreedyStep] = []
    for candidate in order[1:]:
        trial = chosen + [candidate]
        score = float(evaluate(list(trial)))
        if not math.isfinite(score):
            raise SoupError(f'evaluate({trial}) returned {score}; the '
                            'objective must be a finite number')
        accepted = score > best
        history.append(GreedyStep(candidate, trial, score, accepted))
        if accepted:
            chosen, best = trial, score
    share = 1.0 / len(chosen)
    weights = [share if i in chosen else 0.0 for i in range(len(scores))]
    return GreedyResult(chosen, weights, best, history)


# --------------------------------------------------------------------------
# Optuna weight search
# --------------------------------------------------------------------------
#: Value of every unit-cube coordinate that maps to the uniform soup
#: (``-log(1 - u) = 1``); enqueued as the first trial.
_UNIFORM_UNIT = 1.0 - math.exp(-1.0)
_PARAM = 'ingredient_{}'


def weights_from_unit_cube(units: Sequence[float]) -> List[float]:
    """Maps ``n`` numbers in [0, 1] to a point of the weight simplex.

    ``w_i = e_i / sum(e)`` with ``e_i = -log(1 - u_i)``: for independent
    uniform ``u_i`` the ``e_i`` are Exp(1) and ``w`` is uniformly distributed
    on the simplex (Dirichlet(1, ..., 1)). Each ``w_i`` increases with its own
    ``u_i``. Equal ``u_i`` give exactly uniform weights; all ``u_i = 0`` (a
    corner of the cube, where the ratio is undefined) gives uniform weights too.
    """
    units = [min(max(float(u), 0.0), 1.0 - 1e-12) for u in units]
    if not units:
        raise SoupError('no coordinates given')
    if max(units) == min(units):
        return uniform_weights(len(units))
    spacings = [-math.log1p(-u) for u in units]
    total = math.fsum(spacings)
    return [s / total for s in spacings]


@dataclass(frozen=True)
class SearchResult:
    """Outcome of :func:`optuna_search`.

    Attributes:
        weights: Best weights found (normalised).
        score: Their score on the tuning split.
        trial_number: Optuna number of the best trial.
        uniform_score: Score of the uniform soup (the enqueued first trial),
            for reporting the gain of the search; NaN if not in the study.
        n_trials: Completed trials in the study (all calls together).
        study_name: The study's name.
        storage: Its Optuna storage URL (None: in memory).
        study: The ``optuna.Study`` (for plots and inspection).
    """

    weights: List[float]
    score: float
    trial_number: int
    uniform_score: float
    n_trials: int
    study_name: str
    storage: Optional[str]
    study: Any = field(repr=False, compare=False, default=None)


def _make_sampler(sampler: str, seed: int, trials: int):
    import optuna

    if sampler == 'tpe':
        # Optuna's default of 10 random start-up trials would leave no TPE
        # trials at all in a small budget; use at most half of the budget.
        return optuna.samplers.TPESampler(
            seed=seed,
            multivariate=True,
            n_startup_trials=max(1, min(10, trials // 2)))
    if sampler == 'qmc':
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
            # Scrambled Sobol': seeded, and does not start at the u = 0 corner.
            return optuna.samplers.QMCSampler(qmc_type='sobol',
                                              scramble=True,
                                              seed=seed)
    raise SoupError(f"unknown sampler {sampler!r}; use 'tpe' or 'qmc'")


def optuna_search(n: int,
                  evaluate: Callable[[List[float]], float],
                  trials: int,
                  seed: int = 0,
                  storage: Optional[str] = None,
                  study_name: str = 'soup-weights',
                  sampler: str = 'tpe',
                  on_trial: Optional[Callable[[int, List[float], float],
                                              None]] = None
                  ) -> SearchResult:
    """Searches mixing weights that maximise ``evaluate`` with Optuna.

    **Parametrisation.** Each trial suggests ``n`` floats ``u_i`` in [0, 1]
    (named ``ingredient_i``) and maps them to the simplex with
    :func:`weights_from_unit_cube` (``e_i = -log(1 - u_i)``, ``w = e/sum(e)``).
    Why this one: uniform ``u`` give *uniform* weights on the simplex
    (Dirichlet(1)), so TPE's random start-up trials and QMC's low-discrepancy
    points cover the simplex evenly; every suggested point is valid (no
    rejected trials, unlike ``n - 1`` free weights with the last one set to
    ``1 - sum``, which leaves the simplex half of the time or more); and each
    parameter belongs to one ingredient (``w_i`` grows with ``u_i``), so the
    parameter-importance plot reads per ingredient. Normalising plain
    ``u_i`` instead would crowd samples towards the centre. The price, one
    redundant dimension (the overall scale of ``e``), is small for a handful
    of ingredients.

    **Uniform first.** A new study gets the uniform soup enqueued as trial 0,
    so the best result is never worse than uniform on the tuning split.

    **Resuming.** With ``storage`` (an Optuna RDB URL such as
    ``sqlite:///optuna.db``, separate from MLflow's store) the study is
    created or loaded by name (``load_if_exists``) and ``trials`` is the
    *total* number of completed trials wanted: an interrupted search
    continues where it stopped (trial numbers continue), and calling again
    with the same ``trials`` runs nothing new and returns the same best. Note
    that the sampler's random stream restarts on resume, so a resumed study
    is reproducible but not identical to an uninterrupted one.

    Args:
        n: Number of ingredients (>= 2).
        evaluate: Score of the soup with the given weights (higher is
            better), measured on the tuning split.
        trials: Total completed trials wanted in the study (>= 1).
        seed: Sampler seed.
        storage: Optuna storage URL, or None for an in-memory study.
        study_name: Study name in the storage.
        sampler: ``'tpe'`` (multivariate TPE) or ``'qmc'`` (scrambled Sobol').
        on_trial: Called as ``on_trial(trial_number, weights, score)`` after
            each completed trial (e.g. to log a nested MLflow run).

    Returns:
        A :class:`SearchResult`.

    Raises:
        SoupError: for ``n < 2``, ``trials <= 0``, an unknown sampler, a
            storage that cannot be opened, a stored study made for another
            number of ingredients, or a non-finite objective value.
    """
    if n < 2:
        raise SoupError(f'a weight search needs at least 2 ingredients, got '
                        f'{n}; a single checkpoint needs no soup')
    if trials <= 0:
        raise SoupError(f'trials must be a positive number, got {trials}')
    import optuna

    sampler_obj = _make_sampler(sampler, seed, trials)
    try:
        study = optuna.create_study(storage=storage,
                                    study_name=study_name,
                                    sampler=sampler_obj,
                                    direction='maximize',
                                    load_if_exists=True)
    except Exception as error:  # sqlalchemy / optuna raise many types here
        raise SoupError(f'cannot open Optuna study {study_name!r} in storage '
                        f'{storage!r}: {error}. Use a URL such as '
                        "'sqlite:///path/optuna.db'.") from error
    stored_n = study.user_attrs.get('num_ingredients')
    if stored_n is not None and stored_n != n:
        raise SoupError(
            f'Optuna study {study_name!r} in {storage!r} searches weights of '
            f'{stored_n} ingredients, but {n} were given; use another '
            'study_name')
    if not study.trials:
        study.set_user_attr('num_ingredients', n)
        study.set_user_attr('parametrisation', 'w = e / sum(e), '
                            'e_i = -log(1 - ingredient_i)')
        study.enqueue_trial({_PARAM.format(i): _UNIFORM_UNIT
                             for i in range(n)})

    def objective(trial) -> float:
        units = [trial.suggest_float(_PARAM.format(i), 0.0, 1.0)
                 for i in range(n)]
        weights = weights_from_unit_cube(units)
        trial.set_user_attr('weights', weights)
        score = float(evaluate(list(weights)))
        if not math.isfinite(score):
            raise SoupError(f'the objective returned {score} for weights '
                            f'{weights}; it must be a finite number')
        return score

    def report(study, frozen_trial) -> None:
        if on_trial is not None and frozen_trial.value is not None:
            on_trial(frozen_trial.number,
                     list(frozen_trial.user_attrs['weights']),
                     float(frozen_trial.value))

    def completed(study):
        return study.get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, ))

    remaining = trials - len(completed(study))
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, callbacks=[report])

    done = completed(study)
    best = max(done, key=lambda t: (t.value, -t.number))  # earliest on ties
    uniform_scores = [
        t.value for t in done
        if t.user_attrs.get('weights') == uniform_weights(n)
    ]
    return SearchResult(
        weights=list(best.user_attrs['weights']),
        score=float(best.value),
        trial_number=best.number,
        uniform_score=(float(uniform_scores[0])
                       if uniform_scores else math.nan),
        n_trials=len(done),
        study_name=study.study_name,
        storage=storage,
        study=study)


def save_study_plots(study, out_dir: Union[str, Path]) -> List[Path]:
    """Saves Optuna's optimisation-history and parameter-importance plots.

    Uses ``optuna.visualization.matplotlib`` on the Agg backend (selected only
    if pyplot is not imported yet, so an interactive session is left alone).
    The importance plot needs at least two completed trials with different
    parameters; when it cannot be computed it is skipped with a warning.

    Args:
        study: An ``optuna.Study`` (e.g. ``SearchResult.study``).
        out_dir: Folder for the PNG files (created if needed).

    Returns:
        Paths of the files written (``optuna_history.png``,
        ``optuna_importance.png``).
    """
    import matplotlib
    if 'matplotlib.pyplot' not in sys.modules:
        matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as optuna_plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    num_complete = len(study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, )))
    plots = [('optuna_history.png', optuna_plots.plot_optimization_history,
              1), ('optuna_importance.png',
                   optuna_plots.plot_param_importances, 2)]
    written = []
    for file_name, plot, min_trials in plots:
        if num_complete < min_trials:
            warnings.warn(f'{file_name}: skipped, needs {min_trials} '
                          f'completed trial(s), the study has {num_complete}')
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore',
                                      optuna.exceptions.ExperimentalWarning)
                axes = plot(study)
        except (RuntimeError, ValueError, ZeroDivisionError) as error:
            warnings.warn(f'{file_name}: skipped, Optuna could not draw it: '
                          f'{error}')
            continue
        figure = axes.figure
        path = out_dir / file_name
        figure.savefig(path, dpi=100, bbox_inches='tight')
        plt.close(figure)
        written.append(path)
    return written
