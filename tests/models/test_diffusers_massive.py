"""Massive-activation channels found from data and suppressed, on planted channels and on a real block output."""

from __future__ import annotations

import pytest
import torch

from difffeat.models.massive import find_massive_channels, suppress_channels


def planted(n: int = 4, t: int = 16, d: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, t, d, generator=g)
    x[:, 0, 5] += 500.0  # one token carries it, as in DiTs (a register-like token)
    x[:, :, 17] -= 300.0 + torch.rand(n, t, generator=g)
    return x


def test_finds_exactly_the_planted_channels():
    assert find_massive_channels(planted(), k=50) == [5, 17]
    assert find_massive_channels(torch.randn(4, 16, 32), k=50) == []


def test_zero_and_normalise_touch_only_those_channels():
    x = planted()
    zeroed = suppress_channels(x, [5, 17], "zero")
    assert torch.equal(zeroed[..., [5, 17]], torch.zeros(4, 16, 2))
    others = [c for c in range(32) if c not in (5, 17)]
    assert torch.equal(zeroed[..., others], x[..., others])
    normalised = suppress_channels(x, [5, 17], "normalise")
    # fp32 at magnitude 300 rounds at ~3e-5
    torch.testing.assert_close(normalised[..., 17].mean(dim=1), torch.zeros(4), rtol=0, atol=1e-4)
    torch.testing.assert_close(normalised[..., 17].std(dim=1, unbiased=False), torch.ones(4), rtol=0, atol=1e-4)
    assert normalised[..., 5].abs().max() < 5  # 500 gone, the single hot token is still the largest
    with pytest.raises(ValueError, match="zero"):
        suppress_channels(x, [5], "clip")
