"""What a dataset pair looks like: split sizes, class statistics, example images.

Used by the ``main`` entry point to show the data a pipeline runs on, and by
anyone checking that real Cityscapes/ACDC roots were read as expected.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .labels import CLASSES, NUM_CLASSES
from .layouts import ACDC_CONDITIONS, Sample, scan_acdc, scan_cityscapes
from .rcs import count_class_pixels, load_or_compute_class_counts

PathLike = os.PathLike | str


@dataclass
class DatasetSummary:
    """Sizes, class pixel counts and a few examples of a source/target pair.

    Attributes:
        sizes: ``'cityscapes/train' → 48``, ``'acdc/fog/val' → 4``, … (images).
        class_pixels: ``'source train'``/``'target val'`` → pixel count per class (19,).
        examples: Rows of (image, label-or-None, caption) for a picture.
    """

    sizes: dict[str, int]
    class_pixels: dict[str, np.ndarray]
    examples: list[list[tuple[np.ndarray, np.ndarray | None, str]]] = field(default_factory=list)

    def class_table(self) -> dict[str, list]:
        """Columns for ``mlflow.log_table``: class, then pixel share per domain."""
        table: dict[str, list] = {"class": list(CLASSES)}
        for name, counts in self.class_pixels.items():
            total = max(int(counts.sum()), 1)
            table[f"{name} share"] = [round(float(c) / total, 6) for c in counts]
        return table

    def missing_classes(self) -> dict[str, list[str]]:
        return {
            name: [CLASSES[c] for c in range(NUM_CLASSES) if counts[c] == 0]
            for name, counts in self.class_pixels.items()
        }


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _read_label(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def _example(sample: Sample, caption: str) -> tuple[np.ndarray, np.ndarray | None, str]:
    label = _read_label(sample.label_path) if sample.label_path else None
    return _read_rgb(sample.image_path), label, caption


def summarize(source_root: PathLike, target_root: PathLike, examples_per_row: int = 3) -> DatasetSummary:
    """Scan both roots (layout errors surface here, clearly) and gather the summary.

    Args:
        source_root: Cityscapes root.
        target_root: ACDC root (nested or flattened layout).
        examples_per_row: Example images per domain/condition row.
    """
    sizes: dict[str, int] = {}
    source_train = scan_cityscapes(source_root, "train")
    sizes["cityscapes/train"] = len(source_train)
    sizes["cityscapes/val"] = len(scan_cityscapes(source_root, "val"))
    target = {split: scan_acdc(target_root, split) for split in ("train", "val", "test")}
    for split, samples in target.items():
        sizes[f"acdc/{split}"] = len(samples)
        for condition in sorted({s.condition for s in samples}):
            sizes[f"acdc/{condition}/{split}"] = sum(s.condition == condition for s in samples)

    class_pixels = {
        # The rare-class statistics: computed once, cached (see uda.data.paths.stats_dir).
        "source train": load_or_compute_class_counts(source_train, source_root).sum(axis=0),
        "target val": sum(
            (count_class_pixels(_read_label(s.label_path)) for s in target["val"]),
            np.zeros(NUM_CLASSES, dtype=np.int64),
        ),
    }

    rows = [[_example(s, f"cityscapes: {s.name}") for s in source_train[:examples_per_row]]]
    for condition in ACDC_CONDITIONS:
        picked = [s for s in target["val"] if s.condition == condition][:examples_per_row]
        if picked:
            rows.append([_example(s, f"{condition}: {s.name}") for s in picked])
    return DatasetSummary(sizes, class_pixels, rows)
