"""Dataset roots: the project's embedded data, which it may write, and a user's, which it only reads.

The rule this module owns, for every entry point:

- The synthetic generator writes only into the project's own embedded-data
  folder, :data:`EMBEDDED_ROOT` (``<project>/data/embedded``), a path fixed by
  the project and never derived from a root that a user passes.
- Each root is classified on its own. A root that *is* one of the two
  embedded roots (``data/embedded/cityscapes``, ``data/embedded/acdc``) is
  made ready by generating the embedded data there; any other root is a
  user's dataset and is only ever read: nothing is created, moved or
  removed in it (rare-class statistics that are not already there are
  cached in :func:`cache_dir`, not next to the data).
- Mixing is supported: a real Cityscapes with the embedded ACDC (or the
  reverse) trains on both without touching the real one, with a warning
  that one side is synthetic, so it is never a silent default.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

from .layouts import DatasetLayoutError
from .synthetic import DEFAULT_EMBEDDED_ROOT, EmbeddedDataset, ensure_embedded

__all__ = ['EMBEDDED_ROOT', 'DataRoot', 'classify_root', 'is_embedded_root',
           'prepare_roots', 'cache_dir', 'stats_dir']

PathLike = os.PathLike | str
log = logging.getLogger(__name__)

#: The only folder whose dataset sub-folders the project ever writes.
EMBEDDED_ROOT: Path = DEFAULT_EMBEDDED_ROOT
_DATASETS = {'source': 'cityscapes', 'target': 'acdc'}
_PRETTY = {'cityscapes': 'Cityscapes', 'acdc': 'ACDC'}


@dataclass(frozen=True)
class DataRoot:
    """One dataset root after classification.

    Attributes:
        path: The root, absolute.
        dataset: ``'cityscapes'`` or ``'acdc'``: what the root should hold.
        embedded: Whether it is the project's embedded copy of that dataset
            (generated on demand); otherwise it is a user's, read only.
    """
    path: Path
    dataset: str
    embedded: bool

    @property
    def kind(self) -> str:
        return 'embedded' if self.embedded else 'real'


def classify_root(root: PathLike, dataset: str) -> DataRoot:
    """Classifies one root: embedded iff it is ``EMBEDDED_ROOT/<dataset>``.

    Args:
        root: A dataset root as the user gave it (relative to the working
            directory, as MLflow resolves ``path`` parameters).
        dataset: ``'cityscapes'`` (source) or ``'acdc'`` (target).
    """
    path = Path(root).expanduser().resolve()
    return DataRoot(path, dataset, path == (EMBEDDED_ROOT / dataset).resolve())


def is_embedded_root(root: PathLike) -> bool:
    """Whether ``root`` is one of the embedded dataset's two roots."""
    path = Path(root).expanduser().resolve()
    return any(path == (EMBEDDED_ROOT / name).resolve() for name in _DATASETS.values())


def prepare_roots(source_root: Optional[PathLike] = None,
                  target_root: Optional[PathLike] = None,
                  progress: bool = True) -> Optional[EmbeddedDataset]:
    """Makes the given roots ready to read, writing only the embedded folder.

    An embedded root gets the embedded data generated (or reused) in
    :data:`EMBEDDED_ROOT`; a real root is checked to exist and is never
    written. Call it before any work, so a missing root fails first.

    Args:
        source_root: Cityscapes root, or None when the step reads no source.
        target_root: ACDC root, or None when the step reads no target.
        progress: Progress lines while the embedded data is generated.

    Returns:
        The embedded dataset if either root uses it, else None.

    Raises:
        DatasetLayoutError: if a real root does not exist or is not a folder.
    """
    roots: Dict[str, DataRoot] = {}
    for side, root in (('source', source_root), ('target', target_root)):
        if root is not None:
            roots[side] = classify_root(root, _DATASETS[side])
    for side, root in roots.items():
        if not root.embedded and not root.path.is_dir():
            raise DatasetLayoutError(
                f'The {side} root {root.path} ({_PRETTY[root.dataset]}) '
                f'{"is not a folder" if root.path.exists() else "does not exist"}. '
                f'Pass the folder that holds your {_PRETTY[root.dataset]} data, or '
                f'leave {side}_root at its default to use the embedded data '
                f'({EMBEDDED_ROOT / root.dataset}).')
    kinds = {root.kind for root in roots.values()}
    if kinds == {'embedded', 'real'}:
        real = next(r for r in roots.values() if not r.embedded)
        synthetic = next(r for r in roots.values() if r.embedded)
        log.warning(
            'Mixing data: %s is your %s, but %s is the embedded synthetic %s. '
            'Pass %s_root to use real %s on both sides; %s is only read.',
            real.path, _PRETTY[real.dataset], synthetic.path, _PRETTY[synthetic.dataset],
            'target' if synthetic.dataset == 'acdc' else 'source',
            'Cityscapes and ACDC', real.path)
    if 'embedded' in kinds:
        return ensure_embedded(EMBEDDED_ROOT, progress=progress)
    return None


def cache_dir() -> Path:
    """The project's cache: ``$UDA_CACHE_DIR``, else ``$XDG_CACHE_HOME/cs2acdc-uda``
    (``~/.cache/cs2acdc-uda``), the folder ``tools/install.sh`` also uses."""
    env = os.environ.get('UDA_CACHE_DIR')
    if env:
        return Path(env).expanduser()
    base = os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache'
    return Path(base) / 'cs2acdc-uda'


def stats_dir(root: PathLike, dataset: str = 'cityscapes') -> Path:
    """Where statistics computed from ``root`` may be written.

    The embedded root keeps them next to its data, as MIC does; a user's root
    is only read, so its statistics go to ``cache_dir()/rcs/<name>-<hash of
    the absolute path>`` (existing MIC files in the root are still reused).
    """
    data_root = classify_root(root, dataset)
    if data_root.embedded:
        return data_root.path
    digest = hashlib.sha256(str(data_root.path).encode()).hexdigest()[:16]
    return cache_dir() / 'rcs' / f'{data_root.path.name or "root"}-{digest}'
