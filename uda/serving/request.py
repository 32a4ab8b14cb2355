"""The request the served model takes: its format, its budgets and how it is
read (base64 PNG/JPEG cells, checked from the file headers before any pixel is
decoded), the model signature, and the PNG helpers of requests and responses.

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

Budgets: at most :data:`MAX_IMAGES_PER_REQUEST` images,
:data:`MAX_IMAGE_PIXELS` pixels per image (sides
:data:`MIN_IMAGE_SIDE`..:data:`MAX_IMAGE_SIDE`), :data:`MAX_REQUEST_PIXELS`
pixels and :data:`MAX_REQUEST_BYTES` encoded bytes per request (sums over its
images); an over-budget request is answered with HTTP 413 and a message
naming the limit. Malformed requests raise
:class:`mlflow.exceptions.MlflowException` with ``INVALID_PARAMETER_VALUE``,
which MLflow's scoring server answers with HTTP 400 and the message.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image, UnidentifiedImageError

__all__ = [
    "MAX_IMAGE_SIDE",
    "MIN_IMAGE_SIDE",
    "MAX_IMAGE_PIXELS",
    "MAX_REQUEST_PIXELS",
    "MAX_WHOLE_MODE_PIXELS",
    "MAX_IMAGE_BYTES",
    "MAX_REQUEST_BYTES",
    "MAX_IMAGES_PER_REQUEST",
    "IMAGE_FORMATS",
    "RequestTooLarge",
    "serving_signature",
    "example_image_png",
    "encode_png",
    "decode_png",
    "input_frame",
    "request_frame",
    "open_images",
    "decode_images",
    "wants_color",
]

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
#: Accepted image file formats (Pillow names; camera JPEGs with extra
#: pictures open as 'MPO').
IMAGE_FORMATS = ("PNG", "JPEG", "MPO")
_DATA_URL_MARK = ";base64,"


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


def wants_color(frame: pd.DataFrame, params: Mapping[str, Any] | None) -> list[bool]:
    """Per row: whether to add the colour rendering."""
    everywhere = bool((params or {}).get("colorize", False))
    if "colorize" not in frame.columns:
        return [everywhere] * len(frame)
    return [everywhere or (isinstance(v, (bool, np.bool_)) and bool(v)) for v in frame["colorize"]]


def request_frame(model_input: Any) -> pd.DataFrame:
    """The request as a table with a column ``image`` and at least one row."""
    frame = _as_frame(model_input)
    if "image" not in frame.columns:
        raise _bad_input(
            f'The request needs a column "image" with base64-encoded '
            f"PNG/JPEG files; got columns {list(map(str, frame.columns))}."
        )
    if len(frame) == 0:
        raise _bad_input("The request holds no image (0 rows).")
    return frame


def open_images(frame: pd.DataFrame, max_pixels: int) -> list[Image.Image]:
    """Check every row's budget from the file headers and open the
    images, before any pixel is decoded.

    Args:
        frame: The request (see :func:`request_frame`).
        max_pixels: Most pixels per image for the model's test mode.
    """
    if len(frame) > MAX_IMAGES_PER_REQUEST:
        raise RequestTooLarge(
            f"The request holds {len(frame)} images; this server takes at "
            f"most {MAX_IMAGES_PER_REQUEST} per request. Send them in "
            f"several requests."
        )
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


def decode_images(opened: list[Image.Image]) -> list[np.ndarray | None]:
    """Decode every opened image into ``(H, W, 3)`` uint8 RGB, before any
    inference, so a damaged file costs no compute (at most
    :data:`MAX_REQUEST_PIXELS` * 3 bytes held); ``None`` slots let the caller
    free each image as soon as it is done."""
    images: list[np.ndarray | None] = []
    for row, image in enumerate(opened):
        try:
            images.append(_decode_image(image, row))
        except BaseException:
            for rest in opened[row + 1 :]:
                rest.close()
            raise
    return images
