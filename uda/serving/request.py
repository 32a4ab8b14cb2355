"""The segmentor as an MLflow pyfunc model, for ``mlflow models serve``.

This module owns the served model: the request format, its limits (size,
pixel and byte budgets), bounded-memory windowed inference, the per-request
deadline and the fair sharing of the inference device between requests.

Request: a DataFrame with one row per image and a string column ``image``
holding the base64-encoded PNG or JPEG file (raw ``bytes`` are accepted too
when calling the model from Python). Over REST::

    {"dataframe_split": {"columns": ["image"], "data": [["iVBORw0KGgo..."]]},
     "params": {"colorize": true}}

Response: one row per image with

``label_map``
    base64 PNG (8-bit grayscale) of the predicted Cityscapes trainIds
    (0..18, see :mod:`uda.data.labels`), same height and width as the input;
``height``, ``width``
    the input size in pixels;
``color``
    only when asked for (param ``colorize`` or a boolean ``colorize`` column):
    base64 PNG (RGB) of the label map in the Cityscapes palette.

Each image is normalised with the ImageNet mean/std of the training
pipeline and segmented at its own resolution in the model's test mode
(``model_cfg.test_cfg``: overlapping slide windows or one whole pass), like
MIC's test script on 1920×1080 ACDC frames.

Bounded cost per request:

* **Budgets.** At most :data:`MAX_IMAGES_PER_REQUEST` images,
  :data:`MAX_IMAGE_PIXELS` pixels per image (sides
  :data:`MIN_IMAGE_SIDE`..:data:`MAX_IMAGE_SIDE`),
  :data:`MAX_REQUEST_PIXELS` pixels and :data:`MAX_REQUEST_BYTES` encoded
  bytes per request (sums over its images). They are checked from the file
  headers before any pixel is decoded; an over-budget request is answered
  with HTTP 413 and a message naming the limit.
* **Memory.** Slide-mode models run their windows through the segmentor's
  own window loop (:meth:`uda.models.hrda.HRDASegmentor.slide_forward`,
  the one :meth:`~uda.models.hrda.HRDASegmentor.slide_inference` uses) in
  batches of at most :data:`SLIDE_BATCH_PIXELS` window pixels, and the
  overlapping window logits are averaged in a strip one window high that is
  turned into label-map rows as soon as no later window covers them. The
  model's ``test_cfg.max_windows_per_batch`` is set at load to its device
  default (:func:`uda.models.hrda.default_windows_per_batch`: on CPU at
  most 2**18 input pixels per backbone pass, so the 9 detail windows of a
  full-recipe window run one per pass; on CUDA unbounded) unless its config
  sets one. So a request costs one batch of windows plus about 4 bytes per
  pixel (RGB + label map) and one strip, whatever the image size; the label
  map equals ``model(img).argmax(1)`` (same windows, sums in the same
  order) up to last-bit differences of the window logits between batch
  sizes, which can only flip near-tied pixels.
* **Deadline.** Under ``mlflow models serve`` the model reads the server's
  request timeout (``-t``, passed to the server process as
  ``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT``) and checks it before every
  window batch (from a little before it, so that the client gets this
  module's message): a request that ran out of time stops there (HTTP 504)
  instead of computing on after the server has given up on it.
* **Fair turns.** Requests take turns on the device one window batch at a
  time, in arrival order, so a small request waits behind a large one for at
  most one window batch of each request ahead of it, not for the whole
  request.

Malformed requests raise :class:`mlflow.exceptions.MlflowException` with
``INVALID_PARAMETER_VALUE``, which MLflow's scoring server answers with HTTP
400 and the message; the server keeps serving.

Only torch, timm, numpy, Pillow, pandas and MLflow's pyfunc interface are
imported (no mmcv / mmseg).
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import io
import math
import os
import threading
from pathlib import Path
from time import monotonic as _now
from typing import Any
from collections.abc import Iterator, Mapping, Sequence

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, INVALID_PARAMETER_VALUE
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image, UnidentifiedImageError

from uda.data.labels import colorize
from uda.data.pipelines import IMG_MEAN, IMG_STD

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
]

#: Key of the checkpoint file in the pyfunc model's ``artifacts``.
CHECKPOINT_ARTIFACT = "checkpoint"
#: Largest accepted image height/width in pixels.
MAX_IMAGE_SIDE = 4096
#: Smallest accepted image height/width: MiT's stage-1 spatial reduction
#: (ratio 8 on a stride-4 map of the half-scale context input) needs 64.
MIN_IMAGE_SIDE = 64
#: Most pixels of one image (4096×2048, e.g. two 2048×1024 Cityscapes
#: frames side by side): the default model segments it in 10-20 s on 2 CPU
#: cores, inside MLflow's 60 s default timeout.
MAX_IMAGE_PIXELS = 4096 * 2048
#: Most pixels of one request, summed over its images (one 4096×2048
#: image, four 1920×1080 ACDC frames, or 16 images of 1024×512).
MAX_REQUEST_PIXELS = 4096 * 2048
#: Most pixels of one image for a model whose test mode is ``'whole'``
#: (one pass over the image, so its memory grows with the image): a
#: 2048×1024 Cityscapes frame.
MAX_WHOLE_MODE_PIXELS = 2048 * 1024
#: Largest accepted encoded image file: room for an incompressible
#: 4096×2048 PNG (24 MiB; a photo is about half that).
MAX_IMAGE_BYTES = 32 * 1024 * 1024
#: Largest sum of the encoded image files of one request.
MAX_REQUEST_BYTES = 32 * 1024 * 1024
#: Most images per request.
MAX_IMAGES_PER_REQUEST = 16
#: Window pixels per inference batch in slide mode (8 windows of the
#: default's 128×128, ~50 ms on 2 CPU cores and faster per pixel than
#: larger batches; one window of the full recipe's 1024×1024, never less):
#: bounds the activations held at once and the time between two deadline
#: checks or turns of other requests.
SLIDE_BATCH_PIXELS = 2**17
#: Accepted image file formats (Pillow names; camera JPEGs with extra
#: pictures open as 'MPO').
IMAGE_FORMATS = ("PNG", "JPEG", "MPO")
#: Environment variable choosing the inference device (``cpu``, ``cuda``,
#: ``cuda:1``); default: CUDA when available.
DEVICE_ENV = "UDA_SERVING_DEVICE"
#: The request timeout in seconds of MLflow's scoring server: ``mlflow
#: models serve -t`` (default 60) sets it in the server's environment, where
#: the server's timeout middleware and this model both read it. Unset (e.g.
#: ``predict`` from Python): no deadline.
TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"

# ImageNet mean/std on 0-255 RGB: the img_norm_cfg of MIC/mmseg pipelines (one owner).
_MEAN = np.array(IMG_MEAN, dtype=np.float32)
_STD = np.array(IMG_STD, dtype=np.float32)
_DATA_URL_MARK = ";base64,"
# The model stops this long before the server's timeout (at most 1 s, 10 %
# of it), so that the client gets this module's 504 message, which says
# what to change, rather than the server's generic one.
_DEADLINE_MARGIN_S = 1.0
_DEADLINE_MARGIN_FRACTION = 0.1


def _bad_input(message: str) -> MlflowException:
    """An error the scoring server answers with HTTP 400 and ``message``."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class RequestTooLarge(MlflowException):
    """A request over one of the budgets: HTTP 413 (Content Too Large).

    The error code stays ``INVALID_PARAMETER_VALUE`` (the client has to
    change the request; retrying it unchanged will not help).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    def get_http_status_code(self) -> int:
        return 413


class RequestTimeout(MlflowException):
    """The request ran past its deadline and was stopped (HTTP 504)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=DEADLINE_EXCEEDED)


def serving_signature() -> ModelSignature:
    """Input/output schema and the ``colorize`` parameter of the model."""
    inputs = Schema(
        [
            ColSpec("string", "image"),
            ColSpec("boolean", "colorize", required=False),
        ]
    )
    outputs = Schema(
        [
            ColSpec("string", "label_map"),
            ColSpec("long", "height"),
            ColSpec("long", "width"),
            ColSpec("string", "color", required=False),
        ]
    )
    params = ParamSchema([ParamSpec("colorize", "boolean", False)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def encode_png(array: np.ndarray) -> str:
    """Base64 text of a lossless PNG of a ``(H, W)`` uint8 map or an
    ``(H, W, 3)`` uint8 RGB image."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png(text: str) -> np.ndarray:
    """Inverse of :func:`encode_png` (e.g. a response's ``label_map``)."""
    with Image.open(io.BytesIO(base64.b64decode(text))) as image:
        return np.array(image)


def example_image_png(height: int = 64, width: int = 96) -> bytes:
    """A small deterministic street-like PNG (sky, buildings, road) used as
    the logged model's input example and in tests."""
    rows = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    cols = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    sky = np.array([70, 130, 180], np.float32) * (1 - 0.3 * rows)
    road = np.array([128, 64, 128], np.float32) * (0.7 + 0.3 * cols)
    building = np.array([70, 70, 70], np.float32) + 40 * cols
    image = np.where(rows < 0.35, sky, np.where(rows < 0.6, building, road))
    image = np.broadcast_to(image, (height, width, 3)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def input_frame(*images: bytes | str | os.PathLike) -> pd.DataFrame:
    """A request DataFrame from image files or their bytes.

    Args:
        *images: PNG/JPEG bytes, or paths of such files.
    """
    encoded = []
    for image in images:
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        encoded.append(base64.b64encode(data).decode("ascii"))
    return pd.DataFrame({"image": encoded})


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.0f} MiB"


def _pixels(n: int) -> str:
    """``8,388,608 pixels (8.4 MP)``: exact and readable."""
    return f"{n:,} pixels ({n / 1e6:.1f} MP)"


def _image_bytes(value: Any, row: int) -> bytes:
    """The encoded image file of one request cell (base64 text or bytes)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("data:") and _DATA_URL_MARK in text:
            text = text.split(_DATA_URL_MARK, 1)[1]  # data:image/png;base64,
        # Refuse before decoding: base64 text is 4/3 of the file.
        if len(text) * 3 // 4 > MAX_IMAGE_BYTES + 2:
            raise RequestTooLarge(
                f"Row {row}: the encoded image is about "
                f"{_mib(len(text) * 3 // 4)}, more than the limit of "
                f"{_mib(MAX_IMAGE_BYTES)} per image file. Send a smaller "
                f"file (downscale it or use JPEG)."
            )
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise _bad_input(
                f'Row {row}: column "image" must hold a base64-encoded PNG or '
                f"JPEG file (e.g. the output of `base64 -w0 image.png`); "
                f"this value is not valid base64."
            ) from None
    else:
        raise _bad_input(
            f'Row {row}: column "image" must hold base64 text (or bytes), got {type(value).__name__}.'
        )
    if not data:
        raise _bad_input(f"Row {row}: the image is empty.")
    if len(data) > MAX_IMAGE_BYTES:
        raise RequestTooLarge(
            f"Row {row}: the image file has {len(data):,} bytes, more than "
            f"the limit of {_mib(MAX_IMAGE_BYTES)} per image file. Send a "
            f"smaller file (downscale it or use JPEG)."
        )
    return data


def _open_image(data: bytes, row: int, max_pixels: int) -> Image.Image:
    """Open PNG/JPEG bytes and check format and size from the header only
    (no pixel is decoded yet)."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise RequestTooLarge(
            f"Row {row}: the image has more pixels than Pillow will open; "
            f"this server accepts at most {_pixels(max_pixels)} per image "
            f"and {MAX_IMAGE_SIDE} per side. Downscale it first."
        ) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise _bad_input(
            f"Row {row}: the data is not a PNG or JPEG image ({len(data)} bytes that Pillow cannot identify)."
        ) from None
    try:
        if image.format not in IMAGE_FORMATS:
            raise _bad_input(f"Row {row}: image format {image.format} is not accepted; send PNG or JPEG.")
        width, height = image.size
        if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
            raise RequestTooLarge(
                f"Row {row}: the image is {width}x{height} pixels; this "
                f"server accepts at most {MAX_IMAGE_SIDE} pixels per side "
                f"(and {_pixels(max_pixels)} per image). Downscale it "
                f"first."
            )
        if width < MIN_IMAGE_SIDE or height < MIN_IMAGE_SIDE:
            raise _bad_input(
                f"Row {row}: the image is {width}x{height} pixels; the model "
                f"needs at least {MIN_IMAGE_SIDE} pixels per side."
            )
        if width * height > max_pixels:
            raise RequestTooLarge(
                f"Row {row}: the image is {width}x{height} = "
                f"{_pixels(width * height)}; this server segments at most "
                f"{_pixels(max_pixels)} per image. Downscale it or split it "
                f"into tiles first."
            )
    except MlflowException:
        image.close()
        raise
    return image


def _decode_image(image: Image.Image, row: int) -> np.ndarray:
    """Decode an opened image into an ``(H, W, 3)`` uint8 RGB array."""
    with image:
        try:
            rgb = image.convert("RGB")
        except (OSError, ValueError) as err:  # truncated / corrupt pixel data
            raise _bad_input(f"Row {row}: the {image.format} file is damaged ({err}).") from None
    return np.asarray(rgb, dtype=np.uint8)


def _normalise(rgb: np.ndarray) -> np.ndarray:
    """``(..., 3)`` uint8 RGB → float32, ImageNet mean/std normalised."""
    return (rgb.astype(np.float32) - _MEAN) / _STD


def _to_tensor(rgb: np.ndarray, device: torch.device) -> torch.Tensor:
    """``(H, W, 3)`` uint8 RGB → normalised ``(1, 3, H, W)`` float tensor."""
    return torch.from_numpy(_normalise(rgb).transpose(2, 0, 1)).unsqueeze(0).to(device)


Box = tuple[int, int, int, int]  # (y1, y2, x1, x2), as uda.models.hrda


def _windows_tensor(rgb: np.ndarray, boxes: Sequence[Box], device: torch.device) -> torch.Tensor:
    """Normalised ``(N, 3, h, w)`` batch of the windows ``boxes`` of one
    image, normalised per window so the whole image is never held in float
    (12 bytes per pixel); values are those of cropping :func:`_to_tensor`."""
    crops = np.stack([rgb[y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])
    return torch.from_numpy(_normalise(crops).transpose(0, 3, 1, 2)).to(device)


def _as_frame(model_input: Any) -> pd.DataFrame:
    if isinstance(model_input, pd.DataFrame):
        return model_input
    if isinstance(model_input, Mapping):
        try:
            return pd.DataFrame(dict(model_input))
        except ValueError as err:
            raise _bad_input(f"Cannot read the request as a table: {err}")
    raise _bad_input(
        f'Expected a table with a column "image" (JSON "dataframe_split" or '
        f'"dataframe_records"), got {type(model_input).__name__}.'
    )


def _wants_color(frame: pd.DataFrame, params: Mapping[str, Any] | None) -> list[bool]:
    """Per row: whether to add the colour rendering."""
    everywhere = bool((params or {}).get("colorize", False))
    if "colorize" not in frame.columns:
        return [everywhere] * len(frame)
    return [everywhere or (isinstance(v, (bool, np.bool_)) and bool(v)) for v in frame["colorize"]]


def request_timeout_s() -> float | None:
    """The scoring server's request timeout (``$MLFLOW_SCORING_SERVER_
    REQUEST_TIMEOUT``, set from ``mlflow models serve -t``), or None."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value > 0 and math.isfinite(value) else None


class _Deadline:
    """When a request must stop, and how to say so."""

    def __init__(self, timeout_s: float | None, server_margin: bool = False) -> None:
        self.timeout_s = timeout_s
        self.at: float | None = None
        if timeout_s is not None:
            margin = min(_DEADLINE_MARGIN_S, _DEADLINE_MARGIN_FRACTION * timeout_s) if server_margin else 0.0
            self.at = _now() + timeout_s - margin

    def remaining(self) -> float | None:
        return None if self.at is None else self.at - _now()

    def expired(self) -> bool:
        return self.at is not None and _now() >= self.at

    def error(self, what: str) -> RequestTimeout:
        return RequestTimeout(
            f"The request ran out of the server's {self.timeout_s:g} s "
            f"request timeout ({TIMEOUT_ENV}, `mlflow models serve -t`) and "
            f"was stopped {what}. Send fewer or smaller images per request, "
            f"or start the server with a larger -t."
        )


class _FairTurns:
    """One holder at a time, granted in arrival (FIFO) order.

    A request takes a turn per window batch and queues again behind the
    others for its next one, so concurrent requests interleave batch by
    batch instead of the first one holding the device to its end (a plain
    ``threading.Lock`` is neither FIFO nor handed over on release).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: collections.deque[object] = collections.deque()

    @contextlib.contextmanager
    def turn(self, deadline: _Deadline, what: str) -> Iterator[None]:
        """Hold the device for one batch; gives up (raising the deadline's
        error) if the deadline passes while waiting."""
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            try:
                while self._queue[0] is not ticket:
                    remaining = deadline.remaining()
                    if remaining is not None and remaining <= 0:
                        raise deadline.error(what)
                    self._cond.wait(remaining)
            except BaseException:
                self._queue.remove(ticket)
                self._cond.notify_all()
                raise
        try:
            yield
        finally:
            with self._cond:
                self._queue.popleft()
                self._cond.notify_all()


class _StripStitcher:
    """Averages overlapping window logits into a label map, one strip of
    window height at a time.

    Windows arrive in :func:`uda.models.hrda.slide_windows` order (row-major,
    rows top-down), so when a window starts lower than the strip's top row,
    the rows above it are final: they are averaged, argmax'ed into the
    uint8 label map and dropped. Sums are added in window order from zero,
    like the segmentor's own stitching, so the averages equal its averages
    of the same window logits.
    """

    def __init__(
        self, height: int, width: int, window_height: int, num_classes: int, device: torch.device
    ) -> None:
        self.height = height
        self.window_height = window_height
        self.top = 0  # image row of strip row 0
        self.sums = torch.zeros((num_classes, window_height, width), dtype=torch.float32, device=device)
        self.count = torch.zeros((1, window_height, width), dtype=torch.float32, device=device)
        self.label_map = np.empty((height, width), dtype=np.uint8)

    def add(self, box: Box, logits: torch.Tensor) -> None:
        """Add one window's ``(C, h, w)`` logits."""
        y1, y2, x1, x2 = box
        if y1 > self.top:
            self._advance(y1)
        self.sums[:, y1 - self.top : y2 - self.top, x1:x2] += logits
        self.count[:, y1 - self.top : y2 - self.top, x1:x2] += 1

    def finish(self) -> np.ndarray:
        """The ``(H, W)`` uint8 label map once every window was added."""
        self._emit(self.height - self.top)
        return self.label_map

    def _advance(self, row: int) -> None:
        done = row - self.top
        if done > self.window_height:
            raise RuntimeError(
                "Slide windows do not cover the whole image; check test_cfg crop_size and stride."
            )
        self._emit(done)
        keep = self.window_height - done
        for buffer in (self.sums, self.count):
            buffer[:, :keep] = buffer[:, done:].clone()
            buffer[:, keep:] = 0
        self.top = row

    def _emit(self, rows: int) -> None:
        count = self.count[:, :rows]
        if bool((count == 0).any()):
            raise RuntimeError(
                "Slide windows do not cover the whole image; check test_cfg crop_size and stride."
            )
        mean = self.sums[:, :rows] / count
        self.label_map[self.top : self.top + rows] = mean.argmax(dim=0).to(torch.uint8).cpu().numpy()


class SegmentationModel(mlflow.pyfunc.PythonModel):
    """Pyfunc wrapper: base64 image in, trainId label map out.

    The model artifact is a ``cs2acdc-uda/1`` checkpoint (see
    :mod:`uda.models.checkpoint`) under the artifact key ``'checkpoint'``;
    it is rebuilt with :func:`uda.models.build_from_checkpoint`
    (``torch.load(weights_only=True)``), so the architecture comes from the
    file and no pickled code is run.
    """

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None
        self.device = torch.device("cpu")
        #: Window pixels per slide batch (see :data:`SLIDE_BATCH_PIXELS`).
        self.slide_batch_pixels = SLIDE_BATCH_PIXELS
        # The scoring server runs requests in threads: they take FIFO turns
        # on the device, one window batch each, so peak memory is one batch
        # and no request waits for another's whole image.
        self._turns = _FairTurns()

    @classmethod
    def from_checkpoint(
        cls, checkpoint_path: str | os.PathLike, device: str | None = None
    ) -> SegmentationModel:
        """The model ready to ``predict``, without MLflow (tests, scripts).

        Args:
            checkpoint_path: A ``cs2acdc-uda/1`` checkpoint file.
            device: Inference device; default as in :meth:`load_context`.
        """
        wrapper = cls()
        wrapper._load(checkpoint_path, device)
        return wrapper

    def _load(self, checkpoint_path: str | os.PathLike, device: str | None) -> None:
        from uda.models import build_from_checkpoint

        name = device or os.environ.get(DEVICE_ENV, "") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(name)
        self.model = build_from_checkpoint(checkpoint_path).eval().to(self.device)
        # This wrapper's own model: bounded detail passes on a CPU (the
        # model's own value, when its config sets one, is kept).
        self.model.set_windows_per_batch(self.model.device_windows_per_batch(self.device))

    def load_context(self, context: Any) -> None:
        """Build the segmentor from the logged checkpoint artifact.

        The device is ``$UDA_SERVING_DEVICE`` if set, else CUDA when
        available, else CPU.
        """
        self._load(context.artifacts[CHECKPOINT_ARTIFACT], None)

    @property
    def test_mode(self) -> str:
        """The test mode the model runs in (``'slide'`` or ``'whole'``)."""
        return self._segmentor().test_cfg["mode"]

    @property
    def max_image_pixels(self) -> int:
        """Most pixels per image for this model's test mode."""
        if self.test_mode == "whole":
            return min(MAX_IMAGE_PIXELS, MAX_WHOLE_MODE_PIXELS)
        return MAX_IMAGE_PIXELS

    def _segmentor(self) -> torch.nn.Module:
        if self.model is None:
            raise RuntimeError(
                "SegmentationModel has no model; use "
                "mlflow.pyfunc.load_model() or "
                "SegmentationModel.from_checkpoint()."
            )
        return self.model

    def windows_per_batch(self, window_pixels: int) -> int:
        """Slide windows run together: as many as fit in
        :attr:`slide_batch_pixels` (at least one), or one when the model's
        ``test_cfg.batched_slide`` is off. The segmentor's window loop
        (:meth:`~uda.models.hrda.HRDASegmentor.slide_batches`) caps it
        further at the model's ``test_cfg.max_windows_per_batch``."""
        from uda.models.hrda import windows_for_pixels

        if not self._segmentor().test_cfg.get("batched_slide", False):
            return 1
        return windows_for_pixels(self.slide_batch_pixels, window_pixels)

    def segment(self, rgb: np.ndarray, deadline: float | None = None, name: str = "the image") -> np.ndarray:
        """TrainId map ``(H, W)`` uint8 of one ``(H, W, 3)`` uint8 RGB image,
        in the model's configured test mode at the image's resolution.

        Args:
            rgb: The image.
            deadline: Seconds from now after which to stop (between window
                batches) with :class:`RequestTimeout`; None: no limit.
            name: How error messages call the image.
        """
        return self._segment(rgb, _Deadline(deadline), name)

    # No autograd: a graph kept through the stitching sums would hold every
    # batch's activations (memory growing with the image).
    @torch.inference_mode()
    def _segment(self, rgb: np.ndarray, deadline: _Deadline, name: str) -> np.ndarray:
        model = self._segmentor()
        if model.test_cfg["mode"] != "slide":
            # One pass, its memory bounded by MAX_WHOLE_MODE_PIXELS.
            with self._turns.turn(deadline, f"before {name}"):
                if deadline.expired():
                    raise deadline.error(f"before {name}")
                logits = model(_to_tensor(rgb, self.device))
                return logits[0].argmax(dim=0).to(torch.uint8).cpu().numpy()
        height, width = rgb.shape[:2]
        # Clipped to the image when a window is larger than it.
        window_h = min(int(model.test_cfg["crop_size"][0]), height)
        window_w = min(int(model.test_cfg["crop_size"][1]), width)
        stitcher = _StripStitcher(height, width, window_h, model.num_classes, self.device)

        @contextlib.contextmanager
        def turn(start: int, total: int) -> Iterator[None]:
            where = f"after {start} of the {total} windows of {name}"
            with self._turns.turn(deadline, where):
                # Checked again once it is our turn: the wait may have used
                # the time up.
                if deadline.expired():
                    raise deadline.error(where)
                yield

        def add(boxes: Sequence[Box], logits: torch.Tensor) -> None:
            for box, window_logits in zip(boxes, logits):
                stitcher.add(box, window_logits)

        # The segmentor's window loop (same windows and groups as its
        # slide_inference), strip-stitched here to bound the memory.
        model.slide_forward(
            height,
            width,
            lambda boxes: _windows_tensor(rgb, boxes, self.device),
            add,
            windows_per_forward=self.windows_per_batch(window_h * window_w),
            around_batch=turn,
        )
        return stitcher.finish()

    def _check_request(self, frame: pd.DataFrame) -> list[Image.Image]:
        """Check every row's budget from the file headers and open the
        images, before any pixel is decoded."""
        if len(frame) > MAX_IMAGES_PER_REQUEST:
            raise RequestTooLarge(
                f"The request holds {len(frame)} images; this server takes at "
                f"most {MAX_IMAGES_PER_REQUEST} per request. Send them in "
                f"several requests."
            )
        max_pixels = self.max_image_pixels
        images: list[Image.Image] = []
        try:
            total_bytes = 0
            for row, value in enumerate(frame["image"]):
                data = _image_bytes(value, row)
                total_bytes += len(data)
                if total_bytes > MAX_REQUEST_BYTES:
                    raise RequestTooLarge(
                        f"The image files of rows 0..{row} add up to "
                        f"{total_bytes:,} bytes, more than the limit of "
                        f"{_mib(MAX_REQUEST_BYTES)} per request. Send fewer "
                        f"or smaller files per request."
                    )
                images.append(_open_image(data, row, max_pixels))
            sizes = [image.size for image in images]
            total = sum(w * h for w, h in sizes)
            if total > MAX_REQUEST_PIXELS:
                shown = ", ".join(f"{w}x{h}" for w, h in sizes[:4]) + (", ..." if len(sizes) > 4 else "")
                raise RequestTooLarge(
                    f"The request holds {len(sizes)} images with "
                    f"{_pixels(total)} in all ({shown}); this server "
                    f"segments at most {_pixels(MAX_REQUEST_PIXELS)} per "
                    f"request (e.g. one 4096x2048 image or four 1920x1080 "
                    f"frames). Send fewer or smaller images per request."
                )
        except BaseException:
            for image in images:
                image.close()
            raise
        return images

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Segment every image of the request.

        Args:
            context: MLflow's context (unused after loading).
            model_input: DataFrame with a column ``image`` (base64 PNG/JPEG
                text, or bytes) and optionally a boolean column ``colorize``.
            params: ``{'colorize': bool}``: add the ``color`` column for
                every row.

        Returns:
            DataFrame with ``label_map``, ``height``, ``width`` (and
            ``color`` when asked for), one row per input row.

        Raises:
            MlflowException: ``INVALID_PARAMETER_VALUE`` (HTTP 400) for a
                malformed request; :class:`RequestTooLarge` (HTTP 413) for
                one over a budget; :class:`RequestTimeout` (HTTP 504) when
                the server's request timeout ran out. Each message says
                what to change.
        """
        # The server's clock started when the request came in; ours starts
        # here, after its JSON was parsed (the margin covers that).
        deadline = _Deadline(request_timeout_s(), server_margin=True)
        frame = _as_frame(model_input)
        if "image" not in frame.columns:
            raise _bad_input(
                f'The request needs a column "image" with base64-encoded '
                f"PNG/JPEG files; got columns {list(map(str, frame.columns))}."
            )
        if len(frame) == 0:
            raise _bad_input("The request holds no image (0 rows).")
        opened = self._check_request(frame)
        # Decode every row before any inference, so a damaged file costs no
        # compute (at most MAX_REQUEST_PIXELS * 3 bytes held).
        images: list[np.ndarray | None] = []
        for row, image in enumerate(opened):
            try:
                images.append(_decode_image(image, row))
            except BaseException:
                for rest in opened[row + 1 :]:
                    rest.close()
                raise
        wants_color = _wants_color(frame, params)
        columns: dict[str, list] = {"label_map": [], "height": [], "width": [], "color": []}
        for row, color in enumerate(wants_color):
            rgb = images[row]
            images[row] = None  # freed as soon as its label map is done
            assert rgb is not None
            label_map = self._segment(rgb, deadline, f"image {row}")
            columns["label_map"].append(encode_png(label_map))
            columns["height"].append(int(rgb.shape[0]))
            columns["width"].append(int(rgb.shape[1]))
            columns["color"].append(encode_png(colorize(label_map)) if color else None)
        result = pd.DataFrame(
            {
                "label_map": pd.Series(columns["label_map"], dtype=object),
                "height": pd.Series(columns["height"], dtype="int64"),
                "width": pd.Series(columns["width"], dtype="int64"),
            }
        )
        if any(wants_color):
            # object dtype keeps None (JSON null) for rows not asking.
            result["color"] = pd.Series(columns["color"], dtype=object)
        return result
