"""Segmentation models: MiT / FAN backbones, DAFormer head, HRDA segmentor,
losses, checkpoint loading and the config builder.

Pure PyTorch + timm (no mmcv / mmseg / mlflow), so inference, serving and the
GPU benchmark need nothing else.
"""

from .builder import build_backbone, build_from_checkpoint, build_segmentor, count_parameters, read_model_cfg
from .checkpoint import CheckpointMismatchError, KeyReport, load_checkpoint, save_checkpoint
from .checkpoint_files import CheckpointError, read_checkpoint
from .model_cfg import DEFAULT_MODEL_CFG, ModelConfigError, backbone_names, normalize_model_cfg
from .checkpoint import FORMAT_TAG
from .daformer_head import DAFormerHead
from .hrda import HRDASegmentor
from .hrda_head import HRDAHead
from .losses import cross_entropy_loss, get_loss, logit_constraint_loss

__all__ = [
    "DEFAULT_MODEL_CFG",
    "ModelConfigError",
    "backbone_names",
    "build_backbone",
    "build_segmentor",
    "count_parameters",
    "normalize_model_cfg",
    "FORMAT_TAG",
    "CheckpointError",
    "CheckpointMismatchError",
    "KeyReport",
    "build_from_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "read_model_cfg",
    "save_checkpoint",
    "DAFormerHead",
    "HRDAHead",
    "HRDASegmentor",
    "cross_entropy_loss",
    "get_loss",
    "logit_constraint_loss",
]
