"""Pieces the backbones share: the GLIDE sinusoidal timestep embedding, block-index resolution and the early exit of
a forward we do not own (a diffusers or transformers model) from a hook.

Reading and strictly loading checkpoint files lives in :mod:`difffeat.models.checkpoints`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

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
    """Raised by a forward hook once the deepest asked block has given its output: the rest is not run."""


def run_until_stopped(forward: Callable[[], Any], handles: Sequence[RemovableHandle]) -> None:
    """Run ``forward``, whose hooks capture block outputs and may stop it with :class:`StopForward`, and remove
    the hooks whatever happens, so a failed call leaves the model as it was."""
    try:
        forward()
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()


class PresetConfig:
    """Named presets and the per-head width, for the text models' config dataclasses (SEDD/MDLM's and RADD's)."""

    presets: ClassVar[dict[str, dict]]
    kind_name: ClassVar[str]

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Any:
        if name not in cls.presets:
            raise ValueError(f"unknown {cls.kind_name} preset {name!r}; known: {', '.join(cls.presets)}")
        return cls(**{**cls.presets[name], **overrides})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads
