"""Wall time of ``difffeat demo`` step by step, against the 5-minute target (a benchmark, not a test).

Run: ``python benchmarks/demo_time.py [--quick] [--out DIR]``. It runs the demo's configuration in a fresh folder
(cold: the demo data is generated, every feature extracted, every head fitted), then again in the same folder
(warm: every step finds its outputs and is skipped), and prints each step's seconds, the total as a ratio of the
300 s target, and the warm rerun as a ratio of the cold run.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from difffeat.run.demo import demo_config
from difffeat.run.pipeline import (
    Experiment,
    extract_grid,
    step_curve,
    step_evaluate,
    step_fit,
    step_search,
    step_sweep,
)
from difffeat.run.summary import build_report

TARGET_S = 300.0


def timed_run(out: Path, quick: bool) -> dict[str, float]:
    """The steps ``difffeat demo`` runs (``pipeline.run`` in grid mode), each timed."""
    times: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        times[name] = now - clock
        clock = now

    start = clock
    exp = Experiment(demo_config(str(out), quick=quick))
    _ = exp.data
    lap("demo data")
    extract_grid(exp)
    lap("extract grid (train, val)")
    tables = step_sweep(exp)
    lap("sweep probes")
    step_search(exp, tables)
    lap("local search")
    heads = step_fit(exp)
    lap("fit heads (fused, unimodal, ablations, baselines)")
    step_evaluate(exp, heads)
    lap("evaluate on test")
    step_curve(exp, exp.cfg.fusion.curve_sizes)
    lap("label-efficiency curve (every head refitted)")
    build_report(exp, seconds=time.perf_counter() - start)
    lap("report (heatmaps, t-SNE, clustering)")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the reduced demo (demo --quick)")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: a temporary one, removed)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="difffeat-demo-")) / "demo"
    shutil.rmtree(out, ignore_errors=True)
    cold = timed_run(out, args.quick)
    warm = timed_run(out, args.quick)
    print(f"\n{'step':<52} {'cold s':>8} {'warm s':>8}")
    for name in cold:
        print(f"{name:<52} {cold[name]:8.1f} {warm[name]:8.1f}")
    total_cold, total_warm = sum(cold.values()), sum(warm.values())
    print(f"{'total':<52} {total_cold:8.1f} {total_warm:8.1f}")
    print(f"cold run / {TARGET_S:.0f} s target: {total_cold / TARGET_S:.2f}")
    print(f"warm rerun / cold run: {total_warm / total_cold:.3f}")
    if args.out is None:
        shutil.rmtree(out.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
