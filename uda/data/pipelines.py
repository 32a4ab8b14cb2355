"""Data pipelines: MIC's training augmentations and the test-time resize.

Both turn a :class:`~uda.data.layouts.Sample` into a dict of numpy arrays:
``img`` (H, W, 3) float32 RGB normalised with ImageNet mean/std, ``gt``
(H, W) uint8 trainIds (only for labelled samples), ``ori_size`` (H, W) of the
file on disk.

- :class:`TrainPipeline` runs mmsegmentation 0.30's own transforms, built from
  the MIC config vocabulary (``LoadImageFromFile``, ``LoadAnnotations``,
  ``Resize(img_scale)``, ``RandomCrop(crop_size, cat_max_ratio)``,
  ``RandomFlip(prob)``, ``Normalize``, ``Pad``), exactly as in MIC's
  ``uda_cityscapesHR_to_acdcHR_1024x1024.py``. It needs mmcv-full + mmseg.
- :class:`TestPipeline` loads, resizes keeping the aspect ratio to
  ``img_scale`` and normalises; the label stays at its original size, as
  mmseg evaluates (predictions are resized back to ``ori_size``). It uses
  mmseg's transforms when importable and otherwise a numpy/Pillow
  re-implementation (OpenCV for the resize when installed, which is what
  mmcv uses, so both give the same arrays), so evaluation and serving work
  without mmcv.

Sizes use mmcv's conventions: ``img_scale`` is (width, height), i.e.
(long edge, short edge) limits for a ratio-keeping resize;
``crop_size`` is (height, width) as in mmseg's ``RandomCrop``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .labels import IGNORE_INDEX
from .layouts import Sample

__all__ = [
    "IMG_NORM_CFG",
    "IMG_MEAN",
    "IMG_STD",
    "mmseg_available",
    "rescale_size",
    "load_image",
    "load_label",
    "TrainPipeline",
    "TestPipeline",
]

#: ImageNet statistics on 0-255 RGB (MIC's ``img_norm_cfg``).
IMG_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
IMG_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)
IMG_NORM_CFG = dict(mean=list(IMG_MEAN), std=list(IMG_STD), to_rgb=True)

Size = tuple[int, int]


def mmseg_available() -> bool:
    """Whether mmsegmentation (and with it mmcv-full) can be imported."""
    try:
        import mmseg.datasets.pipelines  # noqa: F401
    except Exception:  # ImportError, or a broken mmcv build
        return False
    return True


def rescale_size(width: int, height: int, img_scale: Size) -> Size:
    """New (width, height) of a ratio-keeping resize, as ``mmcv.rescale_size``.

    The image is scaled so that its long edge fits ``max(img_scale)`` and its
    short edge fits ``min(img_scale)``.

    Args:
        width: Original width.
        height: Original height.
        img_scale: (width, height) limits, e.g. (2048, 1024).
    """
    long_edge, short_edge = max(img_scale), min(img_scale)
    factor = min(long_edge / max(width, height), short_edge / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def load_image(path: Path) -> np.ndarray:
    """Reads an image file as uint8 RGB (H, W, 3)."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def load_label(path: Path) -> np.ndarray:
    """Reads a ``*_labelTrainIds.png`` as uint8 (H, W).

    Raises:
        ValueError: if the file is not a single-channel label map.
    """
    with Image.open(path) as img:
        label = np.asarray(img)
    if label.ndim != 2:
        raise ValueError(
            f"{path} is not a single-channel label map (shape {label.shape}); "
            "expected a *_labelTrainIds.png, not a colour visualisation."
        )
    return label.astype(np.uint8, copy=False)


def _resize(img: np.ndarray, size: Size, nearest: bool) -> np.ndarray:
    """Resizes to (width, height): OpenCV as mmcv does, Pillow otherwise."""
    if (img.shape[1], img.shape[0]) == tuple(size):
        return img
    try:
        import cv2
    except ImportError:
        resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
        return np.asarray(Image.fromarray(img).resize(tuple(size), resample))
    flag = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.resize(img, tuple(size), interpolation=flag)


def _normalize(img: np.ndarray) -> np.ndarray:
    """(img - mean) / std in float32, as ``mmcv.imnormalize``."""
    mean = np.asarray(IMG_MEAN, dtype=np.float64)
    stdinv = 1.0 / np.asarray(IMG_STD, dtype=np.float64)
    return ((img.astype(np.float32) - mean) * stdinv).astype(np.float32)


def _mmseg_results(sample: Sample, with_label: bool) -> dict[str, Any]:
    """The input dict mmseg's ``CustomDataset.prepare_*_img`` builds."""
    results: dict[str, Any] = dict(
        img_info=dict(filename=str(sample.image_path)), img_prefix=None, seg_prefix=None, seg_fields=[]
    )
    if with_label:
        results["ann_info"] = dict(seg_map=str(sample.label_path))
    return results


def _import_compose(what: str):
    try:
        from mmseg.datasets.pipelines import Compose
    except Exception as e:
        raise ImportError(
            f"{what} uses mmsegmentation 0.30 transforms, which need mmcv-full "
            f"1.7 and mmsegmentation 0.30 ({type(e).__name__}: {e}). Install "
            "them (see requirements/mmcv.txt)."
        ) from e
    return Compose


class TrainPipeline:
    """MIC's training pipeline (mmseg transforms) for source and target.

    Labelled samples get ``LoadAnnotations`` and the ``cat_max_ratio`` crop
    (the label travels through every geometric transform); unlabelled
    samples (target train) get the same geometry without a label.

    Args:
        img_scale: Resize target (width, height), ratio kept; e.g.
            (2048, 1024) for Cityscapes, (1920, 1080) for ACDC. None skips
            the resize.
        crop_size: Random crop (height, width), e.g. (1024, 1024); padded
            with 0 / 255 (ignore) where the image is smaller.
        cat_max_ratio: Crops where one class covers more than this share of
            the labelled pixels are redrawn (up to 10 times); 0.75 on the
            source in MIC, 1.0 disables.
        flip_prob: Horizontal flip probability.

    Raises:
        ImportError: if mmseg/mmcv-full are not importable.
    """

    def __init__(
        self, img_scale: Size | None, crop_size: Size, cat_max_ratio: float = 1.0, flip_prob: float = 0.5
    ) -> None:
        if not 0 < cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {cat_max_ratio}")
        if not 0 <= flip_prob <= 1:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        Compose = _import_compose("TrainPipeline")
        self.img_scale = tuple(img_scale) if img_scale else None
        self.crop_size = tuple(crop_size)
        self.cat_max_ratio = cat_max_ratio
        self.flip_prob = flip_prob
        self.labelled = Compose(self.config(with_label=True))
        self.unlabelled = Compose(self.config(with_label=False))

    def config(self, with_label: bool) -> list[dict[str, Any]]:
        """The mmseg pipeline config (MIC vocabulary) this pipeline runs."""
        steps: list[dict[str, Any]] = [dict(type="LoadImageFromFile")]
        if with_label:
            steps.append(dict(type="LoadAnnotations"))
        if self.img_scale is not None:
            steps.append(dict(type="Resize", img_scale=self.img_scale))
        crop = dict(type="RandomCrop", crop_size=self.crop_size)
        if with_label and self.cat_max_ratio < 1:
            crop["cat_max_ratio"] = self.cat_max_ratio
        steps += [
            crop,
            dict(type="RandomFlip", prob=self.flip_prob),
            dict(type="Normalize", **IMG_NORM_CFG),
            dict(type="Pad", size=self.crop_size, pad_val=0, seg_pad_val=IGNORE_INDEX),
        ]
        return steps

    def __call__(self, sample: Sample) -> dict[str, Any]:
        with_label = sample.label_path is not None
        pipeline = self.labelled if with_label else self.unlabelled
        results = pipeline(_mmseg_results(sample, with_label))
        out = dict(img=results["img"], ori_size=tuple(results["ori_shape"][:2]))
        if with_label:
            out["gt"] = results["gt_semantic_seg"]
        return out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(img_scale={self.img_scale}, crop_size="
            f"{self.crop_size}, cat_max_ratio={self.cat_max_ratio}, "
            f"flip_prob={self.flip_prob})"
        )


class TestPipeline:
    """Test/val pipeline: resize (ratio kept) to ``img_scale`` and normalise.

    The label, when the sample has one, is returned at its original size.

    Args:
        img_scale: Resize target (width, height), e.g. (1920, 1080); None
            keeps the original size.
        backend: 'mmseg' (mmseg's transforms), 'numpy' (Pillow/numpy, OpenCV
            resize when installed) or 'auto' (mmseg when importable).
    """

    __test__ = False  # not a pytest test class, despite its name

    def __init__(self, img_scale: Size | None, backend: str = "auto") -> None:
        if backend not in ("auto", "mmseg", "numpy"):
            raise ValueError(f"backend must be 'auto', 'mmseg' or 'numpy', got {backend!r}")
        if backend == "auto":
            backend = "mmseg" if mmseg_available() else "numpy"
        self.img_scale = tuple(img_scale) if img_scale else None
        self.backend = backend
        self._compose = None
        if backend == "mmseg":
            Compose = _import_compose("TestPipeline(backend='mmseg')")
            steps: list[dict[str, Any]] = [dict(type="LoadImageFromFile")]
            if self.img_scale is not None:
                steps.append(dict(type="Resize", img_scale=self.img_scale, keep_ratio=True))
            steps.append(dict(type="Normalize", **IMG_NORM_CFG))
            self._compose = Compose(steps)

    def __call__(self, sample: Sample) -> dict[str, Any]:
        if self._compose is not None:
            results = self._compose(_mmseg_results(sample, with_label=False))
            img, ori_size = results["img"], tuple(results["ori_shape"][:2])
        else:
            rgb = load_image(sample.image_path)
            ori_size = rgb.shape[:2]
            if self.img_scale is not None:
                new_size = rescale_size(rgb.shape[1], rgb.shape[0], self.img_scale)
                rgb = _resize(rgb, new_size, nearest=False)
            img = _normalize(rgb)
        out = dict(img=img, ori_size=ori_size)
        if sample.label_path is not None:
            out["gt"] = load_label(sample.label_path)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(img_scale={self.img_scale}, backend={self.backend!r})"
