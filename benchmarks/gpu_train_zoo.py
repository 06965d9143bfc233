"""Train the v2 demo models (demo world 2's unlabeled pool) on a GPU in minutes; see benchmarks/README.md, "GPU
session". ``benchmarks/gpu_train_zoo.sh`` runs it: the pool once, then the DiT and each DDiT in parallel processes
(tiny models leave an H200 mostly idle, so they share it).

    python benchmarks/gpu_train_zoo.py pool --cache /tmp/pool.npz [--pool 100000]
    python benchmarks/gpu_train_zoo.py dit --cache /tmp/pool.npz --out OUT/demo-dit-v2
    python benchmarks/gpu_train_zoo.py ddit --loss score_entropy --cache /tmp/pool.npz --out OUT/demo-ddit-v2-sedd
    ... --smoke: tiny sizes on the CPU, seconds (tests/demo/test_gpu_train_zoo.py runs it)

Each model folder gets fp16 EMA weights, ``config.json``, ``recipe.json`` (recipe, device, torch, threads,
seconds, steps done, losses) and, for a DDiT, its ``tokenizer.json``: what ``load_dit`` / ``load_ddit`` read.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from difffeat.demo.data import make_pool
from difffeat.demo.zoo import DDIT_LOSSES, DDiTRecipe, DiTRecipe, train_ddit, train_dit

POOL = 100_000
# On one H200 (estimated, not yet measured: tiny models are kernel-launch bound, a few ms a step): 20k steps of
# batch 512 is 10M samples, 100 passes over the pool. ``--max-seconds`` caps each model on a borrowed machine.
GPU_DIT = dict(steps=20_000, batch_size=512, lr=1e-3, warmup=500, bf16=True, device="auto", num_threads=4)
GPU_DDIT = dict(steps=20_000, batch_size=512, lr=1e-3, warmup=500, bf16=True, device="auto", num_threads=4)
SMOKE = dict(steps=2, batch_size=8, warmup=1, bf16=False, device="cpu", num_threads=1)


def cmd_pool(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    images, captions = make_pool(args.pool, workers=args.workers)
    np.savez(args.cache, images=images, captions=np.array(json.dumps(captions)))
    print(f"pool: {len(images)} scenes in {time.perf_counter() - start:.1f} s with {args.workers} workers")


def _load_pool(cache: str) -> tuple[np.ndarray, list[tuple[str, ...]]]:
    with np.load(cache) as z:
        return z["images"], [tuple(c) for c in json.loads(str(z["captions"]))]


def cmd_dit(args: argparse.Namespace) -> None:
    images, _ = _load_pool(args.cache)
    recipe = DiTRecipe(**(SMOKE if args.smoke else GPU_DIT), pool=len(images))
    train_dit(images, recipe, args.out, log_every=args.log_every, max_seconds=args.max_seconds)


def cmd_ddit(args: argparse.Namespace) -> None:
    from difffeat.models.tokenizers import load_tokenizer, train_word_tokenizer

    _, captions = _load_pool(args.cache)
    recipe = DDiTRecipe(**(SMOKE if args.smoke else GPU_DDIT), pool=len(captions), loss=args.loss)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_word_tokenizer([c for caps in captions for c in caps], recipe.vocab_size, out / "tokenizer.json")
    train_ddit(captions, load_tokenizer(tok), recipe, out, log_every=args.log_every, max_seconds=args.max_seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    pool = sub.add_parser("pool", help="generate the unlabeled pool into --cache")
    pool.add_argument("--pool", type=int, default=POOL)
    pool.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    for name in ("dit", "ddit"):
        p = sub.add_parser(name, help=f"train the v2 {name.upper()} on the cached pool")
        p.add_argument("--out", required=True)
        p.add_argument("--smoke", action="store_true", help="tiny run on the CPU (seconds)")
        p.add_argument("--max-seconds", type=float, default=None, help="stop early (recorded as steps_done)")
        p.add_argument("--log-every", type=int, default=1000)
        if name == "ddit":
            p.add_argument("--loss", choices=DDIT_LOSSES, default="score_entropy")
    for p in sub.choices.values():
        p.add_argument("--cache", required=True, help="the pool's .npz")
    args = ap.parse_args()
    {"pool": cmd_pool, "dit": cmd_dit, "ddit": cmd_ddit}[args.cmd](args)


if __name__ == "__main__":
    main()
