"""The soup's ingredients: which registered versions they are, and their checkpoints read from the registry.

:func:`resolve_ingredients` names them (``-P aliases``, else the preset's
``soup.aliases``, else the last three checkpoints of the newest run);
:func:`last_checkpoints` is the one rule for "the last three checkpoints of
a run", also used by ``main`` (:mod:`uda.workflow`) to hand the distill run's
checkpoints to the soup step. :func:`download_ingredients` fetches only
their checkpoint files and reads them lazily, memory-mapped, so the streaming
mix holds about one model at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .mixing import SoupError
from .request import SoupRequest

__all__ = [
    "NUM_DEFAULT_INGREDIENTS",
    "IngredientRef",
    "last_checkpoints",
    "resolve_ingredients",
    "Checkpoints",
    "download_ingredients",
]

#: How many checkpoints make the default soup: the last three of a run.
NUM_DEFAULT_INGREDIENTS = 3


@dataclass(frozen=True)
class IngredientRef:
    """One registered version used as an ingredient.

    Attributes:
        label: How it is named in metrics and tags: its alias (``iter-40``),
            or ``v<version>`` when no alias names it.
        version: Registered version number.
        run_id: Source run (tag ``run_id``).
        iteration: Training iteration (tag ``iteration``), if any.
        model_id: The MLflow 3 logged model behind the version.
    """

    label: str
    version: str
    run_id: str | None = None
    iteration: int | None = None
    model_id: str | None = None

    def uri(self, model_name: str) -> str:
        return f"models:/{model_name}/{self.version}"


def _registered_model(name: str):
    """The registered model, or a RegistryError listing what exists."""
    from uda.registry import get_registered_model

    return get_registered_model(
        name, "Run the distill step first (it registers its checkpoints) or pass -P model_name."
    )


def last_checkpoints(versions: Iterable[Any], count: int = NUM_DEFAULT_INGREDIENTS) -> list[Any]:
    """The ``count`` versions of highest training iteration, highest last.

    Args:
        versions: Registered versions of one run (``ModelVersion``).
        count: How many to keep.

    Returns:
        Those versions, sorted by (iteration, version number); versions
        without an ``iteration`` tag are left out.
    """
    from uda.registry import iteration_of

    with_iteration = [v for v in versions if iteration_of(v) is not None]
    with_iteration.sort(key=lambda v: (iteration_of(v), int(v.version)))
    return with_iteration[-count:]


def _latest_run_checkpoints(name: str, aliases: Mapping[str, str]) -> list[IngredientRef]:
    """The last three checkpoints of the newest run that registered any."""
    from uda.registry import (
        find_versions,
        iteration_alias,
        iteration_of,
        source_run_id,
        version_model_id,
    )

    checkpoints = find_versions(name, "tags.kind = 'checkpoint'")
    if not checkpoints:
        raise SoupError(
            f"{name!r} has no checkpoint versions (tag kind=checkpoint) to "
            f"make a soup of; run distill first or pass -P aliases=..."
        )
    run_id = source_run_id(checkpoints[-1])
    # The checkpoints are already here: pick the run's without asking the store again.
    chosen = last_checkpoints(v for v in checkpoints if source_run_id(v) == run_id)
    by_version = {str(v): a for a, v in sorted(aliases.items())}
    refs = []
    for v in chosen:
        wanted = iteration_alias(iteration_of(v))
        label = (
            wanted
            if str(aliases.get(wanted)) == str(v.version)
            else by_version.get(str(v.version), f"v{v.version}")
        )
        refs.append(IngredientRef(label, str(v.version), run_id, iteration_of(v), version_model_id(v)))
    if len(refs) < 2:
        raise SoupError(
            f"the latest run that registered checkpoints of {name!r} "
            f"({run_id}) has {len(refs)} checkpoint(s); a soup needs at "
            "least 2. Pass -P aliases=... to choose them."
        )
    return refs


def resolve_ingredients(request: SoupRequest) -> tuple[list[IngredientRef], str]:
    """The ingredient versions and where their names came from.

    ``-P aliases`` if given (each must exist); else the preset's
    ``soup.aliases`` if they all exist; else the last three checkpoints
    (highest iterations) of the newest run that registered checkpoints of
    the model, whatever the preset.

    Args:
        request: From :func:`~uda.soup.request.make_request`.

    Returns:
        ``(ingredients, source)`` with ``source`` one of ``'parameter'``,
        ``'preset'``, ``'latest-run'``.

    Raises:
        RegistryError: unknown model or alias (lists the existing aliases).
        SoupError: no usable checkpoints.
    """
    from uda.registry import iteration_of, resolve_alias, source_run_id, version_model_id

    registered = _registered_model(request.model_name)
    aliases = {a: str(v) for a, v in (registered.aliases or {}).items()}
    if request.aliases is not None:
        names, source = list(request.aliases), "parameter"
    elif request.preset_aliases and all(a in aliases for a in request.preset_aliases):
        names, source = list(request.preset_aliases), "preset"
    else:
        return _latest_run_checkpoints(request.model_name, aliases), "latest-run"
    refs = []
    for alias in names:
        version = resolve_alias(request.model_name, alias)
        refs.append(
            IngredientRef(
                alias,
                str(version.version),
                source_run_id(version),
                iteration_of(version),
                version_model_id(version),
            )
        )
    return refs, source


def _read_checkpoint(path: Path) -> Mapping[str, Any]:
    """Memory-mapped read (tensors stay in the page cache, so loading an
    ingredient again for the next trial costs little and the process holds
    about one model at a time); clear errors for damaged files."""
    from uda.models import FORMAT_TAG, read_checkpoint

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # let the careful reader give its clear message
        obj = read_checkpoint(path)
    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT_TAG:
        raise SoupError(f"{path} is not a {FORMAT_TAG} checkpoint")
    return obj


def _state_dict_loader(path: Path) -> Callable[[], Mapping[str, torch.Tensor]]:
    return lambda: _read_checkpoint(path)["state_dict"]


@dataclass(frozen=True)
class Checkpoints:
    """The ingredients' checkpoints on disk, in the ingredients' order.

    Attributes:
        paths: The downloaded checkpoint files.
        loaders: One state-dict loader per file (read again at each call).
        names: How messages name each ingredient (``models:/NAME@ALIAS (version V)``).
    """

    paths: list[Path]
    loaders: list[Callable[[], Mapping[str, torch.Tensor]]]
    names: list[str]


def download_ingredients(model_name: str, ingredients: Sequence[IngredientRef], folder: Path) -> Checkpoints:
    """Downloads the checkpoint file of every ingredient into ``folder/v<version>``.

    Args:
        model_name: The registered model holding the ingredients.
        ingredients: From :func:`resolve_ingredients`.
        folder: Where the files go.

    Raises:
        RegistryError: a version that is not a cs2acdc-uda segmentor, or not fully logged.
    """
    from uda.registry import download_checkpoint

    paths = [download_checkpoint(model_name, i.version, folder / f"v{i.version}") for i in ingredients]
    return Checkpoints(
        paths=paths,
        loaders=[_state_dict_loader(p) for p in paths],
        names=[f"models:/{model_name}@{i.label} (version {i.version})" for i in ingredients],
    )
