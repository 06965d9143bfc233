"""Does the training loss decide whether a DDiT's clean-caption features beat its random init? (issue 15)

The hypothesis (see the README's "Text features and the training loss"): MDLM's SUBS parameterisation copies
unmasked tokens to the output, so its loss never shapes unmasked positions' outputs, and at step 0 (nothing masked)
every position is one the loss never trained. Trains the same small DDiT on demo world 2's unlabeled pool with
three losses, same seed, data and steps:

* ``mdlm``: MDLM's SUBS absorbing loss (the committed demo DDiT's);
* ``score_entropy``: SEDD's absorbing score entropy (note: on the absorbing graph it too has terms only at masked
  positions, see ``difffeat.demo.zoo.score_entropy``);
* ``ce_all``: plain cross-entropy of the clean token at every position of the noisy caption (unmasked positions
  are trained to copy);

and probes, on world 2's few-label set, mean-pooled clean-caption features (step 0) and small-noise ones (step 100)
of every block, against the random-init rows (the DDiT's own init, whose zeroed adaLN gates make every block the
identity, and PyTorch's default init, the demo's random-init baseline) and a bag-of-words probe. "held-out" is test
mAP on the test rows whose captions use a surface form the labeled splits never show.

Run by hand, 1 thread::

    python benchmarks/text_hypothesis.py --out runs/text_hypothesis      # ~25 CPU-minutes on a 2-core machine
    python benchmarks/text_hypothesis.py --smoke --out /tmp/th            # seconds: the code path only

Trained models are kept in ``--out`` and reused on a rerun; results go to ``--out/results.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from difffeat.demo.data import (
    CLASSES,
    DemoParams,
    generate_demo_scenes,
    held_out_forms,
    make_demo_dataset,
    make_pool,
    tokenize_caption,
)
from difffeat.demo.zoo import DDIT_LOSSES, DDiTRecipe, ddit_config, train_ddit
from difffeat.features.extract import TextFeatureExtractor
from difffeat.heads.probe import ProbeOptions, fit_probes
from difffeat.metrics import multilabel_metrics
from difffeat.models.ddit import DDiT
from difffeat.models.ddit_load import load_ddit
from difffeat.models.tokenizers import load_tokenizer, train_word_tokenizer

STEPS = (0, 100)
PROBE = ProbeOptions(epochs=200, lr=3e-2, patience=20, num_threads=1)  # the demo's probe recipe


def multi_hot(samples) -> np.ndarray:
    y = np.zeros((len(samples), len(CLASSES)), dtype=np.float32)
    for i, s in enumerate(samples):
        y[i, list(s.labels)] = 1
    return y


def probe_map(feats: dict[str, np.ndarray], ys: dict[str, np.ndarray], rows: np.ndarray) -> tuple[float, float]:
    """Test mAP of a linear probe (selected on val) on all test rows and on ``rows``."""
    probe = fit_probes([feats["train"]], ys["train"], [feats["val"]], ys["val"], PROBE)[0]
    scores = probe.predict(feats["test"])
    full = multilabel_metrics(scores, ys["test"])["mAP"]
    return full, multilabel_metrics(scores[rows], ys["test"][rows])["mAP"]


def bag_of_words(splits: dict, vocab: list[str]) -> dict[str, np.ndarray]:
    """Token counts averaged over a sample's captions: what a random projection of embeddings approximates."""
    index = {w: i for i, w in enumerate(vocab)}
    out = {}
    for name, samples in splits.items():
        x = np.zeros((len(samples), len(vocab)), dtype=np.float32)
        for i, s in enumerate(samples):
            for c in s.captions:
                for tok in tokenize_caption(c):
                    if tok in index:
                        x[i, index[tok]] += 1 / len(s.captions)
        out[name] = x
    return out


def default_init(model: DDiT, seed: int) -> DDiT:
    """The demo's random-init baseline: PyTorch's default init everywhere (``run.pipeline._random_twin``)."""
    torch.manual_seed(seed)
    twin = DDiT(model.config)
    for mod in twin.modules():
        if isinstance(mod, torch.nn.Linear | torch.nn.Embedding):
            mod.reset_parameters()
    return twin.eval()


def evaluate(model: DDiT, tok, splits: dict, ys: dict, rows: np.ndarray) -> dict[str, list[float]]:
    """Per step, per block: (test mAP, held-out-rows mAP)."""
    ex = TextFeatureExtractor(model.float().eval(), tok)
    blocks = list(range(model.depth))
    feats = {n: ex([s.captions for s in sp], blocks=blocks, timesteps=STEPS) for n, sp in splits.items()}
    out = {}
    for step in STEPS:
        out[f"step{step}"] = [
            probe_map({n: feats[n][(b, step)].float().numpy() for n in splits}, ys, rows) for b in blocks
        ]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/text_hypothesis")
    ap.add_argument("--pool", type=int, default=20_000, help="unlabeled pool scenes (world 2)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--labeled", type=int, nargs=3, default=(1000, 500, 1000), metavar=("TRAIN", "VAL", "TEST"))
    ap.add_argument("--losses", nargs="+", default=list(DDIT_LOSSES), choices=DDIT_LOSSES)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the code path in seconds")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.smoke:
        args.pool, args.steps, args.batch, args.labeled = 200, 3, 8, (60, 30, 60)
    size = {} if not args.smoke else dict(hidden_size=32, cond_dim=16, n_heads=2, n_blocks=2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu0, wall0 = time.process_time(), time.perf_counter()

    captions = make_pool(args.pool)[1]
    tok_path = out / "tokenizer.json"
    if not tok_path.exists():
        train_word_tokenizer([c for caps in captions for c in caps], 256, tok_path)
    tok = load_tokenizer(tok_path)
    n_train, n_val, n_test = args.labeled
    ds = make_demo_dataset(n_train, n_val, n_test, world=2)
    splits = {n: ds.split(n).samples for n in ("train", "val", "test")}
    ys = {n: multi_hot(sp) for n, sp in splits.items()}
    held = {f"{c}:{f}" for c, f in held_out_forms().items()}
    test_scenes = generate_demo_scenes(DemoParams(n_train, n_val, n_test, world=2), "test")
    rows = np.array([any(f in held for forms in s.forms for f in forms) for s in test_scenes])

    results: dict[str, dict] = {}
    vocab = sorted({t for sp in splits.values() for s in sp for c in s.captions for t in tokenize_caption(c)})
    bow = bag_of_words(splits, vocab)
    results["bag of words"] = {"step0": [probe_map(bow, ys, rows)]}
    models = {}
    for loss in args.losses:
        folder = out / f"ddit-{loss}"
        if not (folder / "recipe.json").exists():
            recipe = DDiTRecipe(steps=args.steps, batch_size=args.batch, warmup=min(100, args.steps), bf16=False,
                                loss=loss, pool=args.pool, **size)  # fmt: skip
            train_ddit(captions, tok, recipe, folder, log_every=100)
        models[loss] = load_ddit(folder)
    template = DDiT(ddit_config(DDiTRecipe(**size), tok.vocab_size))
    torch.manual_seed(0)
    models["random (DDiT init)"] = DDiT(template.config).eval()
    models["random (default init)"] = default_init(template, 0)
    for name, model in models.items():
        results[name] = evaluate(model, tok, splits, ys, rows)
        print(name, json.dumps(results[name]), flush=True)

    info = {
        "args": vars(args),
        "cpu_seconds": round(time.process_time() - cpu0, 1),
        "wall_seconds": round(time.perf_counter() - wall0, 1),
        "held_out_test_rows": int(rows.sum()),
        "torch": torch.__version__,
        "results": results,
    }
    (out / "results.json").write_text(json.dumps(info, indent=1) + "\n")
    print_table(results)
    print(f"CPU {info['cpu_seconds']} s, wall {info['wall_seconds']} s")


def print_table(results: dict) -> None:
    print("| features | step | " + " | ".join(f"block {b}" for b in range(6)) + " |")
    for name, per_step in results.items():
        for step, cells in per_step.items():
            vals = " | ".join(f"{a:.1f} ({h:.1f})" for a, h in cells)
            print(f"| {name} | {step[4:]} | {vals} |")


if __name__ == "__main__":
    main()
