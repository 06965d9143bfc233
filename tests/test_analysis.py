"""Heatmaps, t-SNE and clustering scores: checked against sklearn directly and on data with a known answer."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.cluster import KMeans
from sklearn.metrics import (
    calinski_harabasz_score,
    davies_bouldin_score,
    normalized_mutual_info_score,
    silhouette_score,
)
from threadpoolctl import threadpool_limits

from difffeat.analysis import (
    CLUSTERING_BETTER,
    clustering_scores,
    plot_curve,
    plot_heatmap,
    plot_tsne,
    single_label_subset,
    tsne_embed,
)


@pytest.fixture(autouse=True)
def one_thread():
    """OpenMP threads spin against each other on a shared, busy CPU (t-SNE went from 0.1 s to 4 s): use one."""
    with threadpool_limits(limits=1):
        yield


def blobs(n_per_class: int = 30, n_classes: int = 3, dim: int = 8, spread: float = 8.0, seed: int = 0):
    """Gaussian blobs far apart compared with their unit spread: labels are recoverable from the features."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, spread, (n_classes, dim))
    labels = np.repeat(np.arange(n_classes), n_per_class)
    return centres[labels] + rng.normal(size=(len(labels), dim)), labels


def assert_png(path) -> None:
    assert path.exists() and path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()


def test_clustering_scores_match_an_independent_sklearn_recompute():
    features, labels = blobs()
    standardised = (features - features.mean(axis=0)) / features.std(axis=0)
    clusters = KMeans(n_clusters=3, n_init=10, random_state=7).fit_predict(standardised)
    expected = {
        "silhouette": silhouette_score(standardised, labels),
        "davies_bouldin": davies_bouldin_score(standardised, labels),
        "calinski_harabasz": calinski_harabasz_score(standardised, labels),
        "nmi": normalized_mutual_info_score(labels, clusters),
    }
    assert clustering_scores(features, labels, seed=7) == pytest.approx(expected, rel=1e-9)


def test_separated_blobs_score_better_than_noise_on_every_metric():
    features, labels = blobs()
    noise = np.random.default_rng(1).normal(size=features.shape)
    good, bad = clustering_scores(features, labels, seed=0), clustering_scores(noise, labels, seed=0)
    assert set(good) == set(CLUSTERING_BETTER)
    for name, direction in CLUSTERING_BETTER.items():
        assert (good[name] > bad[name]) if direction == "higher" else (good[name] < bad[name]), name
    assert good["nmi"] == pytest.approx(1.0)


def test_clustering_scores_need_two_labels():
    features, _ = blobs()
    with pytest.raises(ValueError, match="distinct labels"):
        clustering_scores(features, np.zeros(len(features), dtype=int), seed=0)


def test_single_label_subset_on_a_hand_made_matrix():
    #                     class: 0  1  2  3
    targets = np.array(
        [
            [1, 0, 0, 0],  # 0: only class 0 -> kept, label 0
            [1, 1, 0, 0],  # 1: two top classes -> dropped
            [0, 1, 0, 1],  # 2: class 1 plus rare class 3 -> kept, label 1
            [0, 0, 1, 0],  # 3: class 2 -> kept, label 2
            [0, 0, 0, 1],  # 4: only the rare class 3 -> dropped (not a top class)
            [0, 0, 0, 0],  # 5: no labels -> dropped
            [1, 0, 1, 0],  # 6: two top classes -> dropped
            [0, 1, 0, 0],  # 7: class 1 -> kept, label 1
        ]
    )
    # counts: class 0: 3, class 1: 3, class 2: 2, class 3: 2; top-3 = [0, 1, 2] (2 beats 3 on the index tie)
    indices, labels = single_label_subset(targets, max_classes=3)
    assert indices.tolist() == [0, 2, 3, 7]
    assert labels.tolist() == [0, 1, 2, 1]
    assert indices.dtype == labels.dtype == np.int64


def test_single_label_subset_ignores_classes_without_positives():
    targets = np.array([[1, 0, 0], [0, 0, 1], [1, 0, 1]])
    indices, labels = single_label_subset(targets, max_classes=10)
    assert indices.tolist() == [0, 1] and labels.tolist() == [0, 2]


def test_tsne_is_deterministic_given_a_seed_and_pca_reduces_wide_features():
    features, _ = blobs(n_per_class=15, dim=60)
    first, second = tsne_embed(features, seed=3, max_iter=250), tsne_embed(features, seed=3, max_iter=250)
    assert first.shape == (45, 2)
    np.testing.assert_array_equal(first, second)


def test_tsne_caps_the_perplexity_for_small_sets():
    features, _ = blobs(n_per_class=4)
    assert tsne_embed(features, seed=0, perplexity=30, max_iter=250).shape == (12, 2)


def test_heatmap_with_nan_cells_best_and_search_path_is_a_png(tmp_path):
    blocks, timesteps = [0, 4, 8, 11], [0, 250, 500, 750, 999]
    scores = np.arange(20, dtype=float).reshape(4, 5)
    scores[0, 0] = np.nan
    path = plot_heatmap(
        scores,
        blocks,
        timesteps,
        "image <DiT>",
        tmp_path / "sub" / "heat.png",
        best=(8, 500),
        search_path=[(4, 250), (8, 500)],
    )
    assert_png(path)


def test_curve_plot_draws_one_line_per_head_on_a_log_axis(tmp_path, monkeypatch):
    import difffeat.analysis as analysis

    saved = []
    monkeypatch.setattr(analysis, "_save", lambda fig, path: saved.append(fig))
    curve = {"fused": {"100": 33.2, "300": 45.8, "1000": 57.3}, "pixels": {"100": 19.1, "300": None, "1000": 24.0}}
    plot_curve(curve, tmp_path / "curve.png")
    (ax,) = saved[0].axes
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
    assert lines == {"fused": ([100, 300, 1000], [33.2, 45.8, 57.3]), "pixels": ([100, 1000], [19.1, 24.0])}
    assert ax.get_xscale() == "log"


def test_curve_plot_is_a_png(tmp_path):
    assert_png(plot_curve({"fused": {"100": 33.2, "1000": 57.3}}, tmp_path / "c.png"))


def test_heatmap_rejects_cells_off_the_grid(tmp_path):
    with pytest.raises(ValueError, match="not on the heatmap grid"):
        plot_heatmap(np.zeros((2, 2)), [0, 1], [0, 10], "t", tmp_path / "h.png", best=(5, 10))


def test_tsne_plot_has_one_panel_per_feature_kind(tmp_path):
    points = np.random.default_rng(0).normal(size=(12, 2))
    labels = np.array([0, 2] * 6)
    path = plot_tsne(
        {"image": points, "text": -points, "fused": points * 2}, labels, ["a", "b", "c"], tmp_path / "t.png"
    )
    assert_png(path)
    with Image.open(path) as image:
        assert image.width > 2 * image.height  # three panels side by side
