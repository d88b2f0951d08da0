"""Training on several processes with ``torchrun``: one process per GPU (or per CPU share), DDP between them.

``torchrun --nproc_per_node=N -m training.cli stage1 ...`` sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous
address in each process's environment; ``start`` reads them and joins the process group (NCCL on CUDA, gloo on the
CPU). Without them the run is a single process and nothing is initialised. Every process trains on its own share of
the batches (``shard``), DDP averages the gradients, and only rank 0 writes files (``is_main``).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from pe_node.model import resolve_device

logger = logging.getLogger(__name__)

T = TypeVar("T")
_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes, and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, metrics and logs progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of ``values`` over all processes (the values themselves when alone)."""
        if not self.distributed:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, item: T) -> list[T]:
        """Every process's ``item``, in rank order (any picklable object)."""
        if not self.distributed:
            return [item]
        items: list[Any] = [None] * self.world_size
        dist.all_gather_object(items, item)
        return items

    @property
    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def start(device: str = "auto", threads: int | None = None) -> Processes:
    """Join the process group when run under torchrun, pick the device, and set the CPU threads.

    Under torchrun on CUDA each process takes ``cuda:LOCAL_RANK``. ``threads`` defaults to the CPUs shared out
    among the processes on this machine, so that two CPU processes do not fight over the same cores.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK {rank} is outside WORLD_SIZE {world_size}")
    resolved = resolve_device(device)
    if resolved.type == "cuda" and (world_size > 1 or resolved.index is None):
        resolved = torch.device("cuda", local_rank)  # set_device needs an index: "cuda" alone is refused
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // max(local_world, 1)))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=_TIMEOUT)
        logger.info("rank %d/%d joined the %s process group on %s", rank, world_size, backend, resolved)
    return Processes(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved)


def stop(processes: Processes) -> None:
    """Leave the process group (a no-op for a single process)."""
    if processes.distributed and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence[T], processes: Processes, equal: bool = True) -> list[T]:
    """This process's share of ``items``: every world_size-th item from its rank.

    ``equal`` drops the remainder so that every process gets the same count: training needs it, since DDP
    synchronises every step and a process with one batch more would wait forever. Validation, which meets the
    others only once at the end, takes every item (``equal=False``).
    """
    mine = list(items[processes.rank :: processes.world_size])
    return mine[: len(items) // processes.world_size] if equal else mine
