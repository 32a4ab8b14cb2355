"""The ``model`` section of a preset: its schema, defaults and validation.

What :func:`~uda.models.builder.build_segmentor` builds from and what a
``cs2acdc-uda/1`` checkpoint stores (:func:`normalize_model_cfg`).

The ``model`` section of a preset uses MIC's vocabulary::

    model:
      backbone: fan_large_16_p4_hybrid   # a name of MIT_VARIANTS / FAN_VARIANTS
      pretrained: null                   # ImageNet weights file or null
      drop_path_rate: 0.1
      num_classes: 19
      decode_head:
        channels: 256
        dilations: [1, 6, 12, 18]
        dropout_ratio: 0.1
        loss: ce                         # or logit_constraint
        attention_embed_dim: null        # optional; null = channels (MIC: 256)
      scales: [1, 0.5]
      hr_crop_size: [512, 512]
      hr_loss_weight: 0.1
      attention_classwise: true
      crop_coord_divisible: 8
      hr_slide_inference: true
      feature_scale: 0.5                 # optional (MIC: 0.5)
      test_cfg: {mode: slide, crop_size: [1024, 1024], stride: [512, 512],
                 batched_slide: true,
                 max_windows_per_batch: null}  # null: all at once (MIC)

Every key except ``backbone`` is optional and defaults to the MIC/HRDA value
above; an unknown key is an error naming it and the valid keys.
"""

from __future__ import annotations

import copy
import difflib
from typing import Any
from collections.abc import Mapping

from uda.errors import UserError

from .fan import FAN_VARIANTS
from .hrda import DEFAULT_TEST_CFG
from .losses import LOSSES
from .mit import MIT_VARIANTS

__all__ = ["DEFAULT_MODEL_CFG", "ModelConfigError", "backbone_names", "normalize_model_cfg"]


class ModelConfigError(UserError, ValueError):
    """A ``model`` config section that does not describe a valid model."""


#: Defaults of every optional key (MIC HRDA + DAFormer, cs2acdc recipe).
DEFAULT_MODEL_CFG: dict[str, Any] = {
    "backbone": None,
    "pretrained": None,
    "drop_path_rate": 0.1,
    "num_classes": 19,
    "decode_head": {
        "channels": 256,
        "dilations": [1, 6, 12, 18],
        "dropout_ratio": 0.1,
        "loss": "ce",
        "attention_embed_dim": None,
    },
    "scales": [1, 0.5],
    "hr_crop_size": [512, 512],
    "hr_loss_weight": 0.1,
    "attention_classwise": True,
    "crop_coord_divisible": 8,
    "hr_slide_inference": True,
    "feature_scale": 0.5,
    "test_cfg": dict(DEFAULT_TEST_CFG),
}


def backbone_names() -> list[str]:
    """Every backbone name ``model.backbone`` accepts."""
    return [*MIT_VARIANTS, *FAN_VARIANTS]


def _merge(defaults: Mapping[str, Any], cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(cfg, Mapping):
        raise ModelConfigError(f"{where} must be a mapping, got {type(cfg).__name__}.")
    merged = copy.deepcopy(dict(defaults))
    for key, value in cfg.items():
        if key not in defaults:
            close = difflib.get_close_matches(str(key), list(defaults), n=2)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            raise ModelConfigError(f"Unknown key {where}.{key}.{hint} Valid keys: {', '.join(defaults)}.")
        if isinstance(defaults[key], Mapping) and value is not None:
            merged[key] = _merge(defaults[key], value, f"{where}.{key}")
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _pair(value: Any, key: str, allow_none: bool = False) -> list | None:
    if value is None and allow_none:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ModelConfigError(f"{key} must be two positive integers [h, w], got {value!r}.")
    return [int(v) for v in value]


def _number(value: Any, key: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ModelConfigError(f"{key} must be a number in [{low}, {high}], got {value!r}.")
    return float(value)


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelConfigError(f"{key} must be a positive integer, got {value!r}.")
    return value


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ModelConfigError(f"{key} must be true or false, got {value!r}.")
    return value


def normalize_model_cfg(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a ``model`` section and fill in defaults.

    Args:
        model_cfg: The ``model`` mapping of a preset (MIC vocabulary).

    Returns:
        A new plain dict (lists, no tuples) with every key present; it is
        what :func:`~uda.models.checkpoint.save_checkpoint` stores.

    Raises:
        ModelConfigError: Unknown key, unknown backbone/loss, or a value of
            the wrong type or range (the message names the key).
    """
    cfg = _merge(DEFAULT_MODEL_CFG, model_cfg, "model")
    names = backbone_names()
    if cfg["backbone"] not in names:
        close = difflib.get_close_matches(str(cfg["backbone"]), names, n=2)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise ModelConfigError(
            f"model.backbone {cfg['backbone']!r} is not a known backbone.{hint} Valid: {', '.join(names)}."
        )
    if cfg["pretrained"] is not None and not isinstance(cfg["pretrained"], str):
        raise ModelConfigError(f"model.pretrained must be a file path or null, got {cfg['pretrained']!r}.")
    cfg["drop_path_rate"] = _number(cfg["drop_path_rate"], "model.drop_path_rate", 0, 1)
    cfg["num_classes"] = _positive_int(cfg["num_classes"], "model.num_classes")
    head = cfg["decode_head"]
    head["channels"] = _positive_int(head["channels"], "model.decode_head.channels")
    if head["attention_embed_dim"] is not None:
        _positive_int(head["attention_embed_dim"], "model.decode_head.attention_embed_dim")
    dil = head["dilations"]
    if (
        not isinstance(dil, (list, tuple))
        or not dil
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dil)
    ):
        raise ModelConfigError(
            f"model.decode_head.dilations must be a list of positive integers, got {dil!r}."
        )
    head["dilations"] = list(dil)
    head["dropout_ratio"] = _number(head["dropout_ratio"], "model.decode_head.dropout_ratio", 0, 1)
    if head["loss"] not in LOSSES:
        raise ModelConfigError(
            f"model.decode_head.loss must be one of {', '.join(LOSSES)}, got {head['loss']!r}."
        )
    scales = cfg["scales"]
    if (
        not isinstance(scales, (list, tuple))
        or len(scales) != 2
        or sorted(scales)[1] != 1
        or not 0 < sorted(scales)[0] < 1
    ):
        raise ModelConfigError(
            f"model.scales must be [1, r] with 0 < r < 1 (HRDA uses exactly two scales), got {scales!r}."
        )
    cfg["scales"] = list(scales)
    cfg["hr_crop_size"] = _pair(cfg["hr_crop_size"], "model.hr_crop_size", allow_none=True)
    cfg["hr_loss_weight"] = _number(cfg["hr_loss_weight"], "model.hr_loss_weight", 0, 1)
    cfg["attention_classwise"] = _bool(cfg["attention_classwise"], "model.attention_classwise")
    cfg["crop_coord_divisible"] = _positive_int(cfg["crop_coord_divisible"], "model.crop_coord_divisible")
    cfg["hr_slide_inference"] = _bool(cfg["hr_slide_inference"], "model.hr_slide_inference")
    if cfg["hr_slide_inference"] and cfg["hr_crop_size"] is None:
        raise ModelConfigError("model.hr_slide_inference needs model.hr_crop_size (the window size).")
    if cfg["feature_scale"] not in scales:
        raise ModelConfigError(
            f"model.feature_scale must be one of model.scales {scales}, got {cfg['feature_scale']!r}."
        )
    test = _merge(DEFAULT_TEST_CFG, cfg["test_cfg"] or {}, "model.test_cfg")
    if test["mode"] not in ("slide", "whole"):
        raise ModelConfigError(f"model.test_cfg.mode must be 'slide' or 'whole', got {test['mode']!r}.")
    test["crop_size"] = _pair(test["crop_size"], "model.test_cfg.crop_size")
    test["stride"] = _pair(test["stride"], "model.test_cfg.stride")
    test["batched_slide"] = _bool(test["batched_slide"], "model.test_cfg.batched_slide")
    bound = test["max_windows_per_batch"]
    if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int) or bound < 1):
        raise ModelConfigError(
            f"model.test_cfg.max_windows_per_batch must be a positive "
            f"integer (most windows per forward pass in inference) or null "
            f"(every window at once, as MIC), got {bound!r}."
        )
    cfg["test_cfg"] = test
    return cfg
