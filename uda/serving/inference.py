"""Running one image through the segmentor within bounded memory and time:
windows normalised per batch, their logits averaged in a strip one window high
(:class:`StripStitcher`), the request's deadline (:class:`Deadline`) and the
fair, batch-by-batch turns of requests on the device (:class:`FairTurns`).

* **Memory.** Slide-mode models run their windows through the segmentor's
  own window loop (:meth:`uda.models.hrda.HRDASegmentor.slide_forward`,
  the one :meth:`~uda.models.hrda.HRDASegmentor.slide_inference` uses) in
  batches of at most :data:`SLIDE_BATCH_PIXELS` window pixels, and the
  overlapping window logits are averaged in a strip one window high that is
  turned into label-map rows as soon as no later window covers them. The
  model's ``test_cfg.max_windows_per_batch`` is set at load to its device
  default (:func:`uda.models.windows.default_windows_per_batch`: on CPU at
  most 2**18 input pixels per backbone pass, so the 9 detail windows of a
  full-recipe window run one per pass; on CUDA unbounded) unless its config
  sets one. So a request costs one batch of windows plus about 4 bytes per
  pixel (RGB + label map) and one strip, whatever the image size; the label
  map equals :func:`uda.metrics.logits_to_labels` of ``model(img)`` (same windows, sums in the same
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
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import threading
from time import monotonic as _now
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED

from uda.data.pipelines import IMG_MEAN, IMG_STD
from uda.metrics import logits_to_labels

__all__ = [
    "SLIDE_BATCH_PIXELS",
    "TIMEOUT_ENV",
    "RequestTimeout",
    "request_timeout_s",
    "Deadline",
    "FairTurns",
    "StripStitcher",
    "Box",
    "to_tensor",
    "windows_tensor",
]

#: Window pixels per inference batch in slide mode (8 windows of the
#: default's 128×128, ~50 ms on 2 CPU cores and faster per pixel than
#: larger batches; one window of the full recipe's 1024×1024, never less):
#: bounds the activations held at once and the time between two deadline
#: checks or turns of other requests.
SLIDE_BATCH_PIXELS = 2**17
#: The request timeout in seconds of MLflow's scoring server: ``mlflow
#: models serve -t`` (default 60) sets it in the server's environment, where
#: the server's timeout middleware and this model both read it. Unset (e.g.
#: ``predict`` from Python): no deadline.
TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"

# ImageNet mean/std on 0-255 RGB: the img_norm_cfg of MIC/mmseg pipelines (one owner).
_MEAN = np.array(IMG_MEAN, dtype=np.float32)
_STD = np.array(IMG_STD, dtype=np.float32)
# The model stops this long before the server's timeout (at most 1 s, 10 %
# of it), so that the client gets this module's 504 message, which says
# what to change, rather than the server's generic one.
_DEADLINE_MARGIN_S = 1.0
_DEADLINE_MARGIN_FRACTION = 0.1


class RequestTimeout(MlflowException):
    """The request ran past its deadline and was stopped (HTTP 504)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=DEADLINE_EXCEEDED)


def _normalise(rgb: np.ndarray) -> np.ndarray:
    """``(..., 3)`` uint8 RGB → float32, ImageNet mean/std normalised."""
    return (rgb.astype(np.float32) - _MEAN) / _STD


def to_tensor(rgb: np.ndarray, device: torch.device) -> torch.Tensor:
    """``(H, W, 3)`` uint8 RGB → normalised ``(1, 3, H, W)`` float tensor."""
    return torch.from_numpy(_normalise(rgb).transpose(2, 0, 1)).unsqueeze(0).to(device)


Box = tuple[int, int, int, int]  # (y1, y2, x1, x2), as uda.models.hrda


def windows_tensor(rgb: np.ndarray, boxes: Sequence[Box], device: torch.device) -> torch.Tensor:
    """Normalised ``(N, 3, h, w)`` batch of the windows ``boxes`` of one
    image, normalised per window so the whole image is never held in float
    (12 bytes per pixel); values are those of cropping :func:`to_tensor`."""
    crops = np.stack([rgb[y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])
    return torch.from_numpy(_normalise(crops).transpose(0, 3, 1, 2)).to(device)


def request_timeout_s() -> float | None:
    """The scoring server's request timeout (``$MLFLOW_SCORING_SERVER_
    REQUEST_TIMEOUT``, set from ``mlflow models serve -t``), or None."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value > 0 and math.isfinite(value) else None


class Deadline:
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


class FairTurns:
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
    def turn(self, deadline: Deadline, what: str) -> Iterator[None]:
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


class StripStitcher:
    """Averages overlapping window logits into a label map, one strip of
    window height at a time.

    Windows arrive in :func:`uda.models.windows.slide_windows` order (row-major,
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
        labels = logits_to_labels(mean[None], mean.shape[-2:])[0]
        self.label_map[self.top : self.top + rows] = labels.to(torch.uint8).cpu().numpy()
