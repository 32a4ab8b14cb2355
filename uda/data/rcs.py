"""Rare-class sampling (RCS) on the labelled source, as in DAFormer/HRDA/MIC.

Per-image class pixel counts are computed once from the source label files
and cached in MIC's files, so a MIC user recognises them and either project
can reuse the other's (MIC's files in a dataset root are read; new ones are
written next to the embedded data, or to the project cache for a user's root,
which is never written):

- ``sample_class_stats.json``: a list with one dict per label file,
  ``{"<trainId>": <pixels>, ..., "file": "<label path>"}`` (only classes
  present), as written by MIC's ``tools/convert_datasets/cityscapes.py``;
- ``sample_class_stats_dict.json``: the same keyed by file;
- ``samples_with_class.json``: ``{"<trainId>": [[<label path>, <pixels>], ...]}``.

Files are matched by label file *name* (MIC's ``UDADataset`` does the same),
so the folder prefix in the ``file`` entries does not matter.

Sampling (MIC ``mmseg/datasets/uda_dataset.py``): with ``f_c`` the share of
class ``c`` in all source pixels, class ``c`` is drawn with probability
``softmax((1 - f_c) / T)`` over the classes present; then an image is drawn
uniformly among those with more than ``min_pixels`` pixels of ``c``.
``min_crop_ratio`` acts on the training crop: the random crop of that image
is redrawn (up to 10 times) until it holds more than
``min_pixels * min_crop_ratio`` pixels of ``c`` (see
:func:`draw_rare_class_sample`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from .labels import NUM_CLASSES
from .layouts import Sample
from .paths import stats_dir

__all__ = [
    "STATS_FILE",
    "STATS_DICT_FILE",
    "SAMPLES_WITH_CLASS_FILE",
    "count_class_pixels",
    "load_or_compute_class_counts",
    "rcs_class_probabilities",
    "RareClassSampler",
    "draw_rare_class_sample",
]

STATS_FILE = "sample_class_stats.json"
STATS_DICT_FILE = "sample_class_stats_dict.json"
SAMPLES_WITH_CLASS_FILE = "samples_with_class.json"

# MIC redraws the crop of a rare-class image at most this many times.
_MAX_CROP_TRIES = 10


def count_class_pixels(label: np.ndarray) -> np.ndarray:
    """Counts the pixels of each trainId in a label map.

    Args:
        label: Integer trainId map (0..18, 255 ignored).

    Returns:
        int64 array of shape (19,).
    """
    counts = np.bincount(np.asarray(label, dtype=np.uint8).ravel(), minlength=256)
    return counts[:NUM_CLASSES].astype(np.int64)


def _read_label(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def _write_json_atomically(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cached_counts(samples: Sequence[Sample], stats_path: Path) -> np.ndarray | None:
    """Counts from an existing stats file, or None when it is stale."""
    if not stats_path.is_file():
        return None
    try:
        with open(stats_path) as f:
            entries = json.load(f)
        by_name = {Path(e["file"]).name: e for e in entries}
    except (ValueError, KeyError, TypeError):
        return None  # unreadable: recompute and overwrite
    names = [s.label_path.name for s in samples]
    if set(by_name) != set(names) or len(by_name) != len(entries):
        return None
    stats_mtime = stats_path.stat().st_mtime
    if any(s.label_path.stat().st_mtime > stats_mtime for s in samples):
        return None
    counts = np.zeros((len(samples), NUM_CLASSES), dtype=np.int64)
    for i, name in enumerate(names):
        for key, n in by_name[name].items():
            if key != "file":
                counts[i, int(key)] = n
    return counts


def load_or_compute_class_counts(
    samples: Sequence[Sample],
    data_root: str | os.PathLike,
    progress: Callable[[int, int], None] | None = None,
    write_dir: str | os.PathLike | None = None,
) -> np.ndarray:
    """Per-image class pixel counts of labelled samples, cached in MIC's files.

    A cache in ``data_root`` (e.g. MIC's own files) is reused when it lists
    exactly the samples' label files (by name) and is newer than all of them;
    then one in ``write_dir``; otherwise the counts are recomputed from the
    label files and the three json files written to ``write_dir``.

    Args:
        samples: Labelled samples (e.g. ``scan_cityscapes(root, 'train')``).
        data_root: The dataset root (MIC: the Cityscapes root), read for a cache.
        progress: Optional callback ``progress(done, total)`` while counting.
        write_dir: Where a new cache is written. Default
            :func:`~uda.data.paths.stats_dir`: ``data_root`` itself only when
            the generator wrote it, else the project cache, so that a
            user's dataset folder is only read.

    Returns:
        int64 array (len(samples), 19); row i belongs to ``samples[i]``.

    Raises:
        ValueError: if a sample has no label or two labels share a name.
        PermissionError: if the cache cannot be written to ``write_dir``.
    """
    unlabelled = [s.image_path for s in samples if s.label_path is None]
    if unlabelled:
        raise ValueError(
            "Rare-class statistics need labelled samples; "
            f"{len(unlabelled)} have no label, e.g. {unlabelled[0]}"
        )
    names = [s.label_path.name for s in samples]
    if len(set(names)) != len(names):
        raise ValueError("Label file names must be unique (MIC matches RCS statistics by file name).")
    data_root = Path(data_root)
    write_dir = stats_dir(data_root) if write_dir is None else Path(write_dir)
    counts = _cached_counts(samples, data_root / STATS_FILE)
    if counts is not None and write_dir.resolve() != data_root.resolve():
        return counts  # complete enough to sample from; the root is read only
    if counts is None:
        counts = _cached_counts(samples, write_dir / STATS_FILE)
    if counts is None:
        counts = np.zeros((len(samples), NUM_CLASSES), dtype=np.int64)
        for i, sample in enumerate(samples):
            counts[i] = count_class_pixels(_read_label(sample.label_path))
            if progress is not None:
                progress(i + 1, len(samples))
        _write_stats(samples, counts, data_root, write_dir, rewrite_stats=True)
    elif not ((write_dir / STATS_DICT_FILE).is_file() and (write_dir / SAMPLES_WITH_CLASS_FILE).is_file()):
        _write_stats(samples, counts, data_root, write_dir, rewrite_stats=False)
    return counts


def _write_stats(
    samples: Sequence[Sample], counts: np.ndarray, data_root: Path, write_dir: Path, rewrite_stats: bool
) -> None:
    def rel(path: Path) -> str:
        try:
            return path.relative_to(data_root).as_posix()
        except ValueError:
            return path.as_posix()

    entries = []
    for sample, row in zip(samples, counts):
        entry = {str(c): int(n) for c, n in enumerate(row) if n > 0}
        entry["file"] = rel(sample.label_path)
        entries.append(entry)
    stats_dict = {e["file"]: {k: v for k, v in e.items() if k != "file"} for e in entries}
    samples_with_class: dict[str, list[tuple[str, int]]] = {}
    for file, stats in stats_dict.items():
        for c, n in stats.items():
            samples_with_class.setdefault(c, []).append((file, n))
    try:
        write_dir.mkdir(parents=True, exist_ok=True)
        # The main file last: its mtime marks the cache as up to date.
        _write_json_atomically(write_dir / STATS_DICT_FILE, stats_dict)
        _write_json_atomically(write_dir / SAMPLES_WITH_CLASS_FILE, samples_with_class)
        if rewrite_stats:
            _write_json_atomically(write_dir / STATS_FILE, entries)
    except OSError as e:
        raise PermissionError(
            f"Cannot write the rare-class statistics to {write_dir} ({e}). "
            "Make that folder writable, or set UDA_CACHE_DIR to a writable "
            "folder."
        ) from e


def rcs_class_probabilities(counts: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """RCS class distribution: ``softmax((1 - freq) / T)`` over present classes.

    Args:
        counts: (num_images, num_classes) pixel counts.
        temperature: T; smaller samples rare classes more (MIC: 0.01).

    Returns:
        ``(classes, probabilities)``: the classes with any pixel, ordered by
        increasing pixel count as in MIC, and their sampling probabilities.
    """
    if temperature <= 0:
        raise ValueError(f"RCS temperature must be > 0, got {temperature}")
    totals = np.asarray(counts, dtype=np.int64).sum(axis=0)
    present = np.flatnonzero(totals > 0)
    if present.size == 0:
        raise ValueError("No labelled pixels: cannot build the RCS distribution")
    classes = present[np.argsort(totals[present], kind="stable")]
    freq = totals[classes] / totals[classes].sum()
    logits = (1.0 - freq) / temperature
    probs = np.exp(logits - logits.max())
    return classes, probs / probs.sum()


class RareClassSampler:
    """Draws (image, class) pairs that favour rare classes (MIC's RCS).

    Args:
        class_counts: (num_images, 19) pixel counts; row i is dataset item i.
        temperature: Softmax temperature T (recipe: 0.01).
        min_pixels: An image is a candidate for class c when it holds more
            than this many pixels of c (recipe: 3000 at 2048x1024; scale it
            with the label area for smaller images).
        min_crop_ratio: A training crop of the drawn image is accepted when
            it holds more than ``min_pixels * min_crop_ratio`` pixels of the
            class (recipe: 2.0 for HRDA's 1024x1024 crops); 0 disables.

    Raises:
        ValueError: if a present class has no candidate image.
    """

    def __init__(
        self,
        class_counts: np.ndarray,
        temperature: float = 0.01,
        min_pixels: int = 3000,
        min_crop_ratio: float = 2.0,
    ) -> None:
        counts = np.asarray(class_counts, dtype=np.int64)
        if counts.ndim != 2 or counts.shape[1] != NUM_CLASSES:
            raise ValueError(f"class_counts must have shape (N, {NUM_CLASSES}), got {counts.shape}")
        if min_pixels < 0 or min_crop_ratio < 0:
            raise ValueError("min_pixels and min_crop_ratio must be >= 0")
        self.temperature = float(temperature)
        self.min_pixels = int(min_pixels)
        self.min_crop_ratio = float(min_crop_ratio)
        self.classes, self.probabilities = rcs_class_probabilities(counts, temperature)
        self.samples_with_class: dict[int, np.ndarray] = {}
        empty = []
        for c in self.classes:
            candidates = np.flatnonzero(counts[:, c] > self.min_pixels)
            if candidates.size == 0:
                empty.append(int(c))
            self.samples_with_class[int(c)] = candidates
        if empty:
            raise ValueError(
                f"RCS: no image has more than min_pixels={self.min_pixels} "
                f"pixels of class(es) {empty}. Lower min_pixels (the recipe's "
                "3000 is for 2048x1024 Cityscapes labels)."
            )

    @classmethod
    def from_samples(
        cls, samples: Sequence[Sample], data_root: str | os.PathLike, **kwargs: Any
    ) -> RareClassSampler:
        """Builds the sampler from (cached) statistics of the label files.

        Args:
            samples: Labelled source samples, in dataset order.
            data_root: Where MIC statistics files are read (new ones are
                written as :func:`load_or_compute_class_counts` says).
            **kwargs: ``temperature``, ``min_pixels``, ``min_crop_ratio``.
        """
        return cls(load_or_compute_class_counts(samples, data_root), **kwargs)

    @property
    def min_crop_pixels(self) -> float:
        """Pixels of the drawn class a crop must exceed to be accepted."""
        return self.min_pixels * self.min_crop_ratio

    def sample(self, rng: np.random.Generator) -> tuple[int, int]:
        """Draws a class by its RCS probability, then an image containing it.

        Args:
            rng: Random generator (e.g. ``np.random.default_rng(seed)``).

        Returns:
            ``(dataset_index, train_id)``.
        """
        c = int(rng.choice(self.classes, p=self.probabilities))
        index = int(rng.choice(self.samples_with_class[c]))
        return index, c

    def crop_is_enough(self, gt: Any, train_id: int) -> bool:
        """Whether a cropped label map holds enough pixels of ``train_id``.

        Args:
            gt: Cropped trainId map (numpy array or torch tensor).
            train_id: The class drawn by :meth:`sample`.
        """
        if self.min_crop_ratio <= 0:
            return True
        return int((gt == train_id).sum()) > self.min_crop_pixels


def draw_rare_class_sample(
    dataset: Any, sampler: RareClassSampler, rng: np.random.Generator
) -> tuple[dict[str, Any], int]:
    """Draws a source training item with MIC's rare-class sampling.

    The dataset's training pipeline crops at random on every access, so the
    drawn image is re-read until its crop holds more than
    ``min_pixels * min_crop_ratio`` pixels of the drawn class, at most 10
    times (as MIC's ``UDADataset.get_rare_class_sample``; the last crop is
    kept even if it falls short).

    Args:
        dataset: Indexable returning dicts with a ``gt`` label map.
        sampler: The RCS sampler built on that dataset's labels.
        rng: Random generator for the (class, image) draw.

    Returns:
        ``(item, train_id)``.
    """
    index, train_id = sampler.sample(rng)
    item = dataset[index]
    for _ in range(_MAX_CROP_TRIES):
        if sampler.crop_is_enough(item["gt"], train_id):
            break
        item = dataset[index]
    return item, train_id
