"""Where and how torch runs: device choice, host-to-device copies, bf16 autocast, thread count and seeding.

Every layer needs these, and each of them must leave the caller's global torch state as it found it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import nullcontext

import torch


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else the CPU. Under torchrun ``cuda`` is the rank's current device,
    ``cuda:LOCAL_RANK`` (:func:`difffeat.utils.distributed.init` selects it)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on ``device`` when asked, else nothing."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host to device without stalling the host: on CUDA through pinned memory, non-blocking (a copy from
    pageable memory would wait for every kernel queued before it)."""
    if device.type != "cuda" or x.is_cuda:
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with ``num_threads`` torch CPU threads, restoring the previous count (None: unchanged)."""
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG inside the block and restore it afterwards.

    Module initialisation and dropout draw from the global RNG; forking keeps a fit reproducible without
    changing the random state of the caller.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
