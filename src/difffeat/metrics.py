"""Evaluation metrics for multi-label and single-label classification.

All per-sample work is vectorised (numpy, with torch for the transpose and top-k); Python loops run over classes
only, because a per-class ``sklearn.metrics.average_precision_score`` loop re-sorts and re-validates per class
and dominates the evaluation of a large label set (``benchmarks/metrics_speed.py`` compares the two).

Conventions follow the literature so numbers are comparable with published tables:

* **AP** is the non-interpolated average precision of ``sklearn.metrics.average_precision_score``,
  including its handling of tied scores: a run of equal scores is a single threshold, so the order of
  tied samples cannot change the result. mAP averages AP over classes with at least one positive; the
  others are reported by name instead of being silently dropped or counted as 0.
* **CP/CR/CF1/OP/OR/OF1** follow ML-GCN's reference evaluation (``AveragePrecisionMeter.evaluation`` and
  ``overall_topk`` in megvii-research/ML-GCN ``util.py``): per class Nc (correct), Np (predicted), Ng
  (ground truth); OP = sum Nc / sum Np, OR = sum Nc / sum Ng, CP = mean_c Nc/Np, CR = mean_c Nc/Ng, and
  CF1/OF1 are harmonic means of the (already averaged) precision and recall, *not* means of per-class F1.
  A label is predicted when ``score >= threshold`` (ML-GCN: ``logit >= 0``, i.e. probability >= 0.5).
  Deviations from ML-GCN, which only matter when a class has no positive or nothing is predicted:

  - ML-GCN sets Np = 1 where Np = 0 (so that class's precision is 0); we do the same (precision 0).
  - ML-GCN averages CP and CR over *all* classes, so any class with Ng = 0 makes CR NaN. We average CP and CR
    over the classes with Ng > 0, the same classes as mAP. With every class present (COCO, VOC test sets)
    this is identical to ML-GCN.
  - OP is 0, not NaN, when nothing at all is predicted, and an F1 is 0, not NaN, when its precision and recall
    are both 0. CP, CR, CF1, OR and OF1 are NaN only when no (non-ignored) positive exists at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

_AP_CHUNK = 64  # classes transposed and sorted at once: bounds temporaries to a few N x 64 arrays
_VOC07_RECALL_LEVELS = np.arange(0.0, 1.1, 0.1)  # built exactly as VOC devkit's voc_ap does, float error included

Interpolation = Literal["11point", "envelope", False]


# ----------------------------------------------------------------------------------------------------- input checks


def _to_numpy(name: str, array: object) -> np.ndarray:
    """Accept numpy arrays, lists and torch tensors (also on GPU or requiring grad) alike."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        array = (array.float() if array.dtype in (torch.float16, torch.bfloat16) else array).numpy()
    array = np.asarray(array)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ValueError(f"{name} must be 1-D or 2-D [N, C], got shape {array.shape}")
    return array


def _check_scores(scores: object) -> np.ndarray:
    """Contiguous float scores: float32 stays float32 (exact for ranking and thresholds, half the memory), anything
    else becomes float64. Contiguity also lets torch wrap the array (it rejects negative strides, e.g. ``x[::-1]``).
    """
    scores = _to_numpy("scores", scores)
    scores = np.ascontiguousarray(scores, dtype=np.float32 if scores.dtype == np.float32 else np.float64)
    if scores.shape[0] == 0:
        raise ValueError(f"need at least one sample, got scores of shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN; a NaN has no rank, so AP and thresholded counts would be undefined")
    return scores


def _check_multilabel(
    scores: object, targets: object, ignore: object | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate inputs and return (scores, targets, keep); errors name both shapes so mismatches are traceable."""
    scores = _check_scores(scores)
    targets = _to_numpy("targets", targets)
    if scores.shape != targets.shape:
        raise ValueError(f"scores shape {scores.shape} does not match targets shape {targets.shape}")
    if targets.dtype != bool and not ((targets == 0) | (targets == 1)).all():
        raise ValueError("targets must be in {0, 1}; mark VOC 'difficult' labels with the `ignore` mask instead")
    if ignore is None:
        return scores, targets.astype(bool), np.ones(scores.shape, dtype=bool)
    ignore = _to_numpy("ignore", ignore)
    if ignore.shape != scores.shape:
        raise ValueError(f"ignore shape {ignore.shape} does not match scores shape {scores.shape}")
    return scores, targets.astype(bool), ~ignore.astype(bool)


# --------------------------------------------------------------------------------------------- average precision


def _transposed(array: np.ndarray) -> np.ndarray:
    """Contiguous [C, N] copy of an [N, C] array, so each class is one contiguous row.

    Done in torch because its blocked transpose is several times faster than numpy's on 100k x 500 inputs.
    """
    return torch.from_numpy(array).t().contiguous().numpy()


def _class_ap(
    positive_scores: np.ndarray, sorted_scores: np.ndarray, n_kept: int, interpolation: Interpolation
) -> float:
    """AP of one class from its positives' scores and all its kept scores sorted ascending (NaN-padded at the end).

    sklearn's AP sums, over thresholds, (recall gained) x precision, where a run of tied scores is one threshold.
    Each positive gains 1/P recall at the threshold equal to its own score, so AP is the mean over positives of
    precision at "score >= that positive's score": #positives at or above / #samples at or above. Counting with
    ``searchsorted(side="left")`` includes every tie, which is exactly sklearn's tie rule, with no argsort/gather.
    """
    if positive_scores.size == 0:
        return float("nan")
    positive_scores = np.sort(positive_scores)
    n_pos = positive_scores.size
    pos_at_or_above = n_pos - np.searchsorted(positive_scores, positive_scores, side="left")
    all_at_or_above = n_kept - np.searchsorted(sorted_scores, positive_scores, side="left")
    precision = pos_at_or_above / all_at_or_above  # ascending score order, i.e. descending recall
    if interpolation == "envelope":
        # Best precision at any recall >= this one; only thresholds at positives can hold that maximum.
        return float(np.maximum.accumulate(precision).mean())
    if interpolation == "11point":
        recall = pos_at_or_above / n_pos
        return float(np.mean([np.max(precision[recall >= t], initial=0.0) for t in _VOC07_RECALL_LEVELS]))
    return float(precision.mean())


def _ap_columns(
    scores: np.ndarray, targets: np.ndarray, keep: np.ndarray, interpolation: Interpolation = False
) -> np.ndarray:
    """AP (fraction) for every class of validated [N, C] inputs.

    Classes go in chunks so temporaries stay at a few N x chunk arrays. Ignored entries become NaN, which
    ``np.sort`` places last, so they drop out of the "samples at or above" counts without a per-class copy
    (real NaN scores were rejected on input, so NaN is a free sentinel).
    """
    ranked = scores if keep.all() else np.where(keep, scores, np.nan)
    positive = targets & keep
    n_kept = keep.sum(axis=0)
    ap = np.empty(scores.shape[1])
    for start in range(0, scores.shape[1], _AP_CHUNK):
        block = _transposed(ranked[:, start : start + _AP_CHUNK])
        block_positive = _transposed(positive[:, start : start + _AP_CHUNK])
        block_sorted = np.sort(block, axis=1)
        for row in range(block.shape[0]):
            ap[start + row] = _class_ap(
                block[row][block_positive[row]], block_sorted[row], n_kept[start + row], interpolation
            )
    return ap


def average_precision_per_class(scores: object, targets: object, ignore: object | None = None) -> np.ndarray:
    """Per-class non-interpolated AP as a fraction in [0, 1]; NaN for classes with no (non-ignored) positive.

    Equal to ``sklearn.metrics.average_precision_score`` on each column, ties included. NaN rather than
    sklearn's 0 for no-positive classes because AP is undefined there and a 0 would silently drag mAP down.

    Args:
        scores: [N, C] scores; only their ranking within each class matters.
        targets: [N, C] binary labels in {0, 1}.
        ignore: optional boolean [N, C]; True entries (e.g. VOC 'difficult') are dropped from that class.
    """
    return _ap_columns(*_check_multilabel(scores, targets, ignore))


def nanmean_percent(values: np.ndarray) -> float:
    """Mean of the non-NaN values in percent; NaN (without numpy's empty-slice warning) if there are none."""
    valid = values[~np.isnan(values)]
    return float(valid.mean() * 100.0) if valid.size else float("nan")


def mean_average_precision(scores: object, targets: object, ignore: object | None = None) -> float:
    """mAP in percent: mean AP over classes with at least one (non-ignored) positive; NaN if no class has one."""
    return nanmean_percent(average_precision_per_class(scores, targets, ignore))


# ----------------------------------------------------------------------------------- thresholded (ML-GCN) metrics


def _top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean [N, C]: each row's k highest scores, ties at the k-th value broken towards the lower class index.

    Only the k-th largest *value* comes from ``torch.topk`` (far faster than ``np.partition`` on short rows, and
    a value does not depend on how ties are ordered); the explicit tie rule, which ML-GCN's torch.topk leaves
    unspecified, makes results deterministic and independent of row order.
    """
    k = min(k, scores.shape[1])
    kth = torch.topk(torch.from_numpy(scores), k, dim=1).values[:, -1:].numpy()
    mask = scores > kth
    tied = scores == kth
    slots_left = k - mask.sum(axis=1, keepdims=True)
    rows = np.flatnonzero(tied.sum(axis=1, keepdims=True) > slots_left)  # usually none: no cumsum over all rows
    mask |= tied
    mask[rows] = (scores[rows] > kth[rows]) | (tied[rows] & (np.cumsum(tied[rows], axis=1) <= slots_left[rows]))
    return mask


def _ratio(numerator: np.ndarray | float, denominator: np.ndarray | float) -> np.ndarray:
    """numerator / denominator with 0 where the denominator is 0 (the numerator is then 0 too: nothing to count)."""
    numerator, denominator = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def _f1(precision: float, recall: float) -> float:
    if np.isnan(precision) or np.isnan(recall):
        return float("nan")
    return float(_ratio(2.0 * precision * recall, precision + recall))


def _count_metrics(predicted: np.ndarray, targets: np.ndarray, keep: np.ndarray) -> dict[str, float]:
    """CP, CR, CF1, OP, OR, OF1 in percent from boolean predictions, as ML-GCN's ``evaluation`` (see module doc)."""
    positive = targets & keep
    n_correct = (predicted & positive).sum(axis=0)
    n_predicted = (predicted & keep).sum(axis=0)
    n_truth = positive.sum(axis=0)
    evaluated = n_truth > 0
    if not evaluated.any():
        cp = cr = o_r = float("nan")
    else:
        cp = float(_ratio(n_correct, n_predicted)[evaluated].mean() * 100.0)
        cr = float((n_correct[evaluated] / n_truth[evaluated]).mean() * 100.0)
        o_r = float(n_correct.sum() / n_truth.sum() * 100.0)
    op = float(_ratio(n_correct.sum(), n_predicted.sum()) * 100.0)
    return {"CP": cp, "CR": cr, "CF1": _f1(cp, cr), "OP": op, "OR": o_r, "OF1": _f1(op, o_r)}


def _class_labels(class_names: Sequence[str] | None, n_classes: int) -> list[str] | list[int]:
    if class_names is None:
        return list(range(n_classes))
    if len(class_names) != n_classes:
        raise ValueError(f"class_names has {len(class_names)} entries but scores have {n_classes} classes")
    return list(class_names)


def multilabel_metrics(
    scores: object,
    targets: object,
    threshold: float = 0.5,
    top_k: int | None = None,
    ignore: object | None = None,
    class_names: Sequence[str] | None = None,
    interpolated: Interpolation = False,
) -> dict:
    """The multi-label metrics reported in papers (mAP, CP, CR, CF1, OP, OR, OF1), all in percent.

    Args:
        scores: [N, C] probabilities (thresholded at ``threshold`` with ``>=``; AP only uses their ranking).
        targets: [N, C] labels in {0, 1}.
        threshold: a label is predicted when its score is >= threshold (0.5 on probabilities = ML-GCN's logit >= 0).
        top_k: if given, also report the top-k variants (keys suffixed ``_top{k}``): a label counts as predicted
            only if it is among its sample's k highest scores *and* >= threshold (ML-GCN ``overall_topk``).
            Ignored entries still compete for the top-k slots, since the model cannot know they are ignored.
        ignore: optional boolean [N, C] (e.g. VOC 'difficult'); True entries are excluded from AP and all counts.
        class_names: names used in ``classes_without_positives`` (defaults to class indices).
        interpolated: ``"11point"`` (VOC2007) or ``"envelope"`` (VOC2010+ all-point) adds an interpolated mAP
            under ``mAP_interp_11pt`` / ``mAP_interp_envelope``; plain ``mAP`` is always the non-interpolated one.

    Returns:
        dict with ``mAP``, ``AP`` (per-class list in percent, NaN without positives), ``CP``, ``CR``, ``CF1``,
        ``OP``, ``OR``, ``OF1``, optional ``*_top{k}`` and ``mAP_interp_*`` keys, ``num_samples``,
        ``num_classes``, ``num_classes_evaluated`` and ``classes_without_positives``.
    """
    if interpolated not in ("11point", "envelope", False):
        raise ValueError(f"interpolated must be '11point', 'envelope' or False, got {interpolated!r}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k}")
    scores, targets, keep = _check_multilabel(scores, targets, ignore)
    labels = _class_labels(class_names, scores.shape[1])
    ap = _ap_columns(scores, targets, keep)
    result: dict = {"mAP": nanmean_percent(ap), "AP": (ap * 100.0).tolist()}
    if interpolated:
        suffix = "11pt" if interpolated == "11point" else "envelope"
        result[f"mAP_interp_{suffix}"] = nanmean_percent(_ap_columns(scores, targets, keep, interpolated))
    predicted = scores >= threshold
    result.update(_count_metrics(predicted, targets, keep))
    if top_k is not None:
        top = _count_metrics(predicted & _top_k_mask(scores, top_k), targets, keep)
        result.update({f"{name}_top{top_k}": value for name, value in top.items()})
    result.update(
        num_samples=scores.shape[0],
        num_classes=scores.shape[1],
        num_classes_evaluated=int((~np.isnan(ap)).sum()),
        classes_without_positives=[labels[i] for i in np.flatnonzero(np.isnan(ap))],
    )
    return result


# ------------------------------------------------------------------------------------------------- single label


def _check_single_label(scores: object, targets: object) -> tuple[np.ndarray, np.ndarray]:
    scores = _check_scores(scores)
    targets = targets.detach().cpu().numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)
    if targets.shape != (scores.shape[0],):
        raise ValueError(f"targets shape {targets.shape} must be ({scores.shape[0]},) for scores shape {scores.shape}")
    if not np.issubdtype(targets.dtype, np.integer) or targets.min() < 0 or targets.max() >= scores.shape[1]:
        raise ValueError(f"targets must be integer class indices in [0, {scores.shape[1]})")
    return scores, targets


def _target_rank(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of each sample's true class; ties go to the lower class index, as argmax does."""
    target_score = np.take_along_axis(scores, targets[:, None], axis=1)
    lower_index = np.arange(scores.shape[1]) < targets[:, None]
    return (scores > target_score).sum(axis=1) + ((scores == target_score) & lower_index).sum(axis=1)


def _macro_f1(predicted: np.ndarray, targets: np.ndarray, n_classes: int) -> float:
    """Macro F1 over the classes present in targets or predictions, as sklearn's f1_score(average='macro')."""
    tp = np.bincount(targets[predicted == targets], minlength=n_classes)
    n_pred = np.bincount(predicted, minlength=n_classes)
    n_true = np.bincount(targets, minlength=n_classes)
    present = (n_pred + n_true) > 0
    return float((2.0 * tp[present] / (n_pred[present] + n_true[present])).mean() * 100.0)


def single_label_metrics(scores: object, targets: object) -> dict:
    """Top-1 / top-5 accuracy and macro F1 of the argmax prediction, all in percent.

    Args:
        scores: [N, C] class scores (logits or probabilities).
        targets: [N] integer class indices.

    Returns:
        dict with ``top1``, ``top5`` (only when C >= 5, where it means something), ``macro_F1``, ``num_samples``.
        Ties in scores go to the lower class index, both for argmax and for the top-5 cut.
    """
    scores, targets = _check_single_label(scores, targets)
    rank = _target_rank(scores, targets)
    result = {"top1": float((rank < 1).mean() * 100.0)}
    if scores.shape[1] >= 5:
        result["top5"] = float((rank < 5).mean() * 100.0)
    result["macro_F1"] = _macro_f1(scores.argmax(axis=1), targets, scores.shape[1])
    result["num_samples"] = scores.shape[0]
    return result
