"""What every backbone family answers, so that the extractors, the featurizers, the store and the search need not
know which family they are reading.

A family is one small adapter class (DiT, SiT, PixArt, SD3, FLUX, the text DDiTs...) registered under a name with
:func:`register_backbone`. It answers five questions:

1. ``encode(inputs, keys, seed)``: how raw inputs (PIL images / captions) become the model's clean input, a
   :class:`Clean` (VAE latents with *that* model's VAE and scaling, pixels, or token ids and their mask);
2. ``noise(x0, t, keys, seed, draw)`` and ``model_time(t, n)``: how ``x0`` is noised to time ``t`` in the
   model's **own** time convention (:class:`TimeConvention`), with per-sample seeded noise so a feature never
   depends on its batch, and what the forward is given as its time input for that ``t``;
3. ``condition(n, label=..., captions=...)``: what the forward is conditioned on (the null class, an empty
   prompt's cached embedding, or the sample's own caption), as per-row tensors;
4. ``forward_intermediates(x_t, t, blocks, mask=..., **cond)``: the tokens ``[N, T, D]`` after each asked block,
   stopping after the deepest one (later blocks never run);
5. ``layers()``: every block with its 0-based index, name and output width.

Times are given to a family in its own convention and never converted silently: a DDPM index 100 and a flow
time 0.1 are different things, and configs, store keys and reports carry the convention's name beside them.
How a user's time becomes the model's noise level, per convention: ``ddpm`` (DiT, PixArt) is the index into the
1000-step beta schedule itself; ``flow`` (SD3, FLUX) is the unshifted flow time t, mapped to the model's sigma by
its scheduler config's shift (static ``shift t / (1 + (shift - 1) t)``; FLUX.1-dev's resolution-dependent one) or by
the ``shift`` option; ``sit-flow`` (SiT) is fed unchanged (t = 1 clean; SiT has no shift); ``masked`` (SEDD, MDLM) is
step/1000 on the log-linear schedule.

``forward_intermediates(..., tap=...)`` of the image families also reads a block's AdaLN-modulated input instead
of its output (:data:`difffeat.models.massive.TAPS`).

Pooling, token normalisation, ensembles and fused timesteps are the extractor's business, identical for every
family; an adapter only says how its model is fed and where its blocks are.
"""

from __future__ import annotations

import importlib
import inspect
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn


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

    @property
    def range(self) -> str:
        return f"{self.low:g}..{self.high:g}"

    def check(self, t: float) -> float | int:
        """``t`` as this convention's type, or a ValueError naming the range."""
        number = isinstance(t, numbers.Real) and not isinstance(t, bool)  # numpy scalars from grids included
        if not number or (self.integer and int(t) != t) or not self.low <= t <= self.high:
            kind = "an integer" if self.integer else "a number"
            raise ValueError(f"time {t!r} is out of range: expected {kind} {self.range} ({self.name}: {self.doc})")
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


@dataclass(frozen=True)
class Layers:
    """What ``featurizer.layers()`` shows: every block, the time convention and the family, printable as a table."""

    family: str
    modality: str
    time: TimeConvention
    blocks: tuple[Layer, ...]

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> Layer:
        return self.blocks[index]

    def __str__(self) -> str:
        head = [
            f"{self.family} ({self.modality}), {len(self.blocks)} blocks",
            f"time: {self.time.name} {self.time.range}, clean = {self.time.clean:g}: {self.time.doc}",
            f"{'block':>5}  {'name':<32} width",
        ]
        return "\n".join(head + [f"{b.index:>5}  {b.name:<32} {b.width}" for b in self.blocks])


@dataclass
class Clean:
    """A batch of clean model inputs: ``x`` (latents, pixels or token ids) and, for token inputs, ``mask``
    (True at real tokens), which padding-aware attention and pooling need. ``x`` stays where ``encode`` put it:
    the extractor moves what it feeds the forward to the model's device."""

    x: torch.Tensor
    mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.x)


@runtime_checkable
class Backbone(Protocol):
    """One family's adapter around a loaded model (see the module docstring for the five questions)."""

    family: ClassVar[str]  # registry name, e.g. "dit"
    modality: ClassVar[str]  # "image" | "text"
    time: TimeConvention
    module: nn.Module  # the wrapped model (eval mode, frozen)

    @property
    def depth(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def to(self, device: torch.device | str) -> Backbone: ...

    def layers(self) -> list[Layer]: ...

    def encode(self, inputs: Any, keys: Sequence[str | int], seed: int) -> Clean: ...

    def noise(self, x0: Clean, t: float, keys: Sequence[str | int], seed: int, draw: int = 0) -> torch.Tensor: ...

    def model_time(self, t: float, n: int) -> torch.Tensor: ...

    def condition(
        self, n: int, *, label: int | None = None, captions: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]: ...

    def forward_intermediates(
        self, x: torch.Tensor, t: torch.Tensor, blocks: list[int], mask: torch.Tensor | None = None, **cond: Any
    ) -> dict[int, torch.Tensor]: ...

    def compile_blocks(self) -> None: ...


@runtime_checkable
class ImageBackbone(Backbone, Protocol):
    """An image family also says what pixel side it reads and which VAE encoder (None: pixels are ``x0``), so
    the latent cache can decode images once at that size and key the cache by the posterior choice."""

    image_size: int
    encoder: Any  # models.vae.LatentEncoder | None


@runtime_checkable
class TextBackbone(Backbone, Protocol):
    """A text family tokenizes with the special tokens its model saw in training and counts what it truncated."""

    tokenizer: Any  # models.tokenizers.TextTokenizer
    max_length: int
    num_truncated: int

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


def describe(backbone: Backbone) -> Layers:
    return Layers(backbone.family, backbone.modality, backbone.time, tuple(backbone.layers()))


# ----------------------------------------------------------------------------------------------------------------
# Registry: a new family is one adapter class and one register_backbone call
# ----------------------------------------------------------------------------------------------------------------
#
# An adapter class also offers two classmethods the registry uses:
#   recognises(source: str) -> bool        cheap look at a path / hub id (config.json, file suffix); no weights read
#   from_pretrained(source, **options)     load the model (and its VAE / tokenizer) and wrap it
# and wraps(model: nn.Module) -> bool, so an extractor given a bare model finds its adapter.

_REGISTRY: dict[str, type | str] = {
    "dit": "difffeat.models.dit_adapter:DiTAdapter",
    "ddit": "difffeat.models.ddit_adapter:DDiTAdapter",
    "radd": "difffeat.models.radd:RADDAdapter",
    "diffusion_gemma": "difffeat.models.diffusion_gemma:DiffusionGemmaBackbone",
    "sit": "difffeat.models.sit:SiTBackbone",
    "pixart": "difffeat.models.diffusers_dits:PixArtBackbone",
    "sd3": "difffeat.models.diffusers_dits:SD3Backbone",
    "flux": "difffeat.models.diffusers_dits:FluxBackbone",
    "diffusers": "difffeat.models.diffusers_dits:DiffusersBackbone",
}


def register_backbone(name: str, adapter: type | str, *, overwrite: bool = False) -> None:
    """Add a family: ``adapter`` is the class or ``"module:Class"`` (imported on first use, so registering a
    family never imports its heavy dependencies)."""
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"backbone family {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = adapter


def backbone_class(name: str) -> type:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone family {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    entry = _REGISTRY[name]
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = _REGISTRY[name] = getattr(importlib.import_module(module), attr)
    return entry


def families(modality: str | None = None) -> list[str]:
    """Registered family names (of one modality when given), in registration order."""
    return [n for n in _REGISTRY if modality is None or backbone_class(n).modality == modality]


def adapt(model: nn.Module, **options: Any) -> Backbone:
    """The registered adapter around an already loaded model (``options`` go to the adapter's constructor)."""
    for name in families():
        cls = backbone_class(name)
        if cls.wraps(model):
            return cls(model, **options)
    raise TypeError(f"no registered backbone family wraps a {type(model).__name__}; known: {', '.join(families())}")


def resolve_family(source: str | Path, modality: str, family: str | None = None) -> str:
    """The named family (checked against ``modality``), or the first family of ``modality`` that recognises
    ``source``; a one-line ValueError when none does."""
    if family is None:
        found = [n for n in families(modality) if backbone_class(n).recognises(str(source))]
        if not found:
            raise ValueError(
                f"cannot tell which {modality} backbone {str(source)!r} is (no such file or folder, or a layout "
                f"no family recognises); pass backbone= one of {', '.join(families(modality))}"
            )
        family = found[0]
    cls = backbone_class(family)
    if cls.modality != modality:
        raise ValueError(f"backbone {family!r} reads {cls.modality}, not {modality}")
    return family


def loader_options(family: str) -> set[str]:
    """The keyword options the family's ``from_pretrained`` takes, so a caller can tell an option the family
    reads from one it would silently not (a config's ``stream`` on a DiT). A ``from_pretrained`` written once for
    several families hands its ``**options`` to the family's ``load_model``, whose keyword options count too."""
    cls = backbone_class(family)
    parameters = dict(inspect.signature(cls.from_pretrained).parameters)
    if hasattr(cls, "load_model") and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        parameters.update(inspect.signature(cls.load_model).parameters)
    return {name for name, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def load_backbone(source: str | Path, modality: str, family: str | None = None, **options: Any) -> Backbone:
    """Load ``source`` with the named family, or with the first family of ``modality`` that recognises it."""
    return backbone_class(resolve_family(source, modality, family)).from_pretrained(str(source), **options)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+")


def hub_id_mentions(source: str, *names: str) -> bool:
    """A source that is not a local path but a hub id whose name mentions one of ``names`` (case-insensitive):
    the only hint a family gets about a model not yet downloaded."""
    if Path(source).exists() or not HUB_ID.fullmatch(source):
        return False
    return any(n in source.lower() for n in names)
