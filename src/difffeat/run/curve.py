"""The label-efficiency curve: test mAP of every head of a finished run, refitted on fewer labeled rows.

Pretrained features earn their keep when labels are few: a curve over labeled-set sizes shows whether their lead
over pixels and random-init features grows as labels get fewer, which one table at one size cannot. Each point
refits the same head (same inputs, cells and recipe as ``step_fit``) on the first ``n`` train rows (scenes are
independent draws, so a prefix is a random subset, and the subsets are nested) and keeps the full validation
split for model selection. The cells stay those chosen with all train labels: the curve isolates how the features
respond to fewer labels, not how the search does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from difffeat.heads.fusion import fit_fusion
from difffeat.metrics import multilabel_metrics, single_label_metrics
from difffeat.run.pipeline import Experiment, _head_specs
from difffeat.run.summary import CURVE_FILE, chosen_cells
from difffeat.utils.io import atomic_write_json
from difffeat.utils.progress import progress

DEFAULT_SIZES = (100, 300, 1000, 5000)


def label_efficiency(exp: Experiment, sizes: Sequence[int] = DEFAULT_SIZES) -> dict[str, dict[str, float | None]]:
    """``{head: {str(n): test mAP (top-1 for single-label data) or None when the train split has fewer than n
    rows}}``, written to ``label_efficiency.json`` in the run folder; points already there are not refitted."""
    path = exp.out / CURVE_FILE
    done: dict[str, dict[str, float | None]] = json.loads(path.read_text()) if path.exists() else {}
    specs = _head_specs(exp, chosen_cells(exp.out))
    y_train, y_val, y_test = exp.targets("train"), exp.targets("val"), exp.targets("test")
    for name, (inputs, overrides) in progress(specs.items(), desc="label-efficiency curve"):
        row = done.setdefault(name, {})
        todo = [n for n in sizes if str(n) not in row]
        if not todo:
            continue
        train, val, test = ([get(s) for get in inputs] for s in ("train", "val", "test"))
        for n in todo:
            if n > len(y_train):
                row[str(n)] = None
                continue
            head = fit_fusion([x[:n] for x in train], y_train[:n], val, y_val, exp.fusion_options(**overrides))
            row[str(n)] = _score(exp, head.predict(test), y_test)
        atomic_write_json(path, done)
    return done


def _score(exp: Experiment, scores, y_test) -> float:
    if exp.data.single_label:
        return single_label_metrics(scores, y_test)["top1"]
    return multilabel_metrics(scores, y_test, ignore=exp.ignore("test"))["mAP"]
