"""The folders the project itself owns: the embedded-data folder, its generator marker, the cache.

Everything else on disk, a user's dataset root above all, is only read.
This module has no dependencies inside the project, so that every module
that writes (the generator, the rare-class statistics, root preparation)
asks the same owner where it may.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["PROJECT_DIR", "EMBEDDED_ROOT", "GENERATED_MARKER", "is_marked", "cache_dir", "stats_dir"]

_PACKAGE_PARENT = Path(__file__).resolve().parents[2]
#: The project folder (holding ``MLproject``), or None for an install without
#: it (a wheel in site-packages), where the embedded data goes to the cache.
PROJECT_DIR: Path | None = _PACKAGE_PARENT if (_PACKAGE_PARENT / "MLproject").is_file() else None

#: Written into every dataset folder the generator creates; a folder without
#: it is never replaced or removed.
GENERATED_MARKER = ".cs2acdc-synthetic.json"


def cache_dir() -> Path:
    """The project's cache: ``$UDA_CACHE_DIR``, else ``$XDG_CACHE_HOME/cs2acdc-uda``
    (``~/.cache/cs2acdc-uda``); ``tools/install.sh`` keeps its wheels there too."""
    env = os.environ.get("UDA_CACHE_DIR")
    if env:
        return Path(env).expanduser().absolute()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser().absolute() / "cs2acdc-uda"


#: The only folder whose dataset sub-folders the project ever writes:
#: ``<project>/data/embedded``, fixed by where the project lives and never
#: derived from the working directory or from a root a user passes.
EMBEDDED_ROOT: Path = (
    PROJECT_DIR / "data" / "embedded" if PROJECT_DIR is not None else cache_dir() / "embedded"
)


def is_marked(folder: os.PathLike | str) -> bool:
    """Whether ``folder`` carries the generator's marker (it wrote the folder)."""
    return (Path(folder) / GENERATED_MARKER).is_file()


def stats_dir(root: os.PathLike | str) -> Path:
    """Where statistics computed from the dataset ``root`` may be written.

    A folder the generator wrote keeps them next to its data, as MIC does;
    any other root is only read, so its statistics go to
    ``cache_dir()/rcs/<folder name>-<hash of its absolute path>``.
    """
    path = Path(root).expanduser().absolute()
    try:
        path = path.resolve()  # one cache per folder, however it is reached
    except (OSError, RuntimeError):  # a symlink loop: prepare_roots reports it
        pass
    if is_marked(path):
        return path
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    return cache_dir() / "rcs" / f"{path.name or 'root'}-{digest}"
