"""The ``soup`` step: registered checkpoints in, a verified soup version out (:func:`run_soup`'s order).

Order of operations (:func:`run_soup`), so that bad input changes nothing and
``serving`` never points at an unverified model:

1. **Request** (:func:`~uda.soup.request.make_request`, no registry
   access): weights syntax, method, objective, trials, promote, tuning
   fraction.
2. **Resolve** the ingredients by alias in the registry
   (:func:`~uda.soup.ingredients.resolve_ingredients`; an unknown alias lists
   the existing ones) and check the number of weights against them.
3. **Check** the architecture: every ingredient's state dict has the same
   keys, shapes and dtypes (:func:`~uda.soup.mixing.check_compatible`; the
   error names the first mismatch).
4. **Choose** the weights (:mod:`uda.soup.tuning`): fixed, uniform, greedy
   soup, or an Optuna study (stored in its own SQLite file, one nested MLflow
   run per trial), scored on the *tuning* split of target val or,
   label-free, by agreement with the teacher on target train images
   (:mod:`uda.soup.session`, :mod:`uda.soup.scoring`).
5. **Mix** (streaming) and **evaluate** the soup, the uniform soup and every
   ingredient on the tuning split, the disjoint *report* split and full val;
   log the comparison (:mod:`uda.soup.report`).
6. **Register** the soup as a new version of the same registered model
   (``kind=soup``, ingredient/weight/score tags).
7. **Promote** (:mod:`uda.soup.promotion`): move ``serving`` to it (loaded
   and run first; one move at a time, each recorded on both runs) —
   always, never (``promote=false``) or only if its report-split mIoU beats
   the version serving now (``promote=if-better``).

All metric values are fractions in [0, 1] (:mod:`uda.metrics`).
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .ingredients import IngredientRef, download_ingredients, resolve_ingredients
from .mixing import (
    SoupError,
    check_compatible,
    format_weights,
    mix_state_dicts,
    parse_weights,
    uniform_weights,
)
from .promotion import current_serving, promote
from .report import compare, log_comparison, print_summary
from .request import SoupRequest
from .session import SoupSession
from .tuning import choose_weights

__all__ = ["SoupResult", "run_soup"]


@dataclass
class SoupResult:
    """What :func:`run_soup` did.

    Attributes:
        version: The registered soup version (``ModelVersion``).
        ingredients: The ingredients.
        ingredients_source: ``'parameter'``, ``'preset'`` or ``'latest-run'``.
        weights: The soup's normalised weights.
        method: ``fixed``, ``uniform``, ``greedy`` or ``optuna``.
        objective: ``miou`` or ``teacher-agreement``.
        scores: Row name (ingredient label, ``uniform``, ``soup``,
            ``serving``) → ``{'tune': mIoU, 'report': …, 'val': …}`` (and
            ``'agreement'`` for the label-free objective).
        promoted: Whether ``serving`` now points at the soup.
        promote_reason: Why (not).
        seconds_per_trial: Mean wall time of one search trial (mix, load,
            score on the objective split), NaN without a search.
        trials: Search evaluations run in this call (Optuna: the trials
            this run evaluated, 0 when the study already had its total).
        study_name / study_storage: The Optuna study (``optuna`` only).
    """

    version: Any
    ingredients: list[IngredientRef]
    ingredients_source: str
    weights: list[float]
    method: str
    objective: str
    scores: dict[str, dict[str, float]]
    promoted: bool
    promote_reason: str
    seconds_per_trial: float = math.nan
    trials: int = 0
    study_name: str | None = None
    study_storage: str | None = None
    comparison: list[dict[str, Any]] = field(default_factory=list)


def run_soup(
    request: SoupRequest, device: str = "cpu", batch_size: int | None = None, work_dir: Path | None = None
) -> SoupResult:
    """Resolve → check → choose weights → mix → evaluate → register →
    promote, inside the active MLflow run.

    Args:
        request: From :func:`~uda.soup.request.make_request`.
        device: Scoring device (``cpu``, ``cuda``).
        batch_size: Images per inference batch (None: by pixel budget, see
            :data:`~uda.soup.scoring.DEFAULT_MAX_BATCH_PIXELS`).
        work_dir: Where ingredient checkpoints are downloaded (default: a
            temporary folder, deleted afterwards).

    Returns:
        A :class:`SoupResult`.

    Raises:
        SoupError / RegistryError / DatasetLayoutError: bad input; nothing
            is registered and ``serving`` is untouched.
    """
    import mlflow

    if mlflow.active_run() is None:
        raise ValueError("run_soup needs an active MLflow run (the soup entry point starts one).")
    from uda.data.roots import prepare_roots

    started = time.perf_counter()
    # A missing root fails before any ingredient is downloaded; only the
    # embedded root is ever written.
    prepare_roots(target_root=request.target_root)
    ingredients, source = resolve_ingredients(request)
    labels = [i.label for i in ingredients]
    n = len(ingredients)
    fixed_weights = None
    if request.weights is not None:
        fixed_weights = parse_weights(request.weights, n)
    elif request.method == "optuna" and n < 2:
        raise SoupError("a weight search needs at least 2 ingredients")
    origin = {
        "parameter": "from -P aliases",
        "preset": "the preset's soup.aliases",
        "latest-run": "the latest run's last checkpoints",
    }[source]
    print(
        f"Soup of {request.model_name}: "
        + ", ".join(f"{i.label} (version {i.version})" for i in ingredients)
        + f" [{origin}]"
    )
    mlflow.set_tags(
        {
            "soup.ingredients": ",".join(labels),
            "soup.ingredient_versions": ",".join(i.version for i in ingredients),
            "soup.ingredients_source": source,
            "soup.method": request.method,
            "soup.objective": request.objective,
        }
    )
    from uda.tracking import log_model_inputs

    log_model_inputs([i.model_id for i in ingredients])  # lineage: ingredients → this run

    with tempfile.TemporaryDirectory(prefix="uda-soup-") as tmp:
        folder = Path(work_dir) if work_dir is not None else Path(tmp)
        checkpoints = download_ingredients(request.model_name, ingredients, folder)
        check_compatible(checkpoints.loaders, checkpoints.names)
        session = SoupSession.open(request, checkpoints, device, batch_size)
        subset = session.objective_subset

        # --- every ingredient on every split (also greedy's own scores) ---
        for index, label in enumerate(labels):
            result = session.evaluate(session.one_hot(index))
            print(
                f"  {label}: {subset} mIoU {result[subset].miou:.4f}, report mIoU {result['report'].miou:.4f}"
            )

        choice = choose_weights(request, ingredients, session, fixed_weights)
        weights = choice.weights

        # --- the soup, the uniform soup, the ingredients: same splits -----
        rows: dict[str, dict[str, Any]] = {}
        for index, ingredient in enumerate(ingredients):
            one_hot = session.one_hot(index)
            rows[ingredient.label] = dict(
                version=ingredient.version, weights=format_weights(one_hot), tables=session.evaluate(one_hot)
            )
        uniform = uniform_weights(n)
        rows["uniform"] = dict(version="", weights=format_weights(uniform), tables=session.evaluate(uniform))
        # Mixed last, streaming (peak ~2 models), and kept for registering.
        mixed = mix_state_dicts(checkpoints.loaders, weights, checkpoints.names)
        rows["soup"] = dict(
            version="(new)", weights=format_weights(weights), tables=session.evaluate(weights, mixed)
        )
        serving = current_serving(request.model_name)
        if request.promote == "if-better" and serving is not None:
            # The rule compares report-split scores: the serving version's, on the same images.
            rows["serving"] = dict(
                version=str(serving.version),
                weights="",
                tables=session.evaluate_version(request.model_name, serving, ingredients),
            )

        comparison = compare(rows, subset, session.cache.conditions)
        metrics = dict(comparison.metrics)
        if session.trial_seconds:
            metrics["seconds_per_trial"] = session.seconds_per_trial
        metrics["seconds.cache"] = session.cache_seconds
        mlflow.log_metrics(metrics)
        log_comparison(comparison)
        mlflow.log_param("soup.weights", format_weights(weights))

        # --- register, then (maybe) promote -------------------------------
        from uda.registry import log_and_register

        soup_scores = comparison.scores["soup"]
        version = log_and_register(
            mixed,
            request.model_name,
            model_cfg=session.model_cfg,
            kind="soup",
            alias=None,
            preset=request.preset,
            name="soup",
            metrics={f"{split}_mIoU": round(v, 6) for split, v in soup_scores.items() if math.isfinite(v)},
            extra_tags={
                "soup.ingredients": ",".join(labels),
                "soup.ingredient_versions": ",".join(i.version for i in ingredients),
                "soup.weights": format_weights(weights),
                "soup.method": request.method,
                "soup.objective": request.objective,
                **{f"soup.weight.{label}": f"{w:.6g}" for label, w in zip(labels, weights)},
            },
        )
        del mixed
        mlflow.set_tag("soup.version", str(version.version))

        promotion = promote(
            request.model_name,
            str(version.version),
            mlflow.active_run().info.run_id,
            request.promote,
            soup_scores["report"],
            compared=serving,
            compared_report=comparison.scores.get("serving", {}).get("report"),
        )
        mlflow.log_metric("seconds.total", time.perf_counter() - started)
        trials_timed = len(session.trial_seconds)
        print_summary(
            request.model_name,
            request.method,
            version,
            weights,
            comparison,
            promotion,
            session.seconds_per_trial,
            trials_timed,
        )
        return SoupResult(
            version=version,
            ingredients=ingredients,
            ingredients_source=source,
            weights=list(weights),
            method=request.method,
            objective=request.objective,
            scores=comparison.scores,
            promoted=promotion.promoted,
            promote_reason=promotion.reason,
            seconds_per_trial=session.seconds_per_trial,
            trials=(choice.trials_run if choice.trials_run is not None else trials_timed),
            study_name=choice.study_name,
            study_storage=choice.study_storage,
            comparison=comparison.rows,
        )
