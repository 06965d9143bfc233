"""Tiny models and data that tests build on the fly (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from difffeat.models.ddit import DDiT, DDiTConfig
from difffeat.models.ddit_load import save_ddit
from difffeat.models.dit import DiT, DiTConfig
from difffeat.models.dit_load import save_dit
from difffeat.models.tokenizers import load_tokenizer, train_word_tokenizer

CAPTIONS = [
    "a red seven next to a blue circle",
    "two fives on a dark background",
    "the digit three",
    "a square and a triangle above a one",
    "number eight in the middle",
    "some nines and a zero",
]


def images(n: int, seed: int = 0) -> np.ndarray:
    """Random uint8 images [n, 16, 16, 3], the size tiny_dit reads."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8)


def randomise(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Non-zero random weights everywhere (official init zeroes adaLN gates, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def tiny_dit(in_channels: int = 3, input_size: int = 16, depth: int = 4) -> DiT:
    cfg = DiTConfig(input_size=input_size, patch_size=4, in_channels=in_channels, hidden_size=32, depth=depth,
                    num_heads=2, num_classes=1, learn_sigma=False)  # fmt: skip
    return randomise(DiT(cfg))


def tiny_ddit(vocab_size: int, depth: int = 3) -> DDiT:
    cfg = DDiTConfig(vocab_size=vocab_size + 1, hidden_size=32, cond_dim=16, n_heads=2, n_blocks=depth, length=24,
                     kind="mdlm", scale_by_sigma=False)  # fmt: skip
    return randomise(DDiT(cfg), seed=1)


def tiny_tokenizer(folder: Path):
    path = train_word_tokenizer(CAPTIONS * 3, 64, folder / "tokenizer.json")
    return load_tokenizer(path)


def save_tiny_models(folder: Path) -> tuple[Path, Path]:
    """A tiny pixel-space DiT (32 px) and a tiny DDiT with its tokenizer, in our own format."""
    dit_dir = save_dit(tiny_dit(input_size=32), folder / "dit")
    ddit_dir = folder / "ddit"
    ddit_dir.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer(ddit_dir)
    save_ddit(tiny_ddit(tok.vocab_size), ddit_dir)
    return dit_dir, ddit_dir
