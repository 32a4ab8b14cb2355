"""Read, load and write segmentor checkpoints (one module for every format).

Formats recognised by :func:`load_checkpoint` (``KeyReport.format``):

``cs2acdc-uda/1``
    Ours: ``{'format': 'cs2acdc-uda/1', 'model_cfg': <model section>,
    'state_dict': <segmentor state dict>, 'meta': {...}}`` (plus an optional
    ``'optimizer'`` entry for resuming); self-describing,
    so :func:`~uda.models.builder.build_from_checkpoint` rebuilds the model from the file alone.
``mmcv-uda``
    An mmcv training checkpoint of a UDA wrapper (MIC / DAFormer / HRDA, or
    the original CKD distillation): ``{'meta', 'state_dict', 'optimizer'}``
    whose keys carry the sub-model as prefix: ``model.`` (MIC's teacher
    weights, also the distilled student), ``ema_model.``, ``imnet_model.``,
    ``ca_model.`` (the distillation's frozen teacher). ``prefix='auto'``
    selects ``model.``.
``segmentor``
    A bare segmentor state dict (``backbone.*``, ``decode_head.*``), e.g. an
    mmseg checkpoint or one whose prefix was already stripped.
``backbone``
    ImageNet classification weights of the backbone (NVlabs FAN
    ``*.pth.tar``, SegFormer ``mit_b*.pth``): loaded into ``model.backbone``
    through the backbone module's ``checkpoint_filter_fn``; the keys it
    drops (classification ``head.*``, final ``norm.*``) are reported as
    ``unused``.

Files are read by :mod:`uda.models.checkpoint_files` (``weights_only``, one
:class:`CheckpointError` sentence for a file that does not load).
"""

from __future__ import annotations

import importlib
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import torch
import torch.nn as nn

from uda.errors import UserError

from .checkpoint_files import CheckpointError, check_checkpoint_file, file_sha256, read_checkpoint
from .hrda import HRDASegmentor
from .model_cfg import normalize_model_cfg

__all__ = [
    "FORMAT_TAG",
    "SUBMODEL_PREFIXES",
    "CheckpointError",
    "CheckpointMismatchError",
    "MissingPrefixError",
    "KeyReport",
    "read_checkpoint",
    "check_checkpoint_file",
    "file_sha256",
    "unwrap_state_dict",
    "strip_module",
    "prefix_counts",
    "resolve_prefix",
    "detect_format",
    "load_checkpoint",
    "save_checkpoint",
]

#: Format tag of the checkpoints this project writes.
FORMAT_TAG = "cs2acdc-uda/1"

#: Sub-model prefixes of mmcv UDA training checkpoints (MIC and CKD).
SUBMODEL_PREFIXES = ("model.", "ema_model.", "imnet_model.", "ca_model.", "stu_model.")

_SEGMENTOR_ROOTS = ("backbone.", "decode_head.")
PathOrStateDict = str | os.PathLike | Mapping[str, Any]


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint whose keys or shapes do not fit the model."""


class MissingPrefixError(CheckpointMismatchError):
    """An mmcv UDA checkpoint without the requested sub-model."""


@dataclass
class KeyReport:
    """What :func:`load_checkpoint` did with the checkpoint's keys.

    Attributes:
        format: Detected format (see module docstring).
        prefix: Sub-model prefix that was selected ('' if none).
        source: File path, or ``'<state_dict>'``.
        loaded: Number of tensors loaded into the model.
        missing: Model keys the checkpoint lacks (left at their init).
        unexpected: Checkpoint keys the model does not have (not loaded).
        unused: Keys deliberately skipped because the target does not use
            them (a classification backbone's ``head.*`` / ``norm.*``).
        other_models: Tensor count per sub-model prefix that was not
            selected (e.g. ``{'ema_model.': 812, 'imnet_model.': 406}``).
    """

    format: str
    prefix: str = ""
    source: str = "<state_dict>"
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    other_models: dict[str, int] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        """True when every model key was loaded and no key was unexpected."""
        return not self.missing and not self.unexpected

    def __str__(self) -> str:
        prefix = f", prefix '{self.prefix}'" if self.prefix else ""
        lines = [f"{self.source}: format {self.format}{prefix}, loaded {self.loaded} tensors"]
        for name in ("missing", "unexpected", "unused"):
            keys = getattr(self, name)
            if keys:
                lines.append(f"  {name} ({len(keys)}): {_summary(keys)}")
        if self.other_models:
            others = ", ".join(f"{p} {n}" for p, n in sorted(self.other_models.items()))
            lines.append(f"  other sub-models not loaded: {others}")
        return "\n".join(lines)


def _summary(keys: list[str], limit: int = 5) -> str:
    more = f", ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) for k in obj)
        and any(torch.is_tensor(v) for v in obj.values())
    )


def unwrap_state_dict(obj: Any, source: str) -> tuple[dict[str, Any], str]:
    """Return ``(state_dict, container_format)`` of a loaded checkpoint."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a checkpoint dict.")
    fmt = obj.get("format")
    if isinstance(fmt, str) and fmt.startswith("cs2acdc-uda/"):
        if fmt != FORMAT_TAG:
            raise CheckpointError(f"{source} has format {fmt!r}; this version reads {FORMAT_TAG!r}.")
        if not _is_state_dict(obj.get("state_dict")):
            raise CheckpointError(f"{source} ({fmt}) has no state_dict.")
        return dict(obj["state_dict"]), FORMAT_TAG
    for container in ("state_dict", "model"):
        if _is_state_dict(obj.get(container)):
            return dict(obj[container]), ""
    if _is_state_dict(obj):
        return dict(obj), ""
    raise CheckpointError(
        f"{source} contains no state dict (top-level keys: {_summary(sorted(map(str, obj)))})."
    )


def strip_module(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Remove a DataParallel/DDP ``module.`` prefix present on every key."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


def detect_format(state_dict: Mapping[str, Any]) -> str:
    """Classify an (unwrapped) state dict: ``'mmcv-uda'``, ``'segmentor'`` or
    ``'backbone'``."""
    if any(k.startswith(SUBMODEL_PREFIXES) for k in state_dict):
        return "mmcv-uda"
    if any(k.startswith(_SEGMENTOR_ROOTS) for k in state_dict):
        return "segmentor"
    return "backbone"


def prefix_counts(state_dict: Mapping[str, Any]) -> Counter:
    """Tensor count per first key component (``'model.'``: 812, ...)."""
    return Counter(k.split(".", 1)[0] + "." for k in state_dict if "." in k)


def resolve_prefix(fmt: str, prefix: str) -> str:
    """The sub-model ``prefix`` takes from weights of format ``fmt``:
    ``'auto'`` is ``'model.'`` (MIC's and the original's choice) in an mmcv
    UDA file and none elsewhere; our own format holds one model."""
    if fmt == FORMAT_TAG:
        return ""
    if prefix == "auto":
        return "model." if fmt == "mmcv-uda" else ""
    return prefix


def _select_prefix(
    state_dict: dict[str, Any], fmt: str, prefix: str, source: str
) -> tuple[dict[str, Any], str, dict[str, int]]:
    prefix = resolve_prefix(fmt, prefix)
    if not prefix:
        return state_dict, "", {}
    counts = prefix_counts(state_dict)
    if counts.get(prefix, 0) == 0:
        held = [p.rstrip(".") for p in counts if p in SUBMODEL_PREFIXES]
        what = (
            (f"the sub-models it holds: {', '.join(held)} (pick one with prefix=…)")
            if held
            else "it is a plain state dict without sub-models (use prefix=auto)"
        )
        raise MissingPrefixError(f"{source} has no {prefix!r} weights; {what}.")
    selected = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    others = {p: n for p, n in counts.items() if p != prefix}
    return selected, prefix, others


def _shape_mismatches(model_state: Mapping[str, torch.Tensor], state_dict: Mapping[str, Any]) -> list[str]:
    return [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(model_state[k].shape)}"
        for k, v in state_dict.items()
        if k in model_state and torch.is_tensor(v) and tuple(v.shape) != tuple(model_state[k].shape)
    ]


def _load_into(
    module: nn.Module, state_dict: dict[str, Any], strict: bool, report: KeyReport, what: str
) -> KeyReport:
    """Check keys/shapes, then load; raise on a mismatch."""
    model_state = module.state_dict()
    mismatched = _shape_mismatches(model_state, state_dict)
    report.missing = [k for k in model_state if k not in state_dict]
    report.unexpected = [k for k in state_dict if k not in model_state]
    if mismatched or (strict and (report.missing or report.unexpected)):
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} tensors differ in shape, e.g. {_summary(mismatched, 3)}")
        if report.missing:
            parts.append(f"{len(report.missing)} missing keys, e.g. {_summary(report.missing, 3)}")
        if report.unexpected:
            parts.append(f"{len(report.unexpected)} unexpected keys, e.g. {_summary(report.unexpected, 3)}")
        raise CheckpointMismatchError(
            f"{report.source} (format {report.format}"
            f"{', prefix ' + repr(report.prefix) if report.prefix else ''}) "
            f"does not fit this {what}: {'; '.join(parts)}. Is it a "
            f"checkpoint of another architecture/backbone, or the wrong "
            f"sub-model prefix?"
        )
    usable = {k: v for k, v in state_dict.items() if k in model_state}
    module.load_state_dict(usable, strict=False)
    report.loaded = len(usable)
    return report


def _storage_id(value: Any) -> int | None:
    if not torch.is_tensor(value) or value.numel() == 0:
        return None
    return value.untyped_storage().data_ptr()


def _dropped_keys(original: Mapping[str, Any], filtered: Mapping[str, Any]) -> list[str]:
    """Keys a filter fn left out. A key it only renamed or split (FAN's
    ``pos_embeder.`` -> ``pos_embed.``, fused class-attention ``qkv``) keeps
    its tensor storage, so it is not counted as dropped."""
    kept = {_storage_id(v) for v in filtered.values()} - {None}
    return [k for k, v in original.items() if k not in filtered and _storage_id(v) not in kept]


def _backbone_filter(backbone: nn.Module):
    """The ``checkpoint_filter_fn`` of the module defining the backbone."""
    module = importlib.import_module(type(backbone).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def load_checkpoint(
    model: nn.Module,
    path_or_state_dict: PathOrStateDict,
    prefix: str = "auto",
    strict: bool = True,
    source: str | None = None,
) -> KeyReport:
    """Load any supported checkpoint into a segmentor (or a backbone).

    Args:
        model: An :class:`~uda.models.hrda.HRDASegmentor`, or a bare backbone
            (then only backbone-format weights fit).
        path_or_state_dict: A checkpoint file, or an already loaded
            checkpoint dict / state dict.
        prefix: Sub-model to take from an mmcv UDA checkpoint: ``'auto'``
            (``'model.'`` there, none otherwise), ``'model.'``,
            ``'ema_model.'``, ``'imnet_model.'``, ``'ca_model.'``, or ``''``
            (keys used as they are).
        strict: Raise when model keys are missing or checkpoint keys are
            unexpected. Shape mismatches always raise. For backbone-format
            weights the check covers the backbone only.
        source: The file a loaded dict came from, for messages.

    Returns:
        A :class:`KeyReport`.

    Raises:
        FileNotFoundError: The file does not exist.
        CheckpointError: The file cannot be read / holds no state dict.
        CheckpointMismatchError: The weights do not fit ``model``.
    """
    if isinstance(path_or_state_dict, Mapping):
        source, obj = source or "<state_dict>", path_or_state_dict
    else:
        source = str(path_or_state_dict)
        obj = read_checkpoint(path_or_state_dict)
    state_dict, container = unwrap_state_dict(obj, source)
    state_dict = strip_module(state_dict)
    fmt = container or detect_format(state_dict)
    if prefix not in ("auto", "") and prefix not in SUBMODEL_PREFIXES:
        raise ValueError(
            f"prefix must be 'auto', '' or one of {', '.join(SUBMODEL_PREFIXES)}; got {prefix!r}."
        )
    state_dict, prefix, others = _select_prefix(state_dict, fmt, prefix, source)
    report = KeyReport(format=fmt, prefix=prefix, source=source, other_models=others)

    if isinstance(model, HRDASegmentor):
        if fmt != "backbone":
            return _load_into(model, state_dict, strict, report, "segmentor")
        target: nn.Module = model.backbone
    else:  # a bare backbone: take the backbone part of any format
        target = model
        if fmt != "backbone":
            kept = {k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")}
            report.unused = [k for k in state_dict if not k.startswith("backbone.")]
            state_dict = kept
    filter_fn = _backbone_filter(target)
    filtered = state_dict
    if filter_fn is not None:
        try:
            filtered = filter_fn(state_dict, target)
        except ValueError as err:
            raise CheckpointMismatchError(f"{source} does not fit this backbone: {err}") from None
    report.unused += _dropped_keys(state_dict, filtered)
    return _load_into(target, dict(filtered), strict, report, "backbone")


def _check_plain(value: Any, where: str) -> None:
    """Reject values ``weights_only`` loading could not read back."""
    if value is None or isinstance(value, (str, int, float, bool)) or torch.is_tensor(value):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise ValueError(f"{where} has a non-string key {key!r}.")
            _check_plain(item, f"{where}.{key}")
        return
    raise ValueError(
        f"{where} is a {type(value).__name__}; checkpoints may "
        f"only hold str/int/float/bool/None, lists, dicts and "
        f"tensors (so they load with weights_only=True)."
    )


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | Mapping[str, torch.Tensor],
    model_cfg: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    optimizer: Mapping[str, Any] | None = None,
) -> Path:
    """Write a self-describing ``cs2acdc-uda/1`` checkpoint atomically.

    The file is written to a temporary name in the same directory and moved
    into place with ``os.replace``, so readers never see a partial file.

    Args:
        path: Destination file (parent directories are created).
        model: The segmentor, or its state dict (e.g. a soup).
        model_cfg: The ``model`` config section; defaults to
            ``model.model_cfg`` (set by :func:`~uda.models.build_segmentor`).
        meta: Plain metadata (iteration, run id, metrics, ...).
        optimizer: Optional ``optimizer.state_dict()`` (and scheduler state)
            for resuming, stored under ``'optimizer'`` like mmcv; read it
            back with ``read_checkpoint(path)['optimizer']``.

    Returns:
        The written path.
    """
    if model_cfg is None:
        model_cfg = getattr(model, "model_cfg", None)
        if model_cfg is None:
            raise ValueError(
                "save_checkpoint needs model_cfg (the model config section) to make the file self-describing."
            )
    model_cfg = normalize_model_cfg(model_cfg)
    meta = dict(meta or {})
    _check_plain(meta, "meta")
    state = model.state_dict() if isinstance(model, nn.Module) else model
    state_dict = {k: v.detach().cpu() for k, v in state.items()}
    payload = {"format": FORMAT_TAG, "model_cfg": model_cfg, "state_dict": state_dict, "meta": meta}
    if optimizer is not None:
        _check_plain(optimizer, "optimizer")
        payload["optimizer"] = optimizer
    path = Path(path)
    atomic_torch_save(payload, path)
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file next to ``path``, then rename it into place.

    An interrupted write never leaves a truncated file under ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
