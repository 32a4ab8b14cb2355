"""Model soups: weighted averages of registered checkpoints of one architecture.

* :mod:`uda.soup.mixing` — weights, architecture check, streaming mix (torch
  only);
* :mod:`uda.soup.search` — greedy soup and the Optuna weight search;
* :mod:`uda.soup.scoring` — fast evaluation of many mixes on a fixed split;
* :mod:`uda.soup.step` — the ``soup`` entry point: resolve aliases in the
  registry, mix, evaluate, register, move ``serving``.

Importing ``uda.soup`` loads only the first two (no MLflow, no data code).
"""

from .mixing import (
    Ingredient,
    SoupError,
    StateDict,
    TensorSpec,
    check_compatible,
    mix_state_dicts,
    normalize_weights,
    parse_weights,
    state_dict_spec,
    uniform_weights,
)
from .search import (
    GreedyResult,
    GreedyStep,
    SearchResult,
    greedy_soup,
    optuna_search,
    save_study_plots,
    weights_from_unit_cube,
)

__all__ = [
    "SoupError",
    "TensorSpec",
    "StateDict",
    "Ingredient",
    "parse_weights",
    "normalize_weights",
    "uniform_weights",
    "state_dict_spec",
    "check_compatible",
    "mix_state_dicts",
    "GreedyStep",
    "GreedyResult",
    "greedy_soup",
    "SearchResult",
    "optuna_search",
    "weights_from_unit_cube",
    "save_study_plots",
]
