"""Packaging a checkpoint as the pyfunc model that ``mlflow models serve``
runs: :func:`log_segmentor` logs it "models from code" (a small entry-point
file, the ``uda`` package as its code, explicit pip pins, a signature and a
PNG input example), with the checkpoint file as its one artifact."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from collections.abc import Iterator, Mapping

import mlflow
import torch.nn as nn
from mlflow.models.model import ModelInfo

import uda

from .model import CHECKPOINT_ARTIFACT, DEVICE_ENV
from .request import example_image_png, input_frame, serving_signature

__all__ = ["PIP_REQUIREMENTS", "log_segmentor", "serving_device"]

#: Serving dependencies, pinned as in requirements/main.txt (explicit, so
#: MLflow neither infers them slowly nor writes a local ``+cpu`` torch pin;
#: MLflow adds its own ``mlflow==`` pin).
PIP_REQUIREMENTS = (
    "torch==2.13.0",
    "torchvision==0.28.0",
    "timm==1.0.31",
    "numpy==1.26.4",
    "pillow==13.0.0",
    "pyyaml==6.0.4",
)

#: The ``uda`` package, logged as the model's code (``code_paths``): the
#: logged model carries its own copy, so it loads with the code it was logged with.
_PACKAGE_DIR = Path(uda.__file__).resolve().parent
_MODEL_CODE = '''\
"""Pyfunc entry point of a cs2acdc-uda segmentor (models-from-code: MLflow
runs this file with the logged `uda` package on sys.path; nothing is
unpickled)."""
import mlflow
from uda.serving import SegmentationModel

mlflow.models.set_model(SegmentationModel())
'''


@contextmanager
def serving_device(device: str) -> Iterator[None]:
    """Load and run the pyfunc model on ``device`` inside the block (e.g.
    MLflow's input-example check of ``log_model`` on the CPU, not on the GPU
    a training run is using).

    Args:
        device: ``cpu``, ``cuda``, ``cuda:1``: the value of :data:`DEVICE_ENV`.
    """
    from uda.tracking import temporary_env

    with temporary_env(DEVICE_ENV, device):
        yield


def log_segmentor(
    checkpoint: str | os.PathLike | nn.Module | Mapping[str, Any],
    name: str | None = None,
    model_cfg: Mapping[str, Any] | None = None,
    iteration: int | None = None,
    kind: str = "checkpoint",
    preset: str | None = None,
    tags: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> ModelInfo:
    """Log a checkpoint as a pyfunc segmentation model in the active run.

    The checkpoint file is stored once, inside the logged model
    (``artifacts/<file name>``); do not log it again as a run artifact.

    Args:
        checkpoint: A ``cs2acdc-uda/1`` file (used as it is), a foreign
            checkpoint file (MIC / CKD / mmseg; needs ``model_cfg``), a
            segmentor module, or a state dict (needs ``model_cfg``).
        name: Name of the logged model within the run (``runs:/RUN/NAME``);
            default ``iter-<N>``, or the kind when there is no iteration.
        model_cfg: The ``model`` section of a preset, for checkpoints that
            do not describe themselves; checked against a file that does.
        iteration: Training iteration (logged-model tag and ``step``).
        kind: One of :data:`~uda.registry.names.KINDS`.
        preset: Preset name, tagged.
        tags: Extra logged-model tags.
        meta: Extra checkpoint ``meta`` when the file is written here.

    Returns:
        MLflow's :class:`~mlflow.models.model.ModelInfo`
        (``model_uri`` = ``models:/<model id>``).

    Raises:
        ValueError: No active run, bad ``kind``, or a checkpoint that does
            not fit ``model_cfg``.
        FileNotFoundError / CheckpointError: Unreadable checkpoint.
    """
    from uda.models import FORMAT_TAG
    from uda.models.checkpoint_files import file_sha256
    from uda.models.foreign import as_checkpoint_file
    from uda.tracking import flatten

    # Imported here: the served model (uda.serving) never loads the registry.
    from uda.registry.names import check_kind, iteration_alias

    check_kind(kind)
    if mlflow.active_run() is None:
        raise ValueError(
            "log_segmentor needs an active MLflow run (call it "
            "inside `with mlflow.start_run():` or an entry "
            "point run)."
        )
    if name is None:
        name = iteration_alias(iteration) if iteration is not None else kind
    model_tags = {"kind": kind}
    if iteration is not None:
        model_tags["iteration"] = str(int(iteration))
    if preset:
        model_tags["preset"] = str(preset)
    model_tags.update({k: str(v) for k, v in (tags or {}).items()})
    with (
        as_checkpoint_file(checkpoint, model_cfg, meta) as (path, cfg),
        tempfile.TemporaryDirectory(prefix="uda-pyfunc-") as tmp,
    ):
        code_file = Path(tmp) / "segmentation_model.py"
        code_file.write_text(_MODEL_CODE)
        metadata = {
            "checkpoint_format": FORMAT_TAG,
            "checkpoint_file": path.name,
            "checkpoint_bytes": path.stat().st_size,
            "checkpoint_sha256": file_sha256(path),
            "backbone": cfg.get("backbone"),
            "num_classes": cfg.get("num_classes"),
            "test_mode": (cfg.get("test_cfg") or {}).get("mode"),
        }
        with serving_device("cpu"):
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(code_file),
                artifacts={CHECKPOINT_ARTIFACT: str(path)},
                code_paths=[str(_PACKAGE_DIR)],
                pip_requirements=list(PIP_REQUIREMENTS),
                signature=serving_signature(),
                input_example=input_frame(example_image_png()),
                metadata=metadata,
                tags=model_tags,
                params={f"model.{k}": str(v) for k, v in flatten(cfg).items()},
                step=int(iteration or 0),
            )
    return info
