"""Looking at features: (block, t) heatmaps with the search path, t-SNE pictures and clustering scores.

Everything here is deterministic given a seed. Figures are built as bare ``matplotlib.figure.Figure`` objects,
which render with the Agg canvas: this runs headless and, unlike ``matplotlib.use("Agg")`` or pyplot, never changes
the caller's global backend or leaks open figures.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.metrics import (
    calinski_harabasz_score,
    davies_bouldin_score,
    normalized_mutual_info_score,
    silhouette_score,
)
from sklearn.preprocessing import StandardScaler

from difffeat.utils.times import as_time

Cell = tuple[int, int]

# Which way is better for each clustering score, so tables and tests need not remember (Davies-Bouldin is "lower").
CLUSTERING_BETTER = {"silhouette": "higher", "davies_bouldin": "lower", "calinski_harabasz": "higher", "nmi": "higher"}
_PCA_DIMS = 50  # the usual t-SNE recipe: PCA first removes noise dimensions and makes t-SNE much faster
_KMEANS_INITS = 10


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _cell_position(cell: Sequence[int], blocks: Sequence[int], timesteps: Sequence[int]) -> tuple[int, int]:
    """(block, t) in real indices -> (x, y) = (timestep column, block row) in the image."""
    block, t = int(cell[0]), as_time(cell[1])
    if block not in blocks or t not in timesteps:
        raise ValueError(f"cell {(block, t)} is not on the heatmap grid (blocks {list(blocks)}, t {list(timesteps)})")
    return list(timesteps).index(t), list(blocks).index(block)


def _annotate(ax: Axes, scores: np.ndarray, image: AxesImage) -> None:
    """Write each value in its cell, in black or white depending on how dark the cell is."""
    finite = scores[np.isfinite(scores)]
    fmt = "{:.1f}" if finite.size and np.abs(finite).max() > 1 else "{:.3f}"  # percent vs fraction scores
    for (row, col), value in np.ndenumerate(scores):
        if np.isfinite(value):
            dark = image.norm(value) < 0.5
            colour = "white" if dark else "black"
            ax.text(col, row, fmt.format(value), ha="center", va="center", fontsize=7, color=colour)


def _draw_path(ax: Axes, points: list[tuple[int, int]]) -> None:
    """The search's visited order: a circle at the start and an arrow for every move."""
    ax.plot(*points[0], marker="o", markersize=10, markerfacecolor="none", markeredgecolor="red", markeredgewidth=2)
    arrow = {"arrowstyle": "->", "color": "red", "lw": 1.8, "alpha": 0.8}
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=arrow)


def plot_heatmap(
    scores: np.ndarray,
    blocks: Sequence[int],
    timesteps: Sequence[int],
    title: str,
    path: str | Path,
    best: Cell | None = None,
    search_path: Sequence[Cell] | None = None,
    value_label: str = "val mAP",
) -> Path:
    """Scores over the (block, t) grid: blocks on y (block 0 at the bottom), timesteps on x, NaN cells grey.

    ``best`` (default: the highest finite cell) gets a box; ``search_path`` (cells in visited order) is drawn as
    arrows so one can see how few cells the local search needed. Axis labels are the real block/timestep indices.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(blocks), len(timesteps)):
        raise ValueError(
            f"scores shape {scores.shape} != (len(blocks), len(timesteps)) = {len(blocks), len(timesteps)}"
        )
    rows, cols = scores.shape
    fig = Figure(figsize=(2.0 + 0.75 * cols, 1.5 + 0.42 * rows))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(scores), cmap=cmap, origin="lower", aspect="auto")
    fig.colorbar(image, ax=ax, label=value_label)
    ax.set_xticks(range(cols), [str(t) for t in timesteps])
    ax.set_yticks(range(rows), [str(b) for b in blocks])
    ax.set_xlabel("timestep")
    ax.set_ylabel("block")
    ax.set_title(title)
    _annotate(ax, scores, image)
    if best is None and np.isfinite(scores).any():
        row, col = np.unravel_index(np.nanargmax(scores), scores.shape)
        best = (blocks[row], timesteps[col])
    if best is not None:
        x, y = _cell_position(best, blocks, timesteps)
        ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=3))
    if search_path:
        _draw_path(ax, [_cell_position(cell, blocks, timesteps) for cell in search_path])
    return _save(fig, path)


def plot_curve(curve: dict[str, dict[str, float | None]], path: str | Path, value_label: str = "test mAP") -> Path:
    """The label-efficiency curve: one line per head, its test score against the number of labeled train rows
    (log scale: the question is what each tenfold of labels buys). Points a head does not have are left out."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for name, row in curve.items():
        points = sorted((int(n), v) for n, v in row.items() if v is not None)
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=name)
    ax.set_xscale("log")
    sizes = sorted({int(n) for row in curve.values() for n in row})
    ax.set_xticks(sizes, [str(n) for n in sizes], minor=False)  # the sizes themselves, not powers of ten
    ax.minorticks_off()
    ax.set_xlabel("labeled train rows")
    ax.set_ylabel(value_label)
    ax.set_title("Label efficiency")
    ax.legend(fontsize="small")
    return _save(fig, path)


def tsne_embed(features: np.ndarray, seed: int, perplexity: float = 30.0, max_iter: int = 1000) -> np.ndarray:
    """2-D t-SNE of ``features`` [N, D], deterministic given ``seed`` (PCA to 50 dims first when D > 50).

    The perplexity is capped at (N - 1) / 3 because t-SNE needs about three times perplexity neighbours per point;
    small debugging subsets would otherwise fail. ``max_iter`` (>= 250) trades quality for speed on quick looks.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 4:
        raise ValueError(f"need features [N >= 4, D], got shape {features.shape}")
    if features.shape[1] > _PCA_DIMS:
        n_components = min(_PCA_DIMS, features.shape[0])
        features = PCA(n_components=n_components, random_state=seed).fit_transform(features)
    perplexity = min(perplexity, (features.shape[0] - 1) / 3)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", max_iter=max_iter, random_state=seed)
    return tsne.fit_transform(features)


def plot_tsne(
    embeddings: dict[str, np.ndarray], labels: np.ndarray, class_names: Sequence[str], path: str | Path
) -> Path:
    """One panel per feature kind (e.g. image / text / fused), points coloured by class, same colour per class."""
    labels = np.asarray(labels)
    present = np.unique(labels)
    cmap = matplotlib.colormaps["tab10" if len(class_names) <= 10 else "tab20"]
    fig = Figure(figsize=(4.5 * len(embeddings), 4.5))
    axes = fig.subplots(1, len(embeddings), squeeze=False)
    for ax, (name, points) in zip(axes[0], embeddings.items(), strict=True):
        points = np.asarray(points)
        for label in present:
            chosen = labels == label
            ax.scatter(*points[chosen].T, s=8, color=cmap(label % cmap.N), label=class_names[label])
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=2, frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def clustering_scores(features: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, float]:
    """How well the labels separate in feature space, on standardised features (so no dimension dominates).

    Returns silhouette (higher is better), Davies-Bouldin (lower), Calinski-Harabasz (higher), and the NMI between
    the labels and a seeded k-means with k = the number of distinct labels (higher); see ``CLUSTERING_BETTER``.
    """
    features = StandardScaler().fit_transform(np.asarray(features, dtype=np.float64))
    labels = np.asarray(labels)
    k = len(np.unique(labels))
    if not 2 <= k < len(labels):
        raise ValueError(
            f"clustering scores need 2 <= distinct labels < samples, got {k} labels, {len(labels)} samples"
        )
    clusters = KMeans(n_clusters=k, n_init=_KMEANS_INITS, random_state=seed).fit_predict(features)
    return {
        "silhouette": float(silhouette_score(features, labels)),
        "davies_bouldin": float(davies_bouldin_score(features, labels)),
        "calinski_harabasz": float(calinski_harabasz_score(features, labels)),
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
    }


def single_label_subset(targets: np.ndarray, max_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Samples that carry exactly one of the ``max_classes`` most frequent classes, and that class as their label.

    Clustering scores and t-SNE colours need one label per point, but a multi-label image has several. Keeping only
    the samples with a single frequent class gives an unambiguous label without inventing one; other, rarer labels
    may still be present. The most frequent classes are used so that each colour/cluster has enough points;
    frequency ties go to the lower class index, and classes with no positives are never chosen.

    Returns (indices into ``targets``, labels as original class indices), both int64 and sorted by index.
    """
    targets = np.asarray(targets) > 0
    if targets.ndim != 2:
        raise ValueError(f"targets must be [N, C], got shape {targets.shape}")
    counts = targets.sum(axis=0)
    order = np.argsort(-counts, kind="stable")  # stable sort: equal counts keep ascending class order
    top = order[:max_classes][counts[order[:max_classes]] > 0]
    in_top = targets[:, top]
    indices = np.flatnonzero(in_top.sum(axis=1) == 1)
    labels = top[in_top[indices].argmax(axis=1)]
    return indices.astype(np.int64), labels.astype(np.int64)
