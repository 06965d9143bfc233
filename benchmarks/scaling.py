"""The same ``difffeat extract`` with 1 process and with N processes under torchrun (a benchmark, not a test).

A DiT-S/2-sized pixel-space model (random weights, 256 tokens of 32 px demo images) extracts 2 blocks x 2
timesteps of the demo train split, once as a plain process and once as ``torchrun --nproc_per_node N``
(gloo on CPU, NCCL on GPUs). Each side gets the same CPU threads in all (a single process uses them all, N
processes 1/N each), so on a CPU the speed-up measures how well the shards split, not more hardware. The
wall time includes process start-up and model loading. The two stores must be byte-identical when each process
runs the same kernels; that is checked and printed.

Run: ``python benchmarks/scaling.py [--images 256] [--nproc 2]``.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from difffeat.models.dit import DiT, DiTConfig
from difffeat.models.dit_load import save_dit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model(folder: Path) -> Path:
    torch.manual_seed(0)
    dit = DiT(DiTConfig(input_size=32, patch_size=2, in_channels=3, hidden_size=384, depth=12, num_heads=6))
    for m in dit.modules():
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d):
            m.reset_parameters()
    return save_dit(dit, folder)


def config(root: Path, name: str, dit: Path, images: int) -> Path:
    cfg = {
        "out": str(root / name),
        "data": {"kind": "demo", "options": {"n_train": images, "n_val": 0, "n_test": 0}, "splits": ["train"]},
        "image": {"dit": str(dit), "name": "dit-s"},
        "extract": {"image_blocks": [5, 11], "image_timesteps": [50, 250], "batch_size": 32, "shard_size": 64,
                    "modalities": ["image"]},
    }  # fmt: skip
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def extract(cfg: Path, nproc: int, threads: int) -> float:
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    cmd = [sys.executable, *(launcher if nproc > 1 else []), "-m", "difffeat.run.cli", "extract", str(cfg)]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    return time.perf_counter() - start


def features(out: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in sorted((out / "store" / "entries").glob("*/features.npy"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads in all, per side")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dit = model(root / "dit")
        print(f"{args.images} images x 2 blocks x 2 timesteps, DiT-S/2-sized, {args.threads} threads in all; "
              f"load {os.getloadavg()[0]:.2f}")  # fmt: skip
        one = extract(config(root, "one", dit, args.images), 1, args.threads)
        print(f"1 process  x {args.threads} threads: {one:7.1f} s")
        many = extract(config(root, "many", dit, args.images), args.nproc, max(1, args.threads // args.nproc))
        print(f"{args.nproc} processes x {max(1, args.threads // args.nproc)} threads: {many:7.1f} s")
        same = features(root / "one") == features(root / "many")
        print(f"speed-up {one / many:.2f}x; stores byte-identical: {same}; load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
