"""The Optuna search for soup weights: points of the simplex, one trial at a time, the study's total exact.

Driven by an objective callable supplied by the caller (e.g. the mIoU of the
mixed model on a tuning split, see :mod:`uda.soup.scoring`), so it is
independent of MLflow and of the model. Where the study is stored and what
it is called is :mod:`uda.soup.study`; its samplers are
:mod:`uda.soup.samplers`. Optuna is imported only inside the functions that
need it.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .mixing import SoupError, uniform_weights
from .samplers import make_sampler
from .study import shown_storage, study_storage

__all__ = [
    "SearchResult",
    "optuna_search",
    "weights_from_unit_cube",
    "SURPLUS_ATTR",
    "RUN_ID_ATTR",
]


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
            f"{shown_storage(storage)!r}: {error}. Use a URL such "
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
                f"Optuna study {study_name!r} in {shown_storage(storage)!r} "
                f"searches weights of {stored_n} ingredients, but {n} were "
                "given; use another study_name"
            )
    return study


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
      Optuna heartbeats and is failed after :data:`~uda.soup.study.GRACE_S` seconds; its
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
            by :func:`~uda.soup.study.study_storage`), an Optuna storage object, or None for
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
    sampler_obj = make_sampler(sampler, seed, trials)
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
        storage=shown_storage(storage),
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
