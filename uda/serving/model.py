"""The pyfunc model behind ``mlflow models serve``: :class:`SegmentationModel`
rebuilds the segmentor from the logged checkpoint, reads each request
(:mod:`uda.serving.request`) and segments its images within the bounds of
:mod:`uda.serving.inference`."""

from __future__ import annotations

import contextlib
import os
from typing import Any
from collections.abc import Iterator, Sequence

import mlflow
import numpy as np
import pandas as pd
import torch

from uda.data.labels import colorize
from uda.metrics import logits_to_labels

from .inference import (
    SLIDE_BATCH_PIXELS,
    Box,
    Deadline,
    FairTurns,
    StripStitcher,
    request_timeout_s,
    to_tensor,
    windows_tensor,
)
from .request import (
    MAX_IMAGE_PIXELS,
    MAX_WHOLE_MODE_PIXELS,
    decode_images,
    encode_png,
    open_images,
    request_frame,
    wants_color,
)

__all__ = ["CHECKPOINT_ARTIFACT", "DEVICE_ENV", "SegmentationModel"]

#: Key of the checkpoint file in the pyfunc model's ``artifacts``.
CHECKPOINT_ARTIFACT = "checkpoint"
#: Environment variable choosing the inference device (``cpu``, ``cuda``,
#: ``cuda:1``); default: CUDA when available.
DEVICE_ENV = "UDA_SERVING_DEVICE"


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
        self._turns = FairTurns()

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
        from uda.models.windows import windows_for_pixels

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
        return self._segment(rgb, Deadline(deadline), name)

    # No autograd: a graph kept through the stitching sums would hold every
    # batch's activations (memory growing with the image).
    @torch.inference_mode()
    def _segment(self, rgb: np.ndarray, deadline: Deadline, name: str) -> np.ndarray:
        model = self._segmentor()
        if model.test_cfg["mode"] != "slide":
            # One pass, its memory bounded by MAX_WHOLE_MODE_PIXELS.
            with self._turns.turn(deadline, f"before {name}"):
                if deadline.expired():
                    raise deadline.error(f"before {name}")
                logits = model(to_tensor(rgb, self.device))
                return logits_to_labels(logits, logits.shape[-2:])[0].to(torch.uint8).cpu().numpy()
        height, width = rgb.shape[:2]
        # Clipped to the image when a window is larger than it.
        window_h = min(int(model.test_cfg["crop_size"][0]), height)
        window_w = min(int(model.test_cfg["crop_size"][1]), width)
        stitcher = StripStitcher(height, width, window_h, model.num_classes, self.device)

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
            lambda boxes: windows_tensor(rgb, boxes, self.device),
            add,
            windows_per_forward=self.windows_per_batch(window_h * window_w),
            around_batch=turn,
        )
        return stitcher.finish()

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
                malformed request; :class:`~uda.serving.request.RequestTooLarge` (HTTP 413) for
                one over a budget; :class:`~uda.serving.inference.RequestTimeout` (HTTP 504) when
                the server's request timeout ran out. Each message says
                what to change.
        """
        # The server's clock started when the request came in; ours starts
        # here, after its JSON was parsed (the margin covers that).
        deadline = Deadline(request_timeout_s(), server_margin=True)
        frame = request_frame(model_input)
        # Every row's budget is checked, and every row decoded, before any inference.
        images = decode_images(open_images(frame, self.max_image_pixels))
        colored = wants_color(frame, params)
        columns: dict[str, list] = {"label_map": [], "height": [], "width": [], "color": []}
        for row, color in enumerate(colored):
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
        if any(colored):
            # object dtype keeps None (JSON null) for rows not asking.
            result["color"] = pd.Series(columns["color"], dtype=object)
        return result
