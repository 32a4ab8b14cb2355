"""Choosing soup weights: greedy soup and an Optuna search over the simplex.

Both are driven by an objective callable supplied by the caller (e.g. the
mIoU of the mixed model on a tuning split, see :mod:`uda.soup.scoring`), so
they are independent of MLflow and of the model. Optuna and matplotlib are
imported only inside the functions that need them.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable, Sequence

from .mixing import SoupError, uniform_weights

__all__ = [
    "GreedyStep",
    "GreedyResult",
    "greedy_soup",
    "SearchResult",
    "optuna_search",
    "study_storage",
    "weights_from_unit_cube",
    "save_study_plots",
    "HEARTBEAT_S",
    "GRACE_S",
    "SURPLUS_ATTR",
    "RUN_ID_ATTR",
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
            :func:`mix_state_dicts`.
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


# --------------------------------------------------------------------------
# Optuna weight search
# --------------------------------------------------------------------------
#: Value of every unit-cube coordinate that maps to the uniform soup
#: (``-log(1 - u) = 1``); enqueued as the first trial.
_UNIFORM_UNIT = 1.0 - math.exp(-1.0)
_PARAM = "ingredient_{}"


def weights_from_unit_cube(units: Sequence[float]) -> list[float]:
    """Maps ``n`` numbers in [0, 1] to a point of the weight simplex.

    ``w_i = e_i / sum(e)`` with ``e_i = -log(1 - u_i)``: for independent
    uniform ``u_i`` the ``e_i`` are Exp(1) and ``w`` is uniformly distributed
    on the simplex (Dirichlet(1, ..., 1)). Each ``w_i`` increases with its own
    ``u_i``. Equal ``u_i`` give exactly uniform weights; all ``u_i = 0`` (a
    corner of the cube, where the ratio is undefined) gives uniform weights too.
    """
    units = [min(max(float(u), 0.0), 1.0 - 1e-12) for u in units]
    if not units:
        raise SoupError("no coordinates given")
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
        n_trials: Completed trials in the study (all calls and processes
            together).
        study_name: The study's name.
        storage: Its Optuna storage URL (None: in memory).
        evaluated: Numbers of the trials this call evaluated, in order (empty
            when the study already had its ``trials``).
        running_elsewhere: Trials still running in other processes when this
            call stopped waiting for them (not part of the result; 0 normally).
        study: The ``optuna.Study`` (for plots and inspection).
    """

    weights: list[float]
    score: float
    trial_number: int
    uniform_score: float
    n_trials: int
    study_name: str
    storage: str | None
    evaluated: list[int] = field(default_factory=list)
    running_elsewhere: int = 0
    study: Any = field(repr=False, compare=False, default=None)


#: Optuna heartbeat of a running trial (seconds) and how long a missing
#: heartbeat is tolerated before another process fails the trial as dead
#: (a killed run leaves its trial RUNNING for ever otherwise).
HEARTBEAT_S = 10
GRACE_S = 30
#: How often a run whose budget is used up polls the trials that other
#: processes are still evaluating, and how long it waits for them at least.
_POLL_S = 0.5
_MIN_WAIT_S = 60.0
#: User attribute of a trial asked beyond the budget in a race (never evaluated).
SURPLUS_ATTR = "uda.surplus"
#: User attribute linking a trial to the MLflow run that logged it.
RUN_ID_ATTR = "mlflow_run_id"


class _SurplusTrial(Exception):
    """Raised inside the objective for a trial asked beyond the budget."""


class _QuietSurplus(logging.Filter):
    """Drops Optuna's "Trial N failed" warnings (with a traceback) for the
    surplus trials: the search reports them in one line of its own."""

    def __init__(self, numbers: list[int]) -> None:
        super().__init__()
        self._numbers = numbers

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(f"Trial {k} failed ") for k in self._numbers)


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


def _make_sampler(sampler: str, seed: int, trials: int):
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


def study_storage(url: str, heartbeat_s: int = HEARTBEAT_S, grace_s: int = GRACE_S) -> Any:
    """The Optuna ``RDBStorage`` the search uses for an RDB URL.

    With heartbeats: a running trial records one every ``heartbeat_s``
    seconds; a trial silent for ``grace_s`` seconds (its process was killed)
    is failed by the next process that looks, and its parameters are queued
    again once (so a killed uniform trial is still evaluated).
    """
    import optuna

    # SQLite: concurrent runs wait for each other's writes instead of failing
    # with "database is locked" after the driver's default 5 s.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine,
                    heartbeat_interval=heartbeat_s,
                    grace_period=grace_s,
                    heartbeat_stale_trial_callback=retry,
                )
        except Exception as error:
            # Two runs creating the schema of a new database at the same
            # moment: one fails on Optuna's version row; the tables exist
            # now, so opening again works.
            if "UNIQUE constraint" not in str(error) and "already exists" not in str(error) or attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


#: How long a run that found the study waits for its creator to finish setting it up.
_CREATOR_WAIT_S = 30.0


def _open_study(storage: Any, study_name: str, sampler_obj: Any, n: int):
    """Creates or loads the study; only the process that created it enqueues
    the uniform trial (two runs starting together would enqueue it twice)."""
    import optuna

    try:
        # A URL gets heartbeats; None (in memory) or a storage object as is.
        backend = study_storage(storage) if isinstance(storage, str) else storage
        try:
            study = optuna.create_study(
                storage=backend, study_name=study_name, sampler=sampler_obj, direction="maximize"
            )
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=study_name, storage=backend, sampler=sampler_obj)
            created = False
    except Exception as error:  # sqlalchemy / optuna raise many types here
        raise SoupError(
            f"cannot open Optuna study {study_name!r} in storage "
            f"{_shown_storage(storage)!r}: {error}. Use a URL such "
            "as 'sqlite:///path/optuna.db'."
        ) from error
    if created:
        # The uniform trial first and num_ingredients last: a run that loads
        # the study waits for that attribute, so it never asks before the
        # uniform soup is queued as trial 0.
        study.enqueue_trial({_PARAM.format(i): _UNIFORM_UNIT for i in range(n)})
        study.set_user_attr("parametrisation", "w = e / sum(e), e_i = -log(1 - ingredient_i)")
        study.set_user_attr("num_ingredients", n)
    else:
        waited_until = time.monotonic() + _CREATOR_WAIT_S
        while "num_ingredients" not in study.user_attrs and time.monotonic() < waited_until:
            time.sleep(0.1)
        stored_n = study.user_attrs.get("num_ingredients")
        if stored_n is not None and stored_n != n:
            raise SoupError(
                f"Optuna study {study_name!r} in {_shown_storage(storage)!r} "
                f"searches weights of {stored_n} ingredients, but {n} were "
                "given; use another study_name"
            )
    return study


def _shown_storage(storage: Any) -> str | None:
    """The storage's URL as runs and messages show it: without its password."""
    if storage is not None and not isinstance(storage, str):
        storage = str(getattr(storage, "url", storage))
    return None if storage is None else redact_url(storage)


def redact_url(url: str) -> str:
    """``postgresql://user:***@host/db`` for a URL with a password.

    MLflow logs every parameter as given, so a team keeps the password out of
    ``study_storage`` (libpq reads ``PGPASSWORD`` or ``~/.pgpass``); what this
    project logs or prints itself never holds one either way.
    """
    if "@" not in url or "://" not in url:
        return url
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return url


def _fail_stale_trials(study) -> None:
    """Fails trials whose process stopped beating (killed runs)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def optuna_search(
    n: int,
    evaluate: Callable[[list[float]], float],
    trials: int,
    seed: int = 0,
    storage: Any = None,
    study_name: str = "soup-weights",
    sampler: str = "tpe",
    on_trial: Callable[[int, list[float], float], str | None] | None = None,
    notify: Callable[[str], None] | None = None,
    wait_timeout_s: float | None = None,
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

    **``trials`` is the study's total**, whoever runs them. With ``storage``
    (an Optuna RDB URL such as ``sqlite:///optuna.db``, separate from
    MLflow's store) the study is created or loaded by name, and trials that
    are complete, running (in any process) or queued all count; failed ones
    do not (their slot is run again). So an interrupted search continues
    where it stopped (trial numbers continue), a call that finds the study
    complete evaluates nothing and returns its best trial, and several
    processes sharing the study run ``trials`` trials between them:

    * each process asks one trial at a time while fewer than ``trials`` are
      counted; two processes may still ask at the same moment, so right
      after asking, a trial checks how many counted trials have a lower
      number (Optuna numbers trials atomically): if that is already
      ``trials``, it is not evaluated but marked FAIL with the user attribute
      ``uda.surplus`` — the total stays exact;
    * once the budget is used up, the call waits for the trials other
      processes are still running (at least a minute, or five times the
      longest trial so far: ``wait_timeout_s``), so concurrent runs end with
      the same best trial; a trial whose process was killed stops sending
      Optuna heartbeats and is failed after :data:`GRACE_S` seconds; its
      parameters are queued again once and run by whichever process is
      still searching.

    Sampling is seeded per trial from ``(seed, trial number)``, so processes
    sharing a study do not repeat each other's random start-up points, and a
    resumed study draws the same start-up points as an uninterrupted one.

    Args:
        n: Number of ingredients (>= 2).
        evaluate: Score of the soup with the given weights (higher is
            better), measured on the tuning split.
        trials: Total trials wanted in the study (>= 1).
        seed: Sampler seed.
        storage: Optuna storage URL (made an ``RDBStorage`` with heartbeats
            by :func:`study_storage`), an Optuna storage object, or None for
            an in-memory study.
        study_name: Study name in the storage.
        sampler: ``'tpe'`` (multivariate TPE) or ``'qmc'`` (scrambled Sobol').
        on_trial: Called as ``on_trial(trial_number, weights, score)`` for
            each trial this call evaluates, before the trial is marked
            complete (e.g. to log a nested MLflow run, so every completed
            trial has one); a returned string is stored as the trial's user
            attribute ``mlflow_run_id``.
        notify: Called with a one-line message when the call waits for other
            processes' trials or stops waiting.
        wait_timeout_s: Longest wait for other processes' running trials
            (default: see above).

    Returns:
        A :class:`SearchResult`.

    Raises:
        SoupError: for ``n < 2``, ``trials <= 0``, an unknown sampler, a
            storage that cannot be opened, a stored study made for another
            number of ingredients, a non-finite objective value, or a study
            with no completed trial at the end.
    """
    if n < 2:
        raise SoupError(
            f"a weight search needs at least 2 ingredients, got {n}; a single checkpoint needs no soup"
        )
    if trials <= 0:
        raise SoupError(f"trials must be a positive number, got {trials}")
    import optuna

    TrialState = optuna.trial.TrialState
    counted = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
    sampler_obj = _make_sampler(sampler, seed, trials)
    study = _open_study(storage, study_name, sampler_obj, n)
    say = notify or (lambda message: None)
    evaluated: list[int] = []
    surplus: list[int] = []
    current: list[int | None] = [None]

    def objective(trial) -> float:
        current[0] = trial.number
        # Exact total under races: the trials numbered below this one are
        # fixed once it exists, so at most `trials` of them pass this test.
        before = sum(
            1 for t in study.get_trials(deepcopy=False) if t.number < trial.number and t.state in counted
        )
        if before >= trials:
            surplus.append(trial.number)
            trial.set_user_attr(SURPLUS_ATTR, True)
            raise _SurplusTrial(
                f"trial {trial.number} not evaluated: the study already "
                f"counts {before} trials (trials={trials}), another process "
                "asked at the same moment"
            )
        units = [trial.suggest_float(_PARAM.format(i), 0.0, 1.0) for i in range(n)]
        weights = weights_from_unit_cube(units)
        trial.set_user_attr("weights", weights)
        score = float(evaluate(list(weights)))
        if not math.isfinite(score):
            raise SoupError(
                f"the objective returned {score} for weights {weights}; it must be a finite number"
            )
        if on_trial is not None:
            run_id = on_trial(trial.number, list(weights), score)
            if isinstance(run_id, str):
                trial.set_user_attr(RUN_ID_ATTR, run_id)
        evaluated.append(trial.number)
        return score

    waiting_since: float | None = None
    limit = 0.0
    running_elsewhere = 0
    while True:
        _fail_stale_trials(study)
        states = [t.state for t in study.get_trials(deepcopy=False)]
        queued = states.count(TrialState.WAITING)
        if queued or sum(states.count(s) for s in counted) < trials:
            waiting_since = None
            current[0] = None
            quiet = _QuietSurplus(surplus)
            optimize_log = logging.getLogger("optuna.study._optimize")
            optimize_log.addFilter(quiet)
            try:
                study.optimize(objective, n_trials=1, catch=(_SurplusTrial,))
            except optuna.exceptions.UpdateFinishedTrialError:
                # Another process declared this one dead (no heartbeat for
                # GRACE_S): it does not count, its slot is run again.
                if current[0] in evaluated:
                    evaluated.remove(current[0])
                say(
                    f"Trial {current[0]} was failed by another process "
                    "(missed heartbeats) and does not count."
                )
            finally:
                optimize_log.removeFilter(quiet)
            if surplus and surplus[-1] == current[0]:
                say(
                    f"Trial {current[0]} was asked at the same moment as "
                    "another process took the last trial of the budget: not "
                    f"evaluated (state FAIL, user attribute {SURPLUS_ATTR})."
                )
            continue
        running = states.count(TrialState.RUNNING)
        if not running:
            break
        now = time.monotonic()
        if waiting_since is None:
            waiting_since = now
            limit = wait_timeout_s if wait_timeout_s is not None else _default_wait(study)
            say(
                f"All {trials} trials of the study are taken; waiting up to "
                f"{limit:.0f} s for {running} trial(s) running in other "
                "processes."
            )
        elif now - waiting_since > limit:
            running_elsewhere = running
            say(
                f"Stopped waiting: {running} trial(s) still running in other "
                "processes are not part of this result."
            )
            break
        time.sleep(_POLL_S)

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        raise SoupError(
            f"Optuna study {study_name!r} has no completed trial "
            f"({running_elsewhere} still running elsewhere)"
        )
    best = max(done, key=lambda t: (t.value, -t.number))  # earliest on ties
    uniform_scores = [t.value for t in done if t.user_attrs.get("weights") == uniform_weights(n)]
    return SearchResult(
        weights=list(best.user_attrs["weights"]),
        score=float(best.value),
        trial_number=best.number,
        uniform_score=(float(uniform_scores[0]) if uniform_scores else math.nan),
        n_trials=len(done),
        study_name=study.study_name,
        storage=_shown_storage(storage),
        evaluated=evaluated,
        running_elsewhere=running_elsewhere,
        study=study,
    )


def _default_wait(study) -> float:
    """At least a minute, or five times the longest completed trial."""
    import optuna

    longest = max(
        (
            (t.datetime_complete - t.datetime_start).total_seconds()
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.datetime_complete and t.datetime_start
        ),
        default=0.0,
    )
    return max(_MIN_WAIT_S, 5.0 * longest)


def save_study_plots(study, out_dir: str | Path) -> list[Path]:
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

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as optuna_plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    num_complete = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    plots = [
        ("optuna_history.png", optuna_plots.plot_optimization_history, 1),
        ("optuna_importance.png", optuna_plots.plot_param_importances, 2),
    ]
    written = []
    for file_name, plot, min_trials in plots:
        if num_complete < min_trials:
            warnings.warn(
                f"{file_name}: skipped, needs {min_trials} completed trial(s), the study has {num_complete}"
            )
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                axes = plot(study)
        except (RuntimeError, ValueError, ZeroDivisionError) as error:
            warnings.warn(f"{file_name}: skipped, Optuna could not draw it: {error}")
            continue
        figure = axes.figure
        path = out_dir / file_name
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written
