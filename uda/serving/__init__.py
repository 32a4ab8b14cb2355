"""The segmentor as an MLflow pyfunc model, for ``mlflow models serve``.

This package owns the served model, one concern per module:

* :mod:`~uda.serving.request`: the request format (base64 PNG/JPEG in, PNG
  label maps out), its budgets, decoding, the signature and PNG helpers;
* :mod:`~uda.serving.inference`: bounded-memory windowed inference, the
  per-request deadline and the fair sharing of the device between requests;
* :mod:`~uda.serving.model`: :class:`SegmentationModel`, the pyfunc model;
* :mod:`~uda.serving.packaging`: logging a checkpoint as that model
  (:func:`log_segmentor`).

Each image is normalised with the ImageNet mean/std of the training
pipeline and segmented at its own resolution in the model's test mode
(``model_cfg.test_cfg``: overlapping slide windows or one whole pass), like
MIC's test script on 1920×1080 ACDC frames.

Only torch, timm, numpy, Pillow, pandas and MLflow's pyfunc interface are
imported (no mmcv / mmseg).
"""

from .inference import SLIDE_BATCH_PIXELS, TIMEOUT_ENV, RequestTimeout
from .model import CHECKPOINT_ARTIFACT, DEVICE_ENV, SegmentationModel
from .packaging import PIP_REQUIREMENTS, log_segmentor, serving_device
from .request import (
    IMAGE_FORMATS,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_IMAGE_SIDE,
    MAX_IMAGES_PER_REQUEST,
    MAX_REQUEST_BYTES,
    MAX_REQUEST_PIXELS,
    MAX_WHOLE_MODE_PIXELS,
    MIN_IMAGE_SIDE,
    RequestTooLarge,
    decode_png,
    encode_png,
    example_image_png,
    input_frame,
    serving_signature,
)

__all__ = [
    "SegmentationModel",
    "CHECKPOINT_ARTIFACT",
    "MAX_IMAGE_SIDE",
    "MIN_IMAGE_SIDE",
    "MAX_IMAGE_PIXELS",
    "MAX_REQUEST_PIXELS",
    "MAX_WHOLE_MODE_PIXELS",
    "MAX_IMAGE_BYTES",
    "MAX_REQUEST_BYTES",
    "MAX_IMAGES_PER_REQUEST",
    "SLIDE_BATCH_PIXELS",
    "IMAGE_FORMATS",
    "DEVICE_ENV",
    "TIMEOUT_ENV",
    "RequestTooLarge",
    "RequestTimeout",
    "serving_signature",
    "example_image_png",
    "encode_png",
    "decode_png",
    "input_frame",
    "PIP_REQUIREMENTS",
    "log_segmentor",
    "serving_device",
]
