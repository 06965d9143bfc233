"""Speed of difffeat.metrics.multilabel_metrics against a per-class sklearn AP loop (a benchmark, not a test).

Run: ``python benchmarks/metrics_speed.py [--samples 100000] [--classes 500]``. Both run on the same random
data in the same process, so the ratio is meaningful even on a busy machine; the absolute times are not.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import average_precision_score

from difffeat.metrics import multilabel_metrics


def _timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def _sklearn_map(scores: np.ndarray, targets: np.ndarray) -> float:
    """The usual evaluation loop: one sklearn call per class, mean over classes with a positive, in percent."""
    present = np.flatnonzero(targets.any(axis=0))
    return 100.0 * float(np.mean([average_precision_score(targets[:, c], scores[:, c]) for c in present]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=500)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    scores = rng.random((args.samples, args.classes), dtype=np.float32)
    targets = (rng.random((args.samples, args.classes)) < 0.05).astype(np.int8)

    ours_s, ours = _timed(multilabel_metrics, scores, targets, top_k=3)
    sklearn_s, sklearn_map = _timed(_sklearn_map, scores, targets)
    print(f"data: {args.samples} samples x {args.classes} classes")
    print(f"difffeat multilabel_metrics (mAP + CP..OF1 + top-3): {ours_s:8.2f} s   mAP = {ours['mAP']:.6f}")
    print(f"sklearn average_precision_score loop (mAP only):     {sklearn_s:8.2f} s   mAP = {sklearn_map:.6f}")
    print(f"speed-up: {sklearn_s / ours_s:.1f}x   |mAP difference| = {abs(ours['mAP'] - sklearn_map):.2e}")


if __name__ == "__main__":
    main()
