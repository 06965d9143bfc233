"""Tests for difffeat.metrics: against sklearn on random data, and on small examples worked by hand."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score, top_k_accuracy_score

from difffeat.metrics import (
    average_precision_per_class,
    mean_average_precision,
    multilabel_metrics,
    single_label_metrics,
)

COUNT_KEYS = ("CP", "CR", "CF1", "OP", "OR", "OF1")


def _random_multilabel(seed: int, n: int = 300, c: int = 12, decimals: int | None = None):
    rng = np.random.default_rng(seed)
    scores = rng.random((n, c))
    if decimals is not None:
        scores = scores.round(decimals)  # many ties per class
    targets = (rng.random((n, c)) < 0.3).astype(int)
    return scores, targets


def _voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    """Loop reference of the VOC devkit's AP (py-faster-rcnn voc_eval.voc_ap), for tie-free rankings."""
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            ap += (np.max(precision[recall >= t]) if np.sum(recall >= t) else 0.0) / 11.0
        return ap
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    changed = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[changed + 1] - mrec[changed]) * mpre[changed + 1]))


def _voc_ap_column(scores: np.ndarray, targets: np.ndarray, use_07_metric: bool) -> float:
    ranked = targets[np.argsort(-scores)]
    tp = np.cumsum(ranked)
    return _voc_ap(tp / ranked.sum(), tp / np.arange(1, len(ranked) + 1), use_07_metric)


# ------------------------------------------------------------------------------------------------ vs sklearn


@pytest.mark.parametrize("decimals", [None, 1], ids=["no_ties", "ties"])
@pytest.mark.parametrize("seed", [0, 1])
def test_ap_matches_sklearn(seed: int, decimals: int | None) -> None:
    scores, targets = _random_multilabel(seed, decimals=decimals)
    expected = [average_precision_score(targets[:, c], scores[:, c]) for c in range(scores.shape[1])]
    np.testing.assert_allclose(average_precision_per_class(scores, targets), expected, rtol=0, atol=1e-12)
    assert mean_average_precision(scores, targets) == pytest.approx(100 * np.mean(expected), abs=1e-10)


def test_ap_matches_sklearn_across_chunks_with_few_positives() -> None:
    """More classes than one sorting chunk, and sparse positives, exercise the chunk boundaries."""
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 20, size=(150, 130)).astype(float)
    targets = (rng.random((150, 130)) < 0.05).astype(int)
    targets[0] = 1  # every class gets a positive
    expected = [average_precision_score(targets[:, c], scores[:, c]) for c in range(130)]
    np.testing.assert_allclose(average_precision_per_class(scores, targets), expected, rtol=0, atol=1e-12)


def test_ignore_mask_equals_sklearn_on_the_remaining_entries() -> None:
    scores, targets = _random_multilabel(4, decimals=1)
    ignore = np.random.default_rng(5).random(scores.shape) < 0.2
    expected = [
        average_precision_score(targets[~ignore[:, c], c], scores[~ignore[:, c], c]) for c in range(scores.shape[1])
    ]
    np.testing.assert_allclose(average_precision_per_class(scores, targets, ignore), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("threshold", [0.5, 0.8])
def test_counts_match_sklearn_precision_recall(threshold: float) -> None:
    scores, targets = _random_multilabel(6)
    targets[:, 3] = 0  # a class without positives: excluded from CP/CR, but its false positives count in OP
    predicted = (scores >= threshold).astype(int)
    present = targets.sum(axis=0) > 0
    result = multilabel_metrics(scores, targets, threshold=threshold)

    cp = 100 * precision_score(targets[:, present], predicted[:, present], average="macro", zero_division=0)
    cr = 100 * recall_score(targets[:, present], predicted[:, present], average="macro", zero_division=0)
    op = 100 * precision_score(targets, predicted, average="micro", zero_division=0)
    o_r = 100 * recall_score(targets, predicted, average="micro", zero_division=0)
    assert result["CP"] == pytest.approx(cp)
    assert result["CR"] == pytest.approx(cr)
    assert result["OP"] == pytest.approx(op)
    assert result["OR"] == pytest.approx(o_r)
    assert result["OF1"] == pytest.approx(100 * f1_score(targets, predicted, average="micro"))
    # CF1 is the harmonic mean of CP and CR (ML-GCN), which is not sklearn's mean of per-class F1.
    assert result["CF1"] == pytest.approx(2 * cp * cr / (cp + cr))
    macro_f1 = 100 * f1_score(targets[:, present], predicted[:, present], average="macro", zero_division=0)
    assert result["CF1"] != pytest.approx(macro_f1)


def test_top_k_matches_row_by_row_reference_with_ties() -> None:
    scores, targets = _random_multilabel(7, n=200, c=8, decimals=1)
    result = multilabel_metrics(scores, targets, threshold=0.3, top_k=3)
    predicted = np.zeros_like(targets)
    for i, row in enumerate(scores):
        top = np.argsort(-row, kind="stable")[:3]  # ties: lower class index first
        predicted[i, top] = row[top] >= 0.3
    assert result["OP_top3"] == pytest.approx(100 * precision_score(targets, predicted, average="micro"))
    assert result["CR_top3"] == pytest.approx(100 * recall_score(targets, predicted, average="macro"))


@pytest.mark.parametrize(("mode", "use_07"), [("11point", True), ("envelope", False)])
def test_interpolated_ap_matches_voc_devkit(mode: str, use_07: bool) -> None:
    scores, targets = _random_multilabel(8, n=60, c=5)
    expected = np.mean([_voc_ap_column(scores[:, c], targets[:, c], use_07) for c in range(5)]) * 100
    key = "mAP_interp_11pt" if mode == "11point" else "mAP_interp_envelope"
    result = multilabel_metrics(scores, targets, interpolated=mode)
    assert result[key] == pytest.approx(expected, abs=1e-10)
    assert result["mAP"] == pytest.approx(mean_average_precision(scores, targets))  # never replaced


# ------------------------------------------------------------------------------------------- worked by hand


def test_tied_scores_count_as_one_threshold() -> None:
    # Ranked: pos(0.9), then {pos, neg} tied at 0.8. Thresholds: 0.9 -> P=1, R=1/2; 0.8 -> P=2/3, R=1.
    # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6. Breaking the tie with the positive first would give 1.0.
    scores = np.array([0.9, 0.8, 0.8, 0.1])
    targets = np.array([1, 1, 0, 0])
    assert average_precision_per_class(scores, targets)[0] == pytest.approx(5 / 6)
    assert average_precision_per_class(scores[[0, 2, 1, 3]], targets[[0, 2, 1, 3]])[0] == pytest.approx(5 / 6)


def test_class_without_positives_is_named_and_excluded() -> None:
    scores = np.array([[0.9, 0.7, 0.2], [0.1, 0.6, 0.8]])
    targets = np.array([[1, 0, 0], [0, 0, 1]])
    result = multilabel_metrics(scores, targets, class_names=["cat", "dog", "car"])
    assert result["classes_without_positives"] == ["dog"]
    assert result["num_classes_evaluated"] == 2
    assert np.isnan(result["AP"][1])
    assert result["mAP"] == pytest.approx(100.0)  # mean of cat and car only, not (100 + 0 + 100) / 3
    # dog's false positives still cost overall precision: 2 correct of 4 predicted.
    assert result["OP"] == pytest.approx(50.0)
    assert result["CP"] == pytest.approx(100.0)
    assert multilabel_metrics(scores, targets)["classes_without_positives"] == [1]


def test_all_correct_predictions_score_100() -> None:
    targets = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    result = multilabel_metrics(np.where(targets == 1, 0.9, 0.1), targets, top_k=2)
    for key in ("mAP", *COUNT_KEYS, *(f"{k}_top2" for k in COUNT_KEYS)):
        assert result[key] == pytest.approx(100.0), key


def test_all_wrong_predictions() -> None:
    # Class 0: the only positive ranked 4th -> AP = 1/4. Class 1: positives ranked 3rd and 4th -> (1/3 + 2/4) / 2.
    scores = np.array([[0.1, 0.9], [0.9, 0.2], [0.8, 0.1], [0.7, 0.8]])
    targets = np.array([[1, 0], [0, 1], [0, 1], [0, 0]])
    result = multilabel_metrics(scores, targets)
    np.testing.assert_allclose(result["AP"], [25.0, 100 * 5 / 12])
    assert result["mAP"] == pytest.approx(100 * (1 / 4 + 5 / 12) / 2)
    for key in COUNT_KEYS:
        assert result[key] == 0.0, key


def test_top3_gating_on_four_classes() -> None:
    scores = np.array(
        [
            [0.9, 0.8, 0.7, 0.6],  # all >= 0.5, but class 3 (0.6) is 4th: dropped by top-3
            [0.2, 0.95, 0.6, 0.55],  # top-3 = classes 1, 2, 3, all >= 0.5
            [0.4, 0.3, 0.2, 0.1],  # top-3 = classes 0, 1, 2, all < 0.5: nothing predicted
        ]
    )
    targets = np.array([[1, 0, 0, 1], [0, 1, 0, 1], [1, 0, 1, 0]])
    result = multilabel_metrics(scores, targets, top_k=3)
    # top-3 per class (Nc/Np/Ng): c0 1/1/2, c1 1/2/1, c2 0/2/1, c3 1/1/2.
    assert result["CP_top3"] == pytest.approx(100 * (1 + 1 / 2 + 0 + 1) / 4)  # 62.5
    assert result["CR_top3"] == pytest.approx(100 * (1 / 2 + 1 + 0 + 1 / 2) / 4)  # 50
    assert result["CF1_top3"] == pytest.approx(2 * 62.5 * 50 / 112.5)
    assert result["OP_top3"] == pytest.approx(100 * 3 / 6)
    assert result["OR_top3"] == pytest.approx(100 * 3 / 6)
    # Without top-k, row 0's class 3 is a correct prediction: c3 becomes 2/2/2.
    assert result["OP"] == pytest.approx(100 * 4 / 7)
    assert result["OR"] == pytest.approx(100 * 4 / 6)
    assert result["CR"] == pytest.approx(100 * (1 / 2 + 1 + 0 + 1) / 4)


def test_top_k_ties_go_to_the_lower_class_index() -> None:
    scores = np.array([[0.5, 0.7, 0.7, 0.7]])
    targets = np.array([[0, 0, 0, 1]])
    result = multilabel_metrics(scores, targets, threshold=0.0, top_k=2)  # keeps classes 1 and 2, not 3
    assert result["OR_top2"] == 0.0
    assert result["OR"] == 100.0


def test_ignore_mask_changes_ap_and_counts_by_hand() -> None:
    # Ranked pos, neg, pos, neg: AP = (1 + 2/3) / 2. Ignoring the 2nd-ranked negative ("difficult") leaves
    # pos, pos, neg: AP = 1. At threshold 0.75 rows 0 and 1 are predicted: P = 1/2, or 1/1 once row 1 is ignored.
    scores = np.array([[0.9], [0.8], [0.7], [0.6]])
    targets = np.array([[1], [0], [1], [0]])
    ignore = np.array([[False], [True], [False], [False]])
    plain = multilabel_metrics(scores, targets, threshold=0.75)
    masked = multilabel_metrics(scores, targets, threshold=0.75, ignore=ignore)
    assert plain["mAP"] == pytest.approx(100 * 5 / 6)
    assert masked["mAP"] == pytest.approx(100.0)
    assert (plain["CP"], plain["CR"]) == pytest.approx((50.0, 50.0))
    assert (masked["CP"], masked["CR"]) == pytest.approx((100.0, 50.0))


def test_interpolated_ap_by_hand() -> None:
    # Ranked pos, neg, neg, pos, pos (3 positives). Precision at each positive: 1, 2/4, 3/5.
    # Plain AP = (1 + 0.5 + 0.6) / 3 = 0.7. Envelope replaces 0.5 by the later 0.6: (1 + 0.6 + 0.6) / 3.
    # 11-point: recall levels 0..0.3 reach precision 1 (4 levels), 0.4..1.0 only 0.6 (7 levels).
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    targets = np.array([1, 0, 0, 1, 1])
    assert multilabel_metrics(scores, targets)["mAP"] == pytest.approx(70.0)
    envelope = multilabel_metrics(scores, targets, interpolated="envelope")
    assert envelope["mAP_interp_envelope"] == pytest.approx(100 * 2.2 / 3)
    eleven = multilabel_metrics(scores, targets, interpolated="11point")
    assert eleven["mAP_interp_11pt"] == pytest.approx(100 * (4 * 1 + 7 * 0.6) / 11)
    assert eleven["mAP"] == pytest.approx(70.0)


def test_11point_uses_voc_devkit_recall_levels() -> None:
    # 10 positives ranked: 3 positives, 7 negatives, 7 positives. Precision is 1 up to recall 0.3, then at most
    # 10/17. The devkit's levels come from np.arange(0, 1.1, 0.1), whose "0.3" is 0.30000000000000004, so recall
    # 3/10 does not reach it: 3 levels score 1 and 8 score 10/17 (exact levels would give 4 and 7).
    targets = np.array([1] * 3 + [0] * 7 + [1] * 7)
    scores = np.linspace(1.0, 0.0, targets.size)
    result = multilabel_metrics(scores, targets, interpolated="11point")
    assert result["mAP_interp_11pt"] == pytest.approx(100 * (3 + 8 * 10 / 17) / 11)


# --------------------------------------------------------------------------------------------- invariances


def test_results_invariant_to_sample_order() -> None:
    scores, targets = _random_multilabel(9, decimals=1)
    targets[:, 0] = 0
    ignore = np.random.default_rng(10).random(scores.shape) < 0.1
    perm = np.random.default_rng(11).permutation(len(scores))
    kwargs = {"top_k": 3, "interpolated": "11point"}
    original = multilabel_metrics(scores, targets, ignore=ignore, **kwargs)
    permuted = multilabel_metrics(scores[perm], targets[perm], ignore=ignore[perm], **kwargs)
    assert original.keys() == permuted.keys()
    for key, value in original.items():
        np.testing.assert_array_equal(value, permuted[key], err_msg=key)


# ------------------------------------------------------------------------------------------------ edge cases


def test_single_sample_single_class() -> None:
    hit = multilabel_metrics(np.array([[0.7]]), np.array([[1]]))
    assert hit["mAP"] == 100.0
    assert hit["num_samples"] == 1
    miss = multilabel_metrics(np.array([[0.7]]), np.array([[0]]))
    assert np.isnan(miss["mAP"])
    assert miss["classes_without_positives"] == [0]
    assert np.isnan(miss["CR"]) and np.isnan(miss["OR"])
    assert miss["OP"] == 0.0


def test_nothing_predicted_gives_zero_precision_not_nan() -> None:
    result = multilabel_metrics(np.array([[0.1, 0.2], [0.3, 0.4]]), np.array([[1, 0], [0, 1]]))
    for key in COUNT_KEYS:
        assert result[key] == 0.0, key


def test_accepts_torch_tensors() -> None:
    torch = pytest.importorskip("torch")
    scores, targets = _random_multilabel(12)
    from_torch = multilabel_metrics(torch.from_numpy(scores).float(), torch.from_numpy(targets))
    assert from_torch["mAP"] == pytest.approx(multilabel_metrics(scores.astype(np.float32), targets)["mAP"])


def test_accepts_reversed_float32_views() -> None:
    scores, targets = _random_multilabel(14, decimals=1)
    scores = scores.astype(np.float32)
    reversed_view = multilabel_metrics(scores[::-1], targets[::-1], top_k=2)
    copied = multilabel_metrics(scores[::-1].copy(), targets[::-1].copy(), top_k=2)
    assert reversed_view["mAP"] == copied["mAP"] == multilabel_metrics(scores, targets)["mAP"]
    assert reversed_view["OF1_top2"] == copied["OF1_top2"]


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(4, 2\)"):
        multilabel_metrics(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(4, 2\)"):
        multilabel_metrics(np.zeros((4, 2)), np.zeros((4, 2)), ignore=np.zeros((4, 3), dtype=bool))
    with pytest.raises(ValueError, match=r"\(3,\).*\(4, 2\)"):
        single_label_metrics(np.zeros((4, 2)), np.zeros(3, dtype=int))


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="NaN"):
        average_precision_per_class(np.array([[0.1], [np.nan]]), np.array([[1], [0]]))
    with pytest.raises(ValueError, match="NaN"):
        single_label_metrics(np.array([[0.1, np.nan]]), np.array([0]))
    with pytest.raises(ValueError, match="ignore"):
        multilabel_metrics(np.zeros((2, 1)), np.array([[1], [-1]]))
    with pytest.raises(ValueError, match="interpolated"):
        multilabel_metrics(np.zeros((2, 1)), np.zeros((2, 1)), interpolated="voc")
    with pytest.raises(ValueError, match="class indices"):
        single_label_metrics(np.zeros((2, 3)), np.array([0, 3]))


# ---------------------------------------------------------------------------------------------- single label


def test_single_label_matches_sklearn() -> None:
    rng = np.random.default_rng(13)
    scores = rng.normal(size=(400, 10))
    targets = rng.integers(0, 10, size=400)
    targets[:5] = scores[:5].argmax(axis=1)  # some hits
    result = single_label_metrics(scores, targets)
    labels = np.arange(10)
    assert result["top1"] == pytest.approx(100 * top_k_accuracy_score(targets, scores, k=1, labels=labels))
    assert result["top5"] == pytest.approx(100 * top_k_accuracy_score(targets, scores, k=5, labels=labels))
    assert result["macro_F1"] == pytest.approx(100 * f1_score(targets, scores.argmax(axis=1), average="macro"))


def test_single_label_macro_f1_skips_absent_classes_like_sklearn() -> None:
    # Class 2 is never a target nor predicted: sklearn leaves it out of the macro average, so do we.
    scores = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.3, 0.7, 0.0]])
    targets = np.array([0, 1, 1])
    result = single_label_metrics(scores, targets)
    assert result["top1"] == pytest.approx(100 * 2 / 3)
    assert "top5" not in result  # fewer than 5 classes
    # class 0: P 1/2, R 1 -> F1 2/3; class 1: P 1, R 1/2 -> F1 2/3.
    assert result["macro_F1"] == pytest.approx(100 * 2 / 3)
    assert result["macro_F1"] == pytest.approx(100 * f1_score(targets, scores.argmax(axis=1), average="macro"))


def test_single_label_ties_go_to_lower_index() -> None:
    scores = np.array([[0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])
    assert single_label_metrics(scores, np.array([0]))["top1"] == 100.0
    assert single_label_metrics(scores, np.array([4]))["top5"] == 100.0
    assert single_label_metrics(scores, np.array([5]))["top5"] == 0.0
