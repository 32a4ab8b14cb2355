"""Read, load and write segmentor checkpoints (one module for every format).

Formats recognised by :func:`load_checkpoint` (``KeyReport.format``):

``cs2acdc-uda/1``
    Ours: ``{'format': 'cs2acdc-uda/1', 'model_cfg': <model section>,
    'state_dict': <segmentor state dict>, 'meta': {...}}`` (plus an optional
    ``'optimizer'`` entry for resuming); self-describing,
    so :func:`build_from_checkpoint` rebuilds the model from the file alone.
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

Every file is read with ``torch.load(weights_only=True)``. A file that does
not load is one :class:`CheckpointError` sentence saying what is wrong
(empty, truncated, corrupt, not a PyTorch checkpoint, or holding Python
objects that are not allowed, named: ``posix.system``);
:func:`check_checkpoint_file` finds most of these without reading tensors,
for the parameter checks that run before any work.
"""
from __future__ import annotations

import _compat_pickle
import argparse
import hashlib
import importlib
import io
import os
import pickle
import pickletools
import re
import tempfile
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn

from .hrda import HRDASegmentor
from uda.errors import UserError

__all__ = [
    'FORMAT_TAG', 'SUBMODEL_PREFIXES', 'CheckpointError',
    'CheckpointMismatchError', 'MissingPrefixError', 'KeyReport', 'read_checkpoint',
    'check_checkpoint_file', 'file_sha256', 'unwrap_state_dict', 'strip_module', 'prefix_counts',
    'resolve_prefix',
    'detect_format', 'load_checkpoint', 'save_checkpoint',
    'read_model_cfg', 'build_from_checkpoint'
]

#: Format tag of the checkpoints this project writes.
FORMAT_TAG = 'cs2acdc-uda/1'

#: Sub-model prefixes of mmcv UDA training checkpoints (MIC and CKD).
SUBMODEL_PREFIXES = ('model.', 'ema_model.', 'imnet_model.', 'ca_model.',
                     'stu_model.')

_SEGMENTOR_ROOTS = ('backbone.', 'decode_head.')
PathOrStateDict = Union[str, os.PathLike, Mapping[str, Any]]


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be read or is not a checkpoint."""


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
    prefix: str = ''
    source: str = '<state_dict>'
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
        prefix = f", prefix '{self.prefix}'" if self.prefix else ''
        lines = [f'{self.source}: format {self.format}{prefix}, loaded '
                 f'{self.loaded} tensors']
        for name in ('missing', 'unexpected', 'unused'):
            keys = getattr(self, name)
            if keys:
                lines.append(f'  {name} ({len(keys)}): {_summary(keys)}')
        if self.other_models:
            others = ', '.join(f'{p} {n}' for p, n in
                               sorted(self.other_models.items()))
            lines.append(f'  other sub-models not loaded: {others}')
        return '\n'.join(lines)


def _summary(keys: list[str], limit: int = 5) -> str:
    more = f', ... (+{len(keys) - limit} more)' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


def _numpy_safe_globals() -> list[Any]:
    """Harmless reconstructors found in real checkpoints: numpy scalars and
    dtypes in mmcv ``meta`` dicts, timm's ``argparse.Namespace`` of training
    arguments. They build plain values and run no user code."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return []
    allowed: list[Any] = [argparse.Namespace, np.dtype, np.ndarray]
    try:
        from numpy.core.multiarray import _reconstruct, scalar
        allowed += [scalar, _reconstruct]
    except ImportError:  # pragma: no cover - numpy 2 layout
        from numpy._core.multiarray import _reconstruct, scalar
        allowed += [scalar, _reconstruct]
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes)
                    if n.endswith('DType')]
    return allowed


def _check_readable(path: Path) -> None:
    try:
        _head(path, 1)
    except OSError as err:  # e.g. permissions: no traceback for it
        raise CheckpointError(f"Checkpoint '{path}' cannot be read: "
                              f"{err.strerror or err}.") from None


def read_checkpoint(path: Union[str, os.PathLike], mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, with clear errors.

    Args:
        path: Checkpoint file.
        mmap: Map the tensors of a zip-format file instead of reading them
            (cheap look at ``meta`` and key names of a multi-GB file; a
            legacy-format file is read as usual).

    Raises:
        FileNotFoundError: No such file.
        CheckpointError: One sentence saying what is wrong: empty, truncated,
            corrupt, not a PyTorch checkpoint, or holding Python objects that
            ``weights_only`` loading refuses (named, e.g. ``posix.system``).
    """
    path = _existing_file(path)
    _check_readable(path)
    try:
        # mmcv meta dicts may hold numpy scalars: allow exactly those types.
        with torch.serialization.safe_globals(_numpy_safe_globals()), \
                warnings.catch_warnings():
            # Its note on pickle protocols is noise next to our message.
            warnings.filterwarnings('ignore', message='Detected pickle protocol')
            if mmap and zipfile.is_zipfile(path):
                try:
                    return torch.load(path, map_location='cpu',
                                      weights_only=True, mmap=True)
                except Exception:  # e.g. a repacked zip: read it instead
                    pass
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # zip/pickle/EOF errors of damaged files
        raise CheckpointError(_explain_unreadable(path, err)) from None


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (multi-GB checkpoints)."""
    digest = hashlib.sha256()
    with open(path, 'rb') as handle:
        for block in iter(lambda: handle.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def check_checkpoint_file(path: Union[str, os.PathLike]) -> Path:
    """Cheap structural check of a checkpoint file, without loading tensors.

    Used before any work starts (an entry point's parameter checks), so a
    file that cannot be a checkpoint fails in seconds, not after data
    preparation. It finds missing, empty, truncated zip, non-PyTorch and
    text files, and (zip format) the refused Python objects of its pickle;
    :func:`read_checkpoint` still reports what only a full read finds.

    Returns:
        The path.

    Raises:
        FileNotFoundError / CheckpointError: As :func:`read_checkpoint`.
    """
    path = _existing_file(path)
    _check_readable(path)
    problem = _diagnose(path)
    if problem is not None:
        raise CheckpointError(f'Checkpoint {str(path)!r} {problem}')
    return path


# What a damaged file looks like; each problem is one sentence.
_ZIP_MAGIC = b'PK\x03\x04'
_PICKLE_PROTO = 0x80
#: ``torch.save`` (legacy format) starts with this number, pickled.
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_TRUNCATION_HINTS = ('truncated', 'ran out of input', 'unexpected eof',
                     'failed finding central directory', 'end of file')
_REFUSED_PATTERNS = (re.compile(r'GLOBAL (\S+) was not an allowed global'),
                     re.compile(r'unsupported GLOBAL (\S+) whose module'))
_AGAIN = 'copy or download it again'
_DOTTED = re.compile(r'^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$')


def _existing_file(path: Union[str, os.PathLike]) -> Path:
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f'Checkpoint {str(path)!r} is a folder, not a '
                                f'checkpoint file.')
    if not path.is_file():
        raise FileNotFoundError(f'Checkpoint file not found: {str(path)!r}.')
    return path


def _head(path: Path, size: int = 64) -> bytes:
    with open(path, 'rb') as handle:
        return handle.read(size)


def _zip_names(path: Path) -> Optional[list[str]]:
    """Entries of a zip file, or None when its central directory (at the
    end of the file) is missing, i.e. the file is cut off."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return None


def _pickle_name(names: list[str]) -> Optional[str]:
    # torch.save writes '<archive name>/data.pkl' (the archive name varies).
    return next((n for n in names if n == 'data.pkl' or
                 n.endswith('/data.pkl')), None)


def _is_text(head: bytes) -> bool:
    try:
        text = head.decode('utf-8')
    except UnicodeDecodeError:
        # A multi-byte character cut at the end of the sample is still text.
        try:
            text = head[:-3].decode('utf-8')
        except UnicodeDecodeError:
            return False
    return all(c.isprintable() or c in '\t\r\n\f' for c in text)


def _refused_message(names: list[str]) -> str:
    return (f'contains Python objects that are not allowed: '
            f'{", ".join(names)}; only tensors and plain values are loaded, and '
            f'no code from the file is run (save only its tensors, such as its '
            f'state_dict, where its classes are available).')


def _qualified(name: str) -> str:
    # torch prints builtins without their module ("Exception").
    return name if '.' in name else f'builtins.{name}'


def _allowed_globals() -> set[str]:
    names = {f'{g.__module__}.{g.__qualname__}'
             for g in _numpy_safe_globals()}
    try:  # torch's own allow-list (private, hence guarded)
        from torch import _weights_only_unpickler as wo

        names |= set(wo._get_allowed_globals())
        names |= set(wo._get_user_allowed_globals())
    except (ImportError, AttributeError):  # pragma: no cover
        names |= {'collections.OrderedDict', 'torch._utils._rebuild_tensor_v2',
                  'torch._utils._rebuild_parameter', 'torch.FloatStorage'}
    return names


def _py3_name(module: str, name: str = '') -> str:
    # Protocol-2 pickles (torch.save's) use Python 2 names (__builtin__.set),
    # which the unpickler maps back exactly like this.
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f'{module}.{name}'


def _globals_in_pickles(data: bytes) -> tuple[list[str], set[str]]:
    """The ``module.name`` globals the pickles in ``data`` import, read with
    :mod:`pickletools` (a disassembler: nothing is imported or run).

    Returns:
        ``(complete, seen)``: the globals of complete pickles only (text
        that happens to start with an opcode letter, "c" = GLOBAL, must not
        read as an import), and every global read at all.
    """
    complete: list[str] = []
    seen: set[str] = set()
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        strings: list[str] = []
        names: list[str] = []
        try:
            for opcode, arg, _ in pickletools.genops(stream):
                if opcode.name in ('GLOBAL', 'INST'):
                    names.append(_py3_name(*str(arg).split(' ', 1)))
                elif opcode.name == 'STACK_GLOBAL' and len(strings) >= 2:
                    names.append(_py3_name(strings[-2], strings[-1]))
                elif isinstance(arg, str):
                    strings.append(arg)
        except Exception:  # the raw tensor bytes of a legacy file, or junk
            seen.update(names)
            break
        seen.update(names)
        complete += [n for n in names if _DOTTED.match(n)]
    return list(dict.fromkeys(complete)), seen


def _pickle_bytes(path: Path) -> bytes:
    """The pickle stream of a checkpoint: ``data.pkl`` of the zip format,
    else the start of the file (the legacy format's pickles come first)."""
    try:
        if _head(path).startswith(_ZIP_MAGIC):
            with zipfile.ZipFile(path) as archive:
                name = _pickle_name(archive.namelist())
                return archive.read(name) if name else b''
        with open(path, 'rb') as handle:
            return handle.read(16 << 20)
    except Exception:  # damaged: the full read says how
        return b''


def _refused_globals(path: Path, err: Optional[Exception]) -> list[str]:
    """Globals that ``weights_only`` loading refuses: those of the file's
    complete pickles that are not allowed, else those torch's error names
    (kept only when they are really in the file, not cut off by a
    truncation)."""
    complete, seen = _globals_in_pickles(_pickle_bytes(path))
    allowed = _allowed_globals()
    refused = [n for n in complete if n not in allowed]
    if refused or err is None:
        return refused
    return [n for n in _named_refused(err) if n in seen]


def _is_legacy_torch(head: bytes) -> bool:
    return any(head.startswith(pickle.dumps(_LEGACY_MAGIC, protocol=p))
               for p in range(2, 6))


def _first_line(err: Exception) -> str:
    """A short reason from torch's message, without its advice to turn
    ``weights_only`` off (never the fix for a damaged or unsafe file)."""
    for line in str(err).splitlines():
        line = line.strip()
        if line and 'weights_only' not in line and \
                not line.lower().startswith('weights only load failed'):
            return f'{type(err).__name__}: {line[:160]}'
    return type(err).__name__


def _named_refused(err: Exception) -> list[str]:
    """The globals torch's ``weights_only`` message names as refused."""
    text = str(err)
    return list(dict.fromkeys(
        _qualified(m.group(1).rstrip('.,'))
        for pattern in _REFUSED_PATTERNS for m in pattern.finditer(text)))


def _diagnose(path: Path, err: Optional[Exception] = None) -> Optional[str]:
    """What is wrong with ``path``: the end of a sentence that starts with
    the file's name. Without ``err`` (the pre-flight check) only what is
    seen without loading tensors, None when it looks fine."""
    size = path.stat().st_size
    if size == 0:
        return f'is empty (0 bytes): it was never written completely; {_AGAIN}.'
    head = _head(path)
    is_zip = head.startswith(_ZIP_MAGIC)
    if is_zip:
        names = _zip_names(path)
        if names is None:
            return (f'is truncated: its zip archive ends after {size} bytes, '
                    f'before its table of contents; {_AGAIN}.')
        if _pickle_name(names) is None:
            return ('is not a PyTorch checkpoint: it is a zip archive without '
                    'the data.pkl that torch.save writes.')
    # Before the text test: a protocol-0 pickle is text too.
    refused = _refused_globals(path, err)
    if refused:
        return _refused_message(refused)
    if not is_zip and head[0] != _PICKLE_PROTO:
        if _is_text(head):
            return ('is not a PyTorch checkpoint: it is a text file (it '
                    f'starts with {head[:24].decode("utf-8", "replace")!r}).')
        return ('is not a PyTorch checkpoint: it is neither a zip archive '
                '(torch.save) nor a pickle (torch.save before PyTorch 1.6).')
    if not is_zip and not _is_legacy_torch(head):
        return ('is not a PyTorch checkpoint: it is a Python pickle that '
                'torch.save did not write.')
    if err is None:
        return None  # only reading it tells more
    text = str(err).lower()
    # A refused name that is not in the file was cut off by its end.
    if isinstance(err, EOFError) or _named_refused(err) or \
            any(h in text for h in _TRUNCATION_HINTS):
        return f'is truncated: its data ends after {size} bytes; {_AGAIN}.'
    return f'is corrupt: PyTorch cannot read it ({_first_line(err)}); {_AGAIN}.'


def _explain_unreadable(path: Path, err: Exception) -> str:
    """One sentence: why ``torch.load(weights_only=True)`` failed on ``path``."""
    return f'Checkpoint {str(path)!r} {_diagnose(path, err)}'


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) for k in obj) and any(
            torch.is_tensor(v) for v in obj.values())


def unwrap_state_dict(obj: Any, source: str) -> tuple[dict[str, Any], str]:
    """Return ``(state_dict, container_format)`` of a loaded checkpoint."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f'{source} holds a {type(obj).__name__}, not a '
                              f'checkpoint dict.')
    fmt = obj.get('format')
    if isinstance(fmt, str) and fmt.startswith('cs2acdc-uda/'):
        if fmt != FORMAT_TAG:
            raise CheckpointError(f'{source} has format {fmt!r}; this version '
                                  f'reads {FORMAT_TAG!r}.')
        if not _is_state_dict(obj.get('state_dict')):
            raise CheckpointError(f'{source} ({fmt}) has no state_dict.')
        return dict(obj['state_dict']), FORMAT_TAG
    for container in ('state_dict', 'model'):
        if _is_state_dict(obj.get(container)):
            return dict(obj[container]), ''
    if _is_state_dict(obj):
        return dict(obj), ''
    raise CheckpointError(f'{source} contains no state dict (top-level keys: '
                          f'{_summary(sorted(map(str, obj)))}).')


def strip_module(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Remove a DataParallel/DDP ``module.`` prefix present on every key."""
    if state_dict and all(k.startswith('module.') for k in state_dict):
        return {k[len('module.'):]: v for k, v in state_dict.items()}
    return state_dict


def detect_format(state_dict: Mapping[str, Any]) -> str:
    """Classify an (unwrapped) state dict: ``'mmcv-uda'``, ``'segmentor'`` or
    ``'backbone'``."""
    if any(k.startswith(SUBMODEL_PREFIXES) for k in state_dict):
        return 'mmcv-uda'
    if any(k.startswith(_SEGMENTOR_ROOTS) for k in state_dict):
        return 'segmentor'
    return 'backbone'


def prefix_counts(state_dict: Mapping[str, Any]) -> Counter:
    """Tensor count per first key component (``'model.'``: 812, ...)."""
    return Counter(k.split('.', 1)[0] + '.' for k in state_dict if '.' in k)


def resolve_prefix(fmt: str, prefix: str) -> str:
    """The sub-model ``prefix`` takes from weights of format ``fmt``:
    ``'auto'`` is ``'model.'`` (MIC's and the original's choice) in an mmcv
    UDA file and none elsewhere; our own format holds one model."""
    if fmt == FORMAT_TAG:
        return ''
    if prefix == 'auto':
        return 'model.' if fmt == 'mmcv-uda' else ''
    return prefix


def _select_prefix(state_dict: dict[str, Any], fmt: str, prefix: str,
                   source: str) -> tuple[dict[str, Any], str, dict[str, int]]:
    prefix = resolve_prefix(fmt, prefix)
    if not prefix:
        return state_dict, '', {}
    counts = prefix_counts(state_dict)
    if counts.get(prefix, 0) == 0:
        held = [p.rstrip('.') for p in counts if p in SUBMODEL_PREFIXES]
        what = (f'the sub-models it holds: {", ".join(held)} (pick one with '
                f'prefix=…)') if held else \
            'it is a plain state dict without sub-models (use prefix=auto)'
        raise MissingPrefixError(
            f'{source} has no {prefix!r} weights; {what}.')
    selected = {k[len(prefix):]: v for k, v in state_dict.items()
                if k.startswith(prefix)}
    others = {p: n for p, n in counts.items() if p != prefix}
    return selected, prefix, others


def _shape_mismatches(model_state: Mapping[str, torch.Tensor],
                      state_dict: Mapping[str, Any]) -> list[str]:
    return [
        f'{k}: checkpoint {tuple(v.shape)} vs model '
        f'{tuple(model_state[k].shape)}' for k, v in state_dict.items()
        if k in model_state and torch.is_tensor(v) and
        tuple(v.shape) != tuple(model_state[k].shape)
    ]


def _load_into(module: nn.Module, state_dict: dict[str, Any], strict: bool,
               report: KeyReport, what: str) -> KeyReport:
    """Check keys/shapes, then load; raise on a mismatch."""
    model_state = module.state_dict()
    mismatched = _shape_mismatches(model_state, state_dict)
    report.missing = [k for k in model_state if k not in state_dict]
    report.unexpected = [k for k in state_dict if k not in model_state]
    if mismatched or (strict and (report.missing or report.unexpected)):
        parts = []
        if mismatched:
            parts.append(f'{len(mismatched)} tensors differ in shape, e.g. '
                         f'{_summary(mismatched, 3)}')
        if report.missing:
            parts.append(f'{len(report.missing)} missing keys, e.g. '
                         f'{_summary(report.missing, 3)}')
        if report.unexpected:
            parts.append(f'{len(report.unexpected)} unexpected keys, e.g. '
                         f'{_summary(report.unexpected, 3)}')
        raise CheckpointMismatchError(
            f'{report.source} (format {report.format}'
            f"{', prefix ' + repr(report.prefix) if report.prefix else ''}) "
            f'does not fit this {what}: {"; ".join(parts)}. Is it a '
            f'checkpoint of another architecture/backbone, or the wrong '
            f'sub-model prefix?')
    usable = {k: v for k, v in state_dict.items() if k in model_state}
    module.load_state_dict(usable, strict=False)
    report.loaded = len(usable)
    return report


def _storage_id(value: Any) -> Optional[int]:
    if not torch.is_tensor(value) or value.numel() == 0:
        return None
    return value.untyped_storage().data_ptr()


def _dropped_keys(original: Mapping[str, Any],
                  filtered: Mapping[str, Any]) -> list[str]:
    """Keys a filter fn left out. A key it only renamed or split (FAN's
    ``pos_embeder.`` -> ``pos_embed.``, fused class-attention ``qkv``) keeps
    its tensor storage, so it is not counted as dropped."""
    kept = {_storage_id(v) for v in filtered.values()} - {None}
    return [k for k, v in original.items()
            if k not in filtered and _storage_id(v) not in kept]


def _backbone_filter(backbone: nn.Module):
    """The ``checkpoint_filter_fn`` of the module defining the backbone."""
    module = importlib.import_module(type(backbone).__module__)
    return getattr(module, 'checkpoint_filter_fn', None)


def load_checkpoint(model: nn.Module,
                    path_or_state_dict: PathOrStateDict,
                    prefix: str = 'auto',
                    strict: bool = True,
                    source: Optional[str] = None) -> KeyReport:
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
        source, obj = source or '<state_dict>', path_or_state_dict
    else:
        source = str(path_or_state_dict)
        obj = read_checkpoint(path_or_state_dict)
    state_dict, container = unwrap_state_dict(obj, source)
    state_dict = strip_module(state_dict)
    fmt = container or detect_format(state_dict)
    if prefix not in ('auto', '') and prefix not in SUBMODEL_PREFIXES:
        raise ValueError(f"prefix must be 'auto', '' or one of "
                         f"{', '.join(SUBMODEL_PREFIXES)}; got {prefix!r}.")
    state_dict, prefix, others = _select_prefix(state_dict, fmt, prefix,
                                                source)
    report = KeyReport(format=fmt, prefix=prefix, source=source,
                       other_models=others)

    if isinstance(model, HRDASegmentor):
        if fmt != 'backbone':
            return _load_into(model, state_dict, strict, report, 'segmentor')
        target: nn.Module = model.backbone
    else:  # a bare backbone: take the backbone part of any format
        target = model
        if fmt != 'backbone':
            kept = {k[len('backbone.'):]: v for k, v in state_dict.items()
                    if k.startswith('backbone.')}
            report.unused = [k for k in state_dict
                             if not k.startswith('backbone.')]
            state_dict = kept
    filter_fn = _backbone_filter(target)
    filtered = state_dict
    if filter_fn is not None:
        try:
            filtered = filter_fn(state_dict, target)
        except ValueError as err:
            raise CheckpointMismatchError(
                f'{source} does not fit this backbone: {err}') from None
    report.unused += _dropped_keys(state_dict, filtered)
    return _load_into(target, dict(filtered), strict, report, 'backbone')


def _check_plain(value: Any, where: str) -> None:
    """Reject values ``weights_only`` loading could not read back."""
    if value is None or isinstance(value, (str, int, float, bool)) or \
            torch.is_tensor(value):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f'{where}[{i}]')
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise ValueError(f'{where} has a non-string key {key!r}.')
            _check_plain(item, f'{where}.{key}')
        return
    raise ValueError(f'{where} is a {type(value).__name__}; checkpoints may '
                     f'only hold str/int/float/bool/None, lists, dicts and '
                     f'tensors (so they load with weights_only=True).')


def save_checkpoint(path: Union[str, os.PathLike],
                    model: Union[nn.Module, Mapping[str, torch.Tensor]],
                    model_cfg: Optional[Mapping[str, Any]] = None,
                    meta: Optional[Mapping[str, Any]] = None,
                    optimizer: Optional[Mapping[str, Any]] = None) -> Path:
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
    from .builder import normalize_model_cfg

    if model_cfg is None:
        model_cfg = getattr(model, 'model_cfg', None)
        if model_cfg is None:
            raise ValueError('save_checkpoint needs model_cfg (the model '
                             'config section) to make the file '
                             'self-describing.')
    model_cfg = normalize_model_cfg(model_cfg)
    meta = dict(meta or {})
    _check_plain(meta, 'meta')
    state = model.state_dict() if isinstance(model, nn.Module) else model
    state_dict = {k: v.detach().cpu() for k, v in state.items()}
    payload = {'format': FORMAT_TAG, 'model_cfg': model_cfg,
               'state_dict': state_dict, 'meta': meta}
    if optimizer is not None:
        _check_plain(optimizer, 'optimizer')
        payload['optimizer'] = optimizer
    path = Path(path)
    atomic_torch_save(payload, path)
    return path


def atomic_torch_save(obj: Any, path: Union[str, os.PathLike]) -> None:
    """``torch.save`` to a temporary file next to ``path``, then rename it into place.

    An interrupted write never leaves a truncated file under ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp',
                               dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_model_cfg(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """The ``model_cfg`` stored in a ``cs2acdc-uda/1`` checkpoint."""
    obj = read_checkpoint(path)
    if not isinstance(obj, Mapping) or obj.get('format') != FORMAT_TAG:
        raise CheckpointError(
            f'{str(path)!r} is not a {FORMAT_TAG} checkpoint, so it does not '
            f'describe its model; build the model from a preset and use '
            f'load_checkpoint().')
    return dict(obj['model_cfg'])


def build_from_checkpoint(checkpoint: Union[str, os.PathLike, Mapping[str, Any]],
                          strict: bool = True) -> nn.Module:
    """Rebuild a segmentor from a ``cs2acdc-uda/1`` checkpoint and load it.

    ``model_cfg.pretrained`` is ignored (the checkpoint has all weights).
    The file's ``meta`` is attached as ``model.checkpoint_meta``.

    Args:
        checkpoint: A file written by :func:`save_checkpoint`, or its
            contents already read with :func:`read_checkpoint`.
        strict: See :func:`load_checkpoint`.
    """
    from .builder import build_segmentor

    if isinstance(checkpoint, Mapping):
        obj, source = checkpoint, '<checkpoint>'
    else:
        obj, source = read_checkpoint(checkpoint), str(checkpoint)
    if not isinstance(obj, Mapping) or obj.get('format') != FORMAT_TAG:
        raise CheckpointError(
            f'{source!r} is not a {FORMAT_TAG} checkpoint, so it does not '
            f'describe its model; build the model from a preset and use '
            f'load_checkpoint().')
    model_cfg = dict(obj['model_cfg'], pretrained=None)
    model = build_segmentor(model_cfg)
    load_checkpoint(model, obj, strict=strict)
    model.checkpoint_meta = dict(obj.get('meta') or {})
    return model
