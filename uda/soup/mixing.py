"""Mixing checkpoints: weights, architecture check, streaming average.

A soup (Wortsman et al., "Model soups", ICML 2022) averages the weights of
several fine-tuned models. The original cs2acdc recipe mixed the 24k/32k/40k
distill checkpoints 3:3:4. This module is pure torch (no MLflow):

* :func:`parse_weights` / :func:`normalize_weights` — ``"3,3,4"`` →
  ``[0.3, 0.3, 0.4]`` with clear errors for bad input (and
  :func:`format_weights` back);
* :func:`check_compatible` / :func:`state_dict_spec` — same keys, shapes and
  dtypes, or an error naming the first mismatch;
* :func:`mix_state_dicts` — streaming weighted average (peak memory ≈ two
  models, whatever the number of ingredients).

Differences from the original soup script, on purpose (see DESIGN.md):
tensors are paired by key *name*, not by position, and integer buffers
(BatchNorm ``num_batches_tracked``, index tables) are copied from one
ingredient instead of being averaged.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple
from collections.abc import Callable, Mapping, Sequence

import torch

from uda.errors import UserError

__all__ = [
    "SoupError",
    "TensorSpec",
    "StateDict",
    "Ingredient",
    "parse_weights",
    "normalize_weights",
    "uniform_weights",
    "format_weights",
    "state_dict_spec",
    "check_compatible",
    "mix_state_dicts",
]

StateDict = Mapping[str, torch.Tensor]
#: An ingredient: a state dict, or a zero-argument callable returning one
#: (e.g. ``lambda: torch.load(path, weights_only=True, mmap=True)``), so that
#: :func:`mix_state_dicts` can load ingredients one at a time.
Ingredient = StateDict | Callable[[], StateDict]


class SoupError(UserError, ValueError):
    """Invalid soup input: weights, incompatible ingredients, search settings."""


# --------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------
def normalize_weights(weights: Sequence[float], num_ingredients: int | None = None) -> list[float]:
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
            raise SoupError(f"weight {position} ({value!r}) is not a number") from None
        if not math.isfinite(value):
            raise SoupError(f"weight {position} is {value}; weights must be finite numbers")
        if value < 0:
            raise SoupError(f"weight {position} is negative ({value:g}); weights must be >= 0")
        values[position - 1] = value
    if num_ingredients is not None and len(values) != num_ingredients:
        raise SoupError(
            f"got {len(values)} weight(s) for {num_ingredients} "
            f"ingredient(s); give exactly one weight per ingredient"
        )
    if not values:
        raise SoupError("no weights given")
    total = math.fsum(values)
    if total <= 0:
        raise SoupError("all weights are zero; at least one weight must be positive")
    return [value / total for value in values]


def parse_weights(text: str, num_ingredients: int) -> list[float]:
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
        raise SoupError(f'weights must be a string like "3,3,4", got {type(text).__name__}')
    if not text.strip():
        raise SoupError(
            f"no weights given; pass one weight per ingredient "
            f"({num_ingredients}), e.g. "
            f'"{",".join(["1"] * max(num_ingredients, 1))}"'
        )
    values = []
    for position, item in enumerate(text.split(","), start=1):
        item = item.strip()
        if not item:
            raise SoupError(
                f'weight {position} is empty in {text!r}; use comma-separated numbers like "3,3,4"'
            )
        try:
            value = float(item)
        except ValueError:
            raise SoupError(
                f"weight {position} ({item!r}) in {text!r} is not "
                "a number; use comma-separated numbers like "
                '"3,3,4"'
            ) from None
        if not math.isfinite(value):
            raise SoupError(f"weight {position} ({item!r}) in {text!r} is not a finite number")
        values.append(value)
    return normalize_weights(values, num_ingredients)


def uniform_weights(n: int) -> list[float]:
    """``n`` equal weights summing to 1 (the uniform soup)."""
    if n < 1:
        raise SoupError(f"need at least one ingredient, got {n}")
    return [1.0 / n] * n


def format_weights(weights: Sequence[float]) -> str:
    """Weights as tags, params and printouts show them: ``0.3,0.3,0.4`` (6 significant digits)."""
    return ",".join(f"{w:.6g}" for w in weights)


# --------------------------------------------------------------------------
# Compatibility
# --------------------------------------------------------------------------
class TensorSpec(NamedTuple):
    """Shape and dtype of one state-dict entry (dtype as ``'float32'``)."""

    shape: tuple[int, ...]
    dtype: str


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).replace("torch.", "")


def _as_spec(value: Any, key: str, label: str) -> TensorSpec:
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(value.shape), _dtype_name(value.dtype))
    if isinstance(value, (tuple, list)) and len(value) == 2:
        shape, dtype = value
        return TensorSpec(tuple(int(s) for s in shape), _dtype_name(dtype))
    raise SoupError(
        f"{label}: entry {key!r} is a {type(value).__name__}, not a tensor; "
        'pass the model state dict (e.g. checkpoint["state_dict"]) or a '
        "spec from state_dict_spec()"
    )


def state_dict_spec(state_dict: Mapping[str, Any], label: str = "ingredient") -> dict[str, TensorSpec]:
    """Key → (shape, dtype) of a state dict, in its key order.

    JSON-friendly (``{key: [list(shape), dtype]}`` round-trips through
    :func:`check_compatible`), so it can be stored with a registered model
    and checked before any weights are downloaded.

    Args:
        state_dict: Tensors, or already (shape, dtype) pairs.
        label: How to name this state dict in error messages.
    """
    if not isinstance(state_dict, Mapping):
        raise SoupError(
            f"{label} is a {type(state_dict).__name__}, not a state dict (a mapping of names to tensors)"
        )
    return {key: _as_spec(value, key, label) for key, value in state_dict.items()}


def _label(index: int, names: Sequence[str] | None) -> str:
    if names is not None and index < len(names):
        return f"ingredient {index} ({names[index]})"
    return f"ingredient {index}"


def _fmt(spec: TensorSpec) -> str:
    return f"shape {tuple(spec.shape)} {spec.dtype}"


def _mismatches(
    reference: dict[str, TensorSpec], candidate: dict[str, TensorSpec], ref_label: str
) -> list[str]:
    """Every difference, in a fixed order: reference keys first, then extras."""
    problems = []
    for key, ref in reference.items():
        got = candidate.get(key)
        if got is None:
            problems.append(f"key {key!r} ({_fmt(ref)} in {ref_label}) is missing")
        elif tuple(got.shape) != tuple(ref.shape):
            problems.append(
                f"key {key!r} has shape {tuple(got.shape)}, but {tuple(ref.shape)} in {ref_label}"
            )
        elif got.dtype != ref.dtype:
            problems.append(f"key {key!r} has dtype {got.dtype}, but {ref.dtype} in {ref_label}")
    for key, got in candidate.items():
        if key not in reference:
            problems.append(f"key {key!r} ({_fmt(got)}) is not in {ref_label}")
    return problems


def _raise_if_incompatible(
    reference: dict[str, TensorSpec],
    candidate: dict[str, TensorSpec],
    index: int,
    names: Sequence[str] | None,
) -> None:
    problems = _mismatches(reference, candidate, "ingredient 0")
    if problems:
        more = f" (and {len(problems) - 1} more difference(s))" if len(problems) > 1 else ""
        raise SoupError(
            f"{_label(index, names)} does not match {_label(0, names)}: "
            f"{problems[0]}{more}. All ingredients must be checkpoints of the "
            "same architecture."
        )


def _materialise(ingredient: Ingredient, index: int, names: Sequence[str] | None) -> Mapping[str, Any]:
    state_dict = ingredient() if callable(ingredient) else ingredient
    if not isinstance(state_dict, Mapping):
        raise SoupError(
            f"{_label(index, names)} is a {type(state_dict).__name__}, not a "
            "state dict (a mapping of names to tensors)"
        )
    return state_dict


def check_compatible(
    ingredients: Sequence[Ingredient | Mapping[str, Any]], names: Sequence[str] | None = None
) -> dict[str, TensorSpec]:
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
        raise SoupError("no ingredients given")
    reference: dict[str, TensorSpec] | None = None
    for index, ingredient in enumerate(ingredients):
        spec = state_dict_spec(_materialise(ingredient, index, names), _label(index, names))
        if reference is None:
            reference = spec
        else:
            _raise_if_incompatible(reference, spec, index, names)
    return reference


# --------------------------------------------------------------------------
# Mixing
# --------------------------------------------------------------------------
def _accumulate(
    state_dict: Mapping[str, torch.Tensor],
    weight: float,
    running_sum: dict[str, torch.Tensor],
    kept: dict[str, torch.Tensor],
) -> None:
    """Adds ``weight * state_dict`` to the running sums (a function, so that no
    local variable keeps a tensor of the ingredient alive afterwards)."""
    for key, tensor in state_dict.items():
        tensor = tensor.detach()
        if not tensor.is_floating_point():
            if key not in kept:
                kept[key] = tensor.clone()
            continue
        accumulate_dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
        total = running_sum.get(key)
        if total is None:
            # A fresh tensor: never aliases the loaded ingredient.
            running_sum[key] = torch.mul(tensor.to(accumulate_dtype), weight)
        else:
            total.add_(tensor.to(total.device, accumulate_dtype), alpha=weight)


@torch.no_grad()
def mix_state_dicts(
    ingredients: Sequence[Ingredient], weights: Sequence[float], names: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
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
        raise SoupError("no ingredients given")
    weights = normalize_weights(weights, len(ingredients))
    reference: dict[str, TensorSpec] | None = None
    running_sum: dict[str, torch.Tensor] = {}
    kept: dict[str, torch.Tensor] = {}  # non-floating entries
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

    mixed: dict[str, torch.Tensor] = {}
    for key, spec in reference.items():
        if key in kept:
            mixed[key] = kept.pop(key)
        else:
            # pop: free each fp32 sum as soon as it has been cast back.
            total = running_sum.pop(key)
            mixed[key] = total.to(getattr(torch, spec.dtype))
    return mixed
