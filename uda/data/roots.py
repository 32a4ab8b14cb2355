"""Dataset roots: which one is the project's embedded data (made ready here) and which is a user's (only read).

The rule, for every entry point:

- The synthetic generator writes only into the project's own embedded-data
  folder, :data:`~uda.data.paths.EMBEDDED_ROOT` (``<project>/data/embedded``),
  a path fixed by the project and never derived from a root a user passes.
- Each root is classified on its own. A root that *is* one of the two
  embedded roots (``data/embedded/cityscapes`` as source,
  ``data/embedded/acdc`` as target) is made ready by generating the embedded
  data there; any other root is a user's dataset and is only ever read:
  nothing is created, moved or removed in it (rare-class statistics that
  are not already there go to the cache, see :func:`~uda.data.paths.stats_dir`).
- ``data/embedded`` is reserved for generated data: a root inside it that
  is not exactly the matching embedded root, or an embedded folder that is
  a symbolic link, is refused before any work.
- Mixing is supported: a real Cityscapes with the embedded ACDC (or the
  reverse) trains on both without touching the real one, and warns that one
  side is synthetic, so it is never a silent default.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .layouts import ACDC_LAYOUT, CITYSCAPES_LAYOUT, DatasetLayoutError
from .paths import EMBEDDED_ROOT
from .synthetic import EmbeddedDataset, ensure_embedded

__all__ = ["DataRoot", "RootError", "classify_root", "prepare_roots"]

PathLike = os.PathLike | str
log = logging.getLogger(__name__)

#: Which dataset each side reads, by the folder name of its embedded root.
SIDES = {"source": "cityscapes", "target": "acdc"}
_PRETTY = {"cityscapes": "Cityscapes", "acdc": "ACDC"}
_LAYOUTS = {"cityscapes": CITYSCAPES_LAYOUT, "acdc": ACDC_LAYOUT}


class RootError(DatasetLayoutError):
    """A dataset root that cannot be used as given (missing, reserved, a link)."""


@dataclass(frozen=True)
class DataRoot:
    """One dataset root after classification.

    Attributes:
        path: The root, absolute with symbolic links resolved.
        dataset: ``'cityscapes'`` or ``'acdc'``: what the root should hold.
        embedded: Whether it is the project's embedded copy of that dataset
            (generated on demand); otherwise it is a user's, read only.
    """

    path: Path
    dataset: str
    embedded: bool

    @property
    def kind(self) -> str:
        """``'embedded'`` or ``'real'``, as runs tag it (``data.<dataset>``)."""
        return "embedded" if self.embedded else "real"


def _resolve(root: PathLike, what: str) -> Path:
    try:
        return Path(root).expanduser().resolve()
    except (OSError, RuntimeError) as err:  # e.g. a symbolic-link loop
        raise RootError(f"The {what} {root} cannot be read: {err}.") from None


def classify_root(root: PathLike, dataset: str) -> DataRoot:
    """Classifies one root: embedded iff it is ``EMBEDDED_ROOT/<dataset>``.

    Args:
        root: A dataset root as given (relative paths are relative to the
            working directory, as MLflow resolves ``path`` parameters).
        dataset: ``'cityscapes'`` (source) or ``'acdc'`` (target).

    Returns:
        The :class:`DataRoot`. Only classifies; :func:`prepare_roots` checks.
    """
    path = _resolve(root, f"{_PRETTY[dataset]} root")
    embedded = EMBEDDED_ROOT / dataset
    if _linked(embedded) is not None:
        # A link in data/embedded is never the embedded data: the default
        # path is refused by prepare_roots, the linked folder is a user's.
        return DataRoot(path, dataset, False)
    return DataRoot(path, dataset, path == _resolve(embedded, "embedded folder"))


def _lexical(root: PathLike) -> Path:
    return Path(os.path.abspath(Path(root).expanduser()))


def _linked(path: Path) -> Path | None:
    """The first of ``path`` and its parents up to the project that is a symlink."""
    stop = EMBEDDED_ROOT.parent.parent
    for candidate in (path, *path.parents):
        if candidate == stop:
            return None
        if candidate.is_symlink():
            return candidate
    return None


def _check(side: str, given: PathLike, root: DataRoot) -> None:
    name = _PRETTY[root.dataset]
    reserved = _resolve(EMBEDDED_ROOT, "embedded folder")
    embedded = EMBEDDED_ROOT / root.dataset
    link = _linked(embedded)
    lexical = _lexical(given)
    if link is not None and (lexical == EMBEDDED_ROOT or EMBEDDED_ROOT in lexical.parents):
        raise RootError(
            f"{link} is a symbolic link (to {link.resolve()}). data/embedded is reserved for "
            f"the generated data; remove the link, and pass your data as -P {side}_root=PATH."
        )
    if not root.embedded and (root.path == reserved or reserved in root.path.parents):
        raise RootError(
            f"The {side} root {given} is inside {EMBEDDED_ROOT}, which is reserved for the "
            f"generated data (the {side} root there is {embedded}). Keep your own data "
            f"elsewhere and pass it as -P {side}_root=PATH."
        )
    if not root.embedded and not root.path.is_dir():
        what = "is a file, not a folder" if root.path.exists() else "does not exist"
        raise RootError(
            f"{name} root {what}. Pass the folder that holds your {name} data as "
            f"-P {side}_root=PATH, or leave {side}_root at its default to use the embedded "
            f"data ({embedded}).\nDataset root: {given}\nExpected layout:\n"
            f"{_LAYOUTS[root.dataset]}"
        )


def prepare_roots(
    source_root: PathLike | None = None, target_root: PathLike | None = None, progress: bool = True
) -> EmbeddedDataset | None:
    """Makes the given roots ready to read, writing only the embedded folder.

    An embedded root gets the embedded data generated (or reused) in
    ``EMBEDDED_ROOT``; a real root is checked and never written. Call it
    before any work, so that a bad root fails first.

    Args:
        source_root: Cityscapes root, or None when the step reads no source.
        target_root: ACDC root, or None when the step reads no target.
        progress: Progress lines while the embedded data is generated.

    Returns:
        The embedded dataset if either root uses it, else None.

    Raises:
        RootError: a real root is missing or not a folder, lies inside the
            reserved ``data/embedded``, or an embedded folder is a link.
    """
    roots: dict[str, DataRoot] = {}
    for side, given in (("source", source_root), ("target", target_root)):
        if given is not None:
            roots[side] = classify_root(given, SIDES[side])
            _check(side, given, roots[side])
    kinds = {root.kind for root in roots.values()}
    if kinds == {"embedded", "real"}:
        real = next(r for r in roots.values() if not r.embedded)
        synthetic_side = next(s for s, r in roots.items() if r.embedded)
        log.warning(
            "Mixing data: %s is your %s, but the %s is the embedded synthetic %s. Pass "
            "-P %s_root=<your %s> to train on real data only (%s is only read).",
            real.path,
            _PRETTY[real.dataset],
            synthetic_side,
            _PRETTY[SIDES[synthetic_side]],
            synthetic_side,
            _PRETTY[SIDES[synthetic_side]],
            real.path,
        )
    if "embedded" in kinds:
        return ensure_embedded(EMBEDDED_ROOT, progress=progress)
    return None
