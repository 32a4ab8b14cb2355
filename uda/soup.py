"""Model soups: weighted averages of checkpoints of one architecture.

A soup (Wortsman et al., "Model soups", ICML 2022) averages the weights of
several fine-tuned models. The original cs2acdc recipe mixed the 24k/32k/40k
distill checkpoints 3:3:4. This module holds everything that does not depend
on MLflow, so that it is easy to test and reuse:

* :func:`parse_weights` / :func:`normalize_weights` — ``"3,3,4"`` →
  ``[0.3, 0.3, 0.4]`` with clear errors for bad input;
* :func:`check_compatible` / :func:`state_dict_spec` — same keys, shapes and
  dtypes, or an error naming the first mismatch;
* :func:`mix_state_dicts` — streaming weighted average (peak memory ≈ two
  models, whatever the number of ingredients);
* :func:`greedy_soup`, :func:`optuna_search`, :func:`save_study_plots` —
  weight search driven by an objective callable supplied by the caller.

Differences from the original soup script, on purpose (see DESIGN.md):
tensors are paired by key *name*, not by position, and integer buffers
(BatchNorm ``num_batches_tracked``, index tables) are copied from one
ingredient instead of being averaged.

Pure torch; Optuna and matplotlib are imported only inside the functions that
need them.
"""
from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import (Any, Callable, Dict, List, Mapping, NamedTuple, Optional,
                    Sequence, Tuple, Union)

import torch

from uda.errors import UserError

__all__ = [
    'SoupError', 'TensorSpec', 'parse_weights', 'normalize_weights',
    'uniform_weights', 'state_dict_spec', 'check_compatible',
    'mix_state_dicts', 'GreedyStep', 'GreedyResult', 'greedy_soup',
    'SearchResult', 'optuna_search', 'weights_from_unit_cube',
    'save_study_plots'
]

StateDict = Mapping[str, torch.Tensor]
#: An ingredient: a state dict, or a zero-argument callable returning one
#: (e.g. ``lambda: torch.load(path, weights_only=True, mmap=True)``), so that
#: :func:`mix_state_dicts` can load ingredients one at a time.
Ingredient = Union[StateDict, Callable[[], StateDict]]


class SoupError(UserError, ValueError):
    """Invalid soup input: weights, incompatible ingredients, search settings."""


# --------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------
def normalize_weights(weights: Sequence[float],
                      num_ingredients: Optional[int] = None) -> List[float]:
    """Validates mixing weights and scales them to sum to 1.

    Args:
        weights: One non-negative, finite weight per ingredient; at least one
            must be positive. Only ratios matter (``3,3,4`` = ``0.3,0.3,0.4``).
        num_ingredients: If given, the number of weights must equal it.

    Returns:
        The weights divided by their sum, as Python floats.

    Raises:
        SoupError: for a wrong count, a non-finite or negative weight, or
            all-zero weights.
    """
    values = list(weights)
    for position, value in enumerate(values, start=1):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise SoupError(
                f'weight {position} ({value!r}) is not a number') from None
        if not math.isfinite(value):
            raise SoupError(f'weight {position} is {value}; weights must be '
                            'finite numbers')
        if value < 0:
            raise SoupError(f'weight {position} is negative ({value:g}); '
                            'weights must be >= 0')
        values[position - 1] = value
    if num_ingredients is not None and len(values) != num_ingredients:
        raise SoupError(
            f'got {len(values)} weight(s) for {num_ingredients} '
            f'ingredient(s); give exactly one weight per ingredient')
    if not values:
        raise SoupError('no weights given')
    total = math.fsum(values)
    if total <= 0:
        raise SoupError('all weights are zero; at least one weight must be '
                        'positive')
    return [value / total for value in values]


def parse_weights(text: str, num_ingredients: int) -> List[float]:
    """Parses comma-separated mixing weights and normalises them to sum 1.

    Args:
        text: E.g. ``"3,3,4"`` or ``"0.2, 0.8"``; only ratios matter.
        num_ingredients: Number of ingredients; the count must match.

    Returns:
        Normalised weights, e.g. ``[0.3, 0.3, 0.4]`` for ``"3,3,4"``.

    Raises:
        SoupError: naming the offending entry for an empty entry, a
            non-number (``"3,x,4"``), ``nan``/``inf``, a negative weight, all
            zeros, or a count different from ``num_ingredients``.
    """
    if not isinstance(text, str):
        raise SoupError(f'weights must be a string like "3,3,4", got '
                        f'{type(text).__name__}')
    if not text.strip():
        raise SoupError(f'no weights given; pass one weight per ingredient '
                        f'({num_ingredients}), e.g. '
                        f'"{",".join(["1"] * max(num_ingredients, 1))}"')
    values = []
    for position, item in enumerate(text.split(','), start=1):
        item = item.strip()
        if not item:
            raise SoupError(f'weight {position} is empty in {text!r}; use '
                            'comma-separated numbers like "3,3,4"')
        try:
            value = float(item)
        except ValueError:
            raise SoupError(f'weight {position} ({item!r}) in {text!r} is not '
                            'a number; use comma-separated numbers like '
                            '"3,3,4"') from None
        if not math.isfinite(value):
            raise SoupError(f'weight {position} ({item!r}) in {text!r} is not '
                            'a finite number')
        values.append(value)
    return normalize_weights(values, num_ingredients)


def uniform_weights(n: int) -> List[float]:
    """``n`` equal weights summing to 1 (the uniform soup)."""
    if n < 1:
        raise SoupError(f'need at least one ingredient, got {n}')
    return [1.0 / n] * n


# --------------------------------------------------------------------------
# Compatibility
# --------------------------------------------------------------------------
class TensorSpec(NamedTuple):
    """Shape and dtype of one state-dict entry (dtype as ``'float32'``)."""

    shape: Tuple[int, ...]
    dtype: str


def _dtype_name(dtype: Union[torch.dtype, str]) -> str:
    return str(dtype).replace('torch.', '')


def _as_spec(value: Any, key: str, label: str) -> TensorSpec:
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(value.shape), _dtype_name(value.dtype))
    if isinstance(value, (tuple, list)) and len(value) == 2:
        shape, dtype = value
        return TensorSpec(tuple(int(s) for s in shape), _dtype_name(dtype))
    raise SoupError(
        f'{label}: entry {key!r} is a {type(value).__name__}, not a tensor; '
        'pass the model state dict (e.g. checkpoint["state_dict"]) or a '
        'spec from state_dict_spec()')


def state_dict_spec(state_dict: Mapping[str, Any],
                    label: str = 'ingredient') -> Dict[str, TensorSpec]:
    """Key → (shape, dtype) of a state dict, in its key order.

    JSON-friendly (``{key: [list(shape), dtype]}`` round-trips through
    :func:`check_compatible`), so it can be stored with a registered model
    and checked before any weights are downloaded.

    Args:
        state_dict: Tensors, or already (shape, dtype) pairs.
        label: How to name this state dict in error messages.
    """
    if not isinstance(state_dict, Mapping):
        raise SoupError(f'{label} is a {type(state_dict).__name__}, not a '
                        'state dict (a mapping of names to tensors)')
    return {
        key: _as_spec(value, key, label)
        for key, value in state_dict.items()
    }


def _label(index: int, names: Optional[Sequence[str]]) -> str:
    if names is not None and index < len(names):
        return f'ingredient {index} ({names[index]})'
    return f'ingredient {index}'


def _fmt(spec: TensorSpec) -> str:
    return f'shape {tuple(spec.shape)} {spec.dtype}'


def _mismatches(reference: Dict[str, TensorSpec],
                candidate: Dict[str, TensorSpec], ref_label: str) -> List[str]:
    """Every difference, in a fixed order: reference keys first, then extras."""
    problems = []
    for key, ref in reference.items():
        got = candidate.get(key)
        if got is None:
            problems.append(f'key {key!r} ({_fmt(ref)} in {ref_label}) is '
                            'missing')
        elif tuple(got.shape) != tuple(ref.shape):
            problems.append(f'key {key!r} has shape {tuple(got.shape)}, but '
                            f'{tuple(ref.shape)} in {ref_label}')
        elif got.dtype != ref.dtype:
            problems.append(f'key {key!r} has dtype {got.dtype}, but '
                            f'{ref.dtype} in {ref_label}')
    for key, got in candidate.items():
        if key not in reference:
            problems.append(f'key {key!r} ({_fmt(got)}) is not in {ref_label}')
    return problems


def _raise_if_incompatible(reference: Dict[str, TensorSpec],
                           candidate: Dict[str, TensorSpec], index: int,
                           names: Optional[Sequence[str]]) -> None:
    problems = _mismatches(reference, candidate, 'ingredient 0')
    if problems:
        more = (f' (and {len(problems) - 1} more difference(s))'
                if len(problems) > 1 else '')
        raise SoupError(
            f'{_label(index, names)} does not match {_label(0, names)}: '
            f'{problems[0]}{more}. All ingredients must be checkpoints of the '
            'same architecture.')


def _materialise(ingredient: Ingredient, index: int,
                 names: Optional[Sequence[str]]) -> Mapping[str, Any]:
    state_dict = ingredient() if callable(ingredient) else ingredient
    if not isinstance(state_dict, Mapping):
        raise SoupError(
            f'{_label(index, names)} is a {type(state_dict).__name__}, not a '
            'state dict (a mapping of names to tensors)')
    return state_dict


def check_compatible(
        ingredients: Sequence[Union[Ingredient, Mapping[str, Any]]],
        names: Optional[Sequence[str]] = None) -> Dict[str, TensorSpec]:
    """Checks that all ingredients have the same keys, shapes and dtypes.

    Args:
        ingredients: State dicts, loader callables (called one at a time) or
            specs from :func:`state_dict_spec` (also as parsed JSON).
        names: Optional display names (e.g. ``models:/student@iter-24000``)
            used in error messages.

    Returns:
        The common spec (that of the first ingredient).

    Raises:
        SoupError: naming the first mismatch: the first ingredient (in the
            given order) that differs from ingredient 0, and in it the first
            reference key that is missing or has another shape or dtype,
            else the first extra key.
    """
    if not ingredients:
        raise SoupError('no ingredients given')
    reference: Optional[Dict[str, TensorSpec]] = None
    for index, ingredient in enumerate(ingredients):
        spec = state_dict_spec(_materialise(ingredient, index, names),
                               _label(index, names))
        if reference is None:
            reference = spec
        else:
            _raise_if_incompatible(reference, spec, index, names)
    return reference


# --------------------------------------------------------------------------
# Mixing
# --------------------------------------------------------------------------
def _accumulate(state_dict: Mapping[str, torch.Tensor], weight: float,
                running_sum: Dict[str, torch.Tensor],
                kept: Dict[str, torch.Tensor]) -> None:
    """Adds ``weight * state_dict`` to the running sums (a function, so that no
    local variable keeps a tensor of the ingredient alive afterwards)."""
    for key, tensor in state_dict.items():
        tensor = tensor.detach()
        if not tensor.is_floating_point():
            if key not in kept:
                kept[key] = tensor.clone()
            continue
        accumulate_dtype = (torch.float64
                            if tensor.dtype == torch.float64 else torch.float32)
        total = running_sum.get(key)
        if total is None:
            # A fresh tensor: never aliases the loaded ingredient.
            running_sum[key] = torch.mul(tensor.to(accumulate_dtype), weight)
        else:
            total.add_(tensor.to(total.device, accumulate_dtype), alpha=weight)


@torch.no_grad()
def mix_state_dicts(ingredients: Sequence[Ingredient],
                    weights: Sequence[float],
                    names: Optional[Sequence[str]] = None
                    ) -> Dict[str, torch.Tensor]:
    """Weighted average of state dicts, loading one ingredient at a time.

    Streaming: a running sum holds the floating tensors and each ingredient is
    released before the next one is loaded, so peak memory is about the
    accumulator plus one ingredient (≈ 2 models in fp32), not N models. Pass
    loader callables to benefit; already-loaded mappings work too.

    Rules:

    * Tensors are paired by key **name**. Every ingredient must have the same
      keys, shapes and dtypes as ingredient 0; this is checked as each one is
      loaded, and a :class:`SoupError` names the first mismatch before any
      result is returned.
    * Floating tensors (weights, biases, BatchNorm running mean/var) are
      accumulated in float32 (float64 for float64 tensors) in ingredient
      order, then cast back to their dtype, so fp16/bf16 checkpoints do not
      lose precision while summing, and the result is deterministic.
    * Non-floating tensors (BatchNorm ``num_batches_tracked``, integer index
      tables, boolean masks) are copied from the **first ingredient with a
      non-zero weight**. Averaging a counter or an index table has no meaning
      (the original soup averaged ``num_batches_tracked``, which is harmless
      but turns the count into a float); index tables are identical across
      checkpoints of one architecture anyway, and ``num_batches_tracked`` only
      matters for BatchNorm with ``momentum=None``, which none of our models
      use. Taking it from a contributing ingredient keeps the rule "a zero
      weight contributes nothing".
    * An ingredient with weight 0 is still loaded and checked for
      compatibility, but adds nothing (not even ``0 * NaN``).

    Args:
        ingredients: State dicts or zero-argument callables returning one
            (e.g. ``functools.partial(torch.load, path, weights_only=True,
            mmap=True)``).
        weights: One weight per ingredient; normalised with
            :func:`normalize_weights`.
        names: Optional display names for error messages.

    Returns:
        A new state dict in ingredient 0's key order, on the device of the
        first contributing ingredient.
    """
    if not ingredients:
        raise SoupError('no ingredients given')
    weights = normalize_weights(weights, len(ingredients))
    reference: Optional[Dict[str, TensorSpec]] = None
    running_sum: Dict[str, torch.Tensor] = {}
    kept: Dict[str, torch.Tensor] = {}  # non-floating entries
    for index, (ingredient, weight) in enumerate(zip(ingredients, weights)):
        state_dict = _materialise(ingredient, index, names)
        spec = state_dict_spec(state_dict, _label(index, names))
        if reference is None:
            reference = spec
        else:
            _raise_if_incompatible(reference, spec, index, names)
        if weight > 0:
            _accumulate(state_dict, weight, running_sum, kept)
        # Drop our reference before loading the next ingredient; otherwise two
        # ingredients are alive at once and the peak grows by one model.
        del state_dict

    mixed: Dict[str, torch.Tensor] = {}
    for key, spec in reference.items():
        if key in kept:
            mixed[key] = kept.pop(key)
        else:
            # pop: free each fp32 sum as soon as it has been cast back.
            total = running_sum.pop(key)
            mixed[key] = total.to(getattr(torch, spec.dtype))
    return mixed


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
