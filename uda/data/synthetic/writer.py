"""Writing the two datasets in the real folder layouts and file names:
Cityscapes (``leftImg8bit`` + ``gtFine``, cities) and ACDC (``rgb_anon`` + ``gt``,
conditions, sequences), marked as the generator's before the first image, with
the source's rare-class statistics written through the same code as for real
data (:mod:`uda.data.rcs`)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ..labels import IGNORE_INDEX, train_id_to_label_id
from ..layouts import (
    ACDC_CONDITIONS,
    ACDC_IMG_SUFFIX,
    ACDC_SEG_SUFFIX,
    CITYSCAPES_IMG_SUFFIX,
    CITYSCAPES_SEG_SUFFIX,
    scan_cityscapes,
)
from ..paths import GENERATED_MARKER
from ..rcs import load_or_compute_class_counts
from .config import EmbeddedDataset, SyntheticConfig
from .ownership import check_replaceable
from .render import render_scene
from .stamp import stamp_of
from .street import FORCEABLE

_SOURCE_TRAIN_CITIES = ("alphaville", "brickton")
_SOURCE_VAL_CITIES = ("cedarfield", "dunmore")
_SEQUENCES_PER_SPLIT = 2  # ACDC: sequences per condition and split


def _save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Fixed compression settings: identical inputs give identical bytes.
    Image.fromarray(array).save(path, format="PNG", compress_level=6)


def _force_for(index: int) -> int | None:
    """Cycles through the optional classes so that each split has them all."""
    order = sorted(FORCEABLE)
    return order[index % len(order)] if index < 2 * len(order) else None


def _plan(config: SyntheticConfig) -> list[dict]:
    """Every image to write: dataset, split, condition, file stem, seed key."""
    plan = []
    for split_id, (split, count, cities) in enumerate(
        [
            ("train", config.num_source_train, _SOURCE_TRAIN_CITIES),
            ("val", config.num_source_val, _SOURCE_VAL_CITIES),
        ]
    ):
        for i in range(count):
            city = cities[i % len(cities)]
            plan.append(
                dict(
                    dataset="cityscapes",
                    split=split,
                    condition="clear",
                    folder=city,
                    stem=f"{city}_{i:06d}_000019",
                    key=(config.seed, 0, split_id, 0, i),
                    force=_force_for(i),
                )
            )
    for cond_id, condition in enumerate(ACDC_CONDITIONS):
        if condition not in config.conditions:
            continue
        for split_id, (split, count) in enumerate(
            [
                ("train", config.num_target_train),
                ("val", config.num_target_val),
                ("test", config.num_target_test),
            ]
        ):
            for i in range(count):
                seq = f"GOPR9{cond_id + 1}{split_id * _SEQUENCES_PER_SPLIT + i % _SEQUENCES_PER_SPLIT:02d}"
                plan.append(
                    dict(
                        dataset="acdc",
                        split=split,
                        condition=condition,
                        folder=seq,
                        stem=f"{seq}_frame_{i:06d}",
                        key=(config.seed, 1, split_id, cond_id + 1, i),
                        force=_force_for(i) if split == "val" else None,
                    )
                )
    return plan


def generate(
    root: os.PathLike, config: SyntheticConfig = SyntheticConfig(), progress: bool = False
) -> EmbeddedDataset:
    """Writes the synthetic datasets into ``root/cityscapes`` and ``root/acdc``.

    Args:
        root: Output folder (created). Its ``cityscapes``/``acdc`` folders
            must be absent, empty placeholders, or earlier output of this
            generator (whose files are overwritten).
        config: What to generate.
        progress: Show a progress bar on stderr.

    Returns:
        The dataset roots.

    Raises:
        NotGeneratedError: if ``root/cityscapes`` or ``root/acdc`` holds
            data that this generator did not write (nothing is touched).
    """
    root = Path(root)
    cs_root, acdc_root = root / "cityscapes", root / "acdc"
    for folder in (cs_root, acdc_root):
        check_replaceable(folder)
    for folder in (cs_root, acdc_root):
        # Marked before the first image: a half-written folder is still ours.
        folder.mkdir(parents=True, exist_ok=True)
        (folder / GENERATED_MARKER).write_text(json.dumps(stamp_of(config), indent=2))
    plan = _plan(config)
    bar = None
    if progress and sys.stderr.isatty():
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(plan), desc="synthetic", unit="img", file=sys.stderr)
        except ImportError:
            pass
    # Without a terminal (logs, MLflow): one line per ~10 %.
    report_every = max(1, len(plan) // 10)
    for n, item in enumerate(plan):
        size = config.source_size if item["dataset"] == "cityscapes" else config.target_size
        rgb, label = render_scene(item["key"], size[0], size[1], item["condition"], item["force"])
        label_ids = train_id_to_label_id(label)
        if item["dataset"] == "cityscapes":
            label_ids[label == IGNORE_INDEX] = 1  # 'ego vehicle'
            img_path = (
                cs_root
                / "leftImg8bit"
                / item["split"]
                / item["folder"]
                / (item["stem"] + CITYSCAPES_IMG_SUFFIX)
            )
            gt_base = cs_root / "gtFine" / item["split"] / item["folder"] / item["stem"]
            _save_png(img_path, rgb)
            _save_png(Path(str(gt_base) + CITYSCAPES_SEG_SUFFIX), label)
            _save_png(Path(str(gt_base) + "_gtFine_labelIds.png"), label_ids)
        else:
            rel = Path(item["condition"]) / item["split"] / item["folder"]
            _save_png(acdc_root / "rgb_anon" / rel / (item["stem"] + ACDC_IMG_SUFFIX), rgb)
            if item["split"] != "test":  # ACDC ships no test ground truth
                gt_base = acdc_root / "gt" / rel / item["stem"]
                _save_png(Path(str(gt_base) + ACDC_SEG_SUFFIX), label)
                _save_png(Path(str(gt_base) + "_gt_labelIds.png"), label_ids)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{item['dataset']}/{item['split']}/{item['condition']}")
        elif progress and ((n + 1) % report_every == 0 or n + 1 == len(plan)):
            print(
                f"synthetic: {n + 1}/{len(plan)} images "
                f"({item['dataset']}/{item['split']}/{item['condition']})",
                file=sys.stderr,
                flush=True,
            )
    if bar is not None:
        bar.close()
    if config.num_source_train:
        load_or_compute_class_counts(scan_cityscapes(cs_root, "train"), cs_root, write_dir=cs_root)
    return EmbeddedDataset(cs_root, acdc_root, config)
