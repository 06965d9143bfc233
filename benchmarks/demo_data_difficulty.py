"""How hard is the demo dataset? Cheap proxies for "the method must matter", printed side by side.

Run by hand (a few minutes on a 2-core CPU)::

    python benchmarks/demo_data_difficulty.py            # full default sizes (5000 / 1000 / 1000)
    python benchmarks/demo_data_difficulty.py --skip-cnn # without the trained-CNN rows

Rows (test mAP, %; every probe picks its regularisation / stopping point on val mAP):

* pixels, linear: one-vs-rest logistic probe on raw pixels. Must stay clearly below the rows below it.
* bag-of-words (one caption / all captions), linear: captions are informative but incomplete.
* pixels + bag-of-words, linear: concatenation beats either alone.
* pixels, MLP / random conv features / small trained CNN: non-linear image structure a good feature extractor can
  capture (the trained CNN is the "oracle-ish" image representation).
* CNN features + bag-of-words, linear: what fusing a good image representation with text reaches.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.metrics import average_precision_score
from torch import nn

from difffeat.demo.data import CLASSES, DemoParams, generate_demo_scenes, make_demo_dataset

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]  # train, val, test


def mean_ap(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean over classes with a positive of sklearn's per-class average precision, in %."""
    aps = [average_precision_score(targets[:, c], scores[:, c]) for c in range(targets.shape[1]) if targets[:, c].any()]
    return 100.0 * float(np.mean(aps))


def standardise(x: Arrays) -> Arrays:
    mu, sd = x[0].mean(0), x[0].std(0) + 1e-6
    return tuple(((a - mu) / sd).astype(np.float32) for a in x)


def _fit(
    model: nn.Module,
    batches: Callable[[], list[tuple[torch.Tensor, torch.Tensor]]],
    score: Callable[[str], np.ndarray],
    y: Arrays,
    epochs: int,
    lr: float,
    l2: float,
) -> tuple[float, float]:
    """Train with BCE + ``l2`` * (sum of squared weights) and Adam; return (best val mAP, test mAP at that
    epoch). An explicit penalty, because AdamW's decoupled decay at these learning rates barely regularises."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    weights = [p for p in model.parameters() if p.ndim > 1]
    best = (-1.0, 0.0)
    for _ in range(epochs):
        model.train()
        for xb, yb in batches():
            opt.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(model(xb), yb)
            (loss + l2 * sum(w.square().sum() for w in weights)).backward()
            opt.step()
        model.eval()
        val = mean_ap(score("val"), y[1])
        if val > best[0]:
            best = (val, mean_ap(score("test"), y[2]))
    return best


def _scorer(model: nn.Module, x: dict[str, torch.Tensor]) -> Callable[[str], np.ndarray]:
    def score(split: str) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([model(xb) for xb in x[split].split(1024)]).numpy()

    return score


def _minibatches(x: torch.Tensor, y: torch.Tensor, size: int, gen: torch.Generator):
    def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(x), generator=gen)
        return [(x[i], y[i]) for i in order.split(size)]

    return batches


def probe(x: Arrays, y: Arrays, model_fn: Callable[[int], nn.Module], grid: list[float], epochs: int, lr: float):
    """Fit ``model_fn(dim)`` on x for each L2 penalty in ``grid``; return (val mAP, test mAP) of the model and
    epoch with the best val mAP."""
    xt = dict(zip(("train", "val", "test"), map(torch.from_numpy, x), strict=True))
    yt = torch.from_numpy(y[0].astype(np.float32))
    best = (-1.0, 0.0)
    for l2 in grid:
        torch.manual_seed(0)
        model = model_fn(x[0].shape[1])
        batches = _minibatches(xt["train"], yt, 256, torch.Generator().manual_seed(0))
        best = max(best, _fit(model, batches, _scorer(model, xt), y, epochs, lr, l2))
    return best


def concat_probe(image: Arrays, text: Arrays, y: Arrays, grid: list[float]) -> tuple[float, float]:
    """Linear probe on [w * image, text] (both standardised), w picked on val: one shared L2 penalty cannot suit
    a 3072-dim weak block and a 100-dim strong one at once, the weight lets the probe trust each its own way."""
    image, text = standardise(image), standardise(text)
    results = []
    for w in (0.2, 0.5, 1.0):
        x = tuple(np.concatenate([a * w, b], 1) for a, b in zip(image, text, strict=True))
        results.append(probe(x, y, linear, grid, 40, 3e-3))
    return max(results)


def linear(dim: int) -> nn.Module:
    return nn.Linear(dim, len(CLASSES))


def mlp(dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, 512), nn.ReLU(), nn.Dropout(0.3), nn.Linear(512, len(CLASSES)))


def random_conv_features(images: Arrays, channels: int = 96) -> Arrays:
    """Fixed random 5x5 filters on per-image-centred pixels, ReLU, 4x4 max pooling: translation-tolerant
    non-linear features with no training at all."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, channels, 5, padding=2)
    out = []
    for im in images:
        x = torch.from_numpy(im).permute(0, 3, 1, 2).float() / 255.0
        x = x - x.mean(dim=(2, 3), keepdim=True)
        with torch.no_grad():
            feats = [nn.functional.max_pool2d(torch.relu(conv(b)), 4).flatten(1) for b in x.split(512)]
        out.append(torch.cat(feats).numpy())
    return tuple(out)


class SmallCNN(nn.Module):
    """Three conv stages and global max pooling: about the smallest network that handles position and scale."""

    def __init__(self) -> None:
        super().__init__()
        layers, c_in = [], 3
        for c_out in (32, 64, 96):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers, nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.head = nn.Linear(c_in, len(CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_cnn(images: Arrays, y: Arrays, epochs: int) -> tuple[float, Arrays]:
    """Train SmallCNN; return its test mAP at the best val epoch and its pooled features for every split."""
    torch.manual_seed(0)
    x = {
        k: torch.from_numpy(im).permute(0, 3, 1, 2).float() / 127.5 - 1
        for k, im in zip(("train", "val", "test"), images, strict=True)
    }
    model = SmallCNN()
    batches = _minibatches(x["train"], torch.from_numpy(y[0].astype(np.float32)), 128, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    best, state = -1.0, None
    for _ in range(epochs):
        model.train()
        for xb, yb in batches():
            opt.zero_grad()
            nn.functional.binary_cross_entropy_with_logits(model(xb), yb).backward()
            opt.step()
        model.eval()
        val = mean_ap(_scorer(model, x)("val"), y[1])
        if val > best:
            best, state = val, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    with torch.no_grad():
        feats = tuple(
            torch.cat([model.features(b) for b in x[k].split(1024)]).numpy() for k in ("train", "val", "test")
        )
    return mean_ap(_scorer(model, x)("test"), y[2]), feats


def bag_of_words(captions: tuple[list[list[str]], ...], first_only: bool) -> Arrays:
    """Binary bag of words over a sample's captions; single-character tokens kept (numerals name digits)."""
    docs = [[" ".join(c[:1] if first_only else c) for c in split] for split in captions]
    vec = CountVectorizer(token_pattern=r"(?u)\b\w+\b", binary=True).fit(docs[0])
    return tuple(vec.transform(d).toarray().astype(np.float32) for d in docs)


def caption_stats(params: DemoParams) -> str:
    """Per-caption and per-sample recall of present labels by mentions, and the wrong-mention rate (val split)."""
    scenes = generate_demo_scenes(params, "val")
    per_caption, union, wrong, n_caps = [], [], 0, 0
    for s in scenes:
        labels = set(s.labels)
        said = [set(m) for m in s.mentions]
        per_caption += [len(m & labels) / len(labels) for m in said]
        union.append(len(set().union(*said) & labels) / len(labels))
        wrong += sum(bool(m - labels) for m in said)
        n_caps += len(said)
    return (
        f"captions/sample {n_caps / len(scenes):.2f}, label recall per caption {np.mean(per_caption):.2f}, "
        f"over all captions {np.mean(union):.2f}, wrong-mention rate {wrong / n_caps:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=5000)
    parser.add_argument("--n-val", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-cnn", action="store_true")
    parser.add_argument("--cnn-epochs", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    ds = make_demo_dataset(args.n_train, args.n_val, args.n_test, seed=args.seed)
    print(f"generated {sum(map(len, ds.splits.values()))} samples in {time.perf_counter() - t0:.1f}s; {ds.notes}")
    splits = [ds.split(n) for n in ("train", "val", "test")]
    images = tuple(np.stack([s.image for s in sp]) for sp in splits)
    y = tuple(sp.label_matrix(ds.num_classes) for sp in splits)
    captions = tuple([list(s.captions) for s in sp] for sp in splits)
    pixels = tuple(im.reshape(len(im), -1).astype(np.float32) / 255.0 for im in images)
    print(caption_stats(DemoParams(args.n_train, args.n_val, args.n_test, seed=args.seed)))
    print(
        f"labels/sample {y[0].sum(1).mean():.2f}, class prior {y[0].mean():.3f} (chance mAP ~{100 * y[2].mean():.0f})"
    )

    bow_all, bow_one = bag_of_words(captions, False), bag_of_words(captions, True)
    grid = [1e-3, 1e-2, 3e-2]
    rows: list[tuple[str, Callable[[], tuple[float, float]]]] = [
        ("pixels, linear", lambda: probe(standardise(pixels), y, linear, grid, 40, 1e-3)),
        ("bag-of-words (one caption), linear", lambda: probe(standardise(bow_one), y, linear, grid, 40, 3e-3)),
        ("bag-of-words (all captions), linear", lambda: probe(standardise(bow_all), y, linear, grid, 40, 3e-3)),
        ("pixels + bag-of-words, linear", lambda: concat_probe(pixels, bow_all, y, grid)),
        ("pixels, MLP (512 hidden)", lambda: probe(standardise(pixels), y, mlp, [1e-4], 40, 1e-3)),
        (
            "random conv features, linear",
            lambda: probe(standardise(random_conv_features(images)), y, linear, grid, 30, 1e-3),
        ),
    ]
    for name, run in rows:
        t = time.perf_counter()
        print(f"{name:40s} test mAP {run()[1]:5.1f}   ({time.perf_counter() - t:.0f}s)", flush=True)
    if not args.skip_cnn:
        t = time.perf_counter()
        cnn_map, feats = train_cnn(images, y, args.cnn_epochs)
        print(f"{'pixels, small trained CNN':40s} test mAP {cnn_map:5.1f}   ({time.perf_counter() - t:.0f}s)")
        print(f"{'CNN features + bag-of-words, linear':40s} test mAP {concat_probe(feats, bow_all, y, grid)[1]:5.1f}")


if __name__ == "__main__":
    main()
