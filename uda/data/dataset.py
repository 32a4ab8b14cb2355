"""Torch datasets over Cityscapes / ACDC samples.

Each item is a dict:

- ``img``: float32 tensor (3, H, W), RGB normalised with ImageNet mean/std;
- ``gt``: int64 tensor (H, W) of trainIds, 255 = ignore; *absent* for
  unlabelled samples (target train, test splits);
- ``condition``: 'clear', 'fog', 'night', 'rain', 'snow' or 'unknown';
- ``filename``: the image path (str);
- ``ori_size``: int64 tensor (2,) = (H, W) of the image on disk.

With the training pipeline ``img``/``gt`` are the augmented crop; with the
test pipeline ``img`` is resized to ``img_scale`` and ``gt`` keeps the
original size (resize predictions to ``ori_size`` before scoring, as mmseg).
"""

from __future__ import annotations

import os
from typing import Any
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .layouts import Sample, scan_acdc, scan_cityscapes
from .pipelines import TestPipeline, TrainPipeline

__all__ = ["SegmentationDataset", "cityscapes_dataset", "acdc_dataset"]

Size = tuple[int, int]
PathLike = str | os.PathLike


class SegmentationDataset(Dataset):
    """Applies a pipeline to a list of samples and returns tensors.

    Args:
        samples: Samples from :func:`~uda.data.layouts.scan_cityscapes` or
            :func:`~uda.data.layouts.scan_acdc`.
        pipeline: A :class:`TrainPipeline`, :class:`TestPipeline` or any
            callable ``Sample -> dict(img=HWC float32, gt=HW uint8?, ori_size)``.
    """

    def __init__(self, samples: Sequence[Sample], pipeline: Callable[[Sample], dict[str, Any]]) -> None:
        if len(samples) == 0:
            raise ValueError("SegmentationDataset needs at least one sample")
        self.samples: list[Sample] = list(samples)
        self.pipeline = pipeline

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        data = self.pipeline(sample)
        img = np.ascontiguousarray(np.asarray(data["img"], np.float32).transpose(2, 0, 1))
        item: dict[str, Any] = dict(
            img=torch.from_numpy(img),
            condition=sample.condition,
            filename=str(sample.image_path),
            ori_size=torch.tensor(data["ori_size"], dtype=torch.int64),
        )
        if "gt" in data:
            item["gt"] = torch.from_numpy(np.asarray(data["gt"], dtype=np.int64))
        return item

    @property
    def conditions(self) -> list[str]:
        """Condition of every item, in order (for per-condition metrics)."""
        return [s.condition for s in self.samples]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} samples, pipeline={self.pipeline!r})"


def _pipeline(
    train: bool,
    img_scale: Size | None,
    crop_size: Size | None,
    cat_max_ratio: float,
    flip_prob: float,
    backend: str,
):
    if not train:
        return TestPipeline(img_scale, backend=backend)
    if crop_size is None:
        raise ValueError("A training pipeline needs crop_size (height, width)")
    return TrainPipeline(img_scale, crop_size, cat_max_ratio, flip_prob)


def cityscapes_dataset(
    root: PathLike,
    split: str = "train",
    train: bool = True,
    img_scale: Size | None = (2048, 1024),
    crop_size: Size | None = (1024, 1024),
    cat_max_ratio: float = 0.75,
    flip_prob: float = 0.5,
    backend: str = "auto",
) -> SegmentationDataset:
    """The labelled source dataset (defaults: MIC's Cityscapes pipeline).

    Args:
        root: Cityscapes root (``leftImg8bit/``, ``gtFine/``).
        split: 'train' or 'val'.
        train: Training augmentations (resize, crop with ``cat_max_ratio``,
            flip) if True, else the test pipeline (resize only).
        img_scale: Resize target (width, height), ratio kept.
        crop_size: Training crop (height, width).
        cat_max_ratio: Max share of one class in a training crop.
        flip_prob: Horizontal flip probability.
        backend: Test pipeline backend ('auto', 'mmseg', 'numpy').
    """
    samples = scan_cityscapes(root, split)
    return SegmentationDataset(
        samples, _pipeline(train, img_scale, crop_size, cat_max_ratio, flip_prob, backend)
    )


def acdc_dataset(
    root: PathLike,
    split: str = "train",
    train: bool = True,
    conditions: Iterable[str] | None = None,
    layout: str = "auto",
    img_scale: Size | None = (1920, 1080),
    crop_size: Size | None = (1024, 1024),
    flip_prob: float = 0.5,
    backend: str = "auto",
) -> SegmentationDataset:
    """The target dataset (defaults: MIC's ACDC pipeline).

    'train' items carry no ``gt`` (UDA target), 'val' items do, 'test' not.

    Args:
        root: ACDC root (``rgb_anon/``, ``gt/``), nested or flattened.
        split: 'train', 'val' or 'test'.
        train: Training augmentations (resize, crop, flip) if True, else the
            test pipeline (resize only).
        conditions: Subset of fog/night/rain/snow; None for all present.
        layout: 'auto', 'nested' or 'flat' (see :func:`scan_acdc`).
        img_scale: Resize target (width, height), ratio kept.
        crop_size: Training crop (height, width).
        flip_prob: Horizontal flip probability.
        backend: Test pipeline backend ('auto', 'mmseg', 'numpy').
    """
    samples = scan_acdc(root, split, conditions=conditions, layout=layout)
    return SegmentationDataset(samples, _pipeline(train, img_scale, crop_size, 1.0, flip_prob, backend))
