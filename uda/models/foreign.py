"""Checkpoints written by other code, recognised and converted into ours;
:func:`as_checkpoint_file` turns any checkpoint into a file of ours before it is logged.

The original solution (leoil/ACDC_UDA_seg) published mmcv runner files of its
distillation (``fan_iter_24k.pth`` …) and its soup (``soup_fan_334.pth``); MIC
published its teachers (``latest.pth``). None of them says which model it
holds, so the architecture comes from a preset's ``student.model`` or
``teacher.model`` (the *role*), and the weights are loaded strictly.

Layouts (:func:`describe`, the ``source_format`` tag of an import):

``cs2acdc-uda/1``  this project's own, self-describing file.
``ckd-distill``    the original distillation's runner file: ``model.*`` (the
                   student), ``ca_model.*`` (its frozen MiT-B5 teacher),
                   ``imnet_model.*``, ``meta.iter``, ``optimizer``.
``ckd-soup``       the original soup: ``model.*`` only, ``meta`` with
                   CLASSES/PALETTE, no optimizer.
``mic``            a MIC/DAFormer/HRDA runner file: ``model.*``,
                   ``ema_model.*``, ``imnet_model.*``.
``mmcv-uda``       other sub-model prefixes.
``segmentor``      a bare segmentor state dict (``backbone.*``,
                   ``decode_head.*``), also behind ``module.``.
``backbone``       ImageNet classification weights (NVlabs FAN, SegFormer
                   ``mit_b5.pth``): not a segmentor; they belong in
                   ``<role>.model.pretrained``.

``prefix='auto'`` takes ``model.*``, as MIC's test script and the original's
loaders do (``checkpoint.SUBMODEL_PREFIXES`` lists the others).

One file (~470 lines) for recognising a layout and converting it: both read the
same layout table above, and :mod:`uda.models.checkpoint` (the formats we load)
cannot take them without an import cycle.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Iterator, Mapping

import torch.nn as nn

from .builder import build_from_checkpoint
from .checkpoint import (
    FORMAT_TAG,
    SUBMODEL_PREFIXES,
    CheckpointMismatchError,
    KeyReport,
    MissingPrefixError,
    detect_format,
    load_checkpoint,
    prefix_counts,
    resolve_prefix,
    save_checkpoint,
    strip_module,
    unwrap_state_dict,
)
from .checkpoint_files import CheckpointError, file_sha256, read_checkpoint
from .model_cfg import normalize_model_cfg

__all__ = [
    "ROLES",
    "LAYOUTS",
    "NotASegmentorError",
    "CheckpointSummary",
    "ConvertedCheckpoint",
    "normalize_prefix",
    "selected_prefix",
    "iteration_of",
    "role_model_cfg",
    "iteration_from_name",
    "architecture_differences",
    "describe",
    "load_segmentor_file",
    "convert_checkpoint",
    "as_checkpoint_file",
]

log = logging.getLogger(__name__)

#: Preset sections a foreign file's architecture can come from.
ROLES = ("student", "teacher")
LAYOUTS = (FORMAT_TAG, "ckd-distill", "ckd-soup", "mic", "mmcv-uda", "segmentor", "backbone")
# Keys that define the architecture (the rest of a model section only
# changes inference: test_cfg, hr_slide_inference, ...).
_ARCH_KEYS = ("backbone", "num_classes", "scales", "attention_classwise")
_HEAD_ARCH_KEYS = ("channels", "dilations", "attention_embed_dim")
# iter_40000.pth, fan_iter_40k.pth, iter-24000: mmcv's and the original's names.
_ITERATION_IN_NAME = re.compile(r"iter[_-]?(\d+)(k?)(?![0-9a-z])", re.I)
_PREFIX_WORDS = {"": "auto", "auto": "auto", "none": ""}
_TRAINED_PREFIXES = ("", "model.", "ema_model.", "stu_model.")


class NotASegmentorError(CheckpointError):
    """ImageNet backbone weights where a segmentor checkpoint was expected."""


@dataclass(frozen=True)
class CheckpointSummary:
    """What a checkpoint file holds, read without copying its tensors.

    Attributes:
        path: The file (absolute).
        layout: One of :data:`LAYOUTS`.
        prefixes: Tensor count per sub-model prefix (``{'model.': 812,
            'ca_model.': 1038}``); empty for a bare state dict.
        iteration: Training iteration: ``meta.iter`` when present, else
            from the file name (``fan_iter_40k.pth`` → 40000), else None.
        iteration_from: ``'meta'``, ``'file name'`` or None.
    """

    path: Path
    layout: str
    prefixes: dict
    iteration: int | None
    iteration_from: str | None


@dataclass(frozen=True)
class ConvertedCheckpoint:
    """A foreign file written as a ``cs2acdc-uda/1`` checkpoint.

    Attributes:
        path: The converted file.
        summary: What the source held.
        sha256: SHA-256 of the source file.
        prefix: The sub-model taken ('' = keys as they are).
        report: The strict load's :class:`KeyReport`.
        model_cfg: The normalised model section of the result.
        seconds: Time to read, load and write.
    """

    path: Path
    summary: CheckpointSummary
    sha256: str
    prefix: str
    report: KeyReport
    model_cfg: dict
    seconds: float


def normalize_prefix(text: str | None, parameter: str = "prefix") -> str:
    """``auto``/empty → ``'auto'``; ``none`` → ``''``; ``ema_model`` or
    ``ema_model.`` → ``'ema_model.'``.

    Raises:
        CheckpointError: Not one of those (lists the choices).
    """
    word = "" if text is None else str(text).strip()
    if word.lower() in _PREFIX_WORDS:
        return _PREFIX_WORDS[word.lower()]
    prefix = word if word.endswith(".") else word + "."
    if prefix not in SUBMODEL_PREFIXES:
        raise CheckpointError(
            f"{parameter} must be auto, none or a sub-model prefix "
            f"({', '.join(p.rstrip('.') for p in SUBMODEL_PREFIXES)}); got "
            f"{text!r}."
        )
    return prefix


def selected_prefix(layout: str, prefix: str) -> str:
    """The sub-model ``prefix`` takes from a file of ``layout``
    (:func:`~uda.models.checkpoint.resolve_prefix` of its format)."""
    fmt = layout if layout in (FORMAT_TAG, "segmentor", "backbone") else "mmcv-uda"
    return resolve_prefix(fmt, prefix)


def iteration_of(summary: CheckpointSummary, prefix: str) -> int | None:
    """The iteration the weights under ``prefix`` were trained to: the
    file's for the trained model (``model.``, ``ema_model.``, ``stu_model.``
    or a bare state dict), none for a frozen sub-model (the distillation's
    ``ca_model.`` teacher, the ``imnet_model.`` ImageNet copy)."""
    return summary.iteration if prefix in _TRAINED_PREFIXES else None


def role_model_cfg(cfg: Mapping[str, Any], role: str) -> dict:
    """The preset's ``<role>.model`` section, without ImageNet weights (a
    checkpoint brings every weight).

    Raises:
        CheckpointError: ``role`` is not one of :data:`ROLES`.
    """
    if role not in ROLES:
        raise CheckpointError(
            f"role must be {' or '.join(ROLES)} (which preset section gives the architecture), got {role!r}."
        )
    return dict(cfg[role]["model"], pretrained=None)


def iteration_from_name(name: str) -> int | None:
    """``iter_40000.pth`` → 40000, ``fan_iter_24k.pth`` → 24000, else None."""
    match = _ITERATION_IN_NAME.search(Path(name).stem)
    if match is None:
        return None
    return int(match.group(1)) * (1000 if match.group(2) else 1)


def _architecture(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    cfg = normalize_model_cfg(model_cfg)
    arch = {k: cfg[k] for k in _ARCH_KEYS}
    arch.update({f"decode_head.{k}": cfg["decode_head"][k] for k in _HEAD_ARCH_KEYS})
    return arch


def architecture_differences(
    found: Mapping[str, Any], wanted: Mapping[str, Any], labels: tuple[str, str] = ("found", "wanted")
) -> list[str]:
    """``'backbone: mit_b5 (found) vs mit_nano (wanted)'`` per differing
    architecture key of two model sections; empty when they match."""
    have, want = _architecture(found), _architecture(wanted)
    return [f"{k}: {have[k]} ({labels[0]}) vs {want[k]} ({labels[1]})" for k in want if have[k] != want[k]]


def _iteration(meta: Any) -> int | None:
    if not isinstance(meta, Mapping):
        return None
    for key in ("iter", "iteration"):
        value = meta.get(key)
        try:
            if value is not None and int(value) >= 0:
                return int(value)
        except (TypeError, ValueError):
            continue
    return None


def _layout(obj: Any, source: str) -> tuple[str, dict]:
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT_TAG:
        return FORMAT_TAG, {}
    state_dict, _ = unwrap_state_dict(obj, source)
    state_dict = strip_module(state_dict)
    fmt = detect_format(state_dict)
    if fmt != "mmcv-uda":
        return fmt, {}
    counts = {p: n for p, n in sorted(prefix_counts(state_dict).items()) if p in SUBMODEL_PREFIXES}
    meta = obj.get("meta") if isinstance(obj, Mapping) else None
    if "ca_model." in counts:
        return "ckd-distill", counts
    if (
        list(counts) == ["model."]
        and "optimizer" not in obj
        and isinstance(meta, Mapping)
        and "CLASSES" in meta
    ):
        return "ckd-soup", counts
    if "ema_model." in counts or "imnet_model." in counts:
        return "mic", counts
    return "mmcv-uda", counts


def _summary(obj: Any, path: Path) -> CheckpointSummary:
    layout, counts = _layout(obj, str(path))
    meta = obj.get("meta") if isinstance(obj, Mapping) else None
    iteration, origin = _iteration(meta), "meta"
    if layout == FORMAT_TAG and isinstance(meta, Mapping):
        iteration = (
            _iteration(meta) if "iteration" in meta else _iteration({"iter": meta.get("source_iteration")})
        )
    if iteration is None:
        iteration, origin = iteration_from_name(path.name), "file name"
    return CheckpointSummary(
        path.resolve(), layout, counts, iteration, origin if iteration is not None else None
    )


def describe(path: str | os.PathLike) -> CheckpointSummary:
    """Layout, sub-models and iteration of a checkpoint file; the tensors
    of a zip-format file are mapped, not read.

    Raises:
        FileNotFoundError / CheckpointError: See
            :func:`~uda.models.checkpoint.read_checkpoint`.
    """
    path = Path(path)
    return _summary(read_checkpoint(path, mmap=True), path)


def _not_a_segmentor(path: Path, role: str | None) -> NotASegmentorError:
    where = f"{role}.model.pretrained" if role else "student.model.pretrained or teacher.model.pretrained"
    return NotASegmentorError(
        f"{str(path)!r} holds ImageNet classification weights of a backbone "
        f"(NVlabs FAN *.pth.tar, SegFormer mit_b*.pth), not a segmentor. It "
        f"is where training starts: set it as {where} in the preset (e.g. "
        f'-P cfg_options="{where}={path}"), then train.'
    )


def load_segmentor_file(
    path: str | os.PathLike,
    model_cfg: Mapping[str, Any] | None = None,
    prefix: str = "auto",
    architecture: str = "",
    role: str | None = None,
    check_own: bool = False,
) -> tuple[nn.Module, CheckpointSummary, KeyReport]:
    """A segmentor from any checkpoint file, loaded strictly.

    Args:
        path: Our own file (it describes its model; ``model_cfg`` and
            ``prefix`` are not used) or a foreign one (see module docstring).
        model_cfg: The architecture of a foreign file (a preset's
            ``<role>.model``; its ``pretrained`` is ignored).
        prefix: Sub-model of a foreign file (see :func:`normalize_prefix`).
        architecture: Where ``model_cfg`` came from, for messages
            (``"preset 'cs2acdc' student.model"``).
        role: The preset section of ``model_cfg`` (``student``/``teacher``),
            for the message about ImageNet files.
        check_own: Our own file must be ``model_cfg``'s architecture too
            (an import into a role); otherwise it is used as it describes
            itself.

    Returns:
        ``(model, summary, report)``, the model in eval mode on the CPU.

    Raises:
        NotASegmentorError: ImageNet backbone weights.
        CheckpointError: Unreadable file, or a foreign file without
            ``model_cfg``.
        CheckpointMismatchError: The weights do not fit ``model_cfg``, or
            the file has no such prefix (lists the ones it has).
    """
    path = Path(path)
    obj = read_checkpoint(path, mmap=True)
    summary = _summary(obj, path)
    if summary.layout == "backbone":
        raise _not_a_segmentor(path, role)
    if summary.layout == FORMAT_TAG:
        model = build_from_checkpoint(obj)
        differences = (
            architecture_differences(model.model_cfg, model_cfg)
            if check_own and model_cfg is not None
            else []
        )
        if differences:
            raise CheckpointMismatchError(
                f"{str(path)!r} holds another model than the "
                f"{architecture or 'preset'}: {'; '.join(differences)}. Pass "
                f"the preset and role it was trained with."
            )
        report = KeyReport(format=FORMAT_TAG, source=str(path), loaded=len(model.state_dict()))
        return model.eval(), summary, report
    if model_cfg is None:
        raise CheckpointError(
            f"{str(path)!r} is a {summary.layout} checkpoint: it does not say "
            f"which model it holds. Pass the preset it was trained with and "
            f"the role (-P preset=cs2acdc -P role=student|teacher)."
        )
    from .builder import build_segmentor

    model = build_segmentor(dict(model_cfg, pretrained=None))
    try:
        report = load_checkpoint(model, obj, prefix=prefix, strict=True, source=str(path))
    except MissingPrefixError:
        raise
    except CheckpointMismatchError as err:
        built = f" Built from {architecture}" if architecture else " Built"
        raise CheckpointMismatchError(
            f"{err}{built}: backbone {model.model_cfg['backbone']}, "
            f"{model.model_cfg['num_classes']} classes; pass the preset and "
            f"role it was trained with."
        ) from None
    del obj
    return model.eval(), summary, report


def convert_checkpoint(
    path: str | os.PathLike,
    destination: str | os.PathLike,
    model_cfg: Mapping[str, Any] | None = None,
    prefix: str = "auto",
    architecture: str = "",
    role: str | None = None,
    meta: Mapping[str, Any] | None = None,
    sha256: str | None = None,
) -> ConvertedCheckpoint:
    """Write ``path`` as a ``cs2acdc-uda/1`` file (atomically) holding only
    the selected sub-model, with its provenance in ``meta``.

    Args:
        path, model_cfg, prefix, architecture, role: See
            :func:`load_segmentor_file`; our own file must fit ``model_cfg``
            too.
        destination: The file to write.
        meta: More ``meta`` entries (e.g. the role).
        sha256: The source's SHA-256 when the caller has it (a multi-GB
            file is not read twice for it).

    Returns:
        A :class:`ConvertedCheckpoint`.
    """
    started = time.perf_counter()
    source = Path(path)
    digest = sha256 or file_sha256(source)
    model, summary, report = load_segmentor_file(
        source, model_cfg, prefix, architecture, role, check_own=model_cfg is not None
    )
    provenance = {
        "imported_from": source.name,
        "source_sha256": digest,
        "source_format": summary.layout,
        "source_prefix": report.prefix,
        "source_iteration": iteration_of(summary, report.prefix),
        **(meta or {}),
    }
    written = save_checkpoint(destination, model, meta=provenance)
    return ConvertedCheckpoint(
        written, summary, digest, report.prefix, report, dict(model.model_cfg), time.perf_counter() - started
    )


@contextmanager
def as_checkpoint_file(
    checkpoint: str | os.PathLike | nn.Module | Mapping[str, Any],
    model_cfg: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Iterator[tuple[Path, dict[str, Any]]]:
    """A ``cs2acdc-uda/1`` file of any checkpoint, and its model config.

    Our own files are used as they are; a module, a state dict or a foreign
    checkpoint (MIC / CKD / mmseg) is written to a temporary file that is
    deleted when the context exits (after logging, so only the logged copy
    remains).

    Args:
        checkpoint: Our own file, a foreign file (needs ``model_cfg``), a
            segmentor module, or a state dict (needs ``model_cfg``).
        model_cfg: The ``model`` section of a preset, for checkpoints that
            do not describe themselves; checked against a file that does.
        meta: Extra checkpoint ``meta`` when the file is written here.

    Yields:
        ``(path, model_cfg)``: the file and its normalised model config.

    Raises:
        ValueError: A foreign file without ``model_cfg``, or our own file
            describing another model than ``model_cfg``.
    """
    with tempfile.TemporaryDirectory(prefix="uda-ckpt-") as tmp:
        target = Path(tmp) / "checkpoint.pth"
        if isinstance(checkpoint, (nn.Module, Mapping)):
            save_checkpoint(target, checkpoint, model_cfg, meta)
            cfg = (
                model_cfg if model_cfg is not None else checkpoint.model_cfg
            )  # save_checkpoint checked one exists
            yield target, normalize_model_cfg(cfg)
            return
        path = Path(checkpoint)
        obj = read_checkpoint(path, mmap=True)
        if isinstance(obj, Mapping) and obj.get("format") == FORMAT_TAG:
            stored = dict(obj["model_cfg"])
            if model_cfg is not None and normalize_model_cfg(model_cfg) != normalize_model_cfg(stored):
                raise ValueError(
                    f"{str(path)!r} describes another model than model_cfg "
                    f"(backbone {stored.get('backbone')!r}); pass "
                    f"model_cfg=None to use the one stored in the file."
                )
            del obj
            yield path, stored
            return
        if model_cfg is None:
            raise ValueError(
                f"{str(path)!r} is not a cs2acdc-uda/1 checkpoint, so it does "
                f"not say which model it holds; pass model_cfg (the preset's "
                f"model section) to import it."
            )
        del obj
        converted = convert_checkpoint(path, target, model_cfg, meta=dict(meta or {}))
        log.info("Imported %s: %s", path, converted.report)
        yield target, converted.model_cfg
