"""Reading checkpoint files safely: ``torch.load(weights_only=True)`` and one
sentence for every file that does not load.

The one owner of "open a ``.pth`` file" for the whole project: our
checkpoints, the original's released files, MIC checkpoints and the ImageNet
files of the backbones (``uda.models.mit`` / ``uda.models.fan`` pretrained
loading). A file that does not load is one :class:`CheckpointError` saying
what is wrong: empty, truncated, corrupt, not a PyTorch checkpoint, or holding
Python objects that ``weights_only`` refuses (named, e.g. ``posix.system``),
never torch's multi-paragraph text. :func:`check_checkpoint_file` finds most
of these without reading tensors, for the checks before any work.

Needs only torch (numpy when present): the model code stays importable with
torch + timm alone.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import hashlib
import io
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from uda.errors import UserError

__all__ = ["CheckpointError", "read_checkpoint", "check_checkpoint_file", "file_sha256"]


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be read or is not a checkpoint."""


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
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


def _check_readable(path: Path) -> None:
    try:
        _head(path, 1)
    except OSError as err:  # e.g. permissions: no traceback for it
        raise CheckpointError(f"Checkpoint '{path}' cannot be read: {err.strerror or err}.") from None


def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> Any:
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
        with torch.serialization.safe_globals(_numpy_safe_globals()), warnings.catch_warnings():
            # Its note on pickle protocols is noise next to our message.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            if mmap and zipfile.is_zipfile(path):
                try:
                    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except Exception:  # e.g. a repacked zip: read it instead
                    pass
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip/pickle/EOF errors of damaged files
        raise CheckpointError(_explain_unreadable(path, err)) from None


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (multi-GB checkpoints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_checkpoint_file(path: str | os.PathLike) -> Path:
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
        raise CheckpointError(f"Checkpoint {str(path)!r} {problem}")
    return path


# What a damaged file looks like; each problem is one sentence.
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80
#: ``torch.save`` (legacy format) starts with this number, pickled.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_TRUNCATION_HINTS = (
    "truncated",
    "ran out of input",
    "unexpected eof",
    "failed finding central directory",
    "end of file",
)
_REFUSED_PATTERNS = (
    re.compile(r"GLOBAL (\S+) was not an allowed global"),
    re.compile(r"unsupported GLOBAL (\S+) whose module"),
)
_AGAIN = "copy or download it again"
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"Checkpoint {str(path)!r} is a folder, not a checkpoint file.")
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file not found: {str(path)!r}.")
    return path


def _head(path: Path, size: int = 64) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(size)


def _zip_names(path: Path) -> list[str] | None:
    """Entries of a zip file, or None when its central directory (at the
    end of the file) is missing, i.e. the file is cut off."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return None


def _pickle_name(names: list[str]) -> str | None:
    # torch.save writes '<archive name>/data.pkl' (the archive name varies).
    return next((n for n in names if n == "data.pkl" or n.endswith("/data.pkl")), None)


def _is_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # A multi-byte character cut at the end of the sample is still text.
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return all(c.isprintable() or c in "\t\r\n\f" for c in text)


def _refused_message(names: list[str]) -> str:
    return (
        f"contains Python objects that are not allowed: "
        f"{', '.join(names)}; only tensors and plain values are loaded, and "
        f"no code from the file is run (save only its tensors, such as its "
        f"state_dict, where its classes are available)."
    )


def _qualified(name: str) -> str:
    # torch prints builtins without their module ("Exception").
    return name if "." in name else f"builtins.{name}"


def _allowed_globals() -> set[str]:
    names = {f"{g.__module__}.{g.__qualname__}" for g in _numpy_safe_globals()}
    try:  # torch's own allow-list (private, hence guarded)
        from torch import _weights_only_unpickler as wo

        names |= set(wo._get_allowed_globals())
        names |= set(wo._get_user_allowed_globals())
    except (ImportError, AttributeError):  # pragma: no cover
        names |= {
            "collections.OrderedDict",
            "torch._utils._rebuild_tensor_v2",
            "torch._utils._rebuild_parameter",
            "torch.FloatStorage",
        }
    return names


def _py3_name(module: str, name: str = "") -> str:
    # Protocol-2 pickles (torch.save's) use Python 2 names (__builtin__.set),
    # which the unpickler maps back exactly like this.
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


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
                if opcode.name in ("GLOBAL", "INST"):
                    names.append(_py3_name(*str(arg).split(" ", 1)))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
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
                return archive.read(name) if name else b""
        with open(path, "rb") as handle:
            return handle.read(16 << 20)
    except Exception:  # damaged: the full read says how
        return b""


def _refused_globals(path: Path, err: Exception | None) -> list[str]:
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
    return any(head.startswith(pickle.dumps(_LEGACY_MAGIC, protocol=p)) for p in range(2, 6))


def _first_line(err: Exception) -> str:
    """A short reason from torch's message, without its advice to turn
    ``weights_only`` off (never the fix for a damaged or unsafe file)."""
    for line in str(err).splitlines():
        line = line.strip()
        if line and "weights_only" not in line and not line.lower().startswith("weights only load failed"):
            return f"{type(err).__name__}: {line[:160]}"
    return type(err).__name__


def _named_refused(err: Exception) -> list[str]:
    """The globals torch's ``weights_only`` message names as refused."""
    text = str(err)
    return list(
        dict.fromkeys(
            _qualified(m.group(1).rstrip(".,"))
            for pattern in _REFUSED_PATTERNS
            for m in pattern.finditer(text)
        )
    )


def _diagnose(path: Path, err: Exception | None = None) -> str | None:
    """What is wrong with ``path``: the end of a sentence that starts with
    the file's name. Without ``err`` (the pre-flight check) only what is
    seen without loading tensors, None when it looks fine."""
    size = path.stat().st_size
    if size == 0:
        return f"is empty (0 bytes): it was never written completely; {_AGAIN}."
    head = _head(path)
    is_zip = head.startswith(_ZIP_MAGIC)
    if is_zip:
        names = _zip_names(path)
        if names is None:
            return (
                f"is truncated: its zip archive ends after {size} bytes, "
                f"before its table of contents; {_AGAIN}."
            )
        if _pickle_name(names) is None:
            return (
                "is not a PyTorch checkpoint: it is a zip archive without "
                "the data.pkl that torch.save writes."
            )
    # Before the text test: a protocol-0 pickle is text too.
    refused = _refused_globals(path, err)
    if refused:
        return _refused_message(refused)
    if not is_zip and head[0] != _PICKLE_PROTO:
        if _is_text(head):
            return (
                "is not a PyTorch checkpoint: it is a text file (it "
                f"starts with {head[:24].decode('utf-8', 'replace')!r})."
            )
        return (
            "is not a PyTorch checkpoint: it is neither a zip archive "
            "(torch.save) nor a pickle (torch.save before PyTorch 1.6)."
        )
    if not is_zip and not _is_legacy_torch(head):
        return "is not a PyTorch checkpoint: it is a Python pickle that torch.save did not write."
    if err is None:
        return None  # only reading it tells more
    text = str(err).lower()
    # A refused name that is not in the file was cut off by its end.
    if isinstance(err, EOFError) or _named_refused(err) or any(h in text for h in _TRUNCATION_HINTS):
        return f"is truncated: its data ends after {size} bytes; {_AGAIN}."
    return f"is corrupt: PyTorch cannot read it ({_first_line(err)}); {_AGAIN}."


def _explain_unreadable(path: Path, err: Exception) -> str:
    """One sentence: why ``torch.load(weights_only=True)`` failed on ``path``."""
    return f"Checkpoint {str(path)!r} {_diagnose(path, err)}"
