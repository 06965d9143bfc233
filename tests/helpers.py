"""Tiny models and data that tests build on the fly (no downloads)."""

from __future__ import annotations

import math
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


# The longest dot product in the tiny models (hidden 32): the timestep embedder's 256 frequencies (the MLP's inner
# width, 4 x 32, is shorter). The ``width`` of ``assert_features_close`` for features of tiny_dit and tiny_ddit.
TINY_WIDTH = 256
# How many typical rounding differences apart two computations may be: the largest of many elements lies a few
# standard deviations out, and LayerNorm and adaLN scales amplify a block's input differences. Worst seen: 0.074
# of the bound (docs/guarantees.md, "Numerics").
ROUNDING_SAFETY = 8.0


def rounding_tolerance(expected: torch.Tensor, depth: int, width: int, dtype: torch.dtype = torch.float32) -> float:
    """The absolute difference two float computations of ``expected`` may show when only their rounding differs.

    Another batch size, thread count, device, fused batch or implementation of the same math sums the same
    products in another order. One dot product of length ``width`` summed in two orders differs by about
    eps * sqrt(width) of the magnitudes summed (rounding errors add like a random walk); each of ``depth``
    layers (residual blocks; the embedding and an output layer count one each) adds such an independent
    difference to the residual stream, so differences grow like sqrt(depth * width). They are relative to the
    activations as a whole, not to one element (an element near zero carries the same absolute error as the
    largest), hence the scale is max |expected| and there is no element-wise rtol. A real bug (another noise
    draw, padding leaking into attention, a sample seeing its batch) moves features by a sizeable fraction of
    that scale, orders of magnitude above this bound.

    bf16 against fp32: pass ``dtype=torch.bfloat16`` and ``width=1``. bf16 rounds the operands of each layer
    (relative error eps each) while sums still accumulate in fp32, so that difference does not grow with the
    length of the sums, only with the depth.
    """
    eps = torch.finfo(dtype).eps
    return ROUNDING_SAFETY * eps * math.sqrt(depth * width) * expected.detach().abs().max().item()


def assert_features_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    depth: int,
    width: int,
    what: str,
    dtype: torch.dtype = torch.float32,
) -> None:
    """``actual`` equals ``expected`` up to float rounding (see ``rounding_tolerance``): the promise for features
    computed by different kernels. Where the code promises the same bytes, compare with ``torch.equal``."""
    assert actual.shape == expected.shape, f"{what}: shapes {tuple(actual.shape)} and {tuple(expected.shape)}"
    atol = rounding_tolerance(expected, depth, width, dtype)
    worst = (actual.detach().float() - expected.detach().float()).abs().max().item()
    assert worst <= atol, f"{what}: differ by {worst:.3g}, more than float rounding allows ({atol:.3g}, depth {depth})"


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
