"""The one training loop: the fusion head and the stacked probes train through ``train_heads``."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from difffeat.heads.fusion import FusionHead
from difffeat.heads.probe import StackedLinear
from difffeat.heads.train import OneHead, TrainConfig, init_prior_bias, train_head, train_heads, train_stacked

CFG = {"epochs": 25, "patience": 4, "batch_size": 64, "lr": 3e-3, "num_threads": 1}


def problem(n: int, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n, 12)), rng.normal(size=(n, 8))
    w = np.random.default_rng(99).normal(size=(20, 5))
    y = (np.concatenate([a, b], 1) @ w + rng.normal(size=(n, 5)) > 0.5).astype(np.float32)
    return [torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)], torch.tensor(y)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fusion_through_the_unified_loop_equals_the_old_loop(dropout):
    (xs, y), (vxs, vy) = problem(300, 0), problem(150, 1)
    torch.manual_seed(0)
    head = FusionHead([12, 8], 5, width=16, dropout=dropout)
    init_prior_bias(head.classifier, y, "bce")
    old, new = copy.deepcopy(head), copy.deepcopy(head)
    cfg = TrainConfig(**CFG)
    a = train_head(old, xs, y, vxs, vy, cfg)
    (b,) = train_heads(OneHead(new), [x[None] for x in xs], y, [x[None] for x in vxs], vy, cfg)
    assert (a.best_epoch, [r.epoch for r in a.history]) == (b.best_epoch, [r.epoch for r in b.history])
    assert a.best_score == pytest.approx(b.best_score, abs=1e-4)
    for (name, p), q in zip(old.state_dict().items(), new.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5, msg=name)


def test_probes_through_the_unified_loop_equal_the_old_stacked_loop():
    (xs, y), (vxs, vy) = problem(300, 0), problem(150, 1)
    train, val = torch.stack([xs[0], xs[0] * 0.1, torch.randn(300, 12)]), torch.stack([vxs[0]] * 3)
    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 5)
    old, new = StackedLinear(linear, 3), StackedLinear(linear, 3)
    cfg = TrainConfig(**CFG)
    a = train_stacked(old, train, y, val, vy, cfg)
    b = train_heads(new, [train], y, [val], vy, cfg)
    assert [o.best_epoch for o in a] == [o.best_epoch for o in b]
    torch.testing.assert_close(old.weight, new.weight, atol=1e-5, rtol=1e-5)
