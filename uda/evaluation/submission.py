"""The ACDC test submission: one label PNG per image at its original size, as
MIC's ``tools/test.py --format-only`` names and encodes them, and their zip
for the benchmark server (same predictions, same zip bytes).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from uda import visualize
from uda.data.dataset import SegmentationDataset
from uda.data.labels import train_id_to_label_id
from uda.data.layouts import Sample

from .inputs import Device, EvaluationError, PathLike
from .prediction import predict_dataset

#: Folder (and zip) name of the submission files, by label encoding; the
#: names of MIC's ``--eval-option imgfile_prefix=labelTrainIds``.
_SUBMISSION_FOLDERS = {False: "labelTrainIds", True: "labelIds"}
#: Fixed zip entry time, so the same predictions give the same zip bytes.
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
#: Threads that encode submission PNGs while the model predicts the next images.
_PNG_WRITERS = 2


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
        model: The segmentor (see :func:`~uda.evaluation.predict_dataset`).
        dataset: Test images with the test pipeline (labels are not used).
        out_dir: Where ``labelTrainIds/`` (or ``labelIds/``) and the zip go.
        label_ids: Write Cityscapes labelIds (7 = road, ...) instead of
            trainIds (the Cityscapes benchmark's encoding).
        mode, batch_size, device, num_workers, progress, precision: See
            :func:`~uda.evaluation.predict_dataset`.
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
    keep = set(visualize.panel_indices([s.condition for s in dataset.samples], num_overlays))
    files, overlays, pending = [], [], []
    start = time.perf_counter()
    # PNG encoding (zlib, which releases the GIL) overlaps with the next forward passes.
    with ThreadPoolExecutor(max_workers=_PNG_WRITERS) as writers:
        for item in predict_dataset(
            model, dataset, mode, batch_size, device, num_workers, progress, precision, desc="submission"
        ):
            if item.index in keep:
                # image | prediction: a submission's panels show no ground truth
                overlays.append((item.sample, replace(item, label=None).panel()))
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
