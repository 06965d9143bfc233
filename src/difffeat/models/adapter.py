"""What the backbone adapters around one torch module answer alike, written once: the device the module lives
on, moving it together with what runs beside it and, for our own block-list models (DiT and DDiT), the depth,
layer names and block compilation. Each adapter keeps only what makes its family different.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from difffeat.models.base import Clean, Layer, block_layers
from difffeat.models.tokenizers import TextTokenizer

_Adapter = TypeVar("_Adapter", bound="ModuleAdapter")
_Captions = TypeVar("_Captions", bound="CaptionsAdapter")


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


class CaptionsAdapter(ModuleAdapter):
    """A text backbone: the captions are its input, tokenized with the model's tokenizer and special tokens, and
    nothing conditions it. Captions longer than ``max_length`` (at most the model's trained length) are truncated
    and counted in ``num_truncated``."""

    modality = "text"
    family: str

    @classmethod
    def from_pretrained(
        cls: type[_Captions],
        source: str,
        *,
        tokenizer: str | TextTokenizer | None = None,
        add_special: str | None = None,
        max_length: int | None = None,
        dtype: str = "float32",
        **options: Any,
    ) -> _Captions:
        """The network (:meth:`load_model`, which takes ``dtype``, the weights' dtype, and the family's own
        ``options``) and its tokenizer: ``tokenizer`` (a ``tokenizer.json``, hub id or folder) or the family's
        default with the special tokens the model saw in training (:meth:`load_tokenizer`; ``add_special``
        overrides them). ``max_length`` caps the caption length at most at the trained one."""
        model = cls.load_model(source, dtype=dtype, **options)
        if not isinstance(tokenizer, TextTokenizer):
            tokenizer = cls.load_tokenizer(source, model, tokenizer, add_special)
        return cls(model, tokenizer, max_length=max_length)

    @classmethod
    def load_model(cls, source: str, *, dtype: str = "float32") -> nn.Module:
        raise NotImplementedError

    @classmethod
    def load_tokenizer(cls, source: str, model: nn.Module, tokenizer: str | None, add_special: str | None):
        raise NotImplementedError

    def __init__(self, tokenizer: TextTokenizer, max_length: int | None, trained_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = min(max_length or trained_length, trained_length)
        self.num_truncated = 0
        self._tokens: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ids and mask (CPU), memoised per batch of texts: a job's batches are the same for every cell
        it extracts, so each caption is tokenized, and its truncation counted, once."""
        key = tuple(texts)
        if key not in self._tokens:
            ids, mask, n_trunc = self.tokenizer.encode_batch(texts, self.max_length)
            self.num_truncated += int(n_trunc)
            self._tokens[key] = (ids, mask.bool())
        return self._tokens[key]

    def encode(self, inputs: Sequence[str], keys: Sequence[str | int], seed: int) -> Clean:
        return Clean(*self.tokenize(list(inputs)))

    def condition(
        self, n: int, *, label: int | None = None, captions: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Nothing: the captions are the input, not a condition."""
        if label is not None or captions is not None:
            raise ValueError(f"a {self.family} text backbone reads the captions as its input; it takes no class "
                             "label or caption condition")  # fmt: skip
        return {}
