"""What every backbone family answers, so that a featurizer, the store and the search need not know which
family they are reading.

A family is a small adapter (DiT, SiT, PixArt, SD3, FLUX, the text DDiTs...). Five questions:

1. ``encode(inputs, keys, seed)``: how raw inputs (PIL images / captions) become the model's clean input ``x0``
   (VAE latents with *that* model's VAE and scaling, pixels, or token ids and their mask);
2. ``noise(x0, t, keys, seed, draw)``: how ``x0`` is noised to time ``t`` in the model's **own** time
   convention (:class:`TimeConvention`), with per-sample seeded noise so a feature never depends on its batch;
3. ``condition(n, ...)``: what the forward is conditioned on (the null class, an empty prompt's cached
   embedding, or the sample's own caption);
4. ``forward_intermediates(x_t, t, blocks, cond)``: the residual stream after each asked block, stopping after
   the deepest one (later blocks never run);
5. ``layers()``: every block with its 0-based index, name and output width.

Times are given to a family in its own convention and never converted silently: a DDPM index 100 and a flow
time 0.1 are different things, and configs, store keys and reports carry the convention's name beside them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class TimeConvention:
    """How a family names its noise levels.

    ``clean`` is the value meaning "no noise"; ``integer`` whether times are integer indices; ``[low, high]``
    the valid range. ``doc`` is one sentence for ``layers()`` output and reports.
    """

    name: str
    low: float
    high: float
    clean: float
    integer: bool
    doc: str

    def check(self, t: float) -> float | int:
        """``t`` as this convention's type, or a ValueError naming the range."""
        if isinstance(t, bool) or (self.integer and int(t) != t) or not self.low <= t <= self.high:
            kind = "an integer" if self.integer else "a number"
            raise ValueError(f"time {t!r} is not {kind} in [{self.low:g}, {self.high:g}] ({self.name}: {self.doc})")
        return int(t) if self.integer else float(t)


DDPM = TimeConvention(
    "ddpm", 0, 999, 0, True, "DDPM index 0..999 on the linear beta schedule (1e-4..0.02); 0 is the least noisy"
)
MASKED = TimeConvention(
    "masked", 0, 1000, 0, True,
    "step 0..1000, t = step/1000, sigma(t) = -log(1 - 0.999 t); a token is masked with probability 1 - exp(-sigma); "
    "0 is the clean caption",
)  # fmt: skip


@dataclass(frozen=True)
class Layer:
    """One block a feature can be read from."""

    index: int  # 0-based
    name: str  # e.g. "blocks.11", "transformer_blocks.3", "single_transformer_blocks.0"
    width: int  # channels of the block's output tokens


@runtime_checkable
class Backbone(Protocol):
    """The forward side of an adapter: the model itself, early exit and block names."""

    modality: str  # "image" | "text"
    time: TimeConvention

    @property
    def depth(self) -> int: ...

    def layers(self) -> list[Layer]: ...

    def forward_intermediates(
        self, x: torch.Tensor, t: torch.Tensor, blocks: list[int], **cond: Any
    ) -> dict[int, torch.Tensor]: ...
