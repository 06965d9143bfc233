"""The front door: features from a pretrained diffusion transformer in a few lines, in the spirit of timm's
``forward_intermediates`` and DIFT's ``SDFeaturizer``::

    f = ImageFeaturizer.from_pretrained("demo")           # an official .pt, a diffusers hub id/folder, our folder
    feats = f(images, blocks=[-1], timesteps=[100])       # feats[(-1, 100)] and feats[(5, 100)] are the same
    print(f.layers())                                     # blocks, names, widths, time range and convention

A featurizer is an extractor (``features.extract``) around a family's adapter (``models.base``), with the
adapter's VAE / tokenizer, its device, and results keyed the way they were asked for.

Blocks are always a list. An int is refused rather than read: timm reads ``indices=3`` as "the last 3 blocks",
block 3 would be the other natural reading, and we never silently pick one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from difffeat.features.extract import FeatureDict, ImageFeatureExtractor, TextFeatureExtractor
from difffeat.models.base import Backbone, Layers, TimeConvention, describe, load_backbone
from difffeat.models.common import resolve_indices
from difffeat.models.massive import (
    MASSIVE_OPTIONS,
    USER_TAPS,
    MassiveChannels,
    calibration_tap,
    find_massive_channels,
)
from difffeat.utils.runtime import resolve_device

# The tiny models trained on the embedded demo data (``difffeat demo`` runs them); ``from_pretrained("demo")``.
DEMO_MODELS = {
    "image": Path(__file__).parents[1] / "assets" / "zoo" / "demo-dit",
    "text": Path(__file__).parents[1] / "assets" / "zoo" / "demo-ddit",
}

Key = tuple[int, float]
Loaded = TypeVar("Loaded", bound="_Featurizer")  # from_pretrained returns the class it is called on
Captions = Sequence[str | Sequence[str]]  # one caption per sample, or several


class Features(Mapping[Key, torch.Tensor]):
    """``{(block, t): Tensor[N, D]}`` that iterates over the keys as they were asked for and also finds a feature
    by its normalised key: with 12 blocks, ``feats[(-1, 0)]`` and ``feats[(11, 0)]`` are the same tensor."""

    def __init__(self, by_index: FeatureDict, asked: list[Key], depth: int, time: TimeConvention) -> None:
        self._by_index = by_index
        self._asked = asked
        self.depth = depth
        self.time = time

    def _index(self, key: object) -> Key:
        """The normalised (0-based block, checked time) of ``key``; KeyError for anything that is not one."""
        try:
            block, t = key  # type: ignore[misc]
            return resolve_indices([block], self.depth)[0], self.time.check(t)
        except (TypeError, ValueError) as exc:
            raise KeyError(key) from exc

    def __getitem__(self, key: object) -> torch.Tensor:
        index = self._index(key)
        if index not in self._by_index:
            raise KeyError(key)
        return self._by_index[index]

    def __iter__(self) -> Iterator[Key]:
        return iter(self._asked)

    def __len__(self) -> int:
        return len(self._asked)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(self[k].shape)}" for k in self._asked)
        return f"Features({shapes})"


def _asked_keys(blocks: Sequence[int], timesteps: Sequence[float]) -> list[Key]:
    """The (block, t) pairs in the order asked, or one clear error for an int block count or a bare time."""
    if isinstance(blocks, int):
        raise ValueError(
            f"blocks={blocks} is ambiguous (timm reads an int as 'the last {blocks} blocks'): pass a list, "
            f"blocks=[{blocks}] for block {blocks} (0-based) or blocks=list(range(-{blocks}, 0)) for the last {blocks}"
        )
    if isinstance(timesteps, int | float):
        raise ValueError(f"timesteps must be a list, e.g. timesteps=[{timesteps}]")
    if not blocks or not timesteps:
        raise ValueError("ask for at least one block and one timestep")
    return list(dict.fromkeys((b, t) for b in blocks for t in timesteps))


class _Featurizer:
    """What both modalities share: loading, device, ``layers()`` and the keyed result."""

    modality: ClassVar[str]
    extractor_class: ClassVar[type[ImageFeatureExtractor] | type[TextFeatureExtractor]]
    own_options: ClassVar[tuple[str, ...]] = ()  # from_pretrained options the featurizer takes, not its loader

    def __init__(self, extractor: ImageFeatureExtractor | TextFeatureExtractor, bf16: bool = False) -> None:
        self.extractor = extractor
        self.bf16 = bf16

    @property
    def backbone(self) -> Backbone:
        return self.extractor.backbone

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def to(self, device: torch.device | str) -> _Featurizer:
        self.backbone.to(resolve_device(str(device)))
        return self

    def layers(self) -> Layers:
        """Every block (0-based index, name, width), the family, and the time convention with its range."""
        return describe(self.backbone)

    @classmethod
    def from_pretrained(
        cls: type[Loaded],
        source: str | Path,
        *,
        backbone: str | None = None,
        device: str = "auto",
        bf16: bool = False,
        compile: bool = False,
        **options: Any,
    ) -> Loaded:
        """Load ``source``: ``"demo"`` or a checkpoint file, hub id or folder of a family of this modality (the
        subclasses list them, with the ``options`` each family's loader takes).

        ``backbone`` names the family (``difffeat.models.base.families(modality)``) when the source does not
        tell. ``device``: "auto" (CUDA when present), "cpu", "cuda:1"...; ``bf16`` runs the forwards under bf16
        autocast; ``compile`` wraps the blocks in ``torch.compile``. ``options`` go to the family's loader, except
        the featurizer's own (``own_options``: the image side's ``massive`` and ``tap``).
        """
        own = {name: options.pop(name) for name in cls.own_options if name in options}
        source = DEMO_MODELS[cls.modality] if str(source) == "demo" else source
        adapter = load_backbone(source, cls.modality, backbone, **options).to(resolve_device(device))
        return cls(cls.extractor_class(adapter, compile=compile), bf16=bf16, **own)

    def _call_options(self, blocks: Sequence[int]) -> dict[str, Any]:
        """What this featurizer adds to every extractor call besides ``bf16`` (the image side: ``massive``)."""
        return {}

    def _extract(self, inputs: Any, blocks: Sequence[int], timesteps: Sequence[float], **options: Any) -> FeatureDict:
        return self.extractor(inputs, blocks=list(blocks), timesteps=list(timesteps), bf16=self.bf16, **options)

    def _features(self, inputs: Any, blocks: Sequence[int], timesteps: Sequence[float], **options: Any) -> Features:
        """Features keyed the way they were asked for; ``options`` are the extractor's (see the subclasses)."""
        asked = _asked_keys(blocks, timesteps)
        feats = self._extract(inputs, blocks, timesteps, **self._call_options(blocks), **options)
        return Features(feats, asked, self.backbone.depth, self.backbone.time)


class ImageFeaturizer(_Featurizer):
    """Pooled block outputs of an image diffusion transformer (see the module docstring).

    ``massive`` ("none", "zero", "normalise") suppresses the few massive-activation channels of each block
    before pooling (DiTF: on FLUX they swamp every other channel). Which channels those are is measured, not
    assumed: :meth:`calibrate` finds them on a calibration batch and keeps them in ``massive_channels``.
    "normalise" keeps their spatial pattern at unit scale; its token mean is 0, so under plain mean pooling it
    equals "zero" and differs only for ``pool="none"`` or ``token_norm=True``.

    :meth:`from_pretrained` loads ``"demo"``, an official checkpoint file, a diffusers folder or hub id, or our
    folder. Its ``vae`` (a diffusers ``AutoencoderKL``, folder or hub id) defaults to the pipeline's own; the
    other loader options: DiT ``numerics``, ``image_size``, ``sample_posterior``; SiT (``backbone="sit"``: no
    file tells it from a DiT) also ``path`` (its interpolant); PixArt / SD3 / FLUX / generic ``diffusers``
    ``condition`` ("null" or "caption"), ``stream`` ("image", "text", "both": the token streams of an MMDiT
    block), ``dtype`` ("bfloat16" for the large ones), ``guidance``, ``shift``, ``max_sequence_length``, DiT/SiT
    ``vae_dtype`` ("bfloat16": the VAE in bf16, faster on GPUs), and for
    ``diffusers`` ``null_condition`` / ``fixed_inputs``. It also takes ``massive`` (above) and ``tap``.
    ``tap="modulated"`` reads each block's input after its own first norm and AdaLN modulation instead of its
    output (DiTF's recipe on FLUX); the massive channels are then found on, and suppressed in, the block's input
    before that norm.
    """

    modality = "image"
    extractor_class = ImageFeatureExtractor
    own_options = ("massive", "tap")

    def __init__(
        self, extractor: ImageFeatureExtractor, bf16: bool = False, massive: str = "none", tap: str = "output"
    ) -> None:
        if massive not in MASSIVE_OPTIONS:
            raise ValueError(f"massive must be one of {MASSIVE_OPTIONS}, got {massive!r}")
        if tap not in USER_TAPS:
            raise ValueError(f"tap must be one of {USER_TAPS}, got {tap!r}")
        super().__init__(extractor, bf16)
        self.massive = massive
        self.tap = tap
        self.massive_channels: dict[int, list[int]] = {}  # 0-based block -> channels, filled by calibrate()

    def calibrate(
        self, images: Any = None, *, blocks: Sequence[int], timesteps: Sequence[float], k: float = 100.0, **options: Any
    ) -> dict[int, list[int]]:
        """Find each asked block's massive channels on a calibration batch: those whose peak magnitude over the
        batch's tokens, at any of ``timesteps``, exceeds ``k`` times the median magnitude
        (:func:`~difffeat.models.massive.find_massive_channels`). ``options``: ``latents``, ``seed``,
        ``class_label``, ``captions``, as for a call."""
        _asked_keys(blocks, timesteps)
        tokens = self._extract(images, blocks, timesteps, pool="none", tap=calibration_tap(self.tap), **options)
        found: dict[int, set[int]] = {}
        for (block, _), x in tokens.items():
            found.setdefault(block, set()).update(find_massive_channels(x, k))
        self.massive_channels.update({block: sorted(channels) for block, channels in found.items()})
        return self.massive_channels

    def _call_options(self, blocks: Sequence[int]) -> dict[str, Any]:
        return {"massive": self._suppression(blocks), "tap": self.tap}

    def _suppression(self, blocks: Sequence[int]) -> MassiveChannels | None:
        if self.massive == "none":
            return None
        missing = [b for b in resolve_indices(blocks, self.backbone.depth) if b not in self.massive_channels]
        if missing:
            raise ValueError(
                f"massive={self.massive!r} needs the massive channels of blocks {missing}: call "
                "f.calibrate(images, blocks=..., timesteps=...) on a calibration batch first"
            )
        return MassiveChannels(self.massive_channels, self.massive)

    def __call__(
        self, images: Any = None, *, blocks: Sequence[int], timesteps: Sequence[float], **options: Any
    ) -> Features:
        """Features of ``images`` (PIL list, uint8 [N, H, W, 3], or float [N, 3, S, S] in [-1, 1]) or of
        precomputed ``latents=``, for every asked block and time (in the backbone's convention, see
        ``layers()``). ``options`` are :class:`ImageFeatureExtractor`'s, which alone declares them and their
        defaults: ``pool`` ("mean", "none"), ``token_norm``, ``seed`` and ``ids`` (noise is seeded per sample by
        ``(seed, ids[i], t)``; ids default to positions), ``ensemble``, ``class_label`` (conditions a
        class-conditional model; default: its null class), ``captions`` (one per image, for a text-to-image
        model loaded with ``condition="caption"``; default: the cached empty prompt)."""
        return self._features(images, blocks, timesteps, **options)


class TextFeaturizer(_Featurizer):
    """Pooled block outputs of a text diffusion transformer (see the module docstring).

    :meth:`from_pretrained` loads ``"demo"``, a SEDD/MDLM hub id or folder, a checkpoint file, or our folder. Its
    ``tokenizer`` (a ``tokenizer.json``, hub id or folder) defaults to the one beside our own models, else GPT-2's,
    with the special tokens the model kind saw in training; the DDiT loader also takes ``add_special`` and
    ``max_length``.
    """

    modality = "text"
    extractor_class = TextFeatureExtractor

    def __call__(
        self, captions: Captions, *, blocks: Sequence[int], timesteps: Sequence[float], **options: Any
    ) -> Features:
        """Features of ``captions`` (one string, or several per sample) for every asked block and noise step
        (see ``layers()``). ``options`` are :class:`TextFeatureExtractor`'s, which alone declares them and their
        defaults: ``pool`` ("mean", "last", "none"), ``token_norm``, ``seed``, ``ids``, ``ensemble``,
        ``caption_reduce`` ("mean", "first" or "concat": how a sample's several captions become one feature)."""
        return self._features(captions, blocks, timesteps, **options)
