"""Massive activations: the few fixed channels of a DiT's residual stream whose magnitude is hundreds of times
the rest (Sun et al. 2024; DiTF, NeurIPS 2025, on FLUX). Mean-pooled features and linear probes are dominated by
them, so they are found from data and then suppressed or normalised before pooling.

Found, not hard-coded: which channels are massive differs per model and per block, so they are measured on a
calibration batch and returned, for the run to record and the report to show.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPRESS_MODES = ("zero", "normalise")

# Where a block's feature is read (``forward_intermediates(tap=...)`` of the image families):
#   output     the block's output tokens (the residual stream after it); massive channels are suppressed on them;
#   modulated  the block's input after its own first norm (LayerNorm without affine) and AdaLN modulation
#              ``(1 + scale) * x + shift`` from the conditioning, what its attention reads (DiTF's features); the
#              massive channels are suppressed on the block's input, before that norm;
#   input      the block's input tokens themselves: what the massive channels of a modulated tap are found on.
TAPS = ("output", "modulated", "input")
USER_TAPS = TAPS[:2]


def calibration_tap(tap: str) -> str:
    """The tap whose tokens the massive channels of ``tap`` are suppressed on, so are found on."""
    if tap not in TAPS:
        raise ValueError(f"tap must be one of {USER_TAPS}, got {tap!r}")
    return "input" if tap == "modulated" else tap


def find_massive_channels(tokens: torch.Tensor, k: float = 100.0) -> list[int]:
    """Channels of ``tokens [N, T, D]`` whose largest magnitude over the batch exceeds ``k`` x the median magnitude
    of all entries (the median is the typical activation; a massive channel stands out by orders of magnitude)."""
    if tokens.dim() != 3:
        raise ValueError(f"expected block tokens [N, T, D], got shape {list(tokens.shape)}")
    magnitude = tokens.detach().abs().float()
    typical = magnitude.median()
    peak = magnitude.amax(dim=(0, 1))
    return torch.nonzero(peak > k * typical).flatten().tolist()


def suppress_channels(tokens: torch.Tensor, channels: list[int], mode: str = "zero") -> torch.Tensor:
    """A copy of ``tokens [N, T, D]`` with ``channels`` set to zero, or standardised over the tokens of each sample
    (``normalise``: zero mean, unit variance, so they keep their spatial pattern but no longer their scale)."""
    if mode not in SUPPRESS_MODES:
        raise ValueError(f"massive-activation mode must be one of {SUPPRESS_MODES}, got {mode!r}")
    out = tokens.clone()
    if not channels:
        return out
    picked = out[..., channels]
    if mode == "zero":
        out[..., channels] = 0
    else:
        mean = picked.mean(dim=1, keepdim=True)
        std = picked.std(dim=1, keepdim=True, unbiased=False).clamp_min(1e-6)
        out[..., channels] = (picked - mean) / std
    return out


MASSIVE_OPTIONS = ("none", *SUPPRESS_MODES)


@dataclass(frozen=True)
class MassiveChannels:
    """Which channels of each block's tokens are massive (0-based block -> channels), and what to do with them
    before pooling: ``zero`` (DiTF's channel discard) or ``normalise`` (see :func:`suppress_channels`)."""

    channels: dict[int, list[int]]
    mode: str = "zero"

    def __post_init__(self) -> None:
        if self.mode not in SUPPRESS_MODES:
            raise ValueError(f"massive-activation mode must be one of {SUPPRESS_MODES}, got {self.mode!r}")

    def apply(self, block: int, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [N, T, D]`` of ``block`` with its massive channels suppressed (a block never calibrated is
        an error: no channels found is ``[]``, not a missing entry)."""
        if block not in self.channels:
            raise KeyError(f"block {block} was not calibrated for massive activations (have {sorted(self.channels)})")
        return suppress_channels(tokens, self.channels[block], self.mode)
