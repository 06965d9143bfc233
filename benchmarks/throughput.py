"""Extraction throughput and model FLOP utilisation of a truncated DiT forward (a benchmark, not a test).

For DiT-B/2- and DiT-XL/2-sized models with random weights, truncated after block 12 (0-based 11), latents
given (no VAE), fp32 and bf16 autocast: images per second through ``ImageFeatureExtractor`` (noise, forward,
pooling: what a job runs per batch), the FLOP rate that implies (FLOPs of the truncated forward counted
analytically) and its ratio to the measured peak of a large matmul of the same dtype on the same device in the
same run: the model FLOP utilisation (MFU).

Model and matmul timings are interleaved, and the best of ``--iters`` is kept for each, so a neighbour's load on
a shared machine hits both alike. Run: ``python benchmarks/throughput.py [--models B XL] [--iters 3]
[--timesteps 100] [--fuse] [--compile] [--device auto]``. With several timesteps an "image" is one
image at one timestep.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch

from difffeat.features.extract import ImageFeatureExtractor
from difffeat.models.dit import FREQUENCY_DIM, DiT, DiTConfig, dit_config
from difffeat.utils.runtime import resolve_device

BATCH = {"B": 16, "XL": 8}
DEPTH = 12  # blocks run: the forward stops after block 11


def truncated_forward_flops(c: DiTConfig, blocks: int) -> float:
    """FLOPs (a multiply-add is 2) of one image through the embeddings and ``blocks`` DiT blocks.

    Counted: patch embedding, timestep MLP, per block the adaLN projection (once per image), qkv, q·kᵀ,
    attention·v, output projection and the MLP. Left out as negligible: norms, GELU, softmax, modulation, pooling.
    """
    t, d, h = c.num_tokens, c.hidden_size, int(c.hidden_size * c.mlp_ratio)
    patch = 2 * t * c.in_channels * c.patch_size**2 * d
    t_embed = 2 * (FREQUENCY_DIM * d + d * d)
    block = 2 * d * 6 * d + 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * h
    return float(patch + t_embed + blocks * block)


def random_dit(size: str) -> DiT:
    """PyTorch's default init everywhere (the official init zeroes the adaLN gates: every block the identity)."""
    torch.manual_seed(0)
    dit = DiT(dit_config(f"DiT-{size}/2"))
    for m in dit.modules():
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d):
            m.reset_parameters()
    return dit.eval().requires_grad_(False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def matmul(device: torch.device, dtype: torch.dtype) -> tuple[Callable[[], object], float]:
    """A large square matmul and its FLOPs: the device's practical peak for that dtype."""
    n = 8192 if device.type == "cuda" else 4096
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return (lambda: a @ b), 2.0 * n**3


def bench_model(size: str, args: argparse.Namespace, device: torch.device) -> None:
    dit = random_dit(size).to(device)
    extractor = ImageFeatureExtractor(dit, compile=args.compile)
    n = BATCH[size]
    latents = torch.randn(n, dit.config.in_channels, dit.config.input_size, dit.config.input_size, device=device)
    flops = truncated_forward_flops(dit.config, DEPTH) * n * len(args.timesteps)
    for bf16, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        peak_fn, peak_flops = matmul(device, dtype)

        def run(bf16: bool = bf16) -> object:
            return extractor(latents=latents, blocks=[DEPTH - 1], timesteps=args.timesteps, bf16=bf16,
                             fuse_timesteps=args.fuse, keep_on_device=True)  # fmt: skip

        run(), peak_fn()  # warm-up (and compilation)
        best_model = best_peak = float("inf")
        for _ in range(args.iters):
            best_peak = min(best_peak, seconds(peak_fn, device))
            best_model = min(best_model, seconds(run, device))
        rate, peak, items = flops / best_model / 1e9, peak_flops / best_peak / 1e9, n * len(args.timesteps)
        print(f"DiT-{size}/2 {'bf16' if bf16 else 'fp32'}  batch {n:2d}  {items / best_model:7.2f} img/s  "
              f"{flops / items / 1e9:6.1f} GFLOP/img  {rate:8.1f} GFLOP/s  matmul peak {peak:8.1f} GFLOP/s  "
              f"MFU {rate / peak:5.1%}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(BATCH), default=["B", "XL"])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[100], help="img/s counts image x timestep")
    parser.add_argument("--fuse", action="store_true", help="fuse_timesteps: all timesteps in one forward")
    parser.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__} on {name}; load {os.getloadavg()[0]:.2f}; truncated after block {DEPTH - 1}, "
          f"best of {args.iters}{', compiled' if args.compile else ''}")  # fmt: skip
    with torch.inference_mode():
        for size in args.models:
            bench_model(size, args, device)
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
