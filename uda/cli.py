"""Command-line plumbing shared by the thin scripts in ``entrypoints/``.

Each script builds an ``argparse`` parser from these pieces, then calls
``run_cli(main)``: a ``UserError`` becomes one ``error: …`` line and exit
status 2, an interruption exit status 130; a bug keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from uda.config import load_config, merge_into, parse_overrides
from uda.errors import UserError  # noqa: F401  (re-exported for entry points)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """``--preset`` and ``--cfg-options`` (mmsegmentation's name for overrides)."""
    parser.add_argument(
        "--preset", default="default", help="preset name in uda/configs (default, cs2acdc) or a YAML path"
    )
    parser.add_argument(
        "--cfg-options", default="", help="space-separated key.sub=value overrides of the preset"
    )


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--threads``: where the compute runs."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, …")
    parser.add_argument(
        "--threads",
        default="auto",
        help="CPU threads: auto (the cores shared among the cs2acdc jobs "
        "running on this machine) or a number",
    )


def optional_int(name: str, text: str, minimum: int | None = None) -> int | None:
    """Parse an integer parameter where "" means "the preset's value"."""
    if text is None or str(text).strip() == "":
        return None
    try:
        value = float(text)
        if not value.is_integer():
            raise ValueError
        value = int(value)
    except ValueError:
        raise UserError(f"{name} must be an integer, got {text!r}.") from None
    if minimum is not None and value < minimum:
        raise UserError(f"{name} must be at least {minimum}, got {value}.")
    return value


def parse_bool(name: str, text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise UserError(f"{name} must be true or false, got {text!r}.")


def resolve_config(preset: str, cfg_options: str, **dotted: Any) -> dict[str, Any]:
    """Load ``preset`` with the entry point's own parameters applied, then ``cfg_options``.

    Args:
        preset: Preset name or YAML path.
        cfg_options: Free-form ``key=value`` overrides; applied last.
        **dotted: Entry-point parameters keyed by their dotted config key with
            ``__`` for dots (``runner__max_iters=200``); ``None`` values are skipped.
    """
    overrides = {k.replace("__", "."): v for k, v in dotted.items() if v is not None}
    return merge_into(load_config(preset, overrides), parse_overrides(cfg_options))


def resolve_device(name: str) -> str:
    """``auto`` → ``cuda`` when available else ``cpu``; validate explicit names."""
    import torch

    if name in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"Unknown device {name!r}; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"Device {name!r} was requested but CUDA is not available here; use cpu.")
    return str(device)


def check_threads(text: str) -> int | None:
    """A ``threads`` parameter checked before any work (None = auto)."""
    from uda.cpu_threads import ThreadsError, parse_threads

    try:
        return parse_threads(text)
    except ThreadsError as error:
        raise UserError(str(error)) from None


def start_compute(args: argparse.Namespace) -> str:
    """The device of ``--device``, with this process's CPU threads set from
    ``--threads`` (see :mod:`uda.cpu_threads`)."""
    from uda import cpu_threads

    check_threads(args.threads)
    device = resolve_device(args.device)
    cpu_threads.configure(args.threads, device=device)
    return device


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run an entry point's ``main`` and turn predictable failures into clean exits."""
    logging.basicConfig(
        level=os.environ.get("UDA_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Quieter MLflow/alembic start-up chatter; warnings and errors still show.
    for noisy in ("alembic", "mlflow.store.db.utils", "mlflow.system_metrics"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Each model load downloads a few small files; MLflow's bar for each would bury the
    # entry point's own progress lines (set it to true to see them).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return int(main(argv) or 0)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if not _sqlite_is_locked(err):
            raise
        print(f"error: {sqlite_locked_message()}", file=sys.stderr)
        return 2


def _sqlite_is_locked(err: BaseException) -> bool:
    """SQLite's "database is locked", however MLflow or SQLAlchemy wrapped it."""
    seen = 0
    while err is not None and seen < 10:
        if "database is locked" in str(err):
            return True
        err = err.__cause__ or err.__context__
        seen += 1
    return False


def sqlite_locked_message() -> str:
    """What to do when an SQLite database held another writer for too long."""
    store = os.environ.get("MLFLOW_TRACKING_URI", "")
    which = (
        f"the SQLite store {store}"
        if store.startswith("sqlite")
        else "an SQLite database (MLflow's store or the soup's Optuna file)"
    )
    return (
        f"{which} is locked: another process kept writing to it for longer than SQLite "
        "waits (5 to 20 s). SQLite takes one writer at a time, so several jobs writing at "
        "once can fail like this. For parallel jobs or a team, run a tracking server on "
        'PostgreSQL (README, "Scaling out"; to try it: python tools/team_services.py '
        "start --dir DIR) and set MLFLOW_TRACKING_URI to it. Run the same command again: "
        "a training resumes from its last checkpoint."
    )


def add_training_args(parser: argparse.ArgumentParser, default_model: str) -> None:
    """The parameters ``teacher`` and ``distill`` share (data, schedule, resume, registry name)."""
    add_config_args(parser)
    add_device_arg(parser)
    parser.add_argument("--source-root", required=True)
    parser.add_argument("--target-root", required=True)
    parser.add_argument("--iterations", default="", help="runner.max_iters (default: the preset's)")
    parser.add_argument("--checkpoint-interval", default="", help="checkpoint_config.interval")
    parser.add_argument("--seed", default="", help="random seed (default: the preset's)")
    parser.add_argument("--resume", default="auto", help="auto, none or the run id to continue")
    parser.add_argument("--model-name", default="", help=f"registered model (default {default_model})")


def check_model_name(text: str, parameter: str = "model_name") -> str | None:
    """A ``model_name`` parameter checked by MLflow's rules ("" → None: the
    entry point's default), before any work; see
    :func:`uda.registry.validate_model_name`."""
    if text is None or not str(text).strip():
        return None
    from uda.registry import validate_model_name

    return validate_model_name(text, parameter)


def check_model(text: str, parameter: str | None) -> Any:
    """A model reference parameter (``teacher``, ``model``) that must name
    an existing model, checked before any work (registry look-ups and the
    small MLmodel file, no weights); see :func:`uda.registry.check_model_uri`.
    ``parameter`` starts the message where an entry point has several
    model parameters (None: the message alone).

    Returns:
        The :class:`uda.registry.ModelReference`: ``uri`` pinned to a
        version (an alias can move later), ``model_id`` its logged model.
    """
    from uda.registry import check_model_uri

    return check_model_uri(text, parameter)


def check_pretrained(cfg: dict[str, Any], roles: Sequence[str]) -> None:
    """The ImageNet weights that training the ``roles`` (``teacher``,
    ``student``) starts from exist, checked before any work."""
    from uda.models.pretrained import resolve_pretrained

    for role in roles:
        model = cfg[role]["model"]
        resolve_pretrained(model.get("pretrained"), str(model.get("backbone")), f"{role}.model.pretrained")


def check_training_args(
    args: argparse.Namespace, entry_point: str, cfg: dict[str, Any] | None = None
) -> str | None:
    """Every ``teacher`` / ``distill`` parameter that can only fail later,
    checked now: a bad ``model_name`` would otherwise fail at the first
    checkpoint, after training; a teacher that does not exist, or a
    checkpoint to import that cannot be one, after data preparation.

    Args:
        args: The parsed parameters (``--model-name``, distill's
            ``--teacher``, teacher's ``--checkpoint``).
        entry_point: ``teacher`` or ``distill``.
        cfg: The resolved preset: the ImageNet weights training starts from
            must exist (not needed when ``teacher`` imports a checkpoint).

    Returns:
        The registered model name (None: the entry point's default).
    """
    check_threads(args.threads)
    model_name = check_model_name(args.model_name)
    checkpoint = str(getattr(args, "checkpoint", "") or "").strip()
    if cfg is not None and not checkpoint:  # training starts from these files
        check_pretrained(cfg, ["teacher" if entry_point == "teacher" else "student"])
    if entry_point == "distill":
        from uda.registry import RegistryError, UnknownModelError, check_model_uri

        try:
            teacher = check_model_uri(args.teacher, "teacher")
        except UnknownModelError as err:
            raise UnknownModelError(
                f"{err} Train or import a teacher first (mlflow run . -e teacher), "
                "or pass -P teacher=… (a model URI or a MIC checkpoint file)."
            ) from None
        if teacher.kind == "folder":  # the runner loads files and URIs only
            raise RegistryError(
                f"teacher {args.teacher!r} is a logged model folder; pass its checkpoint "
                f"file ({teacher.uri}/{teacher.checkpoint}) or a models:/ or runs:/ URI."
            )
    if checkpoint:
        from uda.models.checkpoint_files import CheckpointError, check_checkpoint_file
        from uda.registry import ModelNotFoundError

        try:
            check_checkpoint_file(checkpoint)
        except CheckpointError as err:
            raise CheckpointError(f"checkpoint: {err}") from None
        except FileNotFoundError as err:  # not a UserError by itself
            raise ModelNotFoundError(f"checkpoint: {err} Pass the MIC checkpoint file to import.") from None
    return model_name


def training_config(args: argparse.Namespace) -> dict[str, Any]:
    """The resolved preset of a training entry point: its parameters, then ``cfg_options``."""
    return resolve_config(
        args.preset,
        args.cfg_options,
        data__source__root=args.source_root,
        data__target__root=args.target_root,
        seed=optional_int("seed", args.seed),
        runner__max_iters=optional_int("iterations", args.iterations, minimum=1),
        checkpoint_config__interval=optional_int("checkpoint_interval", args.checkpoint_interval, minimum=1),
    )
