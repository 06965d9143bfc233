"""A probe sweep fitted one cell at a time against all cells fitted together (a benchmark, not a test).

Run: ``python benchmarks/sweep_probes.py [--cells 36] [--rows 5000] [--dim 128]``. Demo-sized by default: 36
cells of 5 000 train / 1 000 val rows, 13 classes, the demo's probe recipe. The cells' features share a hidden
signal at different strengths, so probes stop at different epochs. Both sweeps run in this process on the same
features; the script prints both times, their ratio, and the largest score difference (float rounding only).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from difffeat.heads.probe import ProbeOptions, run_sweep


def make_cells(n_cells: int, rows: int, val_rows: int, dim: int, classes: int = 13, seed: int = 0):
    """Features per cell = signal (a linear map of a latent that sets the labels) at a cell-specific strength."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(rows + val_rows, 32))
    labels = (latent @ rng.normal(size=(32, classes)) > 1.5).astype(np.float32)
    feats = {}
    for i in range(n_cells):
        strength = 0.2 + 0.8 * i / max(1, n_cells - 1)
        x = strength * latent @ rng.normal(size=(32, dim)) + rng.normal(size=(rows + val_rows, dim))
        feats[i] = (x * rng.lognormal(0, 1, size=dim)).astype(np.float32)
    return feats, labels[:rows], labels[rows:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=36)
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--val-rows", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=128)
    args = ap.parse_args()
    feats, y, vy = make_cells(args.cells, args.rows, args.val_rows, args.dim)

    def get(block: int, t: int, split: str) -> np.ndarray:
        x = feats[block]  # one block per cell, t unused
        return x[: args.rows] if split == "train" else x[args.rows :]

    cfg = ProbeOptions(epochs=200, lr=3e-2, patience=20)  # the demo's probe recipe, torch's default threads
    blocks = list(range(args.cells))
    times, results = {}, {}
    for name, group_bytes in (("one at a time", 1), ("together", 2**30)):
        start = time.perf_counter()
        results[name] = run_sweep(get, blocks, [0], y, vy, cfg, progress=False, group_bytes=group_bytes)
        times[name] = time.perf_counter() - start
        print(f"{name:>14}: {times[name]:6.1f} s")
    diff = np.abs(results["one at a time"].scores - results["together"].scores).max()
    print(f"speed-up: {times['one at a time'] / times['together']:.2f}x; largest val mAP difference {diff:.2e}")


if __name__ == "__main__":
    main()
