"""Several processes (GPUs, nodes) filling one feature store: ``torchrun`` and ``torch.distributed``.

Launch any ``difffeat`` command under ``torchrun``; every process joins one process group (NCCL when the
configured device is CUDA, gloo on CPU) and takes the GPU of its ``LOCAL_RANK``. The division of work is plain:

* the dataset is cut into the store's fixed shards and shard ``s`` belongs to rank ``s % world``; every rank
  writes its own shard files into the shared store folder (so the store must be on a filesystem all ranks see);
* whatever must exist once (a split's id list, a finished entry) is written by rank 0 while the others wait
  at a barrier, so nobody reads half-made state and nobody races to write it;
* after extraction, probing, search, fusion and the report run on rank 0 over the merged store; the other
  ranks leave.

Shard and batch boundaries depend only on the configuration, so the merged store is byte-identical to what a
single process writes (given the same kernels: same device type and thread count).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from difffeat.utils.runtime import resolve_device

# Ranks wait at barriers while rank 0 scans a split for unreadable images or concatenates large entries; the
# default process-group timeout (10 to 30 minutes) is too short for that on a big dataset.
BARRIER_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its global rank, the number of processes, its GPU index on the node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def info() -> DistInfo:
    """This process's place in the process group; rank 0 of 1 when there is no group."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def init(device: str = "auto") -> DistInfo:
    """Join the process group torchrun set up (its ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` environment).

    A no-op for a plain single process. ``device`` is the configured ``extract.device``: CUDA selects NCCL and
    makes ``cuda:LOCAL_RANK`` this process's current device (what ``device: auto``/``cuda`` then resolve to).
    """
    if not launched_by_torchrun() or dist.is_initialized():
        return info()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = resolve_device(device).type == "cuda"
    if on_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if on_cuda else "gloo", timeout=BARRIER_TIMEOUT)
    return info()


@contextmanager
def session(device: str = "auto") -> Iterator[DistInfo]:
    """:func:`init` for the duration of a command; the group is torn down on the way out."""
    started = launched_by_torchrun() and not dist.is_initialized()
    try:
        yield init(device)
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()


def barrier(world: int = 2) -> None:
    """Wait for every rank. ``world`` is the caller's idea of the group size: 1 makes this a no-op."""
    if world <= 1:
        return
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"world={world} needs torch.distributed: launch with torchrun (see benchmarks/README.md), "
            "or call with world=1"
        )
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


@contextmanager
def rank_zero_first(rank: int, world: int) -> Iterator[None]:
    """Run the body on rank 0 first and on the other ranks once it is done (they then find its result on disk)."""
    if rank != 0:
        barrier(world)
    yield
    if rank == 0:
        barrier(world)
