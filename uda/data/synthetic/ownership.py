"""Which folders the generator wrote, so that it only ever replaces or removes
those: the marker (:data:`~uda.data.paths.GENERATED_MARKER`) or an unmarked
copy of an earlier release in the project's own ``data/embedded``; the check
before any write, and the safe ``--clean``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ...errors import UserError
from ..layouts import ACDC_IMG_SUFFIX, ACDC_SEG_SUFFIX, CITYSCAPES_IMG_SUFFIX, CITYSCAPES_SEG_SUFFIX
from ..paths import EMBEDDED_ROOT, GENERATED_MARKER, is_marked
from ..rcs import SAMPLES_WITH_CLASS_FILE, STATS_DICT_FILE, STATS_FILE
from .stamp import STAMP_FILE, exclusive, read_stamp

#: Tracked placeholder files of the empty embedded folders (kept on regeneration).
PLACEHOLDERS = frozenset({"README.md"})


class NotGeneratedError(UserError):
    """A folder the generator would replace holds data it did not write."""


def is_generated(folder: os.PathLike) -> bool:
    """Whether ``folder`` was written by this generator: it carries the marker,
    or it is an unmarked copy from an earlier release in the project's own
    ``data/embedded`` (next to that release's stamp, holding only file names
    that the generator writes)."""
    folder = Path(folder)
    if is_marked(folder):
        return True
    return _is_legacy_copy(folder)


#: Every file name an earlier release's generator wrote into a dataset folder.
_GENERATED_SUFFIXES = (
    CITYSCAPES_IMG_SUFFIX,
    CITYSCAPES_SEG_SUFFIX,
    "_gtFine_labelIds.png",
    ACDC_IMG_SUFFIX,
    ACDC_SEG_SUFFIX,
    "_gt_labelIds.png",
)
_GENERATED_NAMES = PLACEHOLDERS | {STATS_FILE, STATS_DICT_FILE, SAMPLES_WITH_CLASS_FILE}


def _is_legacy_copy(folder: Path) -> bool:
    if folder.name not in ("cityscapes", "acdc") or folder.is_symlink():
        return False
    try:
        if folder.parent.resolve() != EMBEDDED_ROOT.resolve() or EMBEDDED_ROOT.is_symlink():
            return False
    except (OSError, RuntimeError):
        return False
    stamp = read_stamp(folder.parent) or {}
    # Stamps written since the marker exists say so: their folders need it.
    if "generator_version" not in stamp or "markers" in stamp:
        return False
    for path in folder.rglob("*"):
        if path.is_symlink() or (
            path.is_file() and not (path.name in _GENERATED_NAMES or path.name.endswith(_GENERATED_SUFFIXES))
        ):
            return False
    return True


def check_replaceable(folder: Path) -> None:
    """Refuses, touching nothing, unless ``folder`` is absent, a placeholder
    (only tracked README files) or the generator's own output."""
    if not folder.exists() and not folder.is_symlink():
        return
    try:
        if folder.is_dir() and not folder.is_symlink():
            if is_generated(folder) or {p.name for p in folder.iterdir()} <= PLACEHOLDERS:
                return
    except OSError as err:
        raise NotGeneratedError(
            f"Cannot check {folder} before writing synthetic data over it ({err}). Nothing was changed."
        ) from None
    what = (
        "is a symbolic link"
        if folder.is_symlink()
        else (f"holds files that the synthetic generator did not create (no {GENERATED_MARKER} in it)")
    )
    raise NotGeneratedError(
        f"Refusing to write synthetic data over {folder}: it {what}. Nothing was changed. "
        f"The generator only replaces its own output. If these are your files, move them "
        f"out (and pass your data as -P source_root=/-P target_root=); to generate "
        f"elsewhere, give the generator an empty folder (python -m uda.data.synthetic "
        f"--root DIR)."
    )


def clean_embedded(root: os.PathLike = EMBEDDED_ROOT) -> list[Path]:
    """Removes the generated data under ``root`` (``make clean-data``), and nothing else.

    Only folders the generator wrote are removed (their tracked README
    placeholders stay); the stamp goes first, so a half-cleaned copy is
    never reused. A foreign folder is refused before anything is removed.

    Returns:
        The folders that were emptied.

    Raises:
        NotGeneratedError: if ``root/cityscapes`` or ``root/acdc`` holds data
            the generator did not write.
    """
    root = Path(root)
    folders = [root / name for name in ("cityscapes", "acdc")]
    for folder in folders:
        check_replaceable(folder)
    cleaned = []
    with exclusive(root / ".lock"):
        for folder in folders:
            check_replaceable(folder)
        (root / STAMP_FILE).unlink(missing_ok=True)
        for folder in folders:
            if not folder.is_dir() or {p.name for p in folder.iterdir()} <= PLACEHOLDERS:
                continue
            for path in folder.iterdir():
                if path.name in PLACEHOLDERS:
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            cleaned.append(folder)
        for leftover in root.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in root.glob(".old-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    return cleaned
