"""The one training loop: a hand-written reference of the recipe, and the stacked heads against single ones."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from difffeat.heads.fusion import FusionHead
from difffeat.heads.probe import StackedLinear
from difffeat.heads.train import OneHead, TrainOptions, init_prior_bias, train_heads
from difffeat.metrics import mean_average_precision
from difffeat.utils.runtime import seeded

# Few rows and a high learning rate: the heads overfit within a few dozen epochs, so early stopping is exercised.
CFG = TrainOptions(epochs=60, patience=4, batch_size=16, lr=3e-2, num_threads=1, loss="bce")


def problem(n: int, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Two inputs (12 and 8 dims) and 5 noisy multi-label targets from a fixed linear map of both."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n, 12)), rng.normal(size=(n, 8))
    w = np.random.default_rng(99).normal(size=(20, 5))
    y = (np.concatenate([a, b], 1) @ w + rng.normal(size=(n, 5)) > 0.5).astype(np.float32)
    return [torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)], torch.tensor(y)


def reference_fit(head: nn.Module, xs: list, y: torch.Tensor, vxs: list, vy: torch.Tensor, cfg: TrainOptions) -> int:
    """The recipe written out plainly for one head; returns the best epoch and leaves the best weights in ``head``."""
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * math.ceil(len(y) / cfg.batch_size))
    shuffle = torch.Generator().manual_seed(cfg.seed)
    best_score, best_epoch, best_state = -math.inf, 0, None
    with seeded(cfg.seed):  # dropout draws from the global RNG
        for epoch in range(1, cfg.epochs + 1):
            head.train()
            for idx in torch.randperm(len(y), generator=shuffle).split(cfg.batch_size):
                opt.zero_grad()
                nn.functional.binary_cross_entropy_with_logits(head(*[x[idx] for x in xs]), y[idx]).backward()
                opt.step()
                sched.step()
            with torch.no_grad():
                score = mean_average_precision(head.eval()(*vxs).numpy(), vy.numpy())
            if score > best_score:
                best_score, best_epoch, best_state = score, epoch, copy.deepcopy(head.state_dict())
            elif epoch - best_epoch >= cfg.patience:
                break
    head.load_state_dict(best_state)
    return best_epoch


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fusion_head_trains_as_the_reference_loop(dropout):
    (xs, y), (vxs, vy) = problem(80, 0), problem(150, 1)
    torch.manual_seed(0)
    head = FusionHead([12, 8], 5, width=16, dropout=dropout)
    init_prior_bias(head.classifier, y, "bce")
    ours, reference = copy.deepcopy(head), copy.deepcopy(head)
    (outcome,) = train_heads(OneHead(ours), [x[None] for x in xs], y, [x[None] for x in vxs], vy, CFG)
    assert outcome.best_epoch == reference_fit(reference, xs, y, vxs, vy, CFG)
    assert len(outcome.history) < CFG.epochs  # early stopping was exercised
    for (name, p), q in zip(ours.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5, msg=name)


def test_stacked_heads_train_as_each_head_alone():
    (xs, y), (vxs, vy) = problem(80, 0), problem(150, 1)
    noise = torch.randn(80, 12, generator=torch.Generator().manual_seed(3))
    sets, val = [xs[0], xs[0] * 0.1 + noise, noise], vxs[0]
    torch.manual_seed(0)
    linear = nn.Linear(12, 5)
    stacked = StackedLinear(linear, 3)
    outcomes = train_heads(stacked, [torch.stack(sets)], y, [torch.stack([val] * 3)], vy, CFG)
    assert len({o.best_epoch for o in outcomes}) > 1  # the heads stop at different epochs
    for i, x in enumerate(sets):
        alone = copy.deepcopy(linear)
        assert outcomes[i].best_epoch == reference_fit(alone, [x], y, [val], vy, CFG)
        torch.testing.assert_close(stacked.head(i).weight, alone.weight, atol=1e-5, rtol=1e-5)
