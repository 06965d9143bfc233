"""Linear probe on cached features, and the sweep over (block, timestep) that picks where to read features.

A probe is a single ``nn.Linear`` on standardised features, trained with the shared recipe of ``difffeat.heads.train``
(BCE or CE, AdamW, cosine, early stopping on the validation score). Its validation score is how the paper ranks
(block, t) cells, so the sweep is just "one probe per cell", made resumable because a full grid means extracting
and fitting dozens of cells.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from difffeat.heads.train import (
    ArrayLike,
    HistoryRow,
    TrainedHead,
    TrainOptions,
    init_prior_bias,
    prepare,
    train_heads,
)
from difffeat.utils.io import atomic_write_text
from difffeat.utils.progress import progress as progress_bar
from difffeat.utils.runtime import seeded
from difffeat.utils.times import as_time

__all__ = [
    "HistoryRow", "ProbeOptions", "ProbeResult", "SweepResult", "SweepRow", "fit_probe", "fit_probes", "run_sweep"
]  # fmt: skip


@dataclass
class ProbeOptions(TrainOptions):
    """A linear probe's training recipe: the shared one with its defaults; what ``fit_probe`` takes and what the run
    config's ``probe:`` section holds."""


@dataclass
class ProbeResult(TrainedHead):
    """A trained probe: ``linear`` applied to ``(x - mean) / std``, plus how training went (``TrainedHead``).

    Attributes:
        linear: the head, holding the best-validation weights.
        mean, std: per-feature train statistics (zeros/ones when not standardised).
    """

    linear: nn.Linear
    mean: torch.Tensor
    std: torch.Tensor

    @torch.no_grad()
    def predict(self, x: ArrayLike) -> np.ndarray:
        """Class probabilities [N, C] (sigmoid for bce, softmax for ce), standardising with the train statistics."""
        return self.probabilities(self.linear, [x], [(self.mean, self.std)])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All tensors needed to rebuild the probe."""
        return {"weight": self.linear.weight, "bias": self.linear.bias, "mean": self.mean, "std": self.std}

    def save(self, path: str | os.PathLike) -> None:
        """Save as one safetensors file; the training summary travels in its metadata."""
        self.save_with(path, self.state_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> ProbeResult:
        """Inverse of ``save``."""
        tensors, _, summary = cls.read_file(path)
        n_classes, dim = tensors["weight"].shape
        linear = nn.Linear(dim, n_classes)
        linear.load_state_dict({"weight": tensors["weight"], "bias": tensors["bias"]})
        return cls(linear=linear.eval(), mean=tensors["mean"], std=tensors["std"], **summary)


def fit_probe(
    train_x: ArrayLike, train_y: ArrayLike, val_x: ArrayLike, val_y: ArrayLike, cfg: ProbeOptions | None = None
) -> ProbeResult:
    """Fit a linear probe with early stopping on validation; deterministic for a given ``cfg.seed``.

    Args:
        train_x, val_x: features [N, D] (numpy, memmap float16/float32, or tensor); converted once to float32.
        train_y, val_y: multi-hot [N, C] for ``loss="bce"``, int class indices [N] for ``loss="ce"``.
        cfg: training recipe; defaults to ``ProbeOptions()``.
    """
    return fit_probes([train_x], train_y, [val_x], val_y, cfg)[0]


# ---------------------------------------------------------------- several probes at once


class StackedLinear(nn.Module):
    """K independent ``nn.Linear(dim, classes)`` heads on a leading axis: [K, B, D] -> [K, B, C] in one bmm."""

    def __init__(self, linear: nn.Linear, k: int):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().repeat(k, 1, 1))
        self.bias = nn.Parameter(linear.bias.detach().repeat(k, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias[:, None, :], x, self.weight.transpose(1, 2))

    def head(self, i: int) -> nn.Linear:
        linear = nn.utils.skip_init(nn.Linear, self.weight.shape[2], self.weight.shape[1])  # no global RNG draw
        linear.load_state_dict({"weight": self.weight[i].detach().clone(), "bias": self.bias[i].detach().clone()})
        return linear.eval()


def fit_probes(
    train_xs: Sequence[ArrayLike],
    train_y: ArrayLike,
    val_xs: Sequence[ArrayLike],
    val_y: ArrayLike,
    cfg: ProbeOptions | None = None,
) -> list[ProbeResult]:
    """``fit_probe`` on each of several feature sets of one width (same rows, same labels), trained together.

    Each probe gets the initialisation, batches, updates and early stopping it would get alone (up to float
    rounding), but the K probes take one optimiser step per batch instead of K: a probe on a few thousand rows
    costs per-step overhead more than arithmetic (``benchmarks/sweep_probes.py`` measures the difference).
    """
    cfg = (cfg or ProbeOptions()).for_targets(train_y)
    data = prepare(train_xs, train_y, val_xs, val_y, cfg.loss, cfg.standardize)
    if len({x.shape[1] for x in data.inputs}) != 1:
        raise ValueError(f"feature sets differ in width: {sorted({x.shape[1] for x in data.inputs})}")
    with seeded(cfg.seed):
        linear = nn.Linear(data.inputs[0].shape[1], data.num_classes)  # the init fit_probe draws, shared by all
    init_prior_bias(linear, data.targets, cfg.loss)
    stacked = StackedLinear(linear, len(data.inputs))
    train, val = torch.stack(data.inputs), torch.stack(data.val_inputs)
    outcomes = train_heads(stacked, [train], data.targets, [val], data.val_targets, cfg)
    stacked.cpu()
    return [
        ProbeResult(linear=stacked.head(i), mean=mean, std=std, loss=cfg.loss, **vars(outcome))
        for i, ((mean, std), outcome) in enumerate(zip(data.stats, outcomes, strict=True))
    ]


# ---------------------------------------------------------------- sweep

FeatureSource = Callable[[int, int, str], ArrayLike]
_CSV_FIELDS = ("block", "t", "val_score", "best_epoch", "seconds")
SWEEP_GROUP_BYTES = 2**30  # train features of the cells fitted together; the sweep holds about twice this


@dataclass(frozen=True)
class SweepRow:
    """One probed (block, t) cell."""

    block: int
    t: int | float  # in the backbone's time convention
    val_score: float
    best_epoch: int
    seconds: float


@dataclass
class SweepResult:
    """Probe scores over a (block, t) grid; ``scores[i, j]`` is for ``blocks[i]``, ``timesteps[j]`` (NaN if missing)."""

    blocks: list[int]
    timesteps: list[int]
    rows: list[SweepRow] = field(default_factory=list)

    @property
    def scores(self) -> np.ndarray:
        grid = np.full((len(self.blocks), len(self.timesteps)), np.nan)
        for row in self.rows:
            grid[self.blocks.index(row.block), self.timesteps.index(row.t)] = row.val_score
        return grid

    def best(self) -> tuple[int, int, float]:
        """(block, t, score) of the highest-scoring cell."""
        scores = self.scores
        if np.isnan(scores).all():
            raise ValueError("sweep has no scored cell")
        i, j = np.unravel_index(np.nanargmax(scores), scores.shape)
        return self.blocks[i], self.timesteps[j], float(scores[i, j])


def run_sweep(
    get_features: FeatureSource,
    blocks: Sequence[int],
    timesteps: Sequence[int],
    train_y: ArrayLike,
    val_y: ArrayLike,
    cfg: ProbeOptions | None = None,
    csv_path: str | os.PathLike | None = None,
    progress: bool = True,
    group_bytes: int = SWEEP_GROUP_BYTES,
) -> SweepResult:
    """Fit one probe per (block, t) on ``get_features(block, t, "train"|"val")`` and record its validation score.

    Cells are fitted together (``fit_probes``) in groups whose float32 train features fit in ``group_bytes``.

    With ``csv_path`` the sweep is resumable: cells already in the CSV are not recomputed, and each new cell is
    appended (and flushed) as soon as it is done, so a killed sweep loses at most the cell in progress. The CSV
    does not record the config: delete it when the recipe or the labels change.
    """
    cfg = cfg or ProbeOptions()
    blocks, timesteps = [int(b) for b in blocks], [as_time(t) for t in timesteps]
    done = _read_rows(Path(csv_path)) if csv_path is not None else {}
    todo = [(b, t) for b in blocks for t in timesteps if (b, t) not in done]
    result = SweepResult(blocks, timesteps, [done[b, t] for b in blocks for t in timesteps if (b, t) in done])
    bar = progress_bar(total=len(todo), desc="probe sweep", enabled=progress and bool(todo), unit="cell")
    for group in _groups(todo, get_features, group_bytes):
        for row in _probe_cells(get_features, group, train_y, val_y, cfg):
            result.rows.append(row)
            if csv_path is not None:
                _append_row(Path(csv_path), row)
        best_block, best_t, best_score = result.best()
        bar.update(len(group))
        bar.set_postfix_str(f"last {row.val_score:.2f}, best {best_score:.2f} @ ({best_block}, {best_t})")
    bar.close()
    return result


def _groups(cells: list[tuple[int, int]], get_features: FeatureSource, group_bytes: int) -> list[list]:
    """Cells in order, cut into groups whose float32 train features stay within ``group_bytes`` together."""
    if not cells:
        return []
    rows, dim = np.shape(get_features(*cells[0], "train"))
    per_group = max(1, group_bytes // max(1, rows * dim * 4))
    return [cells[i : i + per_group] for i in range(0, len(cells), per_group)]


def _probe_cells(
    get_features: FeatureSource, cells: list[tuple[int, int]], train_y: ArrayLike, val_y: ArrayLike, cfg: ProbeOptions
) -> list[SweepRow]:
    start = time.perf_counter()
    train = [get_features(b, t, "train") for b, t in cells]
    val = [get_features(b, t, "val") for b, t in cells]
    probes = fit_probes(train, train_y, val, val_y, cfg)
    seconds = (time.perf_counter() - start) / len(cells)
    return [SweepRow(b, t, p.best_score, p.best_epoch, seconds) for (b, t), p in zip(cells, probes, strict=True)]


def _read_rows(path: Path) -> dict[tuple[int, int], SweepRow]:
    """Rows already in the CSV, rewriting it without any line a killed run left truncated.

    Rewriting (atomically) matters: appending after a truncated last line would glue the next row onto it.
    """
    if not path.exists():
        return {}
    rows: dict[tuple[int, int], SweepRow] = {}
    with path.open(newline="") as f:
        for record in csv.DictReader(f):
            row = _parse_row(record)
            if row is not None:
                rows[row.block, row.t] = row
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(_CSV_FIELDS)
    writer.writerows(_csv_values(row) for row in rows.values())
    atomic_write_text(path, text.getvalue())
    return rows


def _parse_row(record: dict[str, str | None]) -> SweepRow | None:
    """A CSV record as a row, or None when it is incomplete (a line cut short by a kill)."""
    try:
        row = SweepRow(
            int(record["block"]),
            as_time(record["t"]),
            float(record["val_score"]),
            int(record["best_epoch"]),
            float(record["seconds"]),
        )
    except (TypeError, ValueError, KeyError):
        return None
    return None if math.isnan(row.val_score) else row


def _csv_values(row: SweepRow) -> list[str]:
    return [str(row.block), str(row.t), repr(row.val_score), str(row.best_epoch), f"{row.seconds:.3f}"]


def _append_row(path: Path, row: SweepRow) -> None:
    """Append one row and force it to disk, writing the header first for a new file."""
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(_CSV_FIELDS)
        writer.writerow(_csv_values(row))
        f.flush()
        os.fsync(f.fileno())
