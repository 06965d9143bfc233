"""Linear probe and (block, t) sweep on synthetic features whose answer is known by construction."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import StandardScaler

from difffeat.heads.probe import ProbeOptions, ProbeResult, fit_probe, fit_probes, run_sweep
from difffeat.metrics import mean_average_precision, single_label_metrics

# Small problems, mini-batches and one thread keep every fit well under a second, even on a busy CPU.
FAST = {"epochs": 80, "patience": 15, "batch_size": 256, "lr": 1e-2, "num_threads": 1}


def linear_problem(n: int, d: int = 32, c: int = 6, noise: float = 0.0, seed: int = 0, w_seed: int = 99):
    """Multi-label data with labels from a fixed linear map (``w_seed``) of features (``seed``); noise on logits.

    Features get very different per-channel scales and offsets, like diffusion activations.
    """
    w = np.random.default_rng(w_seed).normal(size=(d, c))
    scale = np.random.default_rng(w_seed + 1).lognormal(0, 1.5, size=d)
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, d))
    logits = z @ w / np.sqrt(d) + noise * rng.normal(size=(n, c)) - 0.5
    return (z * scale + 3.0).astype(np.float32), (logits > 0).astype(np.float32)


def test_separable_labels_reach_high_map():
    x, y = linear_problem(2000)
    vx, vy = linear_problem(1000, seed=1)
    result = fit_probe(x, y, vx, vy, ProbeOptions(**FAST))
    assert result.best_score > 95
    assert result.best_score == pytest.approx(mean_average_precision(result.predict(vx), vy), abs=1e-6)


def test_noise_labels_stay_near_base_rate():
    x, _ = linear_problem(2000)
    vx, _ = linear_problem(1000, seed=1)
    rng = np.random.default_rng(5)
    y, vy = (rng.random((2000, 6)) < 0.3).astype(np.float32), (rng.random((1000, 6)) < 0.3).astype(np.float32)
    result = fit_probe(x, y, vx, vy, ProbeOptions(**FAST))
    # Random ranking gives AP ~ positive rate; early stopping on val adds only a small optimistic bias.
    assert abs(result.best_score - 100 * vy.mean()) < 6


def flipped_problem(n: int, flip: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels from a simple rule on 8 of 100 features, a fraction ``flip`` of train labels flipped."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 100))
    y = (x[:, :4] + x[:, 4:8] > 0).astype(np.float32)
    return x, np.where(rng.random(y.shape) < flip, 1 - y, y)


def test_early_stopping_keeps_best_epoch_weights():
    # Few samples and flipped train labels: val score peaks early, then the probe memorises the flips.
    x, y = flipped_problem(200, flip=0.3, seed=0)
    vx, vy = flipped_problem(1000, flip=0.0, seed=1)
    cfg = ProbeOptions(epochs=200, patience=30, batch_size=32, lr=1e-2, num_threads=1)
    result = fit_probe(x, y, vx, vy, cfg)
    scores = [row.val_score for row in result.history]
    assert result.best_score == max(scores)
    assert result.history[scores.index(max(scores))].epoch == result.best_epoch
    assert result.history[-1].epoch == result.best_epoch + cfg.patience < cfg.epochs  # it did stop early
    assert result.history[-1].val_score < result.best_score - 0.2  # the last weights are worse than the best
    assert mean_average_precision(result.predict(vx), vy) == pytest.approx(result.best_score, abs=1e-6)


def test_same_seed_same_result_and_global_rng_untouched():
    x, y = linear_problem(1000, noise=1.0)
    vx, vy = linear_problem(500, noise=1.0, seed=1)
    cfg = ProbeOptions(**{**FAST, "epochs": 20})
    rng_state = torch.random.get_rng_state()
    a, b = fit_probe(x, y, vx, vy, cfg), fit_probe(x, y, vx, vy, cfg)
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert torch.equal(a.linear.weight, b.linear.weight) and torch.equal(a.linear.bias, b.linear.bias)
    assert a.history == b.history and a.best_epoch == b.best_epoch
    c = fit_probe(x, y, vx, vy, ProbeOptions(**{**FAST, "epochs": 20, "seed": 1}))
    assert not torch.equal(a.linear.weight, c.linear.weight)


def test_standardisation_uses_train_statistics_only():
    # Val comes from a shifted, rescaled distribution; labels are the same rule on raw features in both splits.
    # Train statistics keep the learned rule valid on val; val statistics would shrink feature 1 thirtyfold there.
    rng = np.random.default_rng(0)
    x, vx = rng.normal(size=(2000, 4)), rng.normal(size=(2000, 4))
    vx[:, 1] = vx[:, 1] * 30 + 40
    vx[:, 3] = vx[:, 3] * 30 - 40
    rule = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    y, vy = (x @ rule > 0).astype(np.float32), (vx @ rule > 0).astype(np.float32)
    result = fit_probe(x, y, vx, vy, ProbeOptions(**FAST))
    np.testing.assert_allclose(result.mean.numpy(), x.mean(0), atol=1e-5)
    np.testing.assert_allclose(result.std.numpy(), x.std(0), rtol=1e-5)
    manual = torch.sigmoid(result.linear(torch.as_tensor((vx - x.mean(0)) / x.std(0), dtype=torch.float32)))
    np.testing.assert_allclose(result.predict(vx), manual.detach().numpy(), rtol=1e-4, atol=1e-6)
    assert result.best_score > 99


def test_float16_memmap_input(tmp_path):
    x, y = linear_problem(2000)
    vx, vy = linear_problem(1000, seed=1)
    maps = []
    for name, array in (("train", x), ("val", vx)):
        m = np.memmap(tmp_path / f"{name}.f16", dtype=np.float16, mode="w+", shape=array.shape)
        m[:] = array
        m.flush()
        maps.append(np.memmap(tmp_path / f"{name}.f16", dtype=np.float16, mode="r", shape=array.shape))
    from_memmap = fit_probe(maps[0], y, maps[1], vy, ProbeOptions(**FAST))
    from_f32 = fit_probe(x, y, vx, vy, ProbeOptions(**FAST))
    assert from_memmap.best_score > 95
    assert from_memmap.best_score == pytest.approx(from_f32.best_score, abs=1.0)


def test_single_label_ce_reports_top1():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 3
    labels, vlabels = rng.integers(0, 4, 1500), rng.integers(0, 4, 600)
    x, vx = centres[labels] + rng.normal(size=(1500, 16)), centres[vlabels] + rng.normal(size=(600, 16))
    result = fit_probe(x, labels, vx, vlabels, ProbeOptions(**FAST, loss="ce"))
    probs = result.predict(vx)
    assert probs.shape == (600, 4)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert result.best_score > 95
    assert result.best_score == pytest.approx(single_label_metrics(probs, vlabels)["top1"])


def test_ranks_classes_like_sklearn_logistic_regression():
    x, y = linear_problem(3000, d=24, c=5, noise=1.0)
    vx, vy = linear_problem(2000, d=24, c=5, noise=1.0, seed=1)
    scaler = StandardScaler().fit(x)
    reference = OneVsRestClassifier(LogisticRegression(max_iter=2000)).fit(scaler.transform(x), y)
    reference_map = mean_average_precision(reference.predict_proba(scaler.transform(vx)), vy)
    result = fit_probe(x, y, vx, vy, ProbeOptions(**FAST))
    assert 70 < reference_map < 97  # a problem where the two could disagree
    assert result.best_score == pytest.approx(reference_map, abs=2.0)


def test_save_load_round_trip(tmp_path):
    x, y = linear_problem(1000)
    vx, vy = linear_problem(500, seed=1)
    result = fit_probe(x, y, vx, vy, ProbeOptions(**{**FAST, "epochs": 10}))
    result.save(tmp_path / "probe.safetensors")
    loaded = ProbeResult.load(tmp_path / "probe.safetensors")
    np.testing.assert_array_equal(loaded.predict(vx), result.predict(vx))
    assert (loaded.best_score, loaded.best_epoch, loaded.history) == (
        result.best_score,
        result.best_epoch,
        result.history,
    )


# ---------------------------------------------------------------- sweep

BLOCKS, TIMESTEPS, SIGNAL = [0, 5, 11], [0, 100, 400], (5, 100)


class Features:
    """Features per (block, t, split): only ``SIGNAL`` carries the labels, every other cell is pure noise."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, str]] = []
        self.train, self.y = linear_problem(600, d=16, c=4)
        self.val, self.vy = linear_problem(300, d=16, c=4, seed=1)

    def __call__(self, block: int, t: int, split: str) -> np.ndarray:
        self.calls.append((block, t, split))
        signal = self.train if split == "train" else self.val
        if (block, t) == SIGNAL:
            return signal
        return np.random.default_rng([block, t, split == "val"]).normal(size=signal.shape).astype(np.float32)


SWEEP_CFG = ProbeOptions(epochs=30, patience=10, batch_size=256, lr=1e-2, num_threads=1)


def test_sweep_finds_the_informative_cell():
    features = Features()
    result = run_sweep(features, BLOCKS, TIMESTEPS, features.y, features.vy, SWEEP_CFG, progress=False)
    assert result.scores.shape == (3, 3) and not np.isnan(result.scores).any()
    block, t, score = result.best()
    assert (block, t) == SIGNAL
    assert score > 90 > np.delete(result.scores.ravel(), 4).max()
    assert len(result.rows) == 9


def test_sweep_resumes_from_csv(tmp_path):
    path = tmp_path / "sweep.csv"
    features = Features()
    first = run_sweep(features, BLOCKS, TIMESTEPS, features.y, features.vy, SWEEP_CFG, csv_path=path, progress=False)

    def must_not_be_called(block: int, t: int, split: str) -> np.ndarray:
        raise AssertionError(f"cell ({block}, {t}) recomputed")

    again = run_sweep(must_not_be_called, BLOCKS, TIMESTEPS, features.y, features.vy, SWEEP_CFG, csv_path=path)
    np.testing.assert_array_equal(again.scores, first.scores)


def test_sweep_computes_only_missing_cells(tmp_path):
    path = tmp_path / "sweep.csv"
    features = Features()
    full = run_sweep(features, BLOCKS, TIMESTEPS, features.y, features.vy, SWEEP_CFG, csv_path=path, progress=False)
    lines = path.read_text().splitlines(keepends=True)
    # Keep the header and three rows, plus the first half of a fourth as a killed write would leave it.
    path.write_text("".join(lines[:4]) + lines[4][: len(lines[4]) // 2])
    kept = {(int(r["block"]), int(r["t"])) for r in csv.DictReader(lines[:4])}

    features = Features()
    resumed = run_sweep(features, BLOCKS, TIMESTEPS, features.y, features.vy, SWEEP_CFG, csv_path=path, progress=False)
    computed = {(b, t) for b, t, _ in features.calls}
    assert computed == {(b, t) for b in BLOCKS for t in TIMESTEPS} - kept
    # Same seed, same data, other cells stacked with them: the scores agree up to float rounding (as grouping does).
    np.testing.assert_allclose(resumed.scores, full.scores, rtol=0, atol=1e-3)
    with path.open(newline="") as f:
        assert sorted((int(r["block"]), int(r["t"])) for r in csv.DictReader(f)) == sorted(
            (b, t) for b in BLOCKS for t in TIMESTEPS
        )


@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_probes_fitted_together_match_probes_fitted_one_at_a_time(loss):
    # Three feature sets of one width: informative, weakly informative and pure noise, so the three probes stop
    # at different epochs and one keeps training (stacked) after another has stopped.
    x, y = linear_problem(1200, d=16)
    vx, vy = linear_problem(400, d=16, seed=1)
    rng = np.random.default_rng(3)
    weak, vweak = x + 6 * rng.normal(size=x.shape), vx + 6 * rng.normal(size=vx.shape)
    noise, vnoise = rng.normal(size=x.shape), rng.normal(size=vx.shape)
    if loss == "ce":
        y, vy = y.argmax(1), vy.argmax(1)
    cfg = ProbeOptions(**{**FAST, "patience": 5}, loss=loss)
    sets, vsets = [x, weak, noise], [vx, vweak, vnoise]
    together = fit_probes(sets, y, vsets, vy, cfg)
    alone = [fit_probe(a, y, v, vy, cfg) for a, v in zip(sets, vsets, strict=True)]
    assert len({r.best_epoch for r in alone}) > 1 and len({len(r.history) for r in alone}) > 1
    for t, a, v in zip(together, alone, vsets, strict=True):
        assert t.best_epoch == a.best_epoch and len(t.history) == len(a.history)
        assert t.best_score == pytest.approx(a.best_score, abs=1e-3)
        np.testing.assert_allclose(t.predict(v), a.predict(v), atol=1e-5)


def test_probes_fitted_together_need_one_width():
    x, y = linear_problem(100, d=8)
    with pytest.raises(ValueError, match="width"):
        fit_probes([x, x[:, :4]], y, [x, x[:, :4]], y, ProbeOptions(**FAST))


def test_sweep_groups_cells_by_memory_and_gives_the_same_scores(tmp_path):
    features = Features()
    one_group = run_sweep(features, BLOCKS, TIMESTEPS, features.y, features.vy, SWEEP_CFG, progress=False)
    cell_bytes = features(BLOCKS[0], TIMESTEPS[0], "train").nbytes
    in_pairs = run_sweep(
        features, BLOCKS, TIMESTEPS, features.y, features.vy, SWEEP_CFG, progress=False, group_bytes=2 * cell_bytes
    )
    np.testing.assert_allclose(one_group.scores, in_pairs.scores, atol=1e-3)


def test_sweep_csv_rewrite_is_atomic_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "sweep.csv"
    path.write_text("block,t,val_score,best_epoch,seconds\n0,0,50.0,3,0.1\n0,1")  # last line cut by a kill
    before = path.read_text()

    def disk_gone(*args, **kwargs):
        raise OSError("rename failed")

    monkeypatch.setattr("os.replace", disk_gone)
    with pytest.raises(OSError, match="rename failed"):
        run_sweep(Features(), [0], [0], None, None, SWEEP_CFG, csv_path=path, progress=False)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.csv"]
