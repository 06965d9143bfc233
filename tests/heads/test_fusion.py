"""Fusion head: shapes, the linear algebra of "add", and fits on synthetic modalities with known information."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difffeat.heads.fusion import FusionHead, FusionOptions, FusionResult, fit_fusion
from difffeat.heads.probe import ProbeOptions, fit_probe
from difffeat.metrics import mean_average_precision, single_label_metrics

# Small width, mini-batches and one thread keep each fit around a second, even on a busy CPU.
FAST = {"epochs": 60, "patience": 15, "batch_size": 256, "lr": 3e-3, "width": 64, "num_threads": 1}


def modalities(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two modalities (24 and 16 dims, arbitrary scales); classes 0-3 follow the first, classes 4-7 the second."""
    wa, wb = np.random.default_rng(7).normal(size=(24, 4)), np.random.default_rng(8).normal(size=(16, 4))
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n, 24)), rng.normal(size=(n, 16))
    y = np.concatenate([a @ wa > 0.5, b @ wb > 0.5], axis=1).astype(np.float32)
    return (a * 5 + 2).astype(np.float32), (b * 0.1 - 1).astype(np.float32), y


@pytest.fixture(scope="module")
def data() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return {"train": modalities(2000, seed=0), "val": modalities(1000, seed=1)}


def fit(data: dict, inputs: list[int], **overrides) -> FusionResult:
    """Fit on the chosen modalities (0: a, 1: b)."""
    (*train, y), (*val, vy) = data["train"], data["val"]
    cfg = FusionOptions(**{**FAST, **overrides})
    return fit_fusion([train[i] for i in inputs], y, [val[i] for i in inputs], vy, cfg)


def test_fusion_beats_each_single_modality(data):
    fused, only_a, only_b = fit(data, [0, 1]), fit(data, [0]), fit(data, [1])
    vy = data["val"][2]
    # Each modality alone ranks half the classes well and the other half at chance.
    assert only_a.best_score < 80 and only_b.best_score < 80
    assert fused.best_score > 95
    assert fused.best_score > max(only_a.best_score, only_b.best_score) + 15
    assert mean_average_precision(fused.predict(list(data["val"][:2])), vy) == pytest.approx(fused.best_score, abs=1e-6)


def test_concat_mode_fits_and_has_one_projection(data):
    result = fit(data, [0, 1], mode="concat")
    assert [p.in_features for p in result.head.projections] == [40]
    assert result.best_score > 95


def test_add_with_one_input_is_a_factorised_linear_map():
    head = FusionHead([12], num_classes=5, width=8)
    x = torch.randn(30, 12)
    proj, cls = head.projections[0], head.classifier
    weight, bias = cls.weight @ proj.weight, cls.weight @ proj.bias + cls.bias
    torch.testing.assert_close(head(x), x @ weight.T + bias)


def test_single_input_fusion_matches_the_linear_probe(data):
    (a, _, y), (va, _, vy) = data["train"], data["val"]
    probe = fit_probe(a, y, va, vy, ProbeOptions(**{k: v for k, v in FAST.items() if k != "width"}))
    fused = fit_fusion([a], y, [va], vy, FusionOptions(**FAST))
    assert fused.best_score == pytest.approx(probe.best_score, abs=3.0)


def test_shapes_and_options():
    head = FusionHead([10, 20, 30], num_classes=5, width=7)
    assert [(p.in_features, p.out_features) for p in head.projections] == [(10, 7), (20, 7), (30, 7)]
    assert head.classifier.weight.shape == (5, 7)
    inputs = [torch.randn(4, d) for d in (10, 20, 30)]
    assert head(*inputs).shape == (4, 5)
    assert FusionHead([1152, 768], 80).classifier.in_features == 2048  # the paper's width by default
    concat = FusionHead([10, 20, 30], 5, width=7, mode="concat")
    assert concat(*inputs).shape == (4, 5)
    gelu = FusionHead([10, 20, 30], 5, width=7, activation="gelu")
    gelu.load_state_dict(head.state_dict())
    assert not torch.allclose(gelu(*inputs), head(*inputs))
    with pytest.raises(ValueError, match="expected 3 inputs"):
        head(*inputs[:2])
    with pytest.raises(ValueError, match="mode"):
        FusionHead([10], 5, mode="mul")


def test_dropout_only_in_training():
    head = FusionHead([10], 5, width=32, dropout=0.5)
    x = torch.randn(8, 10)
    assert not torch.equal(head.train()(x), head(x))
    head.eval()
    assert torch.equal(head(x), head(x))


def test_seeded_and_single_label(data):
    a, b = fit(data, [0, 1], epochs=5), fit(data, [0, 1], epochs=5)
    for (name, p), q in zip(a.head.state_dict().items(), b.head.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    (xa, _, y), (va, _, vy) = data["train"], data["val"]
    labels, vlabels = y[:, :4].argmax(1), vy[:, :4].argmax(1)  # not separable, but well above chance (25 %)
    result = fit_fusion([xa], labels, [va], vlabels, FusionOptions(**FAST, loss="ce"))
    probs = result.predict([va])
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert result.best_score == pytest.approx(single_label_metrics(probs, vlabels)["top1"])
    assert result.best_score > 50


def test_save_load_round_trip(data, tmp_path):
    result = fit(data, [0, 1], epochs=5, activation="gelu")
    result.save(tmp_path / "fusion.safetensors")
    loaded = FusionResult.load(tmp_path / "fusion.safetensors")
    val = list(data["val"][:2])
    np.testing.assert_array_equal(loaded.predict(val), result.predict(val))
    assert loaded.head.spec() == result.head.spec()
    assert (loaded.best_score, loaded.best_epoch, loaded.history) == (
        result.best_score,
        result.best_epoch,
        result.history,
    )
