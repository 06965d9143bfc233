"""Feature extraction: one truncated forward per timestep, every requested block captured on the way.

Both extractors return ``{(block, t): Tensor[N, D]}`` (float32, CPU) with 0-based block indices (negative
ones are resolved against the model's depth) and, for ``pool="none"``, token tensors ``[N, T, D]``.
Noise is drawn per sample from (seed, sample key, t, draw), so a sample's feature never depends on its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from difffeat.backbones.common import resolve_indices
from difffeat.schedule import DDPMSchedule, LogLinearSchedule, per_sample_randn
from difffeat.vae import LatentEncoder, images_to_tensor

IMAGE_POOLS = ("mean", "none")
TEXT_POOLS = ("mean", "last", "none")
CAPTION_REDUCTIONS = ("mean", "first", "concat")

Features = dict[tuple[int, int], torch.Tensor]


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


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


class ImageFeatureExtractor:
    """Pooled block outputs of a DiT for images noised to DDPM timesteps.

    ``vae`` is a diffusers ``AutoencoderKL`` (latent DiTs) or None (pixel-space DiTs: the image itself, in
    [-1, 1] at the model's input size, is ``x0``).
    """

    def __init__(self, dit, vae=None, image_size: int | None = None, sample_posterior: bool = True):
        self.dit = dit.eval()
        self.encoder = LatentEncoder(vae, sample=sample_posterior) if vae is not None else None
        patch_px = 8 if vae is not None else 1
        self.image_size = image_size or dit.config.input_size * patch_px
        self.schedule = DDPMSchedule()

    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device

    @torch.inference_mode()
    def encode(self, images, ids: Sequence[str | int] | None = None, seed: int = 0) -> torch.Tensor:
        """Images (PIL list / uint8 / float in [-1, 1]) -> ``x0`` (VAE latents, or pixels) on CPU, float32."""
        pixels = images_to_tensor(images, self.image_size)
        if self.encoder is None:
            return pixels
        return self.encoder.encode(pixels, _keys(ids, len(pixels)), seed).cpu()

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
    ) -> Features:
        if (images is None) == (latents is None):
            raise ValueError("pass exactly one of images or latents=")
        if pool not in IMAGE_POOLS:
            raise ValueError(f"pool {pool!r} is not one of {IMAGE_POOLS}")
        if ensemble < 1:
            raise ValueError(f"ensemble must be >= 1, got {ensemble}")
        blocks = resolve_indices(blocks, self.dit.depth)
        timesteps = [self.schedule.check_timestep(t) for t in timesteps]
        x0 = self.encode(images, ids, seed) if latents is None else latents.float()
        keys = _keys(ids, len(x0))
        dev = self.device
        x0 = x0.to(dev)
        label = self.dit.null_class if class_label is None else class_label
        y = torch.full((len(x0),), label, dtype=torch.long, device=dev)
        out: Features = {}
        for t in timesteps:
            tt = torch.full((len(x0),), t, dtype=torch.long, device=dev)
            for draw in range(ensemble):
                noise = per_sample_randn(x0.shape[1:], keys, seed, t, draw)
                xt = self.schedule.q_sample(x0, t, noise)
                with _autocast(dev, bf16):
                    feats = self.dit.forward_intermediates(xt, tt, y, blocks)
                for b, tokens in feats.items():
                    tokens = _normalise_tokens(tokens, token_norm)
                    f = tokens.mean(dim=1) if pool == "mean" else tokens
                    out[(b, t)] = out[(b, t)] + f if draw else f
            for b in blocks:
                out[(b, t)] = (out[(b, t)] / ensemble).cpu()
        return out


class TextFeatureExtractor:
    """Pooled block outputs of a text diffusion transformer (DDiT) for captions corrupted to a noise step.

    Steps are integers 0..1000 (t = step / 1000, sigma = -log(1 - (1 - eps) t)); step 0 is the clean caption
    with sigma = 0. Several captions per sample are reduced by ``caption_reduce``: ``"mean"`` averages the
    per-caption features (every caption counts, none is favoured), ``"first"`` keeps the first caption,
    ``"concat"`` joins them into one sequence (truncated at the model's length).
    """

    def __init__(self, ddit, tokenizer, max_length: int | None = None, add_special: str | None = None):
        self.ddit = ddit.eval()
        self.tokenizer = tokenizer
        self.max_length = min(max_length or ddit.max_length, ddit.max_length)
        self.add_special = add_special
        self.schedule = LogLinearSchedule()
        self.num_truncated = 0  # captions truncated so far (reported by the pipeline)

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
        kwargs = {"add_special": self.add_special} if self.add_special else {}
        ids, mask, n_trunc = self.tokenizer.encode_batch(texts, self.max_length, **kwargs)
        self.num_truncated += int(n_trunc)
        return ids, mask.bool()

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
        dev = self.device
        tok, mask = tok.to(dev), mask.to(dev)
        out: Features = {}
        for s in steps:
            sigma = self.schedule.sigma(self.schedule.t_of_step(s)).float().expand(len(tok)).to(dev)
            for draw in range(ensemble):
                noisy = self.schedule.corrupt(tok, mask, row_keys, s, self.ddit.mask_index, seed, draw)
                with _autocast(dev, bf16):
                    feats = self.ddit.forward_intermediates(noisy, sigma, blocks, attention_mask=mask)
                for b, tokens in feats.items():
                    f = self._pool(_normalise_tokens(tokens, token_norm), mask, pool)
                    out[(b, s)] = out[(b, s)] + f if draw else f
            for b in blocks:
                out[(b, s)] = self._reduce(out[(b, s)] / ensemble, owner, len(keys)).cpu()
        return out

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
