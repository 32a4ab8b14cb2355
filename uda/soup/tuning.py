"""Choosing the soup's weights: fixed, uniform, greedy soup or an Optuna study; a nested run per trial.

The mixes are scored by a :class:`~uda.soup.session.SoupSession` on its
objective split (the *tuning* split of target val, or agreement with the
teacher); the searches themselves are :mod:`uda.soup.greedy` and
:mod:`uda.soup.search`, the study's storage and name :mod:`uda.soup.study`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .ingredients import IngredientRef
from .mixing import format_weights, uniform_weights
from .request import SoupRequest
from .session import SoupSession

__all__ = ["WeightChoice", "choose_weights"]


@dataclass(frozen=True)
class WeightChoice:
    """The chosen weights and how they were found.

    Attributes:
        weights: Normalised, one per ingredient.
        study_name / study_storage: The Optuna study (``optuna`` only).
        trials_run: Optuna trials evaluated in this run (None for the other
            methods: their trials are the session's timed ones).
    """

    weights: list[float]
    study_name: str | None = None
    study_storage: str | None = None
    trials_run: int | None = None


def choose_weights(
    request: SoupRequest,
    ingredients: Sequence[IngredientRef],
    session: SoupSession,
    fixed_weights: Sequence[float] | None,
) -> WeightChoice:
    """The weights of ``request.method``, inside the active MLflow run.

    Args:
        request: The soup request.
        ingredients: The ingredients, in the session's order.
        session: Scores the mixes (every ingredient scored alone already).
        fixed_weights: The parsed ``-P weights`` (method ``fixed``).

    Raises:
        SoupError: a search that cannot run (no labelled pixels, a study
            made for other ingredients, …).
    """
    if request.method == "fixed":
        return WeightChoice(list(fixed_weights))
    if request.method == "uniform":
        return WeightChoice(uniform_weights(session.n))
    if request.method == "greedy":
        return WeightChoice(_greedy(request, ingredients, session))
    return _optuna(request, ingredients, session)


def _log_trial(
    request: SoupRequest,
    labels: Sequence[str],
    objective_subset: str,
    number: int,
    weights: Sequence[float],
    score: float,
    seconds: float | None,
    study_name: str | None = None,
) -> str:
    """One nested run per evaluated trial; returns its run id."""
    import mlflow

    parent = mlflow.active_run()
    # The parent's experiment, explicitly: a run resumed through
    # MLFLOW_RUN_ID does not make its experiment the active one.
    with mlflow.start_run(
        run_name=f"trial-{number}", nested=True, experiment_id=parent.info.experiment_id
    ) as run:
        mlflow.set_tags(
            {
                "soup.trial": str(number),
                "soup.method": request.method,
                "entry_point": "soup-trial",
                **({"soup.study_name": study_name} if study_name else {}),
            }
        )
        mlflow.log_params({f"weight.{label}": f"{w:.6g}" for label, w in zip(labels, weights)})
        metrics = {f"{objective_subset}.mIoU": score, "objective": score}
        if seconds is not None:
            metrics["seconds"] = seconds
        mlflow.log_metrics(metrics)
    mlflow.log_metric(f"trial.{objective_subset}.mIoU", score, step=number)
    print(f"  trial {number}: weights {format_weights(weights)} -> {objective_subset} mIoU {score:.4f}")
    return run.info.run_id


def _greedy(request: SoupRequest, ingredients: Sequence[IngredientRef], session: SoupSession) -> list[float]:
    """Greedy soup on the objective split; its history logged as ``soup/greedy.json``."""
    import mlflow

    from .greedy import greedy_soup

    labels = [i.label for i in ingredients]
    n, subset = session.n, session.objective_subset

    def evaluate(indices: list[int]) -> float:
        share = [1.0 / len(indices) if i in indices else 0.0 for i in range(n)]
        score = session.objective(share)
        session.trials_logged += 1
        _log_trial(request, labels, subset, session.trials_logged, share, score, session.last_seconds)
        return score

    own = [session.evaluate(session.one_hot(i))[subset].miou for i in range(n)]
    greedy = greedy_soup(own, evaluate)
    mlflow.log_dict(
        {
            "ingredient_scores": dict(zip(labels, own)),
            "history": [
                dict(
                    candidate=labels[s.candidate],
                    soup=[labels[i] for i in s.soup],
                    score=s.score,
                    accepted=s.accepted,
                )
                for s in greedy.history
            ],
            "chosen": [labels[i] for i in greedy.indices],
        },
        "soup/greedy.json",
    )
    return greedy.weights


def _optuna(request: SoupRequest, ingredients: Sequence[IngredientRef], session: SoupSession) -> WeightChoice:
    """An Optuna study of ``request.trials`` trials in all, resumed when comparable; plots logged."""
    import mlflow
    import optuna

    from .report import save_study_plots
    from .search import optuna_search
    from .study import redact_url, storage_url, study_name_for

    labels = [i.label for i in ingredients]
    subset = session.objective_subset
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = storage_url(request.study_storage)
    evaluated: dict[str, Any] = dict(
        root=str(Path(request.target_root).resolve()),
        split=request.tune_fraction,
        img_scale=request.img_scale,
        conditions=request.conditions,
        objective_images=session.cache.sizes[subset],
        teacher=request.teacher if subset == "agreement" else None,
    )
    study_name = study_name_for(request.model_name, ingredients, request.objective, request.seed, evaluated)
    shown_storage = redact_url(storage)
    mlflow.set_tags({"soup.study_name": study_name, "soup.study_storage": shown_storage})
    print(
        f"Optuna study {study_name!r} in {shown_storage} "
        f"({request.trials} trials, {request.sampler}, seed "
        f"{request.seed})"
    )

    def on_trial(number: int, weights: list[float], score: float) -> str:
        # Logged before Optuna marks the trial complete, so every
        # complete trial this run evaluated has its nested run.
        return _log_trial(request, labels, subset, number, weights, score, session.last_seconds, study_name)

    search = optuna_search(
        session.n,
        session.objective,
        request.trials,
        seed=request.seed,
        storage=storage,
        study_name=study_name,
        sampler=request.sampler,
        on_trial=on_trial,
        notify=lambda line: print(f"  {line}"),
    )
    searched = len(search.evaluated)
    if not searched:
        print(
            f"  The study already has {search.n_trials} completed "
            f"trials (trials={request.trials} is its total): no trial "
            f"run here; the soup uses its best trial "
            f"{search.trial_number} ({subset} mIoU "
            f"{search.score:.4f})."
        )
    elif searched < request.trials:
        print(
            f"  Ran {searched} of the study's {search.n_trials} "
            f"completed trials here (the others ran before or in "
            f"other processes); best: trial {search.trial_number}."
        )
    mlflow.log_metrics(
        {
            "optuna.best_trial": search.trial_number,
            "optuna.completed_trials": search.n_trials,
            "optuna.trials_run_here": searched,
        }
    )
    mlflow.set_tag("soup.trials_run_here", ",".join(str(number) for number in search.evaluated) or "none")
    with tempfile.TemporaryDirectory(prefix="uda-optuna-") as plots:
        for path in save_study_plots(search.study, plots):
            mlflow.log_artifact(str(path), "soup")
    return WeightChoice(search.weights, study_name=study_name, study_storage=storage, trials_run=searched)
