"""What the backbone adapters around one torch module answer alike, written once: the device the module lives
on, moving it together with what runs beside it; for our own block-list models (DiT and DDiT), the depth,
layer names and block compilation; for the text models (DDiT, RADD, DiffusionGemma), reading captions. Each
adapter keeps only what makes its family different.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from difffeat.models.base import Clean, Layer
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

    network: ClassVar[type[nn.Module]]  # the model class: an instance of it is this family's (``adapt``)

    @classmethod
    def wraps(cls, model: nn.Module) -> bool:
        return isinstance(model, cls.network)

    @property
    def depth(self) -> int:
        return self.module.depth

    def layers(self) -> list[Layer]:
        return [Layer(i, f"blocks.{i}", self.module.hidden_size) for i in range(self.depth)]

    def compile_blocks(self) -> None:
        """``torch.compile`` each block in place: they share one code object, so one graph serves them all, and
        the early-exit loop stays eager (nothing recompiles when another block is the deepest asked for)."""
        for block in self.module.blocks:
            block.compile()


class CaptionsAdapter(ModuleAdapter):
    """A text backbone whose input is the captions themselves, tokenized by one :class:`TextTokenizer`: captions
    longer than ``max_length`` (at most the model's trained length) are truncated and counted in ``num_truncated``,
    and the model takes no condition beside them. Subclasses say how the blocks are read (:meth:`_read_blocks`)."""

    modality = "text"
    no_condition: ClassVar[str]  # who refuses a label or caption condition, for the one-line error

    def __init__(self, module: nn.Module, tokenizer: TextTokenizer, max_length: int | None, trained_length: int):
        self.module = module
        self.tokenizer = tokenizer
        self.max_length = min(max_length or trained_length, trained_length)
        self.num_truncated = 0
        self._tokens: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_pretrained(
        cls: type[_Captions],
        source: str,
        *,
        tokenizer: str | TextTokenizer | None = None,
        add_special: str | None = None,
        max_length: int | None = None,
        dtype: str = "float32",
        **load: Any,
    ) -> _Captions:
        """The family's network from ``source`` (:meth:`load_model`: ``dtype`` is the weights', ``load`` the
        family's own loading options, which :func:`~difffeat.models.base.loader_options` reads from it) with its
        tokenizer: ``tokenizer`` itself when loaded, else loaded from it or from the family's default
        (:meth:`load_tokenizer`). Written once because every text family is loaded this way."""
        model = cls.load_model(source, dtype=dtype, **load)
        if not isinstance(tokenizer, TextTokenizer):
            tokenizer = cls.load_tokenizer(source, model, tokenizer, add_special)
        return cls(model, tokenizer, max_length=max_length, **cls._wrap_options(load))

    @classmethod
    def load_model(cls, source: str, *, dtype: str) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def load_tokenizer(
        cls, source: str, model: nn.Module, tokenizer: str | None, add_special: str | None
    ) -> TextTokenizer:
        """The tokenizer at ``tokenizer``, or the family's default for ``source``, with ``add_special`` (None: the
        family's default)."""
        raise NotImplementedError

    @classmethod
    def _wrap_options(cls, load: dict[str, Any]) -> dict[str, Any]:
        """What the constructor needs to know of how the model was loaded; nothing by default."""
        return {}

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
            raise ValueError(f"{self.no_condition} takes no class label or caption condition")
        return {}

    def forward_intermediates(
        self, x: torch.Tensor, t: torch.Tensor, blocks: list[int], mask: torch.Tensor | None = None, **cond: Any
    ) -> dict[int, torch.Tensor]:
        """Tokens ``[N, L, D]`` after each asked block; ``cond`` is what :meth:`condition` gave, always empty."""
        return self._read_blocks(x, t, blocks, mask)

    def _read_blocks(
        self, x: torch.Tensor, t: torch.Tensor, blocks: list[int], mask: torch.Tensor | None
    ) -> dict[int, torch.Tensor]:
        raise NotImplementedError
