"""The segmentor as an MLflow pyfunc model, for ``mlflow models serve``.

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
MIC's test script on 1920×1080 ACDC frames. Malformed requests raise
:class:`mlflow.exceptions.MlflowException` with ``INVALID_PARAMETER_VALUE``,
which MLflow's scoring server answers with HTTP 400 and the message; the
server keeps serving.

Only torch, timm, numpy, Pillow, pandas and MLflow's pyfunc interface are
imported (no mmcv / mmseg).
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import threading
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image, UnidentifiedImageError

from uda.data.labels import colorize

__all__ = [
    'SegmentationModel', 'CHECKPOINT_ARTIFACT', 'MAX_IMAGE_SIDE',
    'MIN_IMAGE_SIDE', 'MAX_IMAGE_BYTES', 'MAX_IMAGES_PER_REQUEST',
    'IMAGE_FORMATS', 'DEVICE_ENV', 'serving_signature', 'example_image_png',
    'encode_png', 'decode_png', 'input_frame'
]

#: Key of the checkpoint file in the pyfunc model's ``artifacts``.
CHECKPOINT_ARTIFACT = 'checkpoint'
#: Largest accepted image height/width in pixels.
MAX_IMAGE_SIDE = 4096
#: Smallest accepted image height/width: MiT's stage-1 spatial reduction
#: (ratio 8 on a stride-4 map of the half-scale context input) needs 64.
MIN_IMAGE_SIDE = 64
#: Largest accepted encoded image file (a 4096×4096 PNG photo is ~25 MiB).
MAX_IMAGE_BYTES = 64 * 1024 * 1024
#: Most images per request (each is segmented separately).
MAX_IMAGES_PER_REQUEST = 16
#: Accepted image file formats (Pillow names; camera JPEGs with extra
#: pictures open as 'MPO').
IMAGE_FORMATS = ('PNG', 'JPEG', 'MPO')
#: Environment variable choosing the inference device (``cpu``, ``cuda``,
#: ``cuda:1``); default: CUDA when available.
DEVICE_ENV = 'UDA_SERVING_DEVICE'

# ImageNet mean/std on 0-255 RGB: the img_norm_cfg of MIC/mmseg pipelines.
_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
_DATA_URL_MARK = ';base64,'


def _bad_input(message: str) -> MlflowException:
    """An error the scoring server answers with HTTP 400 and ``message``."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def serving_signature() -> ModelSignature:
    """Input/output schema and the ``colorize`` parameter of the model."""
    inputs = Schema([
        ColSpec('string', 'image'),
        ColSpec('boolean', 'colorize', required=False),
    ])
    outputs = Schema([
        ColSpec('string', 'label_map'),
        ColSpec('long', 'height'),
        ColSpec('long', 'width'),
        ColSpec('string', 'color', required=False),
    ])
    params = ParamSchema([ParamSpec('colorize', 'boolean', False)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def encode_png(array: np.ndarray) -> str:
    """Base64 text of a lossless PNG of a ``(H, W)`` uint8 map or an
    ``(H, W, 3)`` uint8 RGB image."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format='PNG')
    return base64.b64encode(buffer.getvalue()).decode('ascii')


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
    Image.fromarray(image).save(buffer, format='PNG')
    return buffer.getvalue()


def input_frame(*images: Union[bytes, str, os.PathLike]) -> pd.DataFrame:
    """A request DataFrame from image files or their bytes.

    Args:
        *images: PNG/JPEG bytes, or paths of such files.
    """
    encoded = []
    for image in images:
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        encoded.append(base64.b64encode(data).decode('ascii'))
    return pd.DataFrame({'image': encoded})


def _image_bytes(value: Any, row: int) -> bytes:
    """The encoded image file of one request cell (base64 text or bytes)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith('data:') and _DATA_URL_MARK in text:
            text = text.split(_DATA_URL_MARK, 1)[1]  # data:image/png;base64,
        if len(text) * 3 // 4 > MAX_IMAGE_BYTES:
            raise _bad_input(
                f'Row {row}: the encoded image is larger than '
                f'{MAX_IMAGE_BYTES // 2**20} MiB, the limit of this server.')
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise _bad_input(
                f'Row {row}: column "image" must hold a base64-encoded PNG or '
                f'JPEG file (e.g. the output of `base64 -w0 image.png`); '
                f'this value is not valid base64.') from None
    else:
        raise _bad_input(
            f'Row {row}: column "image" must hold base64 text (or bytes), got '
            f'{type(value).__name__}.')
    if not data:
        raise _bad_input(f'Row {row}: the image is empty.')
    if len(data) > MAX_IMAGE_BYTES:
        raise _bad_input(
            f'Row {row}: the image file has {len(data)} bytes, more than the '
            f'limit of {MAX_IMAGE_BYTES // 2**20} MiB.')
    return data


def _decode_image(data: bytes, row: int) -> np.ndarray:
    """Decode PNG/JPEG bytes into an ``(H, W, 3)`` uint8 RGB array, checking
    the size before the pixels are decoded."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise _bad_input(
            f'Row {row}: the image is larger than {MAX_IMAGE_SIDE}x'
            f'{MAX_IMAGE_SIDE} pixels, the limit of this server.') from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise _bad_input(
            f'Row {row}: the data is not a PNG or JPEG image '
            f'({len(data)} bytes that Pillow cannot identify).') from None
    with image:
        if image.format not in IMAGE_FORMATS:
            raise _bad_input(
                f'Row {row}: image format {image.format} is not accepted; '
                f'send PNG or JPEG.')
        width, height = image.size
        if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
            raise _bad_input(
                f'Row {row}: the image is {width}x{height} pixels; this '
                f'server accepts at most {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}. '
                f'Downscale it first.')
        if width < MIN_IMAGE_SIDE or height < MIN_IMAGE_SIDE:
            raise _bad_input(
                f'Row {row}: the image is {width}x{height} pixels; the model '
                f'needs at least {MIN_IMAGE_SIDE} pixels per side.')
        try:
            rgb = image.convert('RGB')
        except (OSError, ValueError) as err:  # truncated / corrupt pixel data
            raise _bad_input(f'Row {row}: the {image.format} file is damaged '
                             f'({err}).') from None
    return np.asarray(rgb, dtype=np.uint8)


def _to_tensor(rgb: np.ndarray, device: torch.device) -> torch.Tensor:
    """``(H, W, 3)`` uint8 RGB → normalised ``(1, 3, H, W)`` float tensor."""
    normalised = (rgb.astype(np.float32) - _MEAN) / _STD
    return torch.from_numpy(normalised.transpose(2, 0, 1)).unsqueeze(0).to(
        device)


def _as_frame(model_input: Any) -> pd.DataFrame:
    if isinstance(model_input, pd.DataFrame):
        return model_input
    if isinstance(model_input, Mapping):
        try:
            return pd.DataFrame(dict(model_input))
        except ValueError as err:
            raise _bad_input(f'Cannot read the request as a table: {err}')
    raise _bad_input(
        f'Expected a table with a column "image" (JSON "dataframe_split" or '
        f'"dataframe_records"), got {type(model_input).__name__}.')


def _wants_color(frame: pd.DataFrame, params: Optional[Mapping[str, Any]]
                 ) -> list[bool]:
    """Per row: whether to add the colour rendering."""
    everywhere = bool((params or {}).get('colorize', False))
    if 'colorize' not in frame.columns:
        return [everywhere] * len(frame)
    return [everywhere or (isinstance(v, (bool, np.bool_)) and bool(v))
            for v in frame['colorize']]


class SegmentationModel(mlflow.pyfunc.PythonModel):
    """Pyfunc wrapper: base64 image in, trainId label map out.

    The model artifact is a ``cs2acdc-uda/1`` checkpoint (see
    :mod:`uda.models.checkpoint`) under the artifact key ``'checkpoint'``;
    it is rebuilt with :func:`uda.models.build_from_checkpoint`
    (``torch.load(weights_only=True)``), so the architecture comes from the
    file and no pickled code is run.
    """

    def __init__(self) -> None:
        self.model: Optional[torch.nn.Module] = None
        self.device = torch.device('cpu')
        # The scoring server runs requests in threads: one inference at a
        # time keeps peak (GPU) memory that of one image.
        self._lock = threading.Lock()

    @classmethod
    def from_checkpoint(cls, checkpoint_path: Union[str, os.PathLike],
                        device: Optional[str] = None) -> 'SegmentationModel':
        """The model ready to ``predict``, without MLflow (tests, scripts).

        Args:
            checkpoint_path: A ``cs2acdc-uda/1`` checkpoint file.
            device: Inference device; default as in :meth:`load_context`.
        """
        wrapper = cls()
        wrapper._load(checkpoint_path, device)
        return wrapper

    def _load(self, checkpoint_path: Union[str, os.PathLike],
              device: Optional[str]) -> None:
        from uda.models import build_from_checkpoint

        name = device or os.environ.get(DEVICE_ENV, '') or (
            'cuda' if torch.cuda.is_available() else 'cpu')
        self.device = torch.device(name)
        self.model = build_from_checkpoint(checkpoint_path).eval().to(
            self.device)

    def load_context(self, context: Any) -> None:
        """Build the segmentor from the logged checkpoint artifact.

        The device is ``$UDA_SERVING_DEVICE`` if set, else CUDA when
        available, else CPU.
        """
        self._load(context.artifacts[CHECKPOINT_ARTIFACT], None)

    @property
    def test_mode(self) -> str:
        """The test mode the model runs in (``'slide'`` or ``'whole'``)."""
        return self._segmentor().test_cfg['mode']

    def _segmentor(self) -> torch.nn.Module:
        if self.model is None:
            raise RuntimeError('SegmentationModel has no model; use '
                               'mlflow.pyfunc.load_model() or '
                               'SegmentationModel.from_checkpoint().')
        return self.model

    @torch.inference_mode()
    def segment(self, rgb: np.ndarray) -> np.ndarray:
        """TrainId map ``(H, W)`` uint8 of one ``(H, W, 3)`` uint8 RGB image,
        in the model's configured test mode at the image's resolution."""
        model = self._segmentor()
        with self._lock:
            logits = model(_to_tensor(rgb, self.device))
            label_map = logits[0].argmax(dim=0).to(torch.uint8).cpu()
        return label_map.numpy()

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: Optional[dict[str, Any]] = None) -> pd.DataFrame:
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
                malformed request; the message says what to fix.
        """
        frame = _as_frame(model_input)
        if 'image' not in frame.columns:
            raise _bad_input(
                f'The request needs a column "image" with base64-encoded '
                f'PNG/JPEG files; got columns {list(map(str, frame.columns))}.')
        if len(frame) == 0:
            raise _bad_input('The request holds no image (0 rows).')
        if len(frame) > MAX_IMAGES_PER_REQUEST:
            raise _bad_input(
                f'The request holds {len(frame)} images; send at most '
                f'{MAX_IMAGES_PER_REQUEST} per request.')
        # Decode and check every row before any inference, so a bad row
        # costs no compute.
        images = [_decode_image(_image_bytes(value, row), row)
                  for row, value in enumerate(frame['image'])]
        wants_color = _wants_color(frame, params)
        columns: dict[str, list] = {'label_map': [], 'height': [],
                                    'width': [], 'color': []}
        for rgb, color in zip(images, wants_color):
            label_map = self.segment(rgb)
            columns['label_map'].append(encode_png(label_map))
            columns['height'].append(int(rgb.shape[0]))
            columns['width'].append(int(rgb.shape[1]))
            columns['color'].append(
                encode_png(colorize(label_map)) if color else None)
        result = pd.DataFrame({
            'label_map': pd.Series(columns['label_map'], dtype=object),
            'height': pd.Series(columns['height'], dtype='int64'),
            'width': pd.Series(columns['width'], dtype='int64'),
        })
        if any(wants_color):
            # object dtype keeps None (JSON null) for rows not asking.
            result['color'] = pd.Series(columns['color'], dtype=object)
        return result
