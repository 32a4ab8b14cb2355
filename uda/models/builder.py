"""Build an :class:`~uda.models.hrda.HRDASegmentor` from a ``model`` config section
(its schema: :mod:`uda.models.model_cfg`), or from a ``cs2acdc-uda/1`` checkpoint
that describes its own model.
"""

from __future__ import annotations

import os
from typing import Any
from collections.abc import Callable, Mapping

import torch.nn as nn

from .checkpoint import FORMAT_TAG, CheckpointError, load_checkpoint, read_checkpoint
from .fan import FAN_VARIANTS, create_fan
from .hrda import HRDASegmentor
from .mit import MIT_VARIANTS, create_mit
from .model_cfg import ModelConfigError, normalize_model_cfg
from .pretrained import resolve_pretrained

__all__ = ["build_backbone", "build_segmentor", "read_model_cfg", "build_from_checkpoint", "count_parameters"]


def build_backbone(name: str, drop_path_rate: float = 0.0, pretrained: str | None = None) -> nn.Module:
    """Create a backbone by name, optionally with ImageNet weights.

    Args:
        name: A name of :data:`MIT_VARIANTS` or :data:`FAN_VARIANTS`.
        drop_path_rate: Stochastic-depth rate.
        pretrained: NVlabs FAN ``.pth.tar`` / SegFormer ``mit_*.pth`` file,
            loaded through the backbone's ``checkpoint_filter_fn`` (strict:
            every backbone weight must be present); relative to the current
            folder or the project (:mod:`uda.models.pretrained`).

    Raises:
        PretrainedWeightsMissing: ``pretrained`` names no existing file.
    """
    factories: dict[str, Callable[..., nn.Module]] = {}
    factories.update({n: create_mit for n in MIT_VARIANTS})
    factories.update({n: create_fan for n in FAN_VARIANTS})
    if name not in factories:
        raise ModelConfigError(f"Unknown backbone {name!r}; valid: {', '.join(factories)}.")
    pretrained = resolve_pretrained(pretrained or None, name)
    backbone = factories[name](name, drop_path_rate=drop_path_rate)
    if pretrained:
        load_checkpoint(backbone, pretrained, strict=True)
    return backbone


def build_segmentor(model_cfg: Mapping[str, Any]) -> HRDASegmentor:
    """Build the HRDA segmentor a ``model`` config section describes.

    Args:
        model_cfg: The preset's ``model`` mapping (see module docstring).

    Returns:
        The segmentor, with the normalised config in ``model.model_cfg``.

    Example:
        >>> from uda.config import load_config
        >>> cfg = load_config('default')
        >>> model = build_segmentor(cfg['student']['model'])
    """
    cfg = normalize_model_cfg(model_cfg)
    head = cfg["decode_head"]
    backbone = build_backbone(cfg["backbone"], cfg["drop_path_rate"], cfg["pretrained"])
    model = HRDASegmentor(
        backbone,
        num_classes=cfg["num_classes"],
        channels=head["channels"],
        dilations=head["dilations"],
        dropout_ratio=head["dropout_ratio"],
        loss=head["loss"],
        scales=cfg["scales"],
        hr_crop_size=cfg["hr_crop_size"],
        hr_loss_weight=cfg["hr_loss_weight"],
        attention_classwise=cfg["attention_classwise"],
        attention_embed_dim=head["attention_embed_dim"],
        crop_coord_divisible=cfg["crop_coord_divisible"],
        hr_slide_inference=cfg["hr_slide_inference"],
        feature_scale=cfg["feature_scale"],
        test_cfg=cfg["test_cfg"],
    )
    model.model_cfg = cfg
    return model


def read_model_cfg(path: str | os.PathLike) -> dict[str, Any]:
    """The ``model_cfg`` stored in a ``cs2acdc-uda/1`` checkpoint."""
    obj = read_checkpoint(path)
    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT_TAG:
        raise CheckpointError(
            f"{str(path)!r} is not a {FORMAT_TAG} checkpoint, so it does not "
            f"describe its model; build the model from a preset and use "
            f"load_checkpoint()."
        )
    return dict(obj["model_cfg"])


def build_from_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, Any], strict: bool = True
) -> nn.Module:
    """Rebuild a segmentor from a ``cs2acdc-uda/1`` checkpoint and load it.

    ``model_cfg.pretrained`` is ignored (the checkpoint has all weights).
    The file's ``meta`` is attached as ``model.checkpoint_meta``.

    Args:
        checkpoint: A file written by :func:`save_checkpoint`, or its
            contents already read with :func:`read_checkpoint`.
        strict: See :func:`load_checkpoint`.
    """
    if isinstance(checkpoint, Mapping):
        obj, source = checkpoint, "<checkpoint>"
    else:
        obj, source = read_checkpoint(checkpoint), str(checkpoint)
    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT_TAG:
        raise CheckpointError(
            f"{source!r} is not a {FORMAT_TAG} checkpoint, so it does not "
            f"describe its model; build the model from a preset and use "
            f"load_checkpoint()."
        )
    model_cfg = dict(obj["model_cfg"], pretrained=None)
    model = build_segmentor(model_cfg)
    load_checkpoint(model, obj, strict=strict)
    model.checkpoint_meta = dict(obj.get("meta") or {})
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (shared tensors counted once).

    Args:
        model: Any module.
        trainable_only: Count only parameters with ``requires_grad``.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
