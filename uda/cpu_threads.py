"""CPU threads per process: the machine's cores shared among the cs2acdc jobs running on it.

Why: every process that computes on the CPU starts torch with one thread per
core. Two trainings on one machine then run twice as many OpenMP threads as
there are cores, and the threads spin against each other: measured on a
2-core machine, two default-preset ``distill`` runs made 0.37 it/s each,
against 6.8 it/s alone; with one thread each they made 6.15 it/s each
(docs/team.md, "Several jobs on one machine").

``threads=auto`` (the default of every entry point that computes) therefore
registers the process in a small folder of the project's cache, one file per
process named after the host and the pid, and uses ``cores // jobs``
threads, where ``jobs`` counts the live cs2acdc processes of this host (a
cache shared by several machines counts each machine's own). A job on a GPU
computes little on the CPU: it does not register. :func:`rebalance`, called by the training
loop and the evaluation loops, re-counts every few seconds: a job that was
alone shrinks when a second one starts and grows back when it ends. An
explicit ``OMP_NUM_THREADS`` (``torchrun`` sets it for every rank) or
``threads=N`` fixes the number instead; such a process still counts as a job
for the others.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

#: How often :func:`rebalance` looks at the other jobs.
REBALANCE_EVERY_S = 5.0


class ThreadsError(ValueError):
    """A ``threads`` value that is neither ``auto`` nor a positive integer."""


@dataclass
class _Share:
    folder: Path
    slot: Path
    cores: int
    fixed: int | None
    threads: int
    checked_at: float


_share: _Share | None = None


def parse_threads(text: str | None) -> int | None:
    """``None`` for ``auto`` (or empty), else the positive integer given.

    Raises:
        ThreadsError: anything else.
    """
    value = str(text if text is not None else "").strip().lower()
    if value in ("", "auto"):
        return None
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise ThreadsError(f"threads must be auto or a positive integer, got {text!r}.")


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), which tells a live
    process from a later one that reuses its pid; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "?"
    return stat.rsplit(")", 1)[1].split()[19]


def _host() -> str:
    """This machine's name, safe in a file name; a boot id tells apart two
    containers or reboots that share a name."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        boot = ""
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())
    return f"{name}-{boot}" if boot else name


def _live_jobs(folder: Path) -> int:
    """Counts this host's live registered processes; removes the files of
    its dead ones (never another host's)."""
    count = 0
    for slot in folder.glob(f"{_host()}-*.json"):
        try:
            record = json.loads(slot.read_text())
            alive = _start_time(int(record["pid"])) in (record["start"], "?")
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written or removed right now
        if alive:
            count += 1
        else:
            slot.unlink(missing_ok=True)
    return max(count, 1)


def _default_folder() -> Path:
    from uda.data.paths import cache_dir

    return cache_dir() / "cpu-jobs"


def configure(setting: str | None = "auto", folder: Path | None = None, device: str = "cpu") -> int:
    """Registers this process as a job and sets torch's thread count.

    Args:
        setting: ``auto``/empty (share the cores) or a positive integer.
        folder: Where the jobs register (default: the project's cache).
        device: Where the job computes: on a GPU it neither registers nor
            changes torch's threads unless ``setting`` is a number.

    Returns:
        The threads this process now uses.

    Raises:
        ThreadsError: a bad ``setting``.
    """
    global _share
    import torch

    fixed = parse_threads(setting)
    if not str(device).startswith("cpu"):
        if fixed is not None:
            torch.set_num_threads(fixed)
        return torch.get_num_threads()
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if fixed is None and env.isdigit() and int(env) >= 1:
        fixed = int(env)
    folder = Path(folder) if folder is not None else _default_folder()
    cores = _share.cores if _share is not None else max(1, torch.get_num_threads())
    if _share is None:
        folder.mkdir(parents=True, exist_ok=True)
        slot = folder / f"{_host()}-{os.getpid()}.json"
        temporary = slot.with_suffix(".tmp")
        temporary.write_text(json.dumps({"pid": os.getpid(), "start": _start_time(os.getpid())}))
        os.replace(temporary, slot)  # others never read half a file
        atexit.register(slot.unlink, missing_ok=True)
    else:
        slot = _share.slot
    _share = _Share(folder=folder, slot=slot, cores=cores, fixed=fixed, threads=0, checked_at=0.0)
    threads = _apply(announce=True)
    return threads


def _apply(announce: bool) -> int:
    import torch

    share = _share
    assert share is not None
    jobs = _live_jobs(share.folder)
    threads = share.fixed or max(1, share.cores // jobs)
    share.checked_at = time.monotonic()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)  # also when other code changed it behind our back
    if threads != share.threads:
        if announce or share.threads:
            why = (
                "fixed"
                if share.fixed
                else f"{jobs} cs2acdc job{'s' if jobs > 1 else ''} on {share.cores} cores"
            )
            before = f"{share.threads} → " if share.threads else ""
            print(f"CPU threads: {before}{threads} ({why}; threads=N fixes it).", flush=True)
        share.threads = threads
    return threads


def is_configured() -> bool:
    """Whether :func:`configure` shares this process's cores (then nothing else should set
    torch's thread count)."""
    return _share is not None


def release() -> None:
    """Stops counting this process as a job (done at exit anyway)."""
    global _share
    if _share is not None:
        _share.slot.unlink(missing_ok=True)
        _share = None


def rebalance() -> int:
    """Re-shares the cores if other jobs started or ended (every few seconds).

    Cheap enough for every iteration: it looks at the folder at most every
    :data:`REBALANCE_EVERY_S` seconds. Must run on the thread that computes
    (OpenMP's thread count belongs to the calling thread). Without
    :func:`configure` (library use, tests) it does nothing.

    Returns:
        The threads in use (0 when not configured).
    """
    share = _share
    if share is None:
        return 0
    if share.fixed is None and time.monotonic() - share.checked_at >= REBALANCE_EVERY_S:
        return _apply(announce=False)
    return share.threads
