"""Linear probe on cached features, and the sweep over (block, timestep) that picks where to read features.

A probe is a single ``nn.Linear`` on standardised features, trained with the shared recipe of ``difffeat._train``
(BCE or CE, AdamW, cosine, early stopping on the validation score). Its validation score is how the paper ranks
(block, t) cells, so the sweep is just "one probe per cell", made resumable because a full grid means extracting
and fitting dozens of cells.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from difffeat._train import (
    ArrayLike,
    HistoryRow,
    Loss,
    TrainConfig,
    TrainOutcome,
    apply_stats,
    as_targets,
    feature_stats,
    forward_chunked,
    init_prior_bias,
    load_tensors,
    logits_to_probabilities,
    outcome_from_info,
    outcome_info,
    save_tensors,
    seeded,
    to_float32,
    train_head,
)
from difffeat.progress import progress as progress_bar

__all__ = ["HistoryRow", "ProbeConfig", "ProbeResult", "SweepResult", "SweepRow", "fit_probe", "run_sweep"]


@dataclass
class ProbeConfig(TrainConfig):
    """The probe's training recipe: exactly the shared one (see ``TrainConfig`` for the fields).

    Mini-batches (default 1024) rather than full batch: on synthetic 20k x 1152 x 80 features, 1024 peaked at
    epoch ~70, 4096 at ~170, and full batch was still short of that mAP after 200 epochs; with few samples per
    feature, full-batch Adam also moves noise directions as fast as signal ones, which mini-batch noise damps.
    """


@dataclass
class ProbeResult:
    """A trained probe: ``linear`` applied to ``(x - mean) / std``, plus how training went.

    Attributes:
        linear: the head, holding the best-validation weights.
        mean, std: per-feature train statistics (zeros/ones when not standardised).
        loss: "bce" or "ce"; decides sigmoid vs softmax in ``predict``.
        best_score: validation mAP (bce) or top-1 (ce) in percent, at ``best_epoch`` (1-based).
        history: one row per evaluated epoch.
        seconds: training wall time.
    """

    linear: nn.Linear
    mean: torch.Tensor
    std: torch.Tensor
    loss: Loss
    best_score: float
    best_epoch: int
    history: list[HistoryRow]
    seconds: float

    @torch.no_grad()
    def predict(self, x: ArrayLike) -> np.ndarray:
        """Class probabilities [N, C] (sigmoid for bce, softmax for ce), standardising with the train statistics."""
        features = apply_stats(to_float32(x), self.mean, self.std)
        self.linear.to("cpu")
        return logits_to_probabilities(forward_chunked(self.linear, [features]), self.loss)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All tensors needed to rebuild the probe."""
        return {"weight": self.linear.weight, "bias": self.linear.bias, "mean": self.mean, "std": self.std}

    def save(self, path: str | os.PathLike) -> None:
        """Save as one safetensors file; the training summary travels in its metadata."""
        outcome = TrainOutcome(self.best_score, self.best_epoch, self.history, self.seconds)
        save_tensors(path, self.state_dict(), {"loss": self.loss, **outcome_info(outcome)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> ProbeResult:
        """Inverse of ``save``."""
        tensors, info = load_tensors(path)
        n_classes, dim = tensors["weight"].shape
        linear = nn.Linear(dim, n_classes)
        linear.load_state_dict({"weight": tensors["weight"], "bias": tensors["bias"]})
        outcome = outcome_from_info(info)
        return cls(linear.eval(), tensors["mean"], tensors["std"], info["loss"], **vars(outcome))


def fit_probe(
    train_x: ArrayLike, train_y: ArrayLike, val_x: ArrayLike, val_y: ArrayLike, cfg: ProbeConfig | None = None
) -> ProbeResult:
    """Fit a linear probe with early stopping on validation; deterministic for a given ``cfg.seed``.

    Args:
        train_x, val_x: features [N, D] (numpy, memmap float16/float32, or tensor); converted once to float32.
        train_y, val_y: multi-hot [N, C] for ``loss="bce"``, int class indices [N] for ``loss="ce"``.
        cfg: training recipe; defaults to ``ProbeConfig()``.
    """
    cfg = cfg or ProbeConfig()
    x, vx = to_float32(train_x), to_float32(val_x)
    if x.shape[1] != vx.shape[1]:
        raise ValueError(f"train features have {x.shape[1]} dims, val features {vx.shape[1]}")
    y, vy = as_targets(train_y, cfg.loss, x.shape[0]), as_targets(val_y, cfg.loss, vx.shape[0])
    n_classes = y.shape[1] if cfg.loss == "bce" else int(max(y.max(), vy.max())) + 1
    mean, std = feature_stats(x, cfg.standardize)
    with seeded(cfg.seed):
        linear = nn.Linear(x.shape[1], n_classes)
    init_prior_bias(linear, y, cfg.loss)
    outcome = train_head(linear, [apply_stats(x, mean, std)], y, [apply_stats(vx, mean, std)], vy, cfg)
    return ProbeResult(linear.cpu(), mean, std, cfg.loss, **vars(outcome))


# ---------------------------------------------------------------- sweep

FeatureSource = Callable[[int, int, str], ArrayLike]
_CSV_FIELDS = ("block", "t", "val_score", "best_epoch", "seconds")


@dataclass(frozen=True)
class SweepRow:
    """One probed (block, t) cell."""

    block: int
    t: int
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
    cfg: ProbeConfig | None = None,
    csv_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> SweepResult:
    """Fit one probe per (block, t) on ``get_features(block, t, "train"|"val")`` and record its validation score.

    With ``csv_path`` the sweep is resumable: cells already in the CSV are not recomputed, and each new cell is
    appended (and flushed) as soon as it is done, so a killed sweep loses at most the cell in progress. The CSV
    does not record the config: delete it when the recipe or the labels change.
    """
    cfg = cfg or ProbeConfig()
    blocks, timesteps = [int(b) for b in blocks], [int(t) for t in timesteps]
    done = _read_rows(Path(csv_path)) if csv_path is not None else {}
    todo = [(b, t) for b in blocks for t in timesteps if (b, t) not in done]
    result = SweepResult(blocks, timesteps, [done[b, t] for b in blocks for t in timesteps if (b, t) in done])
    bar = progress_bar(todo, desc="probe sweep", enabled=progress and bool(todo), unit="cell")
    for block, t in bar:
        row = _probe_cell(get_features, block, t, train_y, val_y, cfg)
        result.rows.append(row)
        if csv_path is not None:
            _append_row(Path(csv_path), row)
        best_block, best_t, best_score = result.best()
        bar.set_postfix_str(f"last {row.val_score:.2f}, best {best_score:.2f} @ ({best_block}, {best_t})")
    return result


def _probe_cell(
    get_features: FeatureSource, block: int, t: int, train_y: ArrayLike, val_y: ArrayLike, cfg: ProbeConfig
) -> SweepRow:
    start = time.perf_counter()
    probe = fit_probe(get_features(block, t, "train"), train_y, get_features(block, t, "val"), val_y, cfg)
    return SweepRow(block, t, probe.best_score, probe.best_epoch, time.perf_counter() - start)


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
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(_CSV_FIELDS)
        writer.writerows(_csv_values(row) for row in rows.values())
    os.replace(tmp, path)
    return rows


def _parse_row(record: dict[str, str | None]) -> SweepRow | None:
    """A CSV record as a row, or None when it is incomplete (a line cut short by a kill)."""
    try:
        row = SweepRow(
            int(record["block"]),
            int(record["t"]),
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
