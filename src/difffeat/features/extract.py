"""Feature extraction: one truncated forward per timestep, every requested block captured on the way.

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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from difffeat.models.common import resolve_indices
from difffeat.models.schedule import DDPMSchedule, LogLinearSchedule, per_sample_randn
from difffeat.models.vae import LatentEncoder, images_to_tensor
from difffeat.utils.runtime import autocast, to_device

IMAGE_POOLS = ("mean", "none")
TEXT_POOLS = ("mean", "last", "none")
CAPTION_REDUCTIONS = ("mean", "first", "concat")

Features = dict[tuple[int, int], torch.Tensor]


def compile_blocks(model: nn.Module) -> None:
    """``torch.compile`` each transformer block in place. The blocks share one code object, so one compiled
    graph serves them all, and the early-exit loop and the embeddings stay eager (nothing to recompile when
    another block is the deepest one asked for)."""
    for block in model.blocks:
        block.compile()


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


def _groups(steps: Sequence[int], ensemble: int, fuse: bool) -> list[list[tuple[int, int]]]:
    """The (step, draw) pairs that share a forward: all of them when fused, else one each."""
    runs = [(s, draw) for s in steps for draw in range(ensemble)]
    return [runs] if fuse else [[r] for r in runs]


def _accumulate(out: Features, key: tuple[int, int], draw: int, f: torch.Tensor) -> None:
    out[key] = out[key] + f if draw else f


class ImageFeatureExtractor:
    """Pooled block outputs of a DiT for images noised to DDPM timesteps.

    ``vae`` is a diffusers ``AutoencoderKL`` (latent DiTs) or None (pixel-space DiTs: the image itself, in
    [-1, 1] at the model's input size, is ``x0``). ``compile`` wraps the DiT blocks in ``torch.compile``.
    """

    def __init__(
        self, dit, vae=None, image_size: int | None = None, sample_posterior: bool = True, compile: bool = False
    ):
        self.dit = dit.eval()
        self.encoder = LatentEncoder(vae, sample=sample_posterior) if vae is not None else None
        patch_px = 8 if vae is not None else 1
        self.image_size = image_size or dit.config.input_size * patch_px
        self.schedule = DDPMSchedule()
        self.compiled = compile
        if compile:
            compile_blocks(self.dit)

    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device

    @torch.inference_mode()
    def encode(
        self, images, ids: Sequence[str | int] | None = None, seed: int = 0, keep_on_device: bool = False
    ) -> torch.Tensor:
        """Images (PIL list / uint8 / float in [-1, 1]) -> ``x0`` (VAE latents, or pixels), float32."""
        pixels = images_to_tensor(images, self.image_size)
        if self.encoder is None:
            return pixels
        return _output(self.encoder.encode(pixels, _keys(ids, len(pixels)), seed), keep_on_device)

    @torch.inference_mode()
    def __call__(
        self,
        images=None,
        *,
        latents: torch.Tensor | None = None,
        blocks: Sequence[int] = (-1,),
        timesteps: Sequence[int] = (0,),
        pool: str = "mean",
        token_norm: bool = False,
        seed: int = 0,
        ids: Sequence[str | int] | None = None,
        ensemble: int = 1,
        class_label: int | None = None,
        bf16: bool = False,
        fuse_timesteps: bool = False,
        keep_on_device: bool = False,
    ) -> Features:
        if (images is None) == (latents is None):
            raise ValueError("pass exactly one of images or latents=")
        if pool not in IMAGE_POOLS:
            raise ValueError(f"pool {pool!r} is not one of {IMAGE_POOLS}")
        if ensemble < 1:
            raise ValueError(f"ensemble must be >= 1, got {ensemble}")
        blocks = resolve_indices(blocks, self.dit.depth)
        timesteps = [self.schedule.check_timestep(t) for t in timesteps]
        dev = self.device
        x0 = self.encode(images, ids, seed, keep_on_device=True) if latents is None else latents
        x0 = to_device(x0.float(), dev)
        keys = _keys(ids, len(x0))
        label = self.dit.null_class if class_label is None else class_label
        y = torch.full((len(x0),), label, dtype=torch.long, device=dev)
        out: Features = {}
        for group in _groups(timesteps, ensemble, fuse_timesteps):
            for b, t, draw, f in self._forward_group(x0, keys, y, group, blocks, pool, token_norm, seed, bf16):
                _accumulate(out, (b, t), draw, f)
        return {bt: _output(f / ensemble, keep_on_device) for bt, f in out.items()}

    def _forward_group(
        self,
        x0: torch.Tensor,
        keys: list[str | int],
        y: torch.Tensor,
        group: list[tuple[int, int]],
        blocks: list[int],
        pool: str,
        token_norm: bool,
        seed: int,
        bf16: bool,
    ) -> Iterator[tuple[int, int, int, torch.Tensor]]:
        """One truncated forward over x0 noised for every (t, draw) of ``group``; yields (block, t, draw, feature).

        Each copy is noised on its own (the same x_t as in an unfused call); the copies are stacked on the batch
        axis with their own t, and the pooled outputs split back.
        """
        n, dev = len(x0), x0.device
        noise = to_device(torch.cat([per_sample_randn(x0.shape[1:], keys, seed, t, d) for t, d in group]), dev)
        xt = torch.cat([self.schedule.q_sample(x0, t, e) for (t, _), e in zip(group, noise.split(n), strict=True)])
        tt = torch.tensor([t for t, _ in group], device=dev).repeat_interleave(n)
        with autocast(dev, bf16):
            feats = _forward(self.dit.forward_intermediates, self.compiled, xt, tt, y.repeat(len(group)), blocks)
        for b, tokens in feats.items():
            tokens = _normalise_tokens(tokens, token_norm)
            pooled = tokens.mean(dim=1) if pool == "mean" else tokens
            for (t, draw), f in zip(group, pooled.split(n), strict=True):
                yield b, t, draw, f


class TextFeatureExtractor:
    """Pooled block outputs of a text diffusion transformer (DDiT) for captions corrupted to a noise step.

    Steps are integers 0..1000 (t = step / 1000, sigma = -log(1 - (1 - eps) t)); step 0 is the clean caption
    with sigma = 0. Several captions per sample are reduced by ``caption_reduce``: ``"mean"`` averages the
    per-caption features (every caption counts, none is favoured), ``"first"`` keeps the first caption,
    ``"concat"`` joins them into one sequence (truncated at the model's length).
    """

    def __init__(
        self,
        ddit,
        tokenizer,
        max_length: int | None = None,
        compile: bool = False,
    ):
        self.ddit = ddit.eval()
        self.tokenizer = tokenizer
        self.max_length = min(max_length or ddit.max_length, ddit.max_length)
        self.schedule = LogLinearSchedule()
        self.num_truncated = 0  # captions truncated so far (reported by the pipeline)
        self._tokens: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self.compiled = compile
        if compile:
            compile_blocks(self.ddit)

    @property
    def device(self) -> torch.device:
        return next(self.ddit.parameters()).device

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

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ids and mask (CPU), memoised per batch of texts: a job's batches are the same for every cell
        it extracts, so each caption is tokenized, and its truncation counted, once."""
        key = tuple(texts)
        if key not in self._tokens:
            ids, mask, n_trunc = self.tokenizer.encode_batch(texts, self.max_length)
            self.num_truncated += int(n_trunc)
            self._tokens[key] = (ids, mask.bool())
        return self._tokens[key]

    @torch.inference_mode()
    def __call__(
        self,
        captions: Sequence[str | Sequence[str]],
        *,
        blocks: Sequence[int] = (-1,),
        timesteps: Sequence[int] = (0,),
        pool: str = "mean",
        token_norm: bool = False,
        seed: int = 0,
        ids: Sequence[str | int] | None = None,
        ensemble: int = 1,
        caption_reduce: str = "mean",
        bf16: bool = False,
        fuse_timesteps: bool = False,
        keep_on_device: bool = False,
    ) -> Features:
        if pool not in TEXT_POOLS:
            raise ValueError(f"pool {pool!r} is not one of {TEXT_POOLS}")
        if caption_reduce not in CAPTION_REDUCTIONS:
            raise ValueError(f"caption_reduce {caption_reduce!r} is not one of {CAPTION_REDUCTIONS}")
        if pool == "none" and caption_reduce == "mean":
            raise ValueError('pool="none" returns tokens per caption: use caption_reduce="first" or "concat"')
        blocks = resolve_indices(blocks, self.ddit.depth)
        steps = [self.schedule.check_step(s) for s in timesteps]
        keys = _keys(ids, len(captions))
        texts, row_keys, owner = self._texts(captions, keys, caption_reduce)
        tok, mask = self.tokenize(texts)
        out: Features = {}
        for group in _groups(steps, ensemble, fuse_timesteps):
            for b, s, draw, f in self._forward_group(tok, mask, row_keys, group, blocks, pool, token_norm, seed, bf16):
                _accumulate(out, (b, s), draw, f)
        return {bs: _output(self._reduce(f / ensemble, owner, len(keys)), keep_on_device) for bs, f in out.items()}

    def _forward_group(
        self,
        tok: torch.Tensor,
        mask: torch.Tensor,
        row_keys: list[str],
        group: list[tuple[int, int]],
        blocks: list[int],
        pool: str,
        token_norm: bool,
        seed: int,
        bf16: bool,
    ) -> Iterator[tuple[int, int, int, torch.Tensor]]:
        """One forward over the captions corrupted for every (step, draw) of ``group``, stacked with their own
        sigma; yields (block, step, draw, pooled rows). Corruption runs on the CPU ids (per-caption seeded
        draws), so the device gets one copy and no per-caption indexing."""
        n, dev = len(tok), self.device
        mask_index = self.ddit.mask_index
        noisy = torch.cat([self.schedule.corrupt(tok, mask, row_keys, s, mask_index, seed, d) for s, d in group])
        sigma = torch.cat([self.schedule.sigma(self.schedule.t_of_step(s)).float().expand(n) for s, _ in group])
        mask_dev = to_device(mask, dev).repeat(len(group), 1)
        with autocast(dev, bf16):
            feats = _forward(
                self.ddit.forward_intermediates, self.compiled, to_device(noisy, dev), to_device(sigma, dev), blocks,
                attention_mask=mask_dev,
            )  # fmt: skip
        for b, tokens in feats.items():
            pooled = self._pool(_normalise_tokens(tokens, token_norm), mask_dev, pool)
            for (s, draw), f in zip(group, pooled.split(n), strict=True):
                yield b, s, draw, f

    @staticmethod
    def _pool(tokens: torch.Tensor, mask: torch.Tensor, pool: str) -> torch.Tensor:
        if pool == "none":
            return tokens * mask[..., None]
        if pool == "last":
            last = mask.long().sum(dim=1).clamp(min=1) - 1
            return tokens[torch.arange(len(tokens), device=tokens.device), last]
        m = mask[..., None].float()
        return (tokens * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)

    @staticmethod
    def _reduce(rows: torch.Tensor, owner: list[int], n: int) -> torch.Tensor:
        """Mean of each sample's caption rows (identity when every sample has one row)."""
        if len(owner) == n:
            return rows
        idx = torch.as_tensor(owner, device=rows.device)
        total = torch.zeros((n, *rows.shape[1:]), dtype=rows.dtype, device=rows.device).index_add_(0, idx, rows)
        counts = torch.as_tensor(np.bincount(owner, minlength=n), dtype=rows.dtype, device=rows.device)
        return total / counts.view(-1, *([1] * (rows.dim() - 1)))
