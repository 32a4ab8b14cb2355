"""Prediction of every image of a dataset at its original size, in order, as
mmsegmentation 0.30 predicts it for its evaluation.

``EncoderDecoder.inference`` with ``rescale=True``: the test pipeline resizes
the image to ``img_scale`` keeping its ratio, the model returns logits at
that size, the logits are resized back to the image's *original* size
(bilinear, ``align_corners=False``) and arg-maxed. So a prediction always has
the size of the label file.

Images are batched in order, consecutive images of the same input size
together (never padded: padding would change what the model sees), so
predictions do not depend on the batch size. They stay on the model's device.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from uda import cpu_threads, visualize
from uda.data.dataset import SegmentationDataset
from uda.data.layouts import Sample
from uda.data.pipelines import load_image
from uda.metrics import logits_to_labels
from uda.models.hrda import bounded_slide
from uda.precision import autocast

from .inputs import Device, EvaluationError, check_mode


@dataclass
class PredictedImage:
    """One prediction of :func:`predict_dataset`.

    Attributes:
        index: Position in the dataset.
        sample: The dataset sample (paths, condition, name).
        prediction: ``(H, W)`` int64 trainIds at the original image size, on
            the model's device.
        label: ``(H, W)`` int64 ground truth (255 = ignore) on the same
            device, or None for unlabelled samples.
    """

    index: int
    sample: Sample
    prediction: torch.Tensor
    label: torch.Tensor | None = None

    def panel(self) -> np.ndarray:
        """image | ground truth (if any) | prediction, captioned, for the MLflow UI."""
        label = None if self.label is None else self.label.cpu().numpy()
        return visualize.prediction_panel(
            load_image(self.sample.image_path),
            self.prediction.cpu().numpy(),
            label,
            f"{self.sample.condition}: {self.sample.name}",
        )


def _consecutive_batches(items: Iterable[dict], batch_size: int) -> Iterator[list[dict]]:
    """Groups consecutive items whose images have the same size, up to
    ``batch_size`` per group, keeping the order."""
    group: list[dict] = []
    for item in items:
        if group and (len(group) == batch_size or item["img"].shape != group[0]["img"].shape):
            yield group
            group = []
        group.append(item)
    if group:
        yield group


def _progress_bar(total: int, enabled: bool, desc: str):
    """tqdm bar in images/s on stderr, or None."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    # Without a terminal (mlflow run logs) redraw rarely instead of every image.
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit="img",
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.1 if interactive else 10.0,
    )


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without any)."""
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


@torch.inference_mode()
def predict_dataset(
    model: torch.nn.Module,
    dataset: SegmentationDataset,
    mode: str | None = None,
    batch_size: int = 1,
    device: Device = None,
    num_workers: int = 0,
    progress: bool = False,
    precision: str = "fp32",
    desc: str = "predict",
) -> Iterator[PredictedImage]:
    """Predict every image of ``dataset`` at its original size, in order.

    Args:
        model: A segmentor with ``inference(img, mode)`` returning logits at
            the input size (:class:`~uda.models.HRDASegmentor`); it is put in
            eval mode and moved to ``device``.
        dataset: A :class:`SegmentationDataset` with the test pipeline (e.g.
            :func:`~uda.evaluation.build_dataset`).
        mode: ``whole``/``slide``; None uses the model's ``test_cfg.mode``.
        batch_size: Images per forward pass; consecutive images of one input
            size are batched, so the results are the same for any value.
        device: Device of the model and the outputs; None keeps the model's.
        num_workers: Data-loading processes (0: in this process).
        progress: Show a progress bar (images/s) on stderr.
        precision: ``fp32``, or ``bf16`` autocast (GPU; logits are resized in
            fp32).
        desc: Progress-bar label.

    Yields:
        :class:`PredictedImage`, one per dataset item, in dataset order.
    """
    if int(batch_size) < 1:
        raise EvaluationError(f"batch_size must be at least 1, got {batch_size}.")
    mode = check_mode(mode)
    device = torch.device(device) if device is not None else model_device(model)
    model.eval().to(device)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=int(num_workers),
        pin_memory=device.type == "cuda",
    )
    bar = _progress_bar(len(dataset), progress, desc)
    index = 0
    try:
        for group in _consecutive_batches(loader, int(batch_size)):
            cpu_threads.rebalance()
            imgs = torch.stack([item["img"] for item in group]).to(device, non_blocking=True)
            # Bounded windows per forward on a CPU (a full-size frame would
            # otherwise batch every window at once, as MIC does on a GPU).
            with autocast(device, precision), bounded_slide(model, device):
                logits = model.inference(imgs, mode)
            for k, item in enumerate(group):
                size = [int(v) for v in item["ori_size"]]
                pred = logits_to_labels(logits[k : k + 1], size)[0]
                label = item["gt"].to(device, non_blocking=True) if "gt" in item else None
                if label is not None and tuple(label.shape) != tuple(size):
                    raise EvaluationError(
                        f"{dataset.samples[index].label_path} is {tuple(label.shape)} but "
                        f"its image is {tuple(size)}; labels must have the image size."
                    )
                yield PredictedImage(index, dataset.samples[index], pred, label)
                index += 1
            if bar is not None:
                bar.update(len(group))
    finally:
        if bar is not None:
            bar.close()
