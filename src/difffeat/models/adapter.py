"""What the backbone adapters around one torch module answer alike, written once: the device the module lives
on, moving it together with what runs beside it and, for our own block-list models (DiT and DDiT), the depth,
layer names and block compilation. Each adapter keeps only what makes its family different.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

from difffeat.models.base import Layer, block_layers

_Adapter = TypeVar("_Adapter", bound="ModuleAdapter")


class ModuleAdapter:
    """An adapter whose weights are one ``nn.Module`` (``self.module``): its parameters say where it runs."""

    module: nn.Module

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def to(self: _Adapter, device: torch.device | str) -> _Adapter:
        self.module.to(device)
        self._move_companions(device)
        return self

    def _move_companions(self, device: torch.device | str) -> None:
        """Move what runs beside the module (a VAE, text encoders, cached conditioning); nothing by default."""


class BlocksAdapter(ModuleAdapter):
    """An adapter around one of our own models, which expose ``blocks``, ``depth`` and ``hidden_size``."""

    @property
    def depth(self) -> int:
        return self.module.depth

    def layers(self) -> list[Layer]:
        return block_layers(self.depth, self.module.hidden_size)

    def compile_blocks(self) -> None:
        """``torch.compile`` each block in place: they share one code object, so one graph serves them all, and
        the early-exit loop stays eager (nothing recompiles when another block is the deepest asked for)."""
        for block in self.module.blocks:
            block.compile()
