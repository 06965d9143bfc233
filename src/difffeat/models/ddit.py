"""DDiT: the text diffusion transformer of SEDD (Lou et al. 2024), also MDLM's backbone (Sahoo et al. 2024).

One readable file in the style of DiT's ``models.py``. Module and parameter names are exactly SEDD's, so the
``state_dict()`` keys are the official ones (SEDD's ``model/transformer.py``) and SEDD hub files load unchanged;
MDLM files only need their ``backbone.`` prefix stripped. Parameters are registered in SEDD's order, which
matters: EMA shadow lists in training checkpoints are in ``parameters()`` order.
Loading and saving (SEDD, MDLM and our own formats) live in :mod:`difffeat.models.ddit_load`.

Differences from the official code, all numerically neutral in fp32:

* attention is ``F.scaled_dot_product_attention`` instead of flash-attn's packed varlen kernel, with an optional
  **key padding mask** so right-padded batches of captions give the same features at real positions as one
  caption at a time (the official models never pad: they see full 1024-token chunks);
* rotary cos/sin are recomputed per call instead of cached per length;
* the model runs in its own dtype; SEDD's bf16 autocast is the caller's choice. LayerNorms (and the sigma
  embedding, computed outside autocast in SEDD) always run in fp32, as in SEDD, so a bf16-autocast forward
  rounds where SEDD's does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from difffeat.models.common import resolve_indices, timestep_embedding

KINDS = ("sedd", "mdlm")
FREQ_EMBED_DIM = 256  # GLIDE embedding width fed to sigma_map (SEDD's TimestepEmbedder default)
MDLM_NEG_INF = -1e6  # MDLM's ``neg_infinity`` for the SUBS parameterization

DDIT_PRESETS: dict[str, dict] = {
    "sedd-small": dict(hidden_size=768, n_heads=12, n_blocks=12, kind="sedd"),
    "sedd-medium": dict(hidden_size=1024, n_heads=16, n_blocks=24, kind="sedd"),
    # MDLM trains without time conditioning: the backbone always sees sigma = 0.
    "mdlm-owt": dict(
        hidden_size=768, n_heads=12, n_blocks=12, kind="mdlm", scale_by_sigma=False, time_conditioning=False
    ),
}


_Config = TypeVar("_Config", bound="DDiTConfig")


@dataclass
class DDiTConfig:
    """Architecture of a DDiT. Defaults are SEDD-small on GPT-2 tokens plus one absorbing [MASK] token.

    ``kind`` only changes :meth:`DDiT.log_score` (SEDD score vs MDLM SUBS). ``time_conditioning=False`` (MDLM's
    default) replaces sigma by 0 inside the model, as MDLM's backbone does, so callers may pass any sigma.
    ``length`` is the trained context length; longer inputs are refused. ``hidden_size`` must split into heads
    of even width (GPT-NeoX rotary rotates pairs of dimensions). :meth:`preset` builds a named one of ``presets``.
    """

    vocab_size: int = 50258
    hidden_size: int = 768
    cond_dim: int = 128
    n_heads: int = 12
    n_blocks: int = 12
    length: int = 1024
    scale_by_sigma: bool = True
    mlp_ratio: int = 4
    kind: str = "sedd"
    mask_index: int | None = None
    time_conditioning: bool = True
    label: ClassVar[str] = "DDiT"  # in messages
    presets: ClassVar[dict[str, dict]] = DDIT_PRESETS

    def __post_init__(self) -> None:
        if self.mask_index is None:
            self.mask_index = self.vocab_size - 1
        if self.kind not in KINDS:
            raise ValueError(f"DDiT kind must be one of {KINDS}, got {self.kind!r}")
        if self.hidden_size % self.n_heads or (self.hidden_size // self.n_heads) % 2:
            raise ValueError(f"hidden_size {self.hidden_size} must split into {self.n_heads} heads of even width")
        if not 0 <= self.mask_index < self.vocab_size:
            raise ValueError(f"mask_index {self.mask_index} is outside the vocabulary (size {self.vocab_size})")

    @classmethod
    def preset(cls: type[_Config], name: str, **overrides: Any) -> _Config:
        if name not in cls.presets:
            raise ValueError(f"unknown {cls.label} preset {name!r}; known: {', '.join(cls.presets)}")
        return cls(**{**cls.presets[name], **overrides})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads


# --------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX pairing: dims j and j + D/2 rotate together; [x1, x2] -> [-x2, x1]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., L, D]`` by position; cos/sin ``[L, D]`` are cast to x's dtype as SEDD does."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Non-causal attention over ``[B, H, L, D]`` with scale 1/sqrt(D); ``key_mask [B, L]`` True = attend."""
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class LayerNorm(nn.Module):
    """SEDD's weight-only LayerNorm, always in fp32 (autocast off), result cast back to the input dtype; with
    ``bias``, RADD's ``LayerNormWot``, which adds a bias (initialised to ones, as RADD does) after the weight.

    Under the caller's bf16 autocast the residual stream stays fp32 (as in SEDD), so the cast back is a no-op
    there; it only matters when the whole module was converted to bf16.
    """

    def __init__(self, dim: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.ones(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = F.layer_norm(x.float(), [x.shape[-1]], eps=1e-5) * self.weight.float()
            if self.bias is not None:
                y = y + self.bias.float()
        return y.to(x.dtype)


class EmbeddingLayer(nn.Module):
    """Token embedding as a raw Parameter (key ``vocab_embed.embedding``, no ``.weight``)."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding[ids]


class SigmaEmbedder(nn.Module):
    """sigma -> GLIDE embedding (256 wide, /128, cos first) -> Linear -> SiLU -> Linear (key ``sigma_map.mlp``)."""

    def __init__(self, cond_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_EMBED_DIM, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(sigma, FREQ_EMBED_DIM)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def rotary_inv_freq(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """``1 / base^(2i / head_dim)`` for i < head_dim / 2, fp32, on the CPU (also under a meta-device build, where
    ``arange`` would first import seconds' worth of torch's meta kernels)."""
    return 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim)


class Rotary(nn.Module):
    """Rotary position tables; ``inv_freq`` is a persistent buffer because SEDD/MDLM files contain it."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.register_buffer("inv_freq", rotary_inv_freq(head_dim))

    def forward(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape ``[L, head_dim]`` in fp32 (frequencies repeated: ``cat(freqs, freqs)``)."""
        positions = torch.arange(length, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq.to(device, torch.float32))
        angles = torch.cat([freqs, freqs], dim=-1)
        return angles.cos(), angles.sin()


class DDiTBlock(nn.Module):
    """Pre-LN transformer block with adaLN (shift, scale, gate) x (attention, MLP) from the sigma condition.

    ``cond_dim=None`` builds it without ``adaLN_modulation`` (and ``norm_bias`` with RADD's biased norms): the
    layers of RADD's time-free block, registered in the same order, so :class:`~difffeat.models.radd.RADDBlock`
    only adds its forward.
    """

    def __init__(self, dim: int, n_heads: int, cond_dim: int | None, mlp_ratio: int, norm_bias: bool = False):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = LayerNorm(dim, norm_bias)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim, norm_bias)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * dim, dim)
        )
        if cond_dim is not None:
            self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim)

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], key_mask: torch.Tensor | None
    ) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c)[:, None].chunk(6, -1)
        h = self.attend(modulate(self.norm1(x), shift_msa, scale_msa), rope, key_mask)
        x = x + gate_msa * self.attn_out(h)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))

    def attend(
        self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], key_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """qkv features are [q | k | v], head-major inside each; rotary on q and k only."""
        B, L, D = h.shape
        q, k, v = self.attn_qkv(h).view(B, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        return attention(q, k, v, key_mask).transpose(1, 2).reshape(B, L, D)


class OutputLayer(nn.Module):
    """Final adaLN (shift first, then scale) and the untied vocabulary projection; with ``cond_dim=None`` (and
    ``norm_bias``) RADD's ``DDitFinalLayerWot``: the biased norm and the projection, no modulation."""

    def __init__(self, dim: int, vocab_size: int, cond_dim: int | None, norm_bias: bool = False):
        super().__init__()
        self.norm_final = LayerNorm(dim, norm_bias)
        self.linear = nn.Linear(dim, vocab_size)
        if cond_dim is not None:
            self.adaLN_modulation = nn.Linear(cond_dim, 2 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if c is None:
            return self.linear(self.norm_final(x))
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, -1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------


class DDiT(nn.Module):
    """SEDD/MDLM text diffusion transformer with early exit and block capture.

    ``forward`` returns the raw vocabulary logits (before SEDD's scale_by_sigma); :meth:`log_score` turns them
    into what the training losses use.
    """

    def __init__(self, config: DDiTConfig):
        super().__init__()
        cfg = self.config = config
        self.depth, self.hidden_size, self.max_length = cfg.n_blocks, cfg.hidden_size, cfg.length
        self.mask_index: int = cfg.mask_index  # the absorbing [MASK] id (SEDD/MDLM: one past GPT-2's vocabulary)
        self.vocab_embed = EmbeddingLayer(cfg.hidden_size, cfg.vocab_size)
        self.sigma_map = SigmaEmbedder(cfg.cond_dim)
        self.rotary_emb = Rotary(cfg.head_dim)
        self.blocks = nn.ModuleList(
            DDiTBlock(cfg.hidden_size, cfg.n_heads, cfg.cond_dim, cfg.mlp_ratio) for _ in range(cfg.n_blocks)
        )
        self.output_layer = OutputLayer(cfg.hidden_size, cfg.vocab_size, cfg.cond_dim)
        self._zero_init()

    def _zero_init(self) -> None:
        """SEDD's init: adaLN and output projection start at zero, so each block starts as the identity."""
        for module in [*(b.adaLN_modulation for b in self.blocks), self.output_layer.adaLN_modulation]:
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
        nn.init.zeros_(self.output_layer.linear.weight)
        nn.init.zeros_(self.output_layer.linear.bias)

    def _sigma(self, sigma: float | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        """Noise level per sample, fp32 ``[B]``; a scalar is broadcast to the batch."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device).reshape(-1)
        if sigma.numel() == 1:
            return sigma.expand(batch)
        if sigma.numel() != batch:
            raise ValueError(f"sigma has {sigma.numel()} values for a batch of {batch}")
        return sigma

    def _prepare(self, ids: torch.Tensor, sigma: float | torch.Tensor, attention_mask: torch.Tensor | None):
        """Embeddings, condition c = SiLU(sigma_map(sigma)), rotary tables and key mask (outside autocast)."""
        x, rope, key_mask = token_inputs(self, ids, attention_mask)
        sigma = self._sigma(sigma, ids.shape[0], ids.device)
        if not self.config.time_conditioning:
            sigma = torch.zeros_like(sigma)
        with torch.autocast(device_type=ids.device.type, enabled=False):
            c = F.silu(self.sigma_map(sigma))
        return x, c, rope, key_mask

    def forward(
        self, ids: torch.Tensor, sigma: float | torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Raw logits ``[B, L, V]`` for token ids ``[B, L]`` at noise level sigma (``[B]`` or a scalar)."""
        x, c, rope, key_mask = self._prepare(ids, sigma, attention_mask)
        for block in self.blocks:
            x = block(x, c, rope, key_mask)
        return self.output_layer(x, c)

    def forward_intermediates(
        self, ids: torch.Tensor, sigma: float | torch.Tensor, blocks, attention_mask: torch.Tensor | None = None
    ) -> dict[int, torch.Tensor]:
        """Residual stream ``[B, L, D]`` after each requested block (0-based, negatives from the end).

        Blocks after the deepest requested one are never run.
        """
        wanted = resolve_indices(blocks, self.depth)
        x, c, rope, key_mask = self._prepare(ids, sigma, attention_mask)
        return block_outputs(self.blocks, x, wanted, c, rope, key_mask)

    def log_score(
        self, ids: torch.Tensor, sigma: float | torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """What the training losses consume: SEDD's log score (kind "sedd") or MDLM's SUBS log-probs ("mdlm")."""
        logits = self.forward(ids, sigma, attention_mask)
        if self.config.kind == "mdlm":
            return subs_log_probs(logits, ids, self.mask_index)
        if self.config.scale_by_sigma:
            shift = sedd_sigma_shift(self._sigma(sigma, ids.shape[0], ids.device), logits.shape[-1])
            logits = logits + shift.to(logits.dtype)[:, None, None]
        return logits.scatter(-1, ids[..., None], 0.0)


def token_inputs(
    model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
    """What every block of SEDD's token stack reads besides the condition, for DDiT and RADD alike: the token
    embeddings, the rotary tables and the key mask, after refusing a sequence longer than the trained length."""
    if ids.shape[1] > model.max_length:
        raise ValueError(f"sequence length {ids.shape[1]} exceeds the model's trained length {model.max_length}")
    return model.vocab_embed(ids), model.rotary_emb(ids.shape[1], ids.device), _key_mask(attention_mask)


def block_outputs(blocks: nn.ModuleList, x: torch.Tensor, wanted: list[int], *inputs: Any) -> dict[int, torch.Tensor]:
    """The residual stream after each ``wanted`` block (sorted, 0-based), each block called as
    ``block(x, *inputs)``; the loop stops at the deepest wanted one, so later blocks never run (early exit)."""
    out = {}
    for i, block in enumerate(blocks[: wanted[-1] + 1]):
        x = block(x, *inputs)
        if i in wanted:
            out[i] = x
    return out


def _key_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Boolean key mask; a sequence with no real token attends everywhere so its (unused) outputs stay finite."""
    if attention_mask is None:
        return None
    mask = attention_mask.bool()
    return mask | ~mask.any(dim=-1, keepdim=True)


def sedd_sigma_shift(sigma: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """SEDD's scale_by_sigma: -log(e^sigma - 1) - log(V - 1), with expm1 below sigma = 0.5 as SEDD computes it."""
    esigm1 = torch.where(sigma < 0.5, torch.expm1(sigma), sigma.exp() - 1)
    return -esigm1.log() - math.log(vocab_size - 1)


def subs_log_probs(logits: torch.Tensor, ids: torch.Tensor, mask_index: int) -> torch.Tensor:
    """MDLM's SUBS: never predict [MASK]; a position that is not masked keeps its token with certainty."""
    logits = logits.clone()
    logits[..., mask_index] += MDLM_NEG_INF
    log_probs = logits - logits.logsumexp(dim=-1, keepdim=True)
    certain = torch.full_like(log_probs, MDLM_NEG_INF).scatter(-1, ids[..., None], 0.0)
    return torch.where((ids != mask_index)[..., None], certain, log_probs)
