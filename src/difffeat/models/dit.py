"""Our DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers") with the official numerics.

Why our own module rather than diffusers' ``DiTTransformer2DModel``: the released weights were trained with the
official code, and diffusers' port differs from it in two constants (timestep frequencies over 127 instead of 128 in
its ``Timesteps(downscale_freq_shift=1)``, and pre-MLP LayerNorm ``norm_eps`` 1e-5 instead of 1e-6). Features taken
from a foundation model should be the ones it was trained to produce, so ``numerics="official"`` is the default and
``numerics="diffusers"`` exists only to reproduce diffusers bit-for-bit. We also need a forward that stops after the
deepest block asked for, and a state dict whose keys are exactly the official ones, so official files load with a
strict load and every other layout is converted to it.

Loading and layout conversion (official, diffusers, our folders, the hub) live in
:mod:`difffeat.models.dit_load`.

Shapes: N batch, C channels, T = (input_size / patch_size)² tokens, D hidden size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from difffeat.models.common import resolve_indices, timestep_embedding
from difffeat.models.massive import TAPS

NUMERICS = ("official", "diffusers")
FREQUENCY_DIM = 256  # width of the sinusoidal timestep features fed to the timestep MLP
_LN_EPS = 1e-6  # every official LayerNorm
_DIFFUSERS_MLP_LN_EPS = 1e-5  # diffusers' norm3 (config.norm_eps default)

# ----------------------------------------------------------------------------------------------------------------
# Config and presets
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class DiTConfig:
    """Hyper-parameters of a DiT. ``input_size`` is the latent (or pixel) side the model runs at: 32 for 256 px."""

    input_size: int
    patch_size: int
    in_channels: int
    hidden_size: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    numerics: str = "official"

    def __post_init__(self) -> None:
        if self.numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {NUMERICS}, got {self.numerics!r}")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of 4 (2-D sin-cos position embedding)")

    @property
    def out_channels(self) -> int:
        """With a learned variance the model predicts ε and the variance interpolation value: twice the input."""
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2


_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}  # depth, width, heads
DIT_PRESETS: dict[str, dict[str, int]] = {
    f"DiT-{size}/{patch}": {"depth": depth, "hidden_size": width, "num_heads": heads, "patch_size": patch}
    for size, (depth, width, heads) in _SIZES.items()
    for patch in (2, 4, 8)
}


def dit_config(name: str, **overrides) -> DiTConfig:
    """Config of a named preset ("DiT-XL/2" or "DiT-XL-2"), at 256 px latents (input 32, 4 channels) by default."""
    canonical = {key.lower().replace("/", "-"): key for key in DIT_PRESETS}
    key = canonical.get(name.strip().lower().replace("/", "-"))
    if key is None:
        raise ValueError(f"unknown DiT preset {name!r}; known: {', '.join(DIT_PRESETS)}")
    return DiTConfig(**{"input_size": 32, "in_channels": 4, **DIT_PRESETS[key], **overrides})


# ----------------------------------------------------------------------------------------------------------------
# Fixed embeddings
# ----------------------------------------------------------------------------------------------------------------


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """MAE 1-D embedding of float64 positions: ``[sin(p·ω), cos(p·ω)]`` (sines first), ω_k = 10000^(-2k/dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Official fixed 2-D position embedding, ``[grid_size², dim]`` float32 for token ``row·grid_size + col``.

    The first half of the channels encodes the **column**, the second the row: the official code names the first
    half "emb_h" but feeds it ``meshgrid(w, h)[0]``, the column index. Computed in float64 like the numpy original.
    """
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    emb = torch.cat([_sincos_1d(dim // 2, cols.flatten()), _sincos_1d(dim // 2, rows.flatten())], dim=1)
    return emb.float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of tokens ``[N, T, D]`` by per-sample ``[N, D]`` shift and scale."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ----------------------------------------------------------------------------------------------------------------
# Modules (names and parameter layout follow the official models.py so state-dict keys match)
# ----------------------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches → tokens, row-major (token = row·grid + col)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """GLIDE sinusoidal features of t (cos first) → Linear → SiLU → Linear.

    ``denom_shift`` 0 divides the frequency exponent by 128 (official), 1 by 127 (diffusers).
    """

    def __init__(self, hidden_size: int, denom_shift: int = 0) -> None:
        super().__init__()
        self.denom_shift = denom_shift
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_DIM, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_embedding(t, FREQUENCY_DIM, denom_shift=self.denom_shift)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label → vector. With ``class_dropout_prob > 0`` the table has one extra row, the null class.

    Training-time random label dropping is left out: this library only runs pretrained models, and the caller
    passes the null class explicitly when it wants the unconditional branch.
    """

    def __init__(self, num_classes: int, hidden_size: int, class_dropout_prob: float) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(class_dropout_prob > 0), hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (rows: all q, then all k, then all v)."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q·kᵀ/√head_dim)·v, no mask
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    """fc1 → GELU (tanh approximation, as trained) → fc2."""

    def __init__(self, hidden_size: int, mlp_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero block: conditioning → 6 chunks (shift/scale/gate for attention, then for the MLP)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, mlp_norm_eps: float = _LN_EPS) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=_LN_EPS)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))

    def modulated_input(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """What the attention reads, ``modulate(norm1(x), shift_msa, scale_msa)``, without running the attention
        or the MLP."""
        shift_msa, scale_msa = self.adaLN_modulation(c).chunk(6, dim=1)[:2]
        return modulate(self.norm1(x), shift_msa, scale_msa)


class FinalLayer(nn.Module):
    """adaLN (shift, then scale) → Linear to p·p·out_channels per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=_LN_EPS)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Class-conditional diffusion transformer with the official state-dict layout and numerics."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        diffusers_numerics = config.numerics == "diffusers"
        d = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, d)
        self.t_embedder = TimestepEmbedder(d, denom_shift=int(diffusers_numerics))
        self.y_embedder = LabelEmbedder(config.num_classes, d, config.class_dropout_prob)
        # A frozen Parameter, not a buffer: the official checkpoints store it under this key.
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, d), requires_grad=False)
        mlp_norm_eps = _DIFFUSERS_MLP_LN_EPS if diffusers_numerics else _LN_EPS
        self.blocks = nn.ModuleList(
            DiTBlock(d, config.num_heads, config.mlp_ratio, mlp_norm_eps) for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(d, config.patch_size, config.out_channels)
        self.initialize_weights()

    @property
    def depth(self) -> int:
        return self.config.depth

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def null_class(self) -> int | None:
        """Label of the unconditional branch (the extra table row), or None when the model was trained without."""
        return self.config.num_classes if self.config.class_dropout_prob > 0 else None

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Official init: xavier linears, zero adaLN and output layer, so a fresh model is a valid (zero) DiT."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.pos_embed.copy_(sincos_pos_embed_2d(self.hidden_size, self.config.grid_size).unsqueeze(0))
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [*(block.adaLN_modulation[1] for block in self.blocks), self.final_layer.adaLN_modulation[1]]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor | int, y: torch.Tensor | int | None = None) -> torch.Tensor:
        """Full denoiser output ``[N, out_channels, H, W]`` for latents ``[N, C, H, W]``, timesteps and labels."""
        h, c = self._embed(x, t, y)
        for block in self.blocks:
            h = block(h, c)
        return self._unpatchify(self.final_layer(h, c))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        t: torch.Tensor | int,
        y: torch.Tensor | int | None,
        blocks: int | Sequence[int],
        tap: str = "output",
        suppress: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[int, torch.Tensor]:
        """Tokens ``[N, T, D]`` of each requested block, keyed 0..depth-1: its output (``tap="output"``), its
        input (``"input"``), or its input through ``suppress(block, tokens)`` (when given), ``norm1`` and its
        attention's adaLN modulation (``"modulated"``, see :data:`difffeat.models.massive.TAPS`).

        Blocks after the deepest one requested never run (for an input tap, neither does that one): feature
        extraction from early blocks costs only them.
        """
        if tap not in TAPS:
            raise ValueError(f"tap must be one of {TAPS}, got {tap!r}")
        wanted = resolve_indices(blocks, self.depth)
        h, c = self._embed(x, t, y)
        out: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.blocks[: wanted[-1] + 1]):
            if index in wanted and tap != "output":
                out[index] = h if tap == "input" else block.modulated_input(_suppressed(suppress, index, h), c)
                if index == wanted[-1]:
                    break
            h = block(h, c)
            if index in wanted and tap == "output":
                out[index] = h
        return out

    def _embed(
        self, x: torch.Tensor, t: torch.Tensor | int, y: torch.Tensor | int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens with position embedding and the conditioning vector c = t_emb + y_emb."""
        expected = (self.config.in_channels, self.config.input_size, self.config.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected input [N, {', '.join(map(str, expected))}], got {list(x.shape)}")
        n = x.shape[0]
        if y is None:
            if self.null_class is None:
                raise ValueError("this model has no null class (class_dropout_prob=0): pass labels y")
            y = self.null_class
        rows = self.y_embedder.embedding_table.num_embeddings
        if isinstance(y, int) and not 0 <= y < rows:
            raise ValueError(f"class labels must be integers in 0..{rows - 1}, got {y}")
        y = _per_sample(y, n, "y", x.device)
        # The value check reads the tensor back, a host sync per forward on a GPU: done on CPU tensors only
        # (the extractors pass Python ints); on a GPU an out-of-range label trips the embedding's device assert.
        if y.is_floating_point() or (y.device.type == "cpu" and bool(((y < 0) | (y >= rows)).any())):
            raise ValueError(f"class labels must be integers in 0..{rows - 1}, got {y.tolist()}")
        c = self.t_embedder(_per_sample(t, n, "t", x.device)) + self.y_embedder(y)
        return self.x_embedder(x) + self.pos_embed, c

    def _unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[N, T, p·p·C]`` (features ordered p_row, p_col, channel) → ``[N, C, H, W]``."""
        n, g, p, ch = tokens.shape[0], self.config.grid_size, self.config.patch_size, self.config.out_channels
        x = tokens.reshape(n, g, g, p, p, ch).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(n, ch, g * p, g * p)


def _suppressed(
    suppress: Callable[[int, torch.Tensor], torch.Tensor] | None, block: int, tokens: torch.Tensor
) -> torch.Tensor:
    return tokens if suppress is None else suppress(block, tokens)


def _per_sample(value: torch.Tensor | int | float, n: int, name: str, device: torch.device) -> torch.Tensor:
    """A scalar broadcast to ``[n]``, or a ``[n]`` tensor passed through."""
    tensor = torch.as_tensor(value, device=device)
    if tensor.dim() == 0:
        return tensor.expand(n)
    if tuple(tensor.shape) != (n,):
        raise ValueError(f"{name} must be a scalar or have shape [{n}], got {list(tensor.shape)}")
    return tensor
