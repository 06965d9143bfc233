"""Feature extraction through a backbone adapter: one truncated forward per timestep, every requested block
captured on the way.

The extractors know nothing of a model family: the adapter (``models.base.Backbone``) encodes, noises in its
own time convention, conditions and runs the truncated forward; pooling, token normalisation, ensembles and
fused timesteps happen here, identically for every family.

Both extractors return ``{(block, t): Tensor[N, D]}`` (float32) with 0-based block indices (negative ones are
resolved against the model's depth) and, for ``pool="none"``, token tensors ``[N, T, D]``. Results are on the
CPU, or with ``keep_on_device=True`` on the model's device, so a job can gather a whole shard there and copy
it to the host once. Noise is drawn per sample from (seed, sample key, t, draw), so a sample's feature never
depends on its batch. ``fuse_timesteps=True`` stacks the noised copies for every timestep (and ensemble draw)
into one batch with per-sample t: one forward instead of one per timestep, the same features up to float
rounding (a larger batch can pick other matmul kernels), so fewer, larger kernels where a device is underused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from difffeat.models.base import Clean, ImageBackbone, TextBackbone, adapt
from difffeat.models.common import resolve_indices
from difffeat.models.massive import TAPS, MassiveChannels
from difffeat.utils.runtime import autocast, to_device

IMAGE_POOLS = ("mean", "none")
TEXT_POOLS = ("mean", "last", "none")
CAPTION_REDUCTIONS = ("mean", "first", "concat")

FeatureDict = dict[tuple[int, float], torch.Tensor]  # {(block, t): features}


def _forward(fn: Callable[..., dict[int, torch.Tensor]], compiled: bool, *args, **kwargs) -> dict[int, torch.Tensor]:
    """Call a backbone; turn a compiler failure into an error that says how to do without it."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        if compiled and type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
            raise RuntimeError(
                f"torch.compile of the backbone blocks failed ({type(exc).__name__}: {str(exc)[:500]}). "
                "Set extract.compile: false to run eagerly (same features, float rounding aside)."
            ) from exc
        raise


def _output(f: torch.Tensor, keep_on_device: bool) -> torch.Tensor:
    return f if keep_on_device else f.cpu()


def _normalise_tokens(tokens: torch.Tensor, token_norm: bool) -> torch.Tensor:
    """Per-token LayerNorm (no affine). DiT block outputs carry a few huge "massive activation" channels that
    dominate a plain mean; normalising each token first lets the other channels count."""
    tokens = tokens.float()
    return F.layer_norm(tokens, tokens.shape[-1:]) if token_norm else tokens


def _keys(ids: Sequence[str | int] | None, n: int) -> list[str | int]:
    if ids is None:
        return list(range(n))
    if len(ids) != n:
        raise ValueError(f"got {len(ids)} ids for {n} samples")
    return list(ids)


def _groups(timesteps: Sequence[float], ensemble: int, fuse: bool) -> list[list[tuple[float, int]]]:
    """The (timestep, draw) pairs that share a forward: all of them when fused, else one each."""
    runs = [(t, draw) for t in timesteps for draw in range(ensemble)]
    return [runs] if fuse else [[r] for r in runs]


def _accumulate(out: FeatureDict, key: tuple[int, float], draw: int, f: torch.Tensor) -> None:
    out[key] = out[key] + f if draw else f


def _pool(tokens: torch.Tensor, mask: torch.Tensor | None, pool: str) -> torch.Tensor:
    """Mean over the tokens (the real ones where ``mask`` says which), the last real token, or all of them."""
    if pool == "none":
        return tokens if mask is None else tokens * mask[..., None]
    if mask is None:
        return tokens.mean(dim=1) if pool == "mean" else tokens[:, -1]
    if pool == "last":
        last = mask.long().sum(dim=1).clamp(min=1) - 1
        return tokens[torch.arange(len(tokens), device=tokens.device), last]
    m = mask[..., None].float()
    return (tokens * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)


def _adapter_attribute(name: str, doc: str | None = None, settable: bool = False) -> property:
    """The adapter's attribute ``name`` seen through the extractor (what the jobs and the pipeline read)."""

    def get(self: _Extractor) -> Any:
        return getattr(self.backbone, name)

    def set_(self: _Extractor, value: Any) -> None:
        setattr(self.backbone, name, value)

    return property(get, set_ if settable else None, doc=doc)


@dataclass(frozen=True)
class _Run:
    """How one call reads its features (the same for every forward of the call): the keyword options both
    extractors take besides what they read, with their only defaults. ``massive`` (a
    ``models.massive.MassiveChannels``) suppresses each block's massive-activation channels before token
    normalisation and pooling. ``tap`` (image backbones; ``models.massive.TAPS``) is where a block's tokens are
    read: its output, or its input after its own norm and AdaLN modulation (``"modulated"``, whose massive
    channels the backbone suppresses on the block's input, before that norm)."""

    pool: str = "mean"
    token_norm: bool = False
    seed: int = 0
    ensemble: int = 1
    bf16: bool = False
    fuse_timesteps: bool = False
    massive: MassiveChannels | None = None
    tap: str = "output"

    def check(self, pools: tuple[str, ...], taps: tuple[str, ...] = ("output",)) -> _Run:
        if self.pool not in pools:
            raise ValueError(f"pool {self.pool!r} is not one of {pools}")
        if self.tap not in taps:
            raise ValueError(f"tap {self.tap!r} is not one of {taps} (a text backbone is read at block outputs)")
        if self.ensemble < 1:
            raise ValueError(f"ensemble must be >= 1, got {self.ensemble}")
        return self


class _Extractor:
    """What the image and text extractors share: the adapter, compilation, and the noised truncated forwards."""

    def __init__(self, backbone: Any, compile: bool, **adapter_options: Any) -> None:
        if isinstance(backbone, nn.Module):
            backbone = adapt(backbone, **adapter_options)
        self.backbone = backbone
        self.compiled = compile
        if compile:
            backbone.compile_blocks()

    device = _adapter_attribute("device")
    depth = _adapter_attribute("depth")

    def _request(self, blocks: Sequence[int], timesteps: Sequence[float]) -> tuple[list[int], list[float]]:
        """Blocks as sorted 0-based indices, times checked in the backbone's own convention."""
        return resolve_indices(blocks, self.depth), [self.backbone.time.check(t) for t in timesteps]

    def _extract(
        self,
        x0: Clean,
        keys: list[str | int],
        cond: dict[str, torch.Tensor],
        times: list[float],
        blocks: list[int],
        run: _Run,
    ) -> FeatureDict:
        """Ensemble-averaged pooled features for every (block, t), on the device."""
        out: FeatureDict = {}
        for group in _groups(times, run.ensemble, run.fuse_timesteps):
            for b, t, draw, f in self._forward_group(x0, keys, cond, group, blocks, run):
                _accumulate(out, (b, t), draw, f)
        return {bt: f / run.ensemble for bt, f in out.items()}

    def _forward_group(
        self,
        x0: Clean,
        keys: list[str | int],
        cond: dict[str, torch.Tensor],
        group: list[tuple[float, int]],
        blocks: list[int],
        run: _Run,
    ) -> Iterator[tuple[int, float, int, torch.Tensor]]:
        """One truncated forward over x0 noised for every (t, draw) of ``group``; yields (block, t, draw, feature).

        Each copy is noised on its own (the same x_t as in an unfused call); the copies are stacked on the batch
        axis with their own t (and their rows' conditioning and mask), and the pooled outputs split back.
        """
        bb, n, k, dev = self.backbone, len(x0), len(group), self.device
        xt = to_device(torch.cat([bb.noise(x0, t, keys, run.seed, d) for t, d in group]), dev)
        tt = to_device(torch.cat([bb.model_time(t, n) for t, _ in group]), dev)
        mask = None if x0.mask is None else to_device(x0.mask, dev).repeat(k, 1)
        rows = {name: c.repeat(k, *([1] * (c.dim() - 1))) for name, c in cond.items()}
        inside = run.tap == "modulated"  # the backbone suppresses the massive channels before the block's norm
        tap = {} if run.tap == "output" else {"tap": run.tap, "massive": run.massive if inside else None}
        with autocast(dev, run.bf16):
            feats = _forward(bb.forward_intermediates, self.compiled, xt, tt, blocks, mask=mask, **tap, **rows)
        for b, tokens in feats.items():
            tokens = tokens if run.massive is None or inside else run.massive.apply(b, tokens)
            pooled = _pool(_normalise_tokens(tokens, run.token_norm), mask, run.pool)
            for (t, draw), f in zip(group, pooled.split(n), strict=True):
                yield b, t, draw, f


class ImageFeatureExtractor(_Extractor):
    """Pooled block outputs of an image diffusion transformer for images noised to times in its own convention.

    ``backbone`` is an image adapter (``models.base.ImageBackbone``) or a bare model its registered family wraps;
    for a bare model, ``vae`` is a diffusers ``AutoencoderKL`` (latent models) or None (pixel-space models: the
    image itself, in [-1, 1] at the model's input size, is ``x0``), and ``adapter_options`` (``image_size``,
    ``sample_posterior``) go to the adapter. ``compile`` wraps the blocks in ``torch.compile``. A call's ``run``
    options (``pool``, ``token_norm``, ``seed``, ``ensemble``, ``bf16``, ``fuse_timesteps``, ``massive``, ``tap``) are
    ``_Run``'s fields, shared with the text extractor.
    """

    def __init__(self, backbone: ImageBackbone | nn.Module, vae=None, *, compile: bool = False, **adapter_options: Any):
        super().__init__(backbone, compile, vae=vae, **adapter_options)

    dit = _adapter_attribute("module", "The wrapped model (named for the DiT, which the pipeline reads it as).")
    image_size = _adapter_attribute("image_size")
    encoder = _adapter_attribute(
        "encoder", "The VAE encoder (``models.vae.LatentEncoder``), or None when pixels are the input.", settable=True
    )

    @torch.inference_mode()
    def encode(
        self, images, ids: Sequence[str | int] | None = None, seed: int = 0, keep_on_device: bool = False
    ) -> torch.Tensor:
        """Images (PIL list / uint8 / float in [-1, 1]) -> ``x0`` (VAE latents, or pixels), float32."""
        n = len(images)
        x0 = self.backbone.encode(images, _keys(ids, n), seed).x
        return x0 if self.encoder is None else _output(x0, keep_on_device)

    @torch.inference_mode()
    def __call__(
        self,
        images=None,
        *,
        latents: torch.Tensor | None = None,
        blocks: Sequence[int] = (-1,),
        timesteps: Sequence[float] = (0,),
        ids: Sequence[str | int] | None = None,
        class_label: int | None = None,
        captions: Sequence[str] | None = None,
        keep_on_device: bool = False,
        **run_options: Any,
    ) -> FeatureDict:
        if (images is None) == (latents is None):
            raise ValueError("pass exactly one of images or latents=")
        run = _Run(**run_options).check(IMAGE_POOLS, TAPS)
        blocks, times = self._request(blocks, timesteps)
        x0 = self.encode(images, ids, run.seed, keep_on_device=True) if latents is None else latents
        x0 = Clean(to_device(x0.float(), self.device))
        keys = _keys(ids, len(x0))
        cond = self.backbone.condition(len(x0), label=class_label, captions=captions)
        out = self._extract(x0, keys, cond, times, blocks, run)
        return {bt: _output(f, keep_on_device) for bt, f in out.items()}


class TextFeatureExtractor(_Extractor):
    """Pooled block outputs of a text diffusion transformer for captions corrupted to a noise step.

    ``backbone`` is a text adapter (``models.base.TextBackbone``) or a bare model its registered family wraps,
    with ``tokenizer`` and ``adapter_options`` (``max_length``). For the DDiT (SEDD/MDLM), steps are integers 0..1000
    (t = step / 1000, sigma = -log(1 - (1 - eps) t)); step 0 is the clean caption with sigma = 0. Several
    captions per sample are reduced by ``caption_reduce``: ``"mean"`` averages the per-caption features (every
    caption counts, none is favoured), ``"first"`` keeps the first caption, ``"concat"`` joins them into one
    sequence (truncated at the model's length). A call's ``run`` options are ``_Run``'s, as for images.
    """

    def __init__(
        self, backbone: TextBackbone | nn.Module, tokenizer=None, *, compile: bool = False, **adapter_options: Any
    ):
        super().__init__(backbone, compile, tokenizer=tokenizer, **adapter_options)

    ddit = _adapter_attribute("module", "The wrapped model (named for the DDiT, which the pipeline reads it as).")
    tokenizer = _adapter_attribute("tokenizer")
    max_length = _adapter_attribute("max_length")
    num_truncated = _adapter_attribute("num_truncated", "Captions truncated so far (reported by the pipeline).")

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.backbone.tokenize(texts)

    def _texts(self, captions, keys, caption_reduce: str) -> tuple[list[str], list[str | int], list[int]]:
        """Flatten to one text per forward row, its noise key, and the sample each row belongs to."""
        texts, row_keys, owner = [], [], []
        for i, (caps, key) in enumerate(zip(captions, keys, strict=True)):
            caps = [caps] if isinstance(caps, str) else list(caps)
            if not caps:
                raise ValueError(f"sample {key!r} has no caption")
            if caption_reduce == "first":
                caps = caps[:1]
            elif caption_reduce == "concat":
                caps = [" ".join(c.strip() for c in caps)]
            for j, c in enumerate(caps):
                texts.append(c)
                row_keys.append(f"{key}#{j}")
                owner.append(i)
        return texts, row_keys, owner

    @torch.inference_mode()
    def __call__(
        self,
        captions: Sequence[str | Sequence[str]],
        *,
        blocks: Sequence[int] = (-1,),
        timesteps: Sequence[float] = (0,),
        ids: Sequence[str | int] | None = None,
        caption_reduce: str = "mean",
        keep_on_device: bool = False,
        **run_options: Any,
    ) -> FeatureDict:
        run = _Run(**run_options).check(TEXT_POOLS)
        if caption_reduce not in CAPTION_REDUCTIONS:
            raise ValueError(f"caption_reduce {caption_reduce!r} is not one of {CAPTION_REDUCTIONS}")
        if run.pool == "none" and caption_reduce == "mean":
            raise ValueError('pool="none" returns tokens per caption: use caption_reduce="first" or "concat"')
        blocks, times = self._request(blocks, timesteps)
        keys = _keys(ids, len(captions))
        texts, row_keys, owner = self._texts(captions, keys, caption_reduce)
        x0 = self.backbone.encode(texts, row_keys, run.seed)
        cond = self.backbone.condition(len(texts))
        out = self._extract(x0, row_keys, cond, times, blocks, run)
        return {bs: _output(self._reduce(f, owner, len(keys)), keep_on_device) for bs, f in out.items()}

    @staticmethod
    def _reduce(rows: torch.Tensor, owner: list[int], n: int) -> torch.Tensor:
        """Mean of each sample's caption rows (identity when every sample has one row)."""
        if len(owner) == n:
            return rows
        idx = to_device(torch.as_tensor(owner), rows.device)  # pinned, non-blocking: no wait for the forward
        total = torch.zeros((n, *rows.shape[1:]), dtype=rows.dtype, device=rows.device).index_add_(0, idx, rows)
        counts = to_device(torch.as_tensor(np.bincount(owner, minlength=n), dtype=rows.dtype), rows.device)
        return total / counts.view(-1, *([1] * (rows.dim() - 1)))
