"""Pieces shared by the image and text backbones: the GLIDE sinusoidal embedding, checkpoint reading,
format sniffing and strict loading with one readable mismatch report.

Why our own strict loader: ``load_state_dict(strict=True)`` stops at the first kind of problem and says
nothing about what the file *is*. Users point us at a wrong file often (a VAE, a diffusers folder given as an
official checkpoint, a SEDD file given to the DiT loader); the message must say so in one go.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not match the model it is loaded into."""


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, denom_shift: int = 0) -> torch.Tensor:
    """GLIDE sinusoidal embedding, ``[cos, sin]`` halves (cos first), float32.

    ``f_i = exp(-ln(max_period) * i / (half - denom_shift))``: ``denom_shift=0`` is the official DiT/SEDD
    code (denominator 128 for dim 256); diffusers' ``Timesteps(downscale_freq_shift=1)`` uses 1 (127).
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - denom_shift)
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file or a torch pickle (``.pt/.pth/.bin/.ckpt``) into a flat name -> tensor dict.

    Torch pickles are opened with ``weights_only=True`` first; training checkpoints that hold an argparse
    Namespace (DiT's ``train.py``) need ``weights_only=False``, which we fall back to for local files only.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc})") from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    return dict(obj)


def read_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"config file not found: {path}") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: malformed JSON ({exc})") from exc


def sniff_format(keys: set[str] | Mapping[str, object]) -> str:
    """Best guess of what a state dict is, from its key names alone (for error messages and dispatch)."""
    keys = set(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("backbone.vocab_embed") or has("backbone.blocks."):
        return "an MDLM checkpoint (text DDiT with 'backbone.' prefix)"
    if has("vocab_embed") and has("sigma_map"):
        return "a SEDD / DDiT text checkpoint"
    if has("transformer_blocks.") and has("pos_embed.proj"):
        return "a diffusers DiTTransformer2DModel state dict"
    if has("x_embedder.proj") and has("blocks."):
        return "an official DiT state dict"
    if {"ema", "model"} & keys:
        return "a DiT training checkpoint (dict with 'model'/'ema'; pass it whole, the loader unwraps it)"
    if has("encoder.down_blocks") or has("decoder.up_blocks") or has("quant_conv"):
        return "a VAE (AutoencoderKL) state dict, not a transformer"
    if has("text_model.") or has("transformer.h."):
        return "a Hugging Face language model state dict"
    return "an unrecognised state dict"


def _preview(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def strict_load(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, expected: str) -> None:
    """Load ``state_dict`` into ``module`` requiring exactly the same keys and shapes.

    On any mismatch raise one :class:`CheckpointError` listing missing keys, unexpected keys and shape
    mismatches, and what the file looks like instead of ``expected``.
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        lines = [f"{source}: does not match {expected}."]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_preview(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_preview(unexpected)}")
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): {_preview(shapes, 4)}")
        lines.append(f"  the file looks like {sniff_format(state_dict)}.")
        raise CheckpointError("\n".join(lines))
    module.load_state_dict(state_dict, strict=True)


def resolve_indices(blocks, depth: int, what: str = "block") -> list[int]:
    """Normalise requested block indices (0-based, negative counts from the end) to sorted unique ints."""
    if isinstance(blocks, int):
        blocks = [blocks]
    out = set()
    for b in blocks:
        if isinstance(b, bool) or int(b) != b or not -depth <= int(b) < depth:
            raise ValueError(
                f"{what} {b!r} is out of range: this model has {depth} blocks (0..{depth - 1}, or -{depth}..-1)"
            )
        out.add(int(b) % depth)
    if not out:
        raise ValueError(f"no {what} requested")
    return sorted(out)
