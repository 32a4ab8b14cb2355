"""``torchrun`` / DistributedDataParallel plumbing of the training loop.

The same entry point runs alone (``python entrypoints/distill.py``) or as
one of N processes (``torchrun --nproc_per_node=N entrypoints/distill.py``).
:func:`init_distributed` reads torchrun's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``), joins the process group (``nccl`` on GPUs,
``gloo`` on the CPU) and pins each process to its GPU. Rank 0 alone talks to
MLflow; it decides (resume state, teacher weights) and hands its decision to
the other ranks with :meth:`DistContext.broadcast`, so a user error seen by
rank 0 stops every rank with the same message.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from uda.errors import UserError

__all__ = ["DistContext", "init_distributed", "configure_threads"]

# Rank 0 registers checkpoints (minutes on a remote store) while the other
# ranks wait inside the next collective; NCCL's default 10 min is too short.
_COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)


@dataclass
class DistContext:
    """Where this process stands in the (possibly single-process) job.

    Attributes:
        rank: Global rank (0 when not distributed).
        world_size: Number of processes (1 when not distributed).
        local_rank: Rank on this machine (GPU index).
        local_world_size: Processes on this machine.
        device: This process's device.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that logs to MLflow and registers."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj: Any = None, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (pickled; tensors included).

        A :class:`UserError` instance broadcast by ``src`` is raised on every
        rank, so all processes stop with the same one-line message.
        """
        if self.distributed:
            box = [obj if self.rank == src else None]
            dist.broadcast_object_list(box, src=src)
            obj = box[0]
        if isinstance(obj, UserError):
            raise obj
        return obj

    def all_reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalar logs over ranks (keys must agree on every rank)."""
        if not self.distributed or not values:
            return dict(values)
        keys = sorted(values)
        device = self.device if self.device.type == "cuda" else "cpu"
        packed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        packed /= self.world_size
        return dict(zip(keys, packed.tolist()))

    def shutdown(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def configure_threads(local_world_size: int = 1) -> int:
    """Share the CPU cores between the processes of this machine.

    Each process gets ``cpu_count // local_world_size`` intra-op threads (at
    least 1), so two CPU ranks on a 2-core laptop do not oversubscribe it.
    An explicit ``OMP_NUM_THREADS`` wins.

    Returns:
        The number of threads set.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        threads = max(1, int(os.environ["OMP_NUM_THREADS"]))
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // max(1, local_world_size))
    torch.set_num_threads(threads)
    return threads


def init_distributed(device: str) -> DistContext:
    """Join torchrun's process group, or describe a single process.

    Args:
        device: ``cpu``, ``cuda`` or ``cuda:N`` (already resolved). Under
            torchrun on GPUs each process uses ``cuda:LOCAL_RANK``.

    Returns:
        The :class:`DistContext`.

    Raises:
        UserError: torchrun with more processes than GPUs.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(device=torch.device(device))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"torchrun started {local_world_size} processes on this "
                f"machine but it has {torch.cuda.device_count()} GPU(s); use "
                f"--nproc_per_node={torch.cuda.device_count()} or fewer."
            )
        torch_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(torch_device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend, timeout=_COLLECTIVE_TIMEOUT, **({"device_id": torch_device} if backend == "nccl" else {})
        )
    return DistContext(rank, world_size, local_rank, local_world_size, torch_device)
