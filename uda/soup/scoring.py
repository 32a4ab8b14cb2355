"""Fast scoring of many soups on fixed sets of target images.

A weight search evaluates dozens of mixes of the same ingredients on the same
images. What does not change between trials is done once:

* the images of every subset are read, resized to the preset's test scale
  and normalised **once** (the same :class:`~uda.data.TestPipeline` as
  evaluation), grouped into batches of equal size and kept as tensors on the
  scoring device, with their labels (uint8, original size) next to them;
* one segmentor instance is built and reused: each trial only copies the
  mixed state dict into it (:meth:`SoupScorer.load`);
* inference runs batched, in the model's own test mode (slide or whole),
  under ``torch.inference_mode``; confusion matrices are accumulated on the
  device, so nothing but a 19x19 matrix per condition leaves it.

Subsets are named (``tune``, ``report``, ``agreement`` …). The deterministic,
condition-stratified tuning/report split of target val is
:func:`split_tune_report`; :func:`stratified_subset` picks unlabelled target
train images for the label-free objective.

Memory: a cached image takes ``3 * H * W * 4`` bytes at the test scale
(24 MiB for a 1920x1080 ACDC frame, i.e. about 10 GiB for all 406 val
images; 110 KiB for the embedded default's 256x144 frames).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from uda import cpu_threads
from uda.data.labels import CLASSES, IGNORE_INDEX, NUM_CLASSES
from uda.data.layouts import ACDC_CONDITIONS, Sample
from uda.metrics import ConditionTable, PerConditionMetrics, logits_to_labels

from .mixing import SoupError

__all__ = [
    "DEFAULT_MAX_BATCH_PIXELS",
    "split_tune_report",
    "stratified_subset",
    "ImageBatch",
    "ImageCache",
    "SoupScorer",
]

#: Pixels per inference batch when no batch size is given: one 1920x1080
#: ACDC frame (the full recipe then runs one image at a time; the embedded
#: default's 256x144 frames go 56 at a time).
DEFAULT_MAX_BATCH_PIXELS = 1920 * 1080


# --------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------
def _stable_key(sample: Sample) -> str:
    """An order that depends on the file only (not on the listing order, the
    seed or the other files), so a split is the same on every machine."""
    return hashlib.sha1(f"{sample.condition}/{sample.sequence}/{sample.name}".encode()).hexdigest()


def _by_condition(samples: Sequence[Sample]) -> OrderedDict[str, list[Sample]]:
    groups: OrderedDict[str, list[Sample]] = OrderedDict()
    order = {c: i for i, c in enumerate(ACDC_CONDITIONS)}
    for sample in sorted(samples, key=lambda s: (order.get(s.condition, 99), s.condition)):
        groups.setdefault(sample.condition, []).append(sample)
    return groups


def split_tune_report(samples: Sequence[Sample], tune_fraction: float) -> tuple[list[Sample], list[Sample]]:
    """Deterministic tuning/report split of labelled target images.

    Stratified by condition: within each condition the images are ordered by
    a hash of their name and the first ``round(tune_fraction * n)`` go to the
    tuning split, the rest to the report split. The split depends only on
    the files and the fraction (not on a seed), so every soup run on the same
    data reports on the same images.

    Args:
        samples: Labelled samples (e.g. ``scan_acdc(root, 'val')``).
        tune_fraction: Share of each condition used for tuning, in (0, 1).

    Returns:
        ``(tune, report)``, disjoint, each in the input's order.

    Raises:
        SoupError: for a fraction outside (0, 1) or fewer than two images
            (each split needs one).
    """
    if not 0.0 < float(tune_fraction) < 1.0:
        raise SoupError(f"soup.tune_fraction must lie strictly between 0 and 1, got {tune_fraction}")
    if len(samples) < 2:
        raise SoupError(
            f"the tuning and report splits need at least 2 labelled target val images, found {len(samples)}"
        )
    tune: set = set()
    for group in _by_condition(samples).values():
        ordered = sorted(group, key=_stable_key)
        count = int(math.floor(tune_fraction * len(ordered) + 0.5))
        tune.update(s.image_path for s in ordered[:count])
    # Tiny sets (one image per condition): keep both splits non-empty.
    if not tune:
        tune.add(min(samples, key=_stable_key).image_path)
    if len(tune) == len(samples):
        tune.discard(max(samples, key=_stable_key).image_path)
    return ([s for s in samples if s.image_path in tune], [s for s in samples if s.image_path not in tune])


def stratified_subset(samples: Sequence[Sample], count: int) -> list[Sample]:
    """``count`` samples spread evenly over the conditions, deterministically.

    Used to pick unlabelled target-train images for the label-free objective.
    Conditions take turns (fog, night, rain, snow, fog, …), each in the hash
    order of :func:`split_tune_report`.

    Args:
        samples: Candidate samples.
        count: How many to keep (all if larger than ``len(samples)``).
    """
    queues = [sorted(g, key=_stable_key) for g in _by_condition(samples).values()]
    chosen: list[Sample] = []
    while len(chosen) < min(count, len(samples)):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop(0))
    keep = {s.image_path for s in chosen}
    return [s for s in samples if s.image_path in keep]


# --------------------------------------------------------------------------
# Image cache
# --------------------------------------------------------------------------
@dataclass
class ImageBatch:
    """Images of one subset with equal sizes, ready for inference.

    Attributes:
        subset: Subset name.
        images: ``(B, 3, h, w)`` normalised float32 images on the device.
        labels: ``(B, H, W)`` uint8 trainIds (255 = ignore) on the device,
            or None for unlabelled images (until pseudo-labels are set).
        conditions: Condition of each image.
        names: Sample name of each image.
    """

    subset: str
    images: torch.Tensor
    labels: torch.Tensor | None
    conditions: tuple[str, ...]
    names: tuple[str, ...]


class ImageCache:
    """Named subsets of target images, decoded and normalised once, on a
    device.

    Args:
        subsets: Subset name → samples (labelled or not).
        img_scale: Test resize ``(width, height)`` of the preset
            (``data.target.img_scale``); None keeps the file size.
        device: Where the tensors live (the scoring device).
        batch_size: Images per batch; None fills batches up to
            ``max_batch_pixels`` pixels.
        max_batch_pixels: Pixel budget per batch when ``batch_size`` is None.
        backend: :class:`~uda.data.TestPipeline` backend.
    """

    def __init__(
        self,
        subsets: Mapping[str, Sequence[Sample]],
        img_scale: Sequence[int] | None,
        device: torch.device | str = "cpu",
        batch_size: int | None = None,
        max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS,
        backend: str = "auto",
    ) -> None:
        from uda.data.dataset import SegmentationDataset
        from uda.data.pipelines import TestPipeline

        if batch_size is not None and batch_size < 1:
            raise SoupError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batches: list[ImageBatch] = []
        self.conditions: list[str] = []
        self.sizes: dict[str, int] = {}
        pipeline = TestPipeline(tuple(img_scale) if img_scale else None, backend=backend)
        for name, samples in subsets.items():
            if not samples:
                raise SoupError(f"subset {name!r} has no images")
            dataset = SegmentationDataset(samples, pipeline)
            groups: OrderedDict[tuple, list] = OrderedDict()
            for index in range(len(dataset)):
                item = dataset[index]
                gt = item.get("gt")
                key = (tuple(item["img"].shape), None if gt is None else tuple(gt.shape))
                groups.setdefault(key, []).append((item, dataset.samples[index]))
            for (img_shape, _), items in groups.items():
                per_batch = batch_size or max(1, max_batch_pixels // (img_shape[1] * img_shape[2]))
                for start in range(0, len(items), per_batch):
                    self.batches.append(self._batch(name, items[start : start + per_batch]))
            self.sizes[name] = len(samples)
            for sample in samples:
                if sample.condition not in self.conditions:
                    self.conditions.append(sample.condition)

    def _batch(self, subset: str, items: list) -> ImageBatch:
        images = torch.stack([item["img"] for item, _ in items])
        labels = None
        if all("gt" in item for item, _ in items):
            # uint8 keeps 4x less memory than int64 (values 0..18 and 255).
            labels = torch.stack([item["gt"] for item, _ in items]).to(torch.uint8)
            labels = labels.to(self.device)
        return ImageBatch(
            subset=subset,
            images=images.to(self.device),
            labels=labels,
            conditions=tuple(s.condition for _, s in items),
            names=tuple(s.name for _, s in items),
        )

    @property
    def subsets(self) -> list[str]:
        return list(self.sizes)

    def batches_of(self, subset: str) -> list[ImageBatch]:
        if subset not in self.sizes:
            raise KeyError(f"no subset {subset!r}; have {self.subsets}")
        return [b for b in self.batches if b.subset == subset]

    def nbytes(self) -> int:
        """Bytes held by the cached tensors."""
        return sum(
            b.images.element_size() * b.images.nelement() + (0 if b.labels is None else b.labels.nelement())
            for b in self.batches
        )


# --------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------
class SoupScorer:
    """Scores state dicts (or whole models) on the subsets of a cache.

    Args:
        model: The segmentor to reuse; soups are loaded into it with
            :meth:`load`. Put it on ``cache.device``.
        cache: The images.
        num_classes: Number of classes of the label maps.
    """

    def __init__(self, model: nn.Module, cache: ImageCache, num_classes: int = NUM_CLASSES) -> None:
        self.model = model.eval()
        self.cache = cache
        self.num_classes = num_classes

    @torch.no_grad()
    def load(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copies a (mixed) state dict into the reused model (strict)."""
        self.model.load_state_dict(state_dict, strict=True)

    @torch.inference_mode()
    def predict(self, batch: ImageBatch, model: nn.Module | None = None) -> torch.Tensor:
        """``(B, H, W)`` int64 class ids at the label size (or the input size
        for unlabelled images), in the model's test mode.

        Logits are resized bilinearly to the label size before the argmax, as
        mmseg's ``CustomDataset`` evaluation does.
        """
        model = self.model if model is None else model
        cpu_threads.rebalance()
        logits = model.inference(batch.images)
        size = logits.shape[-2:] if batch.labels is None else batch.labels.shape[-2:]
        return logits_to_labels(logits, size)

    @torch.inference_mode()
    def set_pseudo_labels(self, subset: str, teacher: nn.Module) -> None:
        """Labels of an unlabelled subset := ``teacher``'s predictions (argmax
        of its test-mode logits), computed once and kept on the device."""
        for batch in self.cache.batches_of(subset):
            batch.labels = self.predict(
                ImageBatch(batch.subset, batch.images, None, batch.conditions, batch.names), model=teacher
            ).to(torch.uint8)

    @torch.inference_mode()
    def evaluate(
        self,
        subsets: Iterable[str],
        model: nn.Module | None = None,
        union: Mapping[str, Sequence[str]] | None = None,
    ) -> dict[str, ConditionTable]:
        """mIoU (overall and per condition) of the model on some subsets.

        Args:
            subsets: Subset names to run inference on.
            model: Another model to score (default: the reused one, with the
                last :meth:`load`).
            union: Extra results that add up subsets without running them
                again, e.g. ``{'val': ['tune', 'report']}``.

        Returns:
            Subset (and union) name → :class:`~uda.metrics.ConditionTable`.

        Raises:
            SoupError: a subset without labels.
        """
        subsets = list(subsets)
        accumulators = {
            name: PerConditionMetrics(
                self.cache.conditions,
                self.num_classes,
                IGNORE_INDEX,
                self.cache.device,
                _class_names(self.num_classes),
            )
            for name in subsets
        }
        for name in subsets:
            for batch in self.cache.batches_of(name):
                if batch.labels is None:
                    raise SoupError(f"subset {name!r} has no labels to score against")
                accumulators[name].update(self.predict(batch, model), batch.labels, batch.conditions)
        results = {name: acc.compute() for name, acc in accumulators.items()}
        for name, parts in (union or {}).items():
            total = PerConditionMetrics(
                self.cache.conditions,
                self.num_classes,
                IGNORE_INDEX,
                self.cache.device,
                _class_names(self.num_classes),
            )
            for part in parts:
                total.merge(accumulators[part])
            results[name] = total.compute()
        return results


def _class_names(num_classes: int) -> Sequence[str]:
    return CLASSES if num_classes == len(CLASSES) else tuple(str(i) for i in range(num_classes))
