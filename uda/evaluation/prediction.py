"""Evaluation of a segmentor on ACDC: mIoU on val, submission PNGs for test.

Predictions are made as MIC / mmsegmentation 0.30 make them
(``EncoderDecoder.inference`` with ``rescale=True``): the test pipeline
resizes the image to ``img_scale`` keeping its ratio, the model returns
logits at that size, the logits are resized back to the image's *original*
size (bilinear, ``align_corners=False``), soft-maxed and arg-maxed. So a
prediction always has the size of the label file, and our mIoU equals
``mmseg.core.evaluation.mean_iou`` on the same predictions (a test checks
it). How absent classes are counted is documented in :mod:`uda.metrics`.

The confusion matrices stay on the model's device; only the final 19x19
counts travel to the host. Images are batched in order, consecutive images
of the same input size together (never padded: padding would change what
the model sees), so results do not depend on the batch size.

The module needs torch, numpy and Pillow; matplotlib only for the figures,
mlflow only inside the ``log_*`` functions, so it is usable without MLflow::

    from uda.evaluation import build_dataset, evaluate
    from uda.registry import load_segmentor

    model, _ = load_segmentor('models:/cs2acdc-student@serving', 'cuda')
    result = evaluate(model, build_dataset('data/acdc', 'val'), device='cuda')
    print(result.table.miou, result.table.per_condition_miou)
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from uda import cpu_threads
from uda.data.dataset import SegmentationDataset, acdc_dataset
from uda.data.labels import CLASSES, PALETTE, colorize, train_id_to_label_id
from uda.data.layouts import ACDC_CONDITIONS, Sample
from uda.data.pipelines import load_image
from uda.errors import UserError
from uda.metrics import ConditionTable, ConfusionMatrix, PerConditionMetrics
from uda.models.hrda import bounded_slide
from uda.precision import PRECISIONS, autocast

__all__ = [
    "SPLITS",
    "MODES",
    "PRECISIONS",
    "EvaluationError",
    "PredictedImage",
    "EvaluationResult",
    "SubmissionResult",
    "check_split",
    "check_mode",
    "build_dataset",
    "load_model",
    "logits_to_labels",
    "predict_dataset",
    "evaluate",
    "submission_filename",
    "save_label_png",
    "write_submission",
    "confusion_matrix_figure",
    "per_class_iou_figure",
    "format_table",
    "log_evaluation",
    "log_submission",
]


#: ACDC splits the evaluate entry point handles.
SPLITS = ("val", "test")
#: Inference modes of :meth:`uda.models.HRDASegmentor.inference`.
MODES = ("whole", "slide")
#: Folder (and zip) name of the submission files, by label encoding; the
#: names of MIC's ``--eval-option imgfile_prefix=labelTrainIds``.
_SUBMISSION_FOLDERS = {False: "labelTrainIds", True: "labelIds"}
#: Fixed zip entry time, so the same predictions give the same zip bytes.
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
#: Threads that encode submission PNGs while the model predicts the next images.
_PNG_WRITERS = 2
#: Long edge of the images in the overlay panels (pixels).
_OVERLAY_WIDTH = 480

PathLike = str | os.PathLike
Device = str | torch.device | None


class EvaluationError(UserError, ValueError):
    """A wrong evaluation request (split, mode, model path, unlabelled data)."""


# ----------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------
def check_split(split: str) -> str:
    """``split`` if it is ``val`` or ``test``, else an :class:`EvaluationError`."""
    if split not in SPLITS:
        raise EvaluationError(
            f"split must be val (mIoU against the labels) or test (submission PNGs), got {split!r}."
        )
    return split


def check_mode(mode: str | None) -> str | None:
    """``whole``/``slide``, or None (``''`` too) for the model's ``test_cfg.mode``."""
    if mode in (None, ""):
        return None
    if mode not in MODES:
        raise EvaluationError(
            f"mode must be whole or slide (or '' for the model's test_cfg.mode), got {mode!r}."
        )
    return mode


def check_precision(precision: str) -> str:
    """``fp32`` or ``bf16`` (autocast; for GPUs), else an :class:`EvaluationError`."""
    if precision not in PRECISIONS:
        raise EvaluationError(
            f"precision must be fp32 or bf16 (autocast, for GPUs with bf16 support), got {precision!r}."
        )
    return precision


def build_dataset(
    root: PathLike,
    split: str = "val",
    img_scale: Sequence[int] | None = (1920, 1080),
    conditions: Iterable[str] | None = None,
    backend: str = "auto",
) -> SegmentationDataset:
    """The ACDC ``split`` with MIC's test pipeline (resize keeping the ratio).

    Args:
        root: ACDC root, as downloaded (nested) or flattened as in MIC's README.
        split: ``val`` (labelled) or ``test``.
        img_scale: Test resize target (width, height): the preset's
            ``data.target.img_scale``; None keeps the original size.
        conditions: Subset of fog/night/rain/snow; None keeps all present.
        backend: Test pipeline backend ('auto', 'mmseg', 'numpy').

    Raises:
        EvaluationError: ``split`` is not val/test.
        DatasetLayoutError: the root or split is missing (message shows the
            expected layout).
    """
    check_split(split)
    return acdc_dataset(
        root,
        split,
        train=False,
        conditions=conditions,
        img_scale=tuple(img_scale) if img_scale else None,
        backend=backend,
    )


def load_model(
    model_uri: PathLike,
    device: Device = "cpu",
    foreign_cfg: Mapping[str, Any] | None = None,
    architecture: str = "",
) -> tuple[torch.nn.Module, dict]:
    """:func:`uda.registry.load_segmentor`: every URI form, one clear error.

    Args:
        model_uri: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
            ``models:/NAME/latest``, ``models:/m-<logged model id>``,
            ``runs:/RUN_ID/PATH``, a logged-model folder or a checkpoint file.
        device: Where to put the model.
        foreign_cfg, architecture: The architecture of a foreign checkpoint
            file (a preset's ``<role>.model``) and where it came from.

    Returns:
        ``(model, model_cfg)``, the model in eval mode.

    Raises:
        RegistryError (``ModelNotFoundError`` for nothing by that name) /
        CheckpointError: unknown model, alias, version, run or logged model
        (the message lists what exists), or a bad checkpoint.
    """
    from uda.errors import UserError
    from uda.registry import MODEL_URI_FORMS, load_segmentor

    try:
        return load_segmentor(
            model_uri, device=str(device), foreign_cfg=foreign_cfg, architecture=architecture
        )
    except FileNotFoundError as err:
        if isinstance(err, UserError):
            raise
        raise EvaluationError(f"{err} Pass {MODEL_URI_FORMS}.") from None


# ----------------------------------------------------------------------
# Prediction
# ----------------------------------------------------------------------
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


def logits_to_labels(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Class ids at ``size`` from ``(1, C, h, w)`` or ``(C, h, w)`` logits.

    As mmseg's ``EncoderDecoder.inference(rescale=True)`` + ``simple_test``:
    bilinear resize (``align_corners=False``) of the logits to the original
    size, softmax over classes, argmax.

    Returns:
        ``(H, W)`` int64 tensor on the logits' device.
    """
    if logits.dim() == 3:
        logits = logits[None]
    logits = logits.float()
    if tuple(logits.shape[2:]) != tuple(size):
        logits = F.interpolate(logits, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)
    return F.softmax(logits, dim=1).argmax(dim=1)[0]


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


def _model_device(model: torch.nn.Module) -> torch.device:
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
            :func:`build_dataset`).
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
    device = torch.device(device) if device is not None else _model_device(model)
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
                pred = logits_to_labels(logits[k], size)
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


# ----------------------------------------------------------------------
# Overlays
# ----------------------------------------------------------------------
def _overlay_indices(samples: Sequence[Sample], count: int) -> list[int]:
    """The first image of each condition, then the next ones, ``count`` in all."""
    if count <= 0:
        return []
    chosen, seen = [], set()
    for i, sample in enumerate(samples):
        if sample.condition not in seen:
            seen.add(sample.condition)
            chosen.append(i)
    rest = [i for i in range(len(samples)) if i not in set(chosen)]
    return sorted((chosen + rest)[:count])


def _thumbnail(image: np.ndarray, width: int = _OVERLAY_WIDTH) -> np.ndarray:
    if image.shape[1] <= width:
        return image
    height = max(1, round(image.shape[0] * width / image.shape[1]))
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def _overlay_panel(item: PredictedImage) -> np.ndarray:
    """image | ground truth | prediction (Cityscapes colours), with captions."""
    from uda import visualize

    image = _thumbnail(load_image(item.sample.image_path))
    cells = [image]
    captions = [f"{item.sample.condition}: {item.sample.name}"]
    if item.label is not None:
        cells.append(colorize(item.label.cpu().numpy().astype(np.uint8)))
        captions.append("ground truth")
    cells.append(colorize(item.prediction.cpu().numpy().astype(np.uint8)))
    captions.append("prediction")
    return visualize.grid([cells], [captions])


# ----------------------------------------------------------------------
# Evaluation (val)
# ----------------------------------------------------------------------
@dataclass
class EvaluationResult:
    """What :func:`evaluate` measured.

    Attributes:
        table: mIoU / aAcc / mAcc / per-class IoU, overall and per condition.
        metrics: The per-condition confusion matrices (on the device).
        num_images: Images evaluated.
        seconds: Wall time of loading + inference + scoring.
        overlays: ``(sample, panel)`` pairs: image | ground truth | prediction.
    """

    table: ConditionTable
    metrics: PerConditionMetrics
    num_images: int
    seconds: float
    overlays: list[tuple[Sample, np.ndarray]] = field(default_factory=list)

    @property
    def confusion(self) -> ConfusionMatrix:
        """Overall confusion matrix (sum over conditions)."""
        return self.metrics.overall()

    @property
    def images_per_second(self) -> float:
        return self.num_images / self.seconds if self.seconds > 0 else math.nan


def _conditions_of(samples: Sequence[Sample]) -> tuple[str, ...]:
    present = {s.condition for s in samples}
    ordered = [c for c in ACDC_CONDITIONS if c in present]
    return tuple(ordered + sorted(present - set(ordered)))


def evaluate(
    model: torch.nn.Module,
    dataset: SegmentationDataset,
    mode: str | None = None,
    batch_size: int = 1,
    device: Device = None,
    num_workers: int = 0,
    progress: bool = False,
    precision: str = "fp32",
    num_overlays: int = 4,
) -> EvaluationResult:
    """mIoU, per-class IoU, pixel accuracy, overall and per condition.

    Args:
        model: The segmentor (see :func:`predict_dataset`).
        dataset: A labelled dataset with the test pipeline (ACDC val).
        mode: ``whole``/``slide``; None: the model's ``test_cfg.mode``.
        batch_size: Images per forward pass (results do not depend on it).
        device: Device for the model and the confusion matrices.
        num_workers: Data-loading processes.
        progress: Progress bar with images/s.
        precision: ``fp32`` or ``bf16``.
        num_overlays: Prediction panels to keep (first image of each
            condition first).

    Returns:
        An :class:`EvaluationResult`.

    Raises:
        EvaluationError: a sample has no label (use ``write_submission``).
    """
    unlabelled = [s for s in dataset.samples if s.label_path is None]
    if unlabelled:
        raise EvaluationError(
            f"{len(unlabelled)} of {len(dataset)} images have no label (e.g. "
            f"{unlabelled[0].image_path}); mIoU needs a labelled split (ACDC val). "
            f"For test images write a submission (split=test)."
        )
    device = torch.device(device) if device is not None else _model_device(model)
    metrics = PerConditionMetrics(_conditions_of(dataset.samples), device=device)
    keep = set(_overlay_indices(dataset.samples, num_overlays))
    overlays = []
    start = time.perf_counter()
    for item in predict_dataset(
        model, dataset, mode, batch_size, device, num_workers, progress, precision, desc="evaluate"
    ):
        metrics.update(item.prediction, item.label, item.sample.condition)
        if item.index in keep:
            overlays.append((item.sample, _overlay_panel(item)))
    table = metrics.compute()  # host sync: all device work is done here
    return EvaluationResult(table, metrics, len(dataset), time.perf_counter() - start, overlays)


# ----------------------------------------------------------------------
# Submission (test)
# ----------------------------------------------------------------------
@dataclass
class SubmissionResult:
    """What :func:`write_submission` wrote.

    Attributes:
        folder: Folder of the PNGs (``labelTrainIds`` or ``labelIds``).
        zip_path: The zip for the benchmark server (PNGs at its root).
        files: The PNG paths, in dataset order.
        label_ids: True if the PNGs hold Cityscapes labelIds, else trainIds.
        seconds: Wall time.
        overlays: ``(sample, panel)`` pairs: image | prediction.
    """

    folder: Path
    zip_path: Path
    files: list[Path]
    label_ids: bool
    seconds: float
    overlays: list[tuple[Sample, np.ndarray]] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return len(self.files)

    @property
    def images_per_second(self) -> float:
        return self.num_images / self.seconds if self.seconds > 0 else math.nan


def submission_filename(sample: Sample) -> str:
    """``<image file name without extension>.png``, e.g.
    ``GOPR0475_frame_000041_rgb_anon.png``: the name mmseg's
    ``CityscapesDataset.results2img`` gives (MIC's and the original
    submission's ``--format-only`` output)."""
    return f"{Path(sample.image_path).stem}.png"


def save_label_png(path: PathLike, label: np.ndarray) -> Path:
    """Write a label map as an 8-bit grayscale (mode ``L``) PNG.

    Args:
        path: Destination.
        label: ``(H, W)`` integer map with values in [0, 255].
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be (H, W), got shape {label.shape}.")
    if label.dtype != np.uint8:
        if label.size and (label.min() < 0 or label.max() > 255):
            raise ValueError("label values must lie in [0, 255].")
        label = label.astype(np.uint8)
    path = Path(path)
    Image.fromarray(label).save(path, format="PNG")
    return path


def _check_unique_names(samples: Sequence[Sample]) -> None:
    seen: dict[str, Path] = {}
    for sample in samples:
        name = submission_filename(sample)
        if name in seen:
            raise EvaluationError(
                f"Two test images give the same submission file {name}: {seen[name]} and {sample.image_path}."
            )
        seen[name] = Path(sample.image_path)


def _write_zip(zip_path: Path, files: Sequence[Path]) -> Path:
    """Zip ``files`` flat (names only), sorted, fixed timestamps; atomically."""
    fd, tmp = tempfile.mkstemp(prefix=f".{zip_path.name}.", suffix=".tmp", dir=zip_path.parent)
    os.close(fd)
    try:
        # PNGs are compressed already: store them.
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            for path in sorted(files, key=lambda p: p.name):
                info = zipfile.ZipInfo(path.name, date_time=_ZIP_DATE_TIME)
                info.external_attr = 0o644 << 16
                archive.writestr(info, path.read_bytes())
        os.replace(tmp, zip_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return zip_path


def write_submission(
    model: torch.nn.Module,
    dataset: SegmentationDataset,
    out_dir: PathLike,
    label_ids: bool = False,
    mode: str | None = None,
    batch_size: int = 1,
    device: Device = None,
    num_workers: int = 0,
    progress: bool = False,
    precision: str = "fp32",
    num_overlays: int = 4,
    zip_name: str | None = None,
) -> SubmissionResult:
    """One label PNG per image, at its original size, and a zip of them.

    The files follow MIC's ``tools/test.py --test-set --format-only
    --eval-option imgfile_prefix=labelTrainIds to_label_id=False`` (how MIC
    and the original submission made their ACDC test predictions): one flat
    folder, ``<image name>_rgb_anon.png`` per image, trainIds 0-18. Ours are
    mode ``L`` PNGs (mmseg wrote palette PNGs holding the same values).

    Args:
        model: The segmentor (see :func:`predict_dataset`).
        dataset: Test images with the test pipeline (labels are not used).
        out_dir: Where ``labelTrainIds/`` (or ``labelIds/``) and the zip go.
        label_ids: Write Cityscapes labelIds (7 = road, ...) instead of
            trainIds (the Cityscapes benchmark's encoding).
        mode, batch_size, device, num_workers, progress, precision: See
            :func:`predict_dataset`.
        num_overlays: image | prediction panels to keep.
        zip_name: File name of the zip; default ``<folder name>.zip``.

    Returns:
        A :class:`SubmissionResult`.

    Raises:
        EvaluationError: two images would get the same file name.
    """
    _check_unique_names(dataset.samples)
    folder = Path(out_dir) / _SUBMISSION_FOLDERS[bool(label_ids)]
    folder.mkdir(parents=True, exist_ok=True)
    keep = set(_overlay_indices(dataset.samples, num_overlays))
    files, overlays, pending = [], [], []
    start = time.perf_counter()
    # PNG encoding (zlib, which releases the GIL) overlaps with the next forward passes.
    with ThreadPoolExecutor(max_workers=_PNG_WRITERS) as writers:
        for item in predict_dataset(
            model, dataset, mode, batch_size, device, num_workers, progress, precision, desc="submission"
        ):
            if item.index in keep:
                overlays.append(
                    (item.sample, _overlay_panel(PredictedImage(item.index, item.sample, item.prediction)))
                )
            label = item.prediction.to(torch.uint8).cpu().numpy()
            if label_ids:
                label = train_id_to_label_id(label)
            path = folder / submission_filename(item.sample)
            pending.append(writers.submit(save_label_png, path, label))
            files.append(path)
            if len(pending) > 4 * _PNG_WRITERS:  # bound the label maps held in memory
                pending.pop(0).result()
        for future in pending:
            future.result()  # re-raises a failed write
    zip_path = _write_zip(Path(out_dir) / (zip_name or f"{folder.name}.zip"), files)
    return SubmissionResult(folder, zip_path, files, bool(label_ids), time.perf_counter() - start, overlays)


# ----------------------------------------------------------------------
# Figures and text
# ----------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_matrix_figure(
    confusion: ConfusionMatrix | torch.Tensor | np.ndarray,
    class_names: Sequence[str] = CLASSES,
    title: str = "Confusion matrix (rows: ground truth, share of its pixels)",
):
    """Row-normalised confusion matrix (each row sums to 1: recall on the
    diagonal); rows of classes without ground-truth pixels stay blank.

    Args:
        confusion: A :class:`ConfusionMatrix` or its ``(C, C)`` counts
            (rows = ground truth, columns = prediction).
        class_names: Tick labels.
        title: Figure title.

    Returns:
        A matplotlib Figure.
    """
    plt = _pyplot()
    counts = confusion.matrix if isinstance(confusion, ConfusionMatrix) else confusion
    counts = torch.as_tensor(counts).detach().cpu().double().numpy()
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.where(totals > 0, counts / np.maximum(totals, 1), np.nan)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(0.45 * n + 3, 0.45 * n + 2), dpi=100)
    image = ax.imshow(np.ma.masked_invalid(shares), cmap="Blues", vmin=0, vmax=1)
    for (row, col), share in np.ndenumerate(shares):
        if np.isfinite(share) and share >= 0.005:
            ax.text(
                col,
                row,
                f"{100 * share:.0f}",
                ha="center",
                va="center",
                fontsize=6,
                color="white" if share > 0.5 else "black",
            )
    ax.set_xticks(range(n), class_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="share of the row")
    fig.tight_layout()
    return fig


def per_class_iou_figure(table: ConditionTable, title: str | None = None):
    """Per-class IoU bars (all images; Cityscapes colours) with each
    condition's IoU as markers; classes absent from prediction and ground
    truth (NaN) are marked ``n/a``.

    Returns:
        A matplotlib Figure.
    """
    plt = _pyplot()
    names = list(table.class_names)
    x = np.arange(len(names))
    overall = np.asarray(table.overall.iou, dtype=float)
    colours = [np.asarray(c) / 255 for c in PALETTE] if len(names) == len(PALETTE) else None
    fig, ax = plt.subplots(figsize=(11, 4.5), dpi=100)
    ax.bar(
        x,
        np.nan_to_num(overall),
        color=colours,
        edgecolor="black",
        linewidth=0.5,
        label=f"all (mIoU {100 * table.miou:.1f})",
    )
    markers = "ov^sDP*X"
    for k, (condition, metrics) in enumerate(table.per_condition.items()):
        ax.scatter(
            x,
            np.asarray(metrics.iou, dtype=float),
            marker=markers[k % len(markers)],
            s=22,
            zorder=3,
            label=f"{condition} ({100 * metrics.miou:.1f})",
        )
    for i in np.flatnonzero(np.isnan(overall)):
        ax.text(i, 0.01, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(x, names, rotation=60, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("IoU")
    ax.set_title(title or "Per-class IoU (bars: all images; markers: per condition)")
    ax.legend(fontsize=8, ncol=3, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def format_table(table: ConditionTable) -> str:
    """A plain-text summary: overall and per-condition mIoU/aAcc, per-class IoU (%)."""

    def pct(value: float) -> str:
        return "  n/a" if math.isnan(value) else f"{100 * value:5.1f}"

    lines = [
        f"{'':14s} {'mIoU':>5s} {'aAcc':>5s} {'mAcc':>5s}",
        f"{'all':14s} {pct(table.miou)} {pct(table.overall.pixel_accuracy)} "
        f"{pct(table.overall.mean_accuracy)}",
    ]
    for condition, metrics in table.per_condition.items():
        lines.append(
            f"{condition:14s} {pct(metrics.miou)} {pct(metrics.pixel_accuracy)} {pct(metrics.mean_accuracy)}"
        )
    lines.append("")
    lines.append(f"{'class':14s} {'IoU':>5s}  " + " ".join(f"{c[:5]:>5s}" for c in table.per_condition))
    for class_id, name in enumerate(table.class_names):
        per_condition = " ".join(pct(m.iou[class_id]) for m in table.per_condition.values())
        lines.append(f"{name:14s} {pct(table.overall.iou[class_id])}  {per_condition}")
    return "\n".join(lines)


# ----------------------------------------------------------------------
# MLflow
# ----------------------------------------------------------------------
def _columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    """Row dicts → column lists (NaN → None, so the JSON table stays valid)."""
    columns: dict[str, list] = {key: [] for key in rows[0]} if rows else {}
    for row in rows:
        for key, value in row.items():
            is_nan = isinstance(value, float) and math.isnan(value)
            columns[key].append(None if is_nan else value)
    return columns


def _condition_rows(result: EvaluationResult) -> list[dict[str, Any]]:
    """One row for all images, then one per condition."""
    named = [("all", result.table.overall)] + list(result.table.per_condition.items())
    return [
        {
            "condition": condition,
            "mIoU": m.miou,
            "aAcc": m.pixel_accuracy,
            "mAcc": m.mean_accuracy,
            "pixels": m.num_pixels,
        }
        for condition, m in named
    ]


def log_evaluation(
    result: EvaluationResult, prefix: str = "", artifact_dir: str = "evaluation", model_id: str | None = None
) -> dict[str, float]:
    """Log an :class:`EvaluationResult` to the active MLflow run.

    Metrics (fractions in [0, 1]; NaN ones left out): ``mIoU``, ``aAcc``,
    ``mAcc``, ``IoU.<class>``, ``mIoU.<condition>``, ``aAcc.<condition>``,
    ``images_per_second``, ``num_images``, each with ``prefix``. Artifacts under
    ``artifact_dir``: ``per_class.json`` and ``per_condition.json`` (tables),
    ``confusion_matrix.json`` (raw counts, overall and per condition),
    ``confusion_matrix.png``, ``per_class_iou.png``, ``overlays/*.png``.

    Args:
        result: From :func:`evaluate`.
        prefix: Metric-name prefix (e.g. ``val.``).
        artifact_dir: Artifact folder.
        model_id: MLflow 3 logged-model id (``check_model_uri(uri).model_id``): the
            metrics are linked to that model too.

    Returns:
        The logged metrics.
    """
    import mlflow

    plt = _pyplot()
    metrics = result.table.to_flat_dict(prefix)
    metrics[f"{prefix}images_per_second"] = result.images_per_second
    metrics[f"{prefix}num_images"] = float(result.num_images)
    metrics = {k: v for k, v in metrics.items() if not math.isnan(v)}
    mlflow.log_metrics(metrics, model_id=model_id)
    mlflow.log_table(_columns(result.table.rows()), f"{artifact_dir}/per_class.json")
    mlflow.log_table(_columns(_condition_rows(result)), f"{artifact_dir}/per_condition.json")
    mlflow.log_dict(
        {
            "classes": list(result.table.class_names),
            "rows": "ground truth",
            "columns": "prediction",
            "overall": result.confusion.matrix.cpu().tolist(),
            "per_condition": {name: m.matrix.cpu().tolist() for name, m in result.metrics.matrices.items()},
        },
        f"{artifact_dir}/confusion_matrix.json",
    )
    for name, figure in (
        ("confusion_matrix", confusion_matrix_figure(result.confusion, result.table.class_names)),
        ("per_class_iou", per_class_iou_figure(result.table)),
    ):
        mlflow.log_figure(figure, f"{artifact_dir}/{name}.png")
        plt.close(figure)
    _log_overlays(result.overlays, artifact_dir)
    return metrics


def _log_overlays(overlays: Sequence[tuple[Sample, np.ndarray]], artifact_dir: str) -> None:
    import mlflow

    for k, (sample, panel) in enumerate(overlays):
        mlflow.log_image(panel, f"{artifact_dir}/overlays/{k:02d}_{sample.condition}_{sample.name}.png")


def log_submission(result: SubmissionResult, artifact_dir: str = "submission") -> None:
    """Log the submission zip, its throughput and a few image | prediction panels."""
    import mlflow

    mlflow.log_artifact(str(result.zip_path), artifact_dir)
    mlflow.log_metrics(
        {"num_images": float(result.num_images), "images_per_second": result.images_per_second}
    )
    mlflow.set_tag("submission.encoding", result.folder.name)
    _log_overlays(result.overlays, artifact_dir)
