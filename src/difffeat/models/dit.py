"""Our DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers") with the official numerics.

Why our own module rather than diffusers' ``DiTTransformer2DModel``: the released weights were trained with the
official code, and diffusers' port differs from it in two constants (timestep frequencies over 127 instead of
128, and pre-MLP LayerNorm eps 1e-5 instead of 1e-6; ``checkpoints.md`` §3.4). Features taken from a
foundation model should be the ones it was trained to produce, so ``numerics="official"`` is the default and
``numerics="diffusers"`` exists only to reproduce diffusers bit-for-bit. We also need a forward that stops after
the deepest block asked for, and a state dict whose keys are exactly the official ones, so official files load
with a strict load and every other layout is converted to it.

Shapes: N batch, C channels, T = (input_size / patch_size)² tokens, D hidden size.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from difffeat.models.checkpoints import CheckpointError, read_json, read_state_dict, sniff_format, strict_load
from difffeat.models.common import resolve_indices, timestep_embedding

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
# The official code picks heads by model size; a width is enough to recover them from a checkpoint.
_HEADS_BY_WIDTH = {width: heads for _, width, heads in _SIZES.values()}


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
        self, x: torch.Tensor, t: torch.Tensor | int, y: torch.Tensor | int | None, blocks: int | Sequence[int]
    ) -> dict[int, torch.Tensor]:
        """Residual stream ``[N, T, D]`` after each requested block, keyed 0..depth-1.

        Blocks after the deepest one requested never run: feature extraction from early blocks costs only them.
        """
        wanted = resolve_indices(blocks, self.depth)
        h, c = self._embed(x, t, y)
        out: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.blocks[: wanted[-1] + 1]):
            h = block(h, c)
            if index in wanted:
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


def _per_sample(value: torch.Tensor | int | float, n: int, name: str, device: torch.device) -> torch.Tensor:
    """A scalar broadcast to ``[n]``, or a ``[n]`` tensor passed through."""
    tensor = torch.as_tensor(value, device=device)
    if tensor.dim() == 0:
        return tensor.expand(n)
    if tuple(tensor.shape) != (n,):
        raise ValueError(f"{name} must be a scalar or have shape [{n}], got {list(tensor.shape)}")
    return tensor


# ----------------------------------------------------------------------------------------------------------------
# Layout conversion official <-> diffusers (checkpoints.md §3.5)
# ----------------------------------------------------------------------------------------------------------------

_TOP_TO_DIFFUSERS = {
    "x_embedder.proj": "pos_embed.proj",
    "final_layer.adaLN_modulation.1": "proj_out_1",
    "final_layer.linear": "proj_out_2",
}
_BLOCK_TO_DIFFUSERS = {
    "adaLN_modulation.1": "norm1.linear",
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
# One shared embedder officially, a copy in every block in diffusers.
_EMBEDDER_TO_DIFFUSERS = {
    "t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
    "y_embedder.embedding_table": "norm1.emb.class_embedder.embedding_table",
}
_QKV = ("to_q", "to_k", "to_v")
_BLOCK_KEY = re.compile(r"transformer_blocks\.(\d+)\.(.+)\.(weight|bias)")


def dit_to_diffusers_state_dict(sd: Mapping[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Official → diffusers ``DiTTransformer2DModel`` layout (tensors shared, not copied).

    ``pos_embed`` has no counterpart (diffusers recomputes it as a non-persistent buffer) and is left out.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        if key == "pos_embed":
            continue
        stem, _, leaf = key.rpartition(".")
        block = re.fullmatch(r"blocks\.(\d+)\.(.+)", stem)
        if stem in _TOP_TO_DIFFUSERS:
            out[f"{_TOP_TO_DIFFUSERS[stem]}.{leaf}"] = tensor
        elif stem in _EMBEDDER_TO_DIFFUSERS:
            for i in range(depth):
                out[f"transformer_blocks.{i}.{_EMBEDDER_TO_DIFFUSERS[stem]}.{leaf}"] = tensor
        elif block and block.group(2) == "attn.qkv":
            for name, part in zip(_QKV, tensor.chunk(3, dim=0), strict=True):
                out[f"transformer_blocks.{block.group(1)}.attn1.{name}.{leaf}"] = part
        elif block and block.group(2) in _BLOCK_TO_DIFFUSERS:
            out[f"transformer_blocks.{block.group(1)}.{_BLOCK_TO_DIFFUSERS[block.group(2)]}.{leaf}"] = tensor
        else:
            raise KeyError(f"no diffusers counterpart for official key {key!r}")
    return out


def dit_state_dict_from_diffusers(
    sd: Mapping[str, torch.Tensor], source: str = "state dict"
) -> dict[str, torch.Tensor]:
    """Diffusers → official layout: q, k, v concatenated, the per-block embedder copies collapsed into one.

    The copies must all be equal, otherwise no official model reproduces the file and we refuse. Keys we do not
    know pass through unchanged so that the strict load reports them instead of them vanishing.
    """
    top_from = {v: k for k, v in _TOP_TO_DIFFUSERS.items()} | {"pos_embed.pos_embed": "pos_embed"}
    block_from = {v: k for k, v in _BLOCK_TO_DIFFUSERS.items()}
    embedder_from = {v: k for k, v in _EMBEDDER_TO_DIFFUSERS.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    copies: dict[str, dict[str, torch.Tensor]] = {}  # block index -> {official embedder key: tensor}
    for key, tensor in sd.items():
        stem, _, leaf = key.rpartition(".")
        match = _BLOCK_KEY.fullmatch(key)
        if key in top_from or stem in top_from:
            out[top_from[key] if key in top_from else f"{top_from[stem]}.{leaf}"] = tensor
        elif match and match.group(2) in embedder_from:
            copies.setdefault(match.group(1), {})[f"{embedder_from[match.group(2)]}.{leaf}"] = tensor
        elif match and match.group(2) in block_from:
            out[f"blocks.{match.group(1)}.{block_from[match.group(2)]}.{leaf}"] = tensor
        elif match and match.group(2) in {f"attn1.{name}" for name in _QKV}:
            qkv.setdefault((match.group(1), leaf), {})[match.group(2)[len("attn1.") :]] = tensor
        else:
            out[key] = tensor
    for (block, leaf), parts in qkv.items():
        if set(parts) == set(_QKV):
            out[f"blocks.{block}.attn.qkv.{leaf}"] = torch.cat([parts[name] for name in _QKV], dim=0)
        else:  # incomplete: keep the originals so the mismatch report shows them
            out.update({f"transformer_blocks.{block}.attn1.{name}.{leaf}": part for name, part in parts.items()})
    out.update(_shared_embedder(copies, source))
    return out


def _shared_embedder(copies: dict[str, dict[str, torch.Tensor]], source: str) -> dict[str, torch.Tensor]:
    """The one embedder all blocks agree on, or a CheckpointError naming the first disagreement."""
    if not copies:
        return {}
    first, *rest = sorted(copies, key=int)
    reference = copies[first]
    for block in rest:
        for key in sorted(set(reference) | set(copies[block])):
            a, b = reference.get(key), copies[block].get(key)
            if a is None or b is None or a.shape != b.shape or not torch.equal(a, b):
                raise CheckpointError(
                    f"{source}: the per-block timestep/label embedder copies disagree (block {block} {key!r} vs "
                    f"block {first}). The official DiT has a single shared embedder, so this diffusers model "
                    "cannot be converted to it without changing its outputs."
                )
    return dict(reference)


# ----------------------------------------------------------------------------------------------------------------
# Configs read from checkpoints
# ----------------------------------------------------------------------------------------------------------------


def dit_config_from_state_dict(sd: Mapping[str, torch.Tensor], source: str = "state dict") -> DiTConfig:
    """Recover the config of an official-layout state dict from its tensor shapes.

    Heads are not visible in any shape; they come from the standard preset for that width. A table with
    ``num_classes + 1`` rows is assumed (trained with label dropout, as all released DiTs are).
    """
    needed = ["x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight", "final_layer.linear.weight"]
    needed.append("blocks.0.mlp.fc1.weight")
    absent = [k for k in needed if k not in sd]
    if absent:
        raise CheckpointError(
            f"{source}: not an official-layout DiT state dict (no {', '.join(absent)}); "
            f"the file looks like {sniff_format(sd)}."
        )
    hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
    tokens = sd["pos_embed"].shape[1]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise CheckpointError(f"{source}: pos_embed has {tokens} tokens, not a square grid")
    out_channels, rem = divmod(sd["final_layer.linear.weight"].shape[0], patch * patch)
    if rem or out_channels not in (in_channels, 2 * in_channels):
        raise CheckpointError(
            f"{source}: final layer width {sd['final_layer.linear.weight'].shape[0]} fits neither "
            f"{in_channels} nor {2 * in_channels} output channels at patch {patch}"
        )
    if hidden not in _HEADS_BY_WIDTH:
        raise CheckpointError(
            f"{source}: hidden size {hidden} is not a standard DiT width ({sorted(_HEADS_BY_WIDTH)}), so the "
            "number of heads is unknown; pass config=DiTConfig(...)"
        )
    return DiTConfig(
        input_size=grid * patch,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")),
        num_heads=_HEADS_BY_WIDTH[hidden],
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1,
        learn_sigma=out_channels == 2 * in_channels,
    )


def _config_from_diffusers(cfg: Mapping, source: str) -> DiTConfig:
    """DiTConfig from a diffusers ``transformer/config.json``, refusing variants the DiT math does not cover."""
    unsupported = {
        "norm_type": "ada_norm_zero",
        "activation_fn": "gelu-approximate",
        "norm_elementwise_affine": False,
        "attention_bias": True,
    }
    for key, want in unsupported.items():
        if cfg.get(key, want) != want:
            raise CheckpointError(f"{source}: {key}={cfg[key]!r} is not a DiT (expected {want!r})")
    try:
        in_channels = cfg["in_channels"]
        out_channels = cfg.get("out_channels") or in_channels
        if out_channels not in (in_channels, 2 * in_channels):
            raise CheckpointError(f"{source}: out_channels {out_channels} with in_channels {in_channels}")
        return DiTConfig(
            input_size=cfg["sample_size"],
            patch_size=cfg["patch_size"],
            in_channels=in_channels,
            hidden_size=cfg["num_attention_heads"] * cfg["attention_head_dim"],
            depth=cfg["num_layers"],
            num_heads=cfg["num_attention_heads"],
            num_classes=cfg["num_embeds_ada_norm"],
            learn_sigma=out_channels == 2 * in_channels,
        )
    except KeyError as exc:
        raise CheckpointError(f"{source}: diffusers config lacks {exc}") from exc


# ----------------------------------------------------------------------------------------------------------------
# Loading and saving
# ----------------------------------------------------------------------------------------------------------------

_EXPECTED = "an official-layout DiT state dict"
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+")


@dataclass
class _Checkpoint:
    """What a source holds: official-layout tensors, how to get its own config, whether pos_embed is implied."""

    state_dict: dict[str, torch.Tensor]
    own_config: Callable[[], DiTConfig]
    implied_pos_embed: bool = False  # diffusers never stores the fixed position embedding


def save_dit(model: DiT, folder: str | Path) -> Path:
    """Write our format: ``config.json`` (the config plus ``"architecture": "dit"``) and ``model.safetensors``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architecture": "dit", **asdict(model.config)}, indent=2))
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    return folder


def load_dit(
    source: str | Path,
    *,
    numerics: str | None = None,
    config: DiTConfig | None = None,
    map_location: str | torch.device = "cpu",
) -> DiT:
    """Load a DiT in eval mode with frozen parameters from any layout we know.

    ``source``: an official checkpoint file (plain state dict, or a training checkpoint whose ``ema`` is
    preferred over ``model``); a diffusers pipeline folder (with ``transformer/``) or transformer folder; a hub id
    such as ``facebook/DiT-XL-2-256``; or our own folder (see :func:`save_dit`).

    ``numerics`` defaults to "official" for every layout, diffusers' included: those are the numerics the weights
    were trained with. Only our own format keeps the numerics it was saved with. ``config`` replaces the config
    read from the source (needed for non-standard widths, whose head count no tensor shape reveals).
    """
    path = Path(source)
    if not path.exists():
        path = _fetch_from_hub(source)
    checkpoint = _read_file(path) if path.is_file() else _read_folder(path)
    config = config or checkpoint.own_config()
    if numerics is not None:
        config = replace(config, numerics=numerics)
    sd = checkpoint.state_dict
    if checkpoint.implied_pos_embed and "pos_embed" not in sd:
        sd = {**sd, "pos_embed": sincos_pos_embed_2d(config.hidden_size, config.grid_size).unsqueeze(0)}
    model = DiT(config)
    strict_load(model, sd, source=str(path), expected=_EXPECTED)
    model.requires_grad_(False)
    return model.eval().to(map_location)


def _fetch_from_hub(source: str | Path) -> Path:
    """Download the transformer of a hub pipeline; anything that cannot be a hub id is a missing local path."""
    text = str(source)
    if isinstance(source, Path) or not _HUB_ID.fullmatch(text) or text.endswith(_WEIGHT_SUFFIXES):
        raise CheckpointError(f"DiT checkpoint not found: {text} (no such file or folder)")
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(text, allow_patterns=["transformer/*"]))
    except Exception as exc:
        raise CheckpointError(
            f"{text!r} is not a local path and could not be fetched from the Hugging Face hub ({exc}); "
            "pass a local path to the checkpoint file or the downloaded folder."
        ) from exc


def _read_file(path: Path) -> _Checkpoint:
    """An official state dict, or a DiT training checkpoint (``find_model`` prefers ``ema`` over ``model``)."""
    sd = read_state_dict(path)
    for wrapper in ("ema", "model"):
        if isinstance(sd.get(wrapper), Mapping):
            sd = dict(sd[wrapper])
            break
    return _Checkpoint(sd, lambda: dit_config_from_state_dict(sd, source=str(path)))


def _read_folder(path: Path) -> _Checkpoint:
    """Our own folder, a diffusers transformer folder, or a diffusers pipeline root holding ``transformer/``."""
    if (path / "transformer").is_dir() and not (path / "config.json").is_file():
        path = path / "transformer"
    cfg = read_json(path / "config.json")
    if "architecture" in cfg:
        return _read_own_folder(path, cfg)
    if "num_layers" not in cfg:
        raise CheckpointError(f"{path}: config.json is neither ours nor a diffusers DiT transformer config")
    config = _config_from_diffusers(cfg, str(path))
    sd = dit_state_dict_from_diffusers(_read_diffusers_weights(path), source=str(path))
    return _Checkpoint(sd, lambda: config, implied_pos_embed=True)


def _read_own_folder(path: Path, cfg: dict) -> _Checkpoint:
    if cfg["architecture"] != "dit":
        raise CheckpointError(f"{path}: holds a {cfg['architecture']!r} model, not a DiT")
    known = {f.name for f in fields(DiTConfig)}
    unknown = sorted(set(cfg) - known - {"architecture"})
    if unknown:
        raise CheckpointError(f"{path}: config.json has fields DiTConfig does not know: {unknown}")
    config = DiTConfig(**{k: v for k, v in cfg.items() if k in known})
    return _Checkpoint(read_state_dict(path / "model.safetensors"), lambda: config)


def _read_diffusers_weights(path: Path) -> dict[str, torch.Tensor]:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (path / name).is_file():
            return read_state_dict(path / name)
    raise CheckpointError(
        f"{path}: no diffusion_pytorch_model.safetensors or .bin next to config.json "
        f"(found: {sorted(p.name for p in path.iterdir())})"
    )
