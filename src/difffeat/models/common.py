"""Pieces the backbones share: the GLIDE sinusoidal timestep embedding, block-index resolution and the early exit
of an untouched forward read through hooks.

Reading and strictly loading checkpoint files lives in :mod:`difffeat.models.checkpoints`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, denom_shift: int = 0) -> torch.Tensor:
    """GLIDE sinusoidal embedding, ``[cos, sin]`` halves (cos first), float32.

    ``f_i = exp(-ln(max_period) * i / (half - denom_shift))``: ``denom_shift=0`` is the official DiT/SEDD
    code (denominator 128 for dim 256); diffusers' ``Timesteps(downscale_freq_shift=1)`` uses 1 (127).
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - denom_shift)
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def resolve_indices(blocks, depth: int, what: str = "block") -> list[int]:
    """Normalise requested block indices (0-based, negative counts from the end) to sorted unique ints."""
    if isinstance(blocks, int):
        blocks = [blocks]
    out = set()
    for b in blocks:
        if isinstance(b, bool) or int(b) != b or not -depth <= int(b) < depth:
            raise ValueError(
                f"{what} {b!r} is out of range: this model has {depth} blocks (0..{depth - 1}, or -{depth}..-1)"
            )
        out.add(int(b) % depth)
    if not out:
        raise ValueError(f"no {what} requested")
    return sorted(out)


class StopForward(Exception):
    """Raised by a capturing hook once the deepest asked block is read: a forward we do not own (diffusers',
    transformers') then runs up to that block and no further, which is the early exit our own models get by
    looping over their blocks."""


def run_until_stopped(forward: Callable[[], Any], handles: Iterable[RemovableHandle]) -> None:
    """Call ``forward`` until one of the capturing hooks raises :class:`StopForward`; the hooks are removed
    whatever happens, so a failed forward leaves the model as it was."""
    try:
        forward()
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
