"""The one training recipe shared by the linear probe and the fusion head.

Both heads are trained the same way (the paper's recipe): standardised cached features, BCE-with-logits for
multi-label (or cross-entropy for single-label), AdamW, a cosine learning-rate schedule over the maximum number
of epochs, and early stopping on the validation score with the best weights restored. Keeping a single loop here
means a probe score and a fusion score are always comparable: they differ only in the head, never in the recipe.

Features arrive as cached arrays (numpy, ``np.memmap`` in float16/float32, or tensors). They are converted once to
float32 tensors and standardised once, so an epoch is a handful of large matrix multiplications rather than a
conversion per batch.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from difffeat.metrics import (
    average_precision_per_class,
    mean_average_precision,
    nanmean_percent,
    single_label_metrics,
)
from difffeat.utils.io import atomic_write_bytes
from difffeat.utils.options import Options, option
from difffeat.utils.runtime import seeded, torch_threads

ArrayLike = Any  # numpy array, np.memmap or torch.Tensor; kept loose because callers pass whatever the store returns
Loss = Literal["bce", "ce"]
Stats = tuple[torch.Tensor, torch.Tensor]  # per-feature (mean, std) of the train features

_EVAL_CHUNK = 8192  # rows per forward at evaluation/prediction: bounds activation memory for wide heads


def _positive(value: float) -> str | None:
    return None if value > 0 else f"{value!r} must be > 0"


@dataclass
class TrainOptions(Options):
    """How a head is trained on cached features: the one recipe probes and fusion heads share (their option
    classes only change defaults), so a probe score and a fusion score differ in the head, never in the recipe.

    Mini-batches (default 1024) rather than full batch: with few samples per feature, full-batch Adam moves noise
    directions as fast as signal ones, which mini-batch noise damps. One CPU thread by default: on a shared or
    oversubscribed CPU every small multi-threaded op waits at an OpenMP barrier that a busy core stalls.
    """

    epochs: int = option(200, min=1, numbers=True, help="most epochs; the cosine schedule spans all of them")
    lr: float = option(1e-3, check=_positive, numbers=True, help="peak AdamW learning rate")
    weight_decay: float = option(1e-4, min=0, numbers=True, help="AdamW (decoupled) weight decay")
    batch_size: int = option(1024, min=0, numbers=True, help="rows per step; 0 = full batch")
    patience: int = option(20, min=1, numbers=True, help="stop after this many epochs without a new best")
    eval_every: int = option(1, min=1, numbers=True, help="validate every this many epochs")
    standardize: bool = option(True, numbers=True, help="standardise features with train mean/std")
    seed: int = option(0, min=0, numbers=True, help="seeds init, shuffling and dropout")
    device: str = option("cpu", help="torch device to train on")
    num_threads: int | None = option(1, min=1, help="torch CPU threads while fitting; none: torch's setting")
    loss: str | None = option(
        None,
        choices=("bce", "ce"),
        numbers=True,
        help="bce (multi-hot targets, mAP) or ce (class indices, top-1); none: from the targets",
    )

    def for_targets(self, targets: ArrayLike) -> TrainOptions:
        """These options with ``loss`` decided by the targets when it is unset: class indices [N] mean ce."""
        return self if self.loss is not None else replace(self, loss="ce" if np.ndim(targets) == 1 else "bce")


class HistoryRow(NamedTuple):
    """One evaluated epoch (1-based): mean train loss over that epoch and the validation score in percent."""

    epoch: int
    train_loss: float
    val_score: float


@dataclass
class TrainOutcome:
    """What ``train_heads`` reports per head; the model it was given already holds the best weights."""

    best_score: float
    best_epoch: int
    history: list[HistoryRow]
    seconds: float


# ---------------------------------------------------------------- inputs


def to_float32(x: ArrayLike) -> torch.Tensor:
    """One float32 CPU tensor from an array/memmap/tensor (a float16 memmap is read and widened once)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float32)
    array = np.asarray(x, dtype=np.float32)
    if not array.flags.writeable or not array.flags.c_contiguous:  # read-only memmaps: torch wants its own copy
        array = np.array(array, dtype=np.float32, order="C")
    if array.ndim != 2:
        raise ValueError(f"features must be 2-D [N, D], got shape {array.shape}")
    return torch.from_numpy(array)


def feature_stats(x: torch.Tensor, standardize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature (mean, std) of the *train* features; identity statistics when not standardising.

    Diffusion features mix channels of very different scales (some activations are orders of magnitude larger),
    so without this one learning rate cannot suit all of them. A constant feature gets std 1 rather than 0 so it
    maps to 0 instead of blowing up.
    """
    if not standardize:
        return torch.zeros(x.shape[1]), torch.ones(x.shape[1])
    std, mean = torch.std_mean(x.double(), dim=0, correction=0)
    std = torch.where(std > 1e-6 * (1.0 + mean.abs()), std, torch.ones_like(std))
    return mean.float(), std.float()


def apply_stats(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Standardise with given statistics (out of place, so a caller's array is never modified)."""
    return (x - mean) / std


def as_targets(y: ArrayLike, loss: Loss, n_rows: int) -> torch.Tensor:
    """Targets as the loss wants them: float [N, C] for BCE, int64 [N] for CE."""
    target = torch.as_tensor(np.asarray(y))
    if target.shape[0] != n_rows:
        raise ValueError(f"{target.shape[0]} targets for {n_rows} feature rows")
    if loss == "ce":
        if target.ndim != 1:
            raise ValueError(f"'ce' needs int class indices [N], got shape {tuple(target.shape)}")
        return target.long()
    if target.ndim != 2:
        raise ValueError(f"'bce' needs multi-hot targets [N, C], got shape {tuple(target.shape)}")
    return target.float()


# ---------------------------------------------------------------- helpers


def init_prior_bias(linear: nn.Linear, targets: torch.Tensor, loss: Loss) -> None:
    """Start the classifier at the train label prior (log-odds for BCE, log-frequency for CE).

    Multi-label classes are rare (a few percent positive), so a zero bias would spend the first epochs only
    learning the base rate; starting there lets early stopping judge the features, not the bias.
    """
    if loss == "bce":
        p = targets.float().mean(0).clamp(1e-4, 1 - 1e-4)
        prior = torch.log(p) - torch.log1p(-p)
    else:
        counts = torch.bincount(targets, minlength=linear.out_features).float()
        prior = torch.log((counts + 1.0) / (counts.sum() + linear.out_features))
    with torch.no_grad():
        linear.bias.copy_(prior)


@torch.no_grad()
def forward_chunked(model: nn.Module, inputs: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """Logits for all rows (along ``dim``), in chunks so a wide head never materialises [N, width] for the whole
    set at once."""
    was_training = model.training
    model.eval()
    n = inputs[0].shape[dim]
    chunks = [model(*(x.narrow(dim, i, min(_EVAL_CHUNK, n - i)) for x in inputs)) for i in range(0, n, _EVAL_CHUNK)]
    model.train(was_training)
    return torch.cat(chunks, dim=dim)


def logits_to_probabilities(logits: torch.Tensor, loss: Loss) -> np.ndarray:
    """Sigmoid per class for multi-label, softmax over classes for single-label."""
    probs = torch.sigmoid(logits) if loss == "bce" else torch.softmax(logits, dim=1)
    return probs.cpu().numpy()


def val_score(logits: torch.Tensor, targets: torch.Tensor, loss: Loss) -> float:
    """mAP (BCE) or top-1 accuracy (CE) in percent; logits suffice because both only depend on the ranking."""
    scores = logits.cpu().numpy()
    if loss == "bce":
        return mean_average_precision(scores, targets.cpu().numpy())
    return float(single_label_metrics(scores, targets.cpu().numpy())["top1"])


def check_val_targets(val_targets: torch.Tensor, loss: Loss) -> None:
    """Fail early when validation cannot rank epochs (mAP is NaN without any positive)."""
    if loss == "bce" and not bool(val_targets.any()):
        raise ValueError("validation targets have no positive label: mAP is undefined, early stopping impossible")


class Prepared(NamedTuple):
    """Cached features and labels as the loop wants them (see ``prepare``)."""

    inputs: list[torch.Tensor]
    val_inputs: list[torch.Tensor]
    targets: torch.Tensor
    val_targets: torch.Tensor
    stats: list[Stats]
    num_classes: int


def prepare(
    train_feats: Sequence[ArrayLike], train_y: ArrayLike, val_feats: Sequence[ArrayLike], val_y: ArrayLike, loss: Loss,
    standardize: bool,
) -> Prepared:  # fmt: skip
    """Feature arrays as float32 tensors standardised with their own train statistics, targets as ``loss`` wants
    them, and the number of classes (for "ce", enough for every index seen in train or val).

    The arrays describe the same samples (equal row counts per split), and each val array has its train array's
    width. Each raw float32 copy is dropped once standardised, so peak memory holds about one copy of the set.
    """
    _check_shapes(train_feats, val_feats)
    stats, inputs = [], []
    for x in train_feats:
        x = to_float32(x)
        stats.append(feature_stats(x, standardize))
        inputs.append(apply_stats(x, *stats[-1]))
    val_inputs = [apply_stats(to_float32(x), *st) for x, st in zip(val_feats, stats, strict=True)]
    y, vy = as_targets(train_y, loss, inputs[0].shape[0]), as_targets(val_y, loss, val_inputs[0].shape[0])
    num_classes = y.shape[1] if loss == "bce" else int(max(y.max(), vy.max())) + 1
    return Prepared(inputs, val_inputs, y, vy, stats, num_classes)


def _check_shapes(train_feats: Sequence[ArrayLike], val_feats: Sequence[ArrayLike]) -> None:
    if len(train_feats) != len(val_feats) or not train_feats:
        raise ValueError(
            f"need the same non-zero number of train and val inputs, got {len(train_feats)}/{len(val_feats)}"
        )
    for split, arrays in (("train", train_feats), ("val", val_feats)):
        if len({np.shape(x)[0] for x in arrays}) != 1:
            raise ValueError(f"{split} inputs have different row counts: {[np.shape(x)[0] for x in arrays]}")
    for i, (x, vx) in enumerate(zip(train_feats, val_feats, strict=True)):
        if np.shape(x)[1:] != np.shape(vx)[1:]:
            raise ValueError(f"input {i}: train has shape {np.shape(x)}, val {np.shape(vx)}")


# ---------------------------------------------------------------- the loop


class OneHead(nn.Module):
    """A head ``model(*[B, D_i]) -> [B, C]`` (the fusion head) as the K = 1 case of stacked heads."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.head(*(x[0] for x in inputs))[None]


def train_heads(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    targets: torch.Tensor,
    val_inputs: Sequence[torch.Tensor],
    val_targets: torch.Tensor,
    cfg: TrainOptions,
) -> list[TrainOutcome]:
    """Train K heads stacked on a leading axis in place; each ends holding its best-validation weights.

    ``model`` maps one [K, B, D_i] tensor per input to logits [K, B, C]; with K > 1 every parameter and buffer has
    K on its first axis (a single head of any shape is ``OneHead``). Inputs must already be float32 and
    standardised (``feature_stats``/``apply_stats``), targets come from ``as_targets``. The caller seeds module
    initialisation; this seeds shuffling and dropout from ``cfg.seed``.

    The loss is the sum of the K per-head losses, so each head gets exactly its own gradient and, AdamW being
    elementwise, its own update: head k follows the trajectory it would follow alone (same seed, same batches),
    up to float rounding, and stops early on its own. One step for K heads instead of K steps is the point: a
    probe on a few thousand rows is bound by per-step overhead, not arithmetic. The cosine schedule is stepped
    per optimiser step so that mini-batch and full-batch runs follow the same curve over ``cfg.epochs``.
    """
    check_val_targets(val_targets, cfg.loss)
    device = torch.device(cfg.device)
    model.to(device).train()
    k, n = inputs[0].shape[:2]
    rows_first = [x.transpose(0, 1).contiguous().to(device) for x in inputs]  # [N, K, D_i]: see _train_epoch
    val_inputs, targets = [x.to(device) for x in val_inputs], targets.to(device)
    shuffled = [torch.empty_like(x) for x in rows_first] if 0 < cfg.batch_size < n else None
    steps_per_epoch = 1 if cfg.batch_size == 0 else math.ceil(n / cfg.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    best = _BestWeights(model, k)
    with seeded(cfg.seed), torch_threads(cfg.num_threads):
        for epoch in range(1, cfg.epochs + 1):
            losses = _train_epoch(model, rows_first, targets, optimizer, schedule, cfg, generator, shuffled)
            if epoch % cfg.eval_every and epoch != cfg.epochs:
                continue
            scores = stacked_val_scores(forward_chunked(model, val_inputs, dim=1), val_targets, cfg.loss)
            if best.update(model, epoch, losses, scores, cfg.patience):
                break
    model.load_state_dict(best.state)
    model.eval()
    seconds = (time.perf_counter() - start) / k
    return [TrainOutcome(best.score[i], best.epoch[i], best.history[i], seconds) for i in range(k)]


class _BestWeights:
    """Per-head early stopping: each head's best score, its epoch and weights; a stopped head is frozen."""

    def __init__(self, model: nn.Module, k: int):
        self.k = k
        self.score, self.epoch, self.stopped = [-math.inf] * k, [0] * k, [False] * k
        self.history: list[list[HistoryRow]] = [[] for _ in range(k)]
        self.state = {name: v.detach().clone() for name, v in model.state_dict().items()}

    def update(self, model: nn.Module, epoch: int, losses: list[float], scores: list[float], patience: int) -> bool:
        """Record one evaluation; True once every head has stopped."""
        for i in (i for i in range(self.k) if not self.stopped[i]):
            self.history[i].append(HistoryRow(epoch, losses[i], scores[i]))
            if scores[i] > self.score[i]:
                self.score[i], self.epoch[i] = scores[i], epoch
                self._keep(model, i)
            elif epoch - self.epoch[i] >= patience:
                self.stopped[i] = True
        return all(self.stopped)

    def _keep(self, model: nn.Module, i: int) -> None:
        for name, v in model.state_dict().items():
            if self.k == 1:  # a single head's tensors need not have a leading K axis
                self.state[name].copy_(v)
            else:
                self.state[name][i] = v[i]


def _train_epoch(
    model: nn.Module,
    inputs: list[torch.Tensor],
    targets: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    cfg: TrainOptions,
    generator: torch.Generator,
    shuffled: list[torch.Tensor] | None,
) -> list[float]:
    """One pass over the train set for all K heads; returns each head's row-weighted mean loss.

    ``inputs`` are [N, K, D_i] (rows first), shuffled once per epoch into the ``shuffled`` buffers, so every batch
    is a contiguous slice: gathering rows of a [K, N, D] tensor per step cost more than the heads, and a fresh
    allocation per epoch cost more than reusing one.
    """
    n = inputs[0].shape[0]
    size = cfg.batch_size if shuffled is not None else n
    if shuffled is not None:
        order = torch.randperm(n, generator=generator).to(targets.device)
        inputs = [torch.index_select(x, 0, order, out=buf) for x, buf in zip(inputs, shuffled, strict=True)]
        targets = targets[order]
    total, rows = torch.zeros(inputs[0].shape[1], dtype=torch.float64), 0
    for start in range(0, n, size):
        batch, batch_targets = [x[start : start + size].transpose(0, 1) for x in inputs], targets[start : start + size]
        per_head = _stacked_loss(model(*batch), batch_targets, cfg.loss)
        optimizer.zero_grad(set_to_none=True)
        per_head.sum().backward()
        optimizer.step()
        schedule.step()
        total += per_head.detach().double().cpu() * batch_targets.shape[0]
        rows += batch_targets.shape[0]
    return (total / rows).tolist()


def _stacked_loss(logits: torch.Tensor, targets: torch.Tensor, loss: Loss) -> torch.Tensor:
    """Per-head mean loss [K] of logits [K, B, C]: what each head's own loss function would give."""
    if loss == "bce":
        target = targets.expand(logits.shape[0], *targets.shape)
        return nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=(1, 2))
    k, b, c = logits.shape
    flat = nn.functional.cross_entropy(logits.reshape(k * b, c), targets.repeat(k), reduction="none")
    return flat.reshape(k, b).mean(dim=1)


def stacked_val_scores(logits: torch.Tensor, targets: torch.Tensor, loss: Loss) -> list[float]:
    """``val_score`` of each head; for mAP the K heads' classes are ranked in one call (one AP per column)."""
    k, n, c = logits.shape
    if loss == "ce":
        return [val_score(head, targets, loss) for head in logits]
    scores = logits.permute(1, 0, 2).reshape(n, k * c).cpu().numpy()
    ap = average_precision_per_class(scores, np.tile(targets.cpu().numpy(), (1, k))).reshape(k, c)
    return [nanmean_percent(row) for row in ap]


# ---------------------------------------------------------------- trained heads and their files


@dataclass
class TrainedHead:
    """What every trained head carries besides its weights and feature statistics: the loss it was trained with
    (it decides sigmoid or softmax) and how training went. Probe and fusion results extend it."""

    loss: Loss
    best_score: float
    best_epoch: int
    history: list[HistoryRow]
    seconds: float

    def probabilities(self, model: nn.Module, feats: Sequence[ArrayLike], stats: Sequence[Stats]) -> np.ndarray:
        """Class probabilities [N, C] of ``model`` on raw features, standardised with their train statistics."""
        if len(feats) != len(stats):
            raise ValueError(f"expected {len(stats)} feature arrays, got {len(feats)}")
        inputs = [apply_stats(to_float32(x), mean, std) for x, (mean, std) in zip(feats, stats, strict=True)]
        return logits_to_probabilities(forward_chunked(model.to("cpu"), inputs), self.loss)

    def save_with(self, path: str | os.PathLike, tensors: dict[str, torch.Tensor], **info: Any) -> None:
        """One safetensors file, written atomically; the loss, training summary and ``info`` go in its metadata
        (safetensors metadata must be strings, so as JSON)."""
        summary = {"loss": self.loss, "best_score": self.best_score, "best_epoch": self.best_epoch,
                   "history": [list(row) for row in self.history], "seconds": self.seconds}  # fmt: skip
        contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        atomic_write_bytes(path, save(contiguous, metadata={"difffeat": json.dumps({**info, **summary})}))

    @staticmethod
    def read_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
        """Inverse of :meth:`save_with`: (tensors, the extra info, ``TrainedHead`` fields as keywords)."""
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
            info = json.loads(f.metadata()["difffeat"])
        fields = {
            "loss": info.pop("loss"),
            "best_score": float(info.pop("best_score")),
            "best_epoch": int(info.pop("best_epoch")),
            "history": [HistoryRow(int(e), float(l), float(s)) for e, l, s in info.pop("history")],
            "seconds": float(info.pop("seconds")),
        }
        return tensors, info, fields
