"""The batches of a training run, reproducible by construction (and the
validation loader beside them); the datasets themselves are :mod:`uda.data`.

Item ``i`` of :class:`TrainBatches` is the whole batch of iteration ``i``
(``samples_per_gpu`` source crops picked by rare-class sampling, as many
target crops drawn uniformly), and it is a pure function of ``(seed, rank,
i)``: before building it, every random generator the data path touches is
reseeded from those three numbers (numpy's global RNG, which mmseg's
``RandomCrop`` / ``RandomFlip`` use, python's ``random`` and torch's). So

* a resumed run sees exactly the batches the uninterrupted run would have
  seen, with no iterator state to save, and
* DataLoader workers may prefetch in any order without changing anything.

:func:`iteration_seed` gives the per-iteration seeds the loop uses for its
own draws (ClassMix, jitter, masks, HRDA crops, dropout) in the same way.
"""

from __future__ import annotations

import random
from typing import Any
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from uda.data import (
    RareClassSampler,
    acdc_dataset,
    cityscapes_dataset,
    draw_rare_class_sample,
    load_or_compute_class_counts,
)
from uda.data.layouts import scan_cityscapes

__all__ = [
    "iteration_seed",
    "seed_everything",
    "TrainBatches",
    "build_train_data",
    "build_val_dataset",
    "train_loader",
    "val_loader",
]

# Streams of the per-iteration seeds: the data path and the loop's own draws.
STREAM_DATA = 0
STREAM_STEP = 1


def iteration_seed(seed: int, rank: int, iteration: int, stream: int) -> int:
    """A 63-bit seed for one (run seed, rank, iteration, stream)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(rank), int(iteration), int(stream)])
    return int(state.generate_state(2, np.uint64)[0] >> np.uint64(1))


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global RNG and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _stack(items: Sequence[Mapping[str, Any]], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        f"{prefix}img": torch.stack([it["img"] for it in items]),
        f"{prefix}filename": [it["filename"] for it in items],
        f"{prefix}condition": [it["condition"] for it in items],
    }
    if all("gt" in it for it in items):
        out[f"{prefix}gt"] = torch.stack([it["gt"] for it in items])
    return out


class TrainBatches(Dataset):
    """Map-style dataset whose item ``i`` is the batch of iteration ``i``.

    Args:
        source: Labelled source dataset with the training pipeline.
        target: Unlabelled target dataset with the training pipeline.
        batch_size: Source (and target) crops per iteration and process.
        seed: Run seed.
        rank: Process rank (each rank draws its own batches).
        rare_class_sampler: MIC's RCS on the source, or None for uniform
            source sampling.
        length: Number of iterations (``len()``).

    Items: ``img``, ``gt``, ``filename``, ``condition`` (source) and
    ``target_img``, ``target_filename``, ``target_condition``, plus
    ``rcs_class`` (the rare class drawn per source crop, -1 without RCS).
    """

    def __init__(
        self,
        source: Dataset,
        target: Dataset,
        batch_size: int,
        seed: int,
        rank: int = 0,
        rare_class_sampler: RareClassSampler | None = None,
        length: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.source = source
        self.target = target
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.sampler = rare_class_sampler
        self.length = int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, iteration: int) -> dict[str, Any]:
        seed = iteration_seed(self.seed, self.rank, iteration, STREAM_DATA)
        seed_everything(seed)  # mmseg transforms draw from numpy's global RNG
        rng = np.random.default_rng(seed)
        sources, classes = [], []
        for _ in range(self.batch_size):
            if self.sampler is not None:
                item, train_id = draw_rare_class_sample(self.source, self.sampler, rng)
            else:
                item, train_id = self.source[int(rng.integers(len(self.source)))], -1
            sources.append(item)
            classes.append(train_id)
        targets = [self.target[int(rng.integers(len(self.target)))] for _ in range(self.batch_size)]
        batch = _stack(sources, "")
        batch.update(_stack(targets, "target_"))
        batch["rcs_class"] = torch.tensor(classes, dtype=torch.long)
        batch["iteration"] = int(iteration)
        return batch


def _pair(value: Any) -> tuple[int, int] | None:
    return None if value is None else (int(value[0]), int(value[1]))


def build_train_data(cfg: Mapping[str, Any], seed: int, rank: int = 0, rcs: bool = True) -> TrainBatches:
    """Source (Cityscapes train, RCS) and target (ACDC train) of a preset.

    Reads ``cfg['data']``. Missing or malformed roots raise
    :class:`~uda.data.DatasetLayoutError` (a ``UserError``) here, before any
    training starts.

    Args:
        cfg: The resolved preset.
        seed: Run seed.
        rank: Process rank.
        rcs: Use rare-class sampling when the preset configures it.
    """
    data = cfg["data"]
    src, trg = data["source"], data["target"]
    source = cityscapes_dataset(
        src["root"],
        "train",
        train=True,
        img_scale=_pair(src["img_scale"]),
        crop_size=_pair(src["crop_size"]),
        cat_max_ratio=float(src.get("cat_max_ratio", 1.0)),
        flip_prob=float(src.get("flip_prob", 0.5)),
    )
    target = acdc_dataset(
        trg["root"],
        "train",
        train=True,
        conditions=trg.get("conditions"),
        img_scale=_pair(trg["img_scale"]),
        crop_size=_pair(trg["crop_size"]),
        flip_prob=float(trg.get("flip_prob", 0.5)),
    )
    if tuple(src["crop_size"]) != tuple(trg["crop_size"]):
        from uda.errors import UserError

        raise UserError(
            f"data.source.crop_size {src['crop_size']} and "
            f"data.target.crop_size {trg['crop_size']} must be equal "
            f"(ClassMix pastes source pixels into target crops)."
        )
    sampler = None
    rcs_cfg = data.get("rare_class_sampling")
    if rcs and rcs_cfg:
        counts = load_or_compute_class_counts(scan_cityscapes(src["root"], "train"), src["root"])
        try:
            sampler = RareClassSampler(
                counts,
                temperature=float(rcs_cfg["class_temp"]),
                min_pixels=int(rcs_cfg["min_pixels"]),
                min_crop_ratio=float(rcs_cfg["min_crop_ratio"]),
            )
        except ValueError as err:
            from uda.errors import UserError

            raise UserError(f"data.rare_class_sampling: {err}") from None
    return TrainBatches(
        source, target, int(data["samples_per_gpu"]), seed, rank, sampler, int(cfg["runner"]["max_iters"])
    )


def build_val_dataset(cfg: Mapping[str, Any]) -> Dataset:
    """ACDC val with labels (test pipeline, ``data.target.img_scale``)."""
    trg = cfg["data"]["target"]
    return acdc_dataset(
        trg["root"], "val", train=False, conditions=trg.get("conditions"), img_scale=_pair(trg["img_scale"])
    )


def _worker_init(worker_id: int) -> None:
    # Items reseed themselves; keep each worker to one thread.
    torch.set_num_threads(1)


def train_loader(
    batches: TrainBatches, start: int, stop: int, workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    """Iterations ``start .. stop - 1`` of ``batches``, in order.

    Args:
        batches: The per-iteration dataset.
        start: First iteration (the resume point).
        stop: One past the last iteration.
        workers: DataLoader worker processes (``data.workers_per_gpu``).
        pin_memory: Pin host memory (GPU training).
    """
    indices: Iterable[int] = range(start, stop)
    return DataLoader(
        batches,
        batch_size=None,
        sampler=list(indices),
        num_workers=workers,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if workers else None,
        persistent_workers=False,
        prefetch_factor=2 if workers else None,
    )


def _collate_one(items: list[dict[str, Any]]) -> dict[str, Any]:
    return items[0]


def val_loader(dataset: Dataset, rank: int = 0, world_size: int = 1, workers: int = 0) -> DataLoader:
    """This rank's share (every ``world_size``-th image) of the val set, one
    image per batch (images keep their own size)."""
    indices = list(range(rank, len(dataset), world_size))
    return DataLoader(
        dataset,
        batch_size=1,
        sampler=indices,
        num_workers=workers,
        collate_fn=_collate_one,
        worker_init_fn=_worker_init if workers else None,
    )
