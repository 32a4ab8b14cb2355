"""Where a distillation's frozen teacher comes from: a registered model, a
run's logged model or a checkpoint file, pinned to one version and checked
against the preset's ``teacher.model`` before training starts.

What the teacher then does in training is :mod:`uda.train.teacher`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import torch.nn as nn

from uda.errors import UserError

__all__ = ["TeacherError", "resolve_model_uri", "load_teacher"]

log = logging.getLogger(__name__)


class TeacherError(UserError):
    """The distillation teacher cannot be used (not found, wrong model)."""


def resolve_model_uri(uri: str) -> str:
    """Pin a registry URI to a version: ``models:/NAME@ALIAS`` and
    ``models:/NAME/latest`` → ``models:/NAME/<version>``; other URIs and
    files unchanged.

    Args:
        uri: A model URI or a file path.

    Raises:
        RegistryError: Unknown model or alias (lists what exists).
    """
    from uda.registry import check_model_uri, logged_model_id

    # Only registered names move (an alias may be reassigned while a run
    # trains); the registry parses them, one owner of every form and its errors.
    if not uri.startswith("models:/") or logged_model_id(uri) is not None:
        return uri
    return check_model_uri(uri, parameter=None).uri


def _check_teacher_arch(found: Mapping[str, Any], wanted: Mapping[str, Any], where: str) -> None:
    from uda.models.foreign import architecture_differences

    diffs = architecture_differences(found, wanted, ("teacher", "preset"))
    if diffs:
        raise TeacherError(
            f"The teacher {where} is not the architecture of the preset's "
            f"teacher.model: {'; '.join(diffs)}. Pick a teacher trained "
            f"with this preset, or the preset it was trained with."
        )


def load_teacher(uri: str, teacher_model_cfg: Mapping[str, Any]) -> tuple[nn.Module, str]:
    """Load a distillation teacher and check it against the preset.

    Args:
        uri: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION|latest``,
            ``runs:/…``, or a checkpoint file (ours, or a MIC checkpoint:
            its ``model.*`` weights, built from ``teacher_model_cfg``).
        teacher_model_cfg: The preset's ``teacher.model``.

    Returns:
        ``(model, resolved)``: the segmentor (eval mode, CPU) and the URI
        pinned to a version (or the file path).

    Raises:
        TeacherError / RegistryError / CheckpointError /
        CheckpointMismatchError: all ``UserError``.
    """
    from uda.models.foreign import load_segmentor_file
    from uda.registry import load_segmentor

    uri = str(uri).strip()
    if not uri:
        raise TeacherError(
            "distill needs a teacher: a registered model "
            "(models:/cs2acdc-teacher@iter-120) or a MIC "
            "checkpoint file."
        )
    local = Path(uri)
    if local.is_file():
        # A MIC / mmcv / mmseg file: the preset says what it holds.
        model, _, report = load_segmentor_file(
            local, teacher_model_cfg, architecture="the preset's teacher.model"
        )
        log.info("Teacher %s: %s", uri, report)
        _check_teacher_arch(model.model_cfg, teacher_model_cfg, repr(uri))
        return model.eval(), str(local.resolve())
    if ":/" not in uri:
        raise TeacherError(
            f"Teacher {uri!r} is neither a file nor a model "
            f"URI (models:/NAME@ALIAS, models:/NAME/latest, "
            f"runs:/RUN_ID/NAME)."
        )
    resolved = resolve_model_uri(uri)
    try:
        model, model_cfg = load_segmentor(resolved)
    except FileNotFoundError as err:
        raise TeacherError(f"Teacher {uri}: {err}") from None
    _check_teacher_arch(model_cfg, teacher_model_cfg, resolved)
    return model.eval(), resolved
