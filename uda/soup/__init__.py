"""Model soups: weighted averages of registered checkpoints of one architecture.

* :mod:`uda.soup.mixing` — weights, architecture check, streaming mix (torch
  only);
* :mod:`uda.soup.greedy` — greedy soup;
* :mod:`uda.soup.search` — the Optuna weight search (its samplers
  :mod:`uda.soup.samplers`, its storage and name :mod:`uda.soup.study`);
* :mod:`uda.soup.report` — the comparison table, the study's plots, the
  summary;
* :mod:`uda.soup.scoring` — fast evaluation of many mixes on a fixed split;
* the ``soup`` entry point: :mod:`uda.soup.request` (parameters),
  :mod:`uda.soup.ingredients` (registered versions, their checkpoints),
  :mod:`uda.soup.session` (one run's scorer and scores),
  :mod:`uda.soup.tuning` (choosing the weights), :mod:`uda.soup.promotion`
  (moving ``serving``) and :mod:`uda.soup.step` (the order of it all).

Importing ``uda.soup`` loads only mixing, the searches and the report
helpers (no MLflow, no data code).
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
from .greedy import GreedyResult, GreedyStep, greedy_soup
from .report import save_study_plots
from .search import SearchResult, optuna_search, weights_from_unit_cube

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
