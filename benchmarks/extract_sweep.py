"""Extracting a (block x timestep) grid: the naive way against difffeat's, side by side (a benchmark, not a test).

The naive way, per (block, t) pair: VAE-encode the images, noise them to t, run the full diffusers
``DiTTransformer2DModel`` forward with a forward hook on that block and mean-pool what the hook saw.
difffeat's way: VAE once, then one forward per timestep that stops after the deepest block asked for and
captures every asked block on the way (optionally all timesteps in one forward, ``--fuse``).

Both use the same random weights (a DiT-B/2-sized model, ours with diffusers' numerics, converted with
``dit_to_diffusers_state_dict``; an SD-VAE-sized ``AutoencoderKL`` built from its config), the VAE posterior
mean, the same per-sample DDPM noise and the same batches, so the features must agree (to float32 rounding in
fp32, to bf16 rounding with ``--bf16``). The check is printed beside the times.

Run: ``python benchmarks/extract_sweep.py [--grid 4x3|5x5] [--bf16] [--fuse] [--naive-pairs N]``.
Every naive pair costs the same (the full VAE and the full forward, whatever the block), so ``--naive-pairs N``
times N of them and extrapolates to the grid; it says so in its output.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

from difffeat.features.extract import ImageFeatureExtractor
from difffeat.models.dit import DiT, dit_config
from difffeat.models.dit_load import dit_to_diffusers_state_dict
from difffeat.models.schedule import per_sample_randn
from difffeat.models.vae import images_to_tensor

GRIDS = {"4x3": ([3, 6, 9, 11], [50, 250, 500]), "5x5": ([2, 4, 6, 9, 11], [25, 100, 250, 500, 750])}
SEED = 0


class Stopwatch:
    """Seconds per stage (VAE, DiT), to show where each way's time goes."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[stage] += time.perf_counter() - start


def random_dit(preset: str) -> DiT:
    """PyTorch's default init everywhere (the official init zeroes every adaLN gate: all blocks the identity)."""
    torch.manual_seed(0)
    dit = DiT(dit_config(preset, numerics="diffusers"))
    for m in dit.modules():
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d):
            m.reset_parameters()
    return dit.eval().requires_grad_(False)


def diffusers_twin(dit: DiT) -> DiTTransformer2DModel:
    c = dit.config
    twin = DiTTransformer2DModel(
        num_attention_heads=c.num_heads, attention_head_dim=c.hidden_size // c.num_heads, in_channels=c.in_channels,
        out_channels=c.out_channels, num_layers=c.depth, sample_size=c.input_size, patch_size=c.patch_size,
        num_embeds_ada_norm=c.num_classes, norm_eps=1e-5,
    )  # fmt: skip
    twin.load_state_dict(dit_to_diffusers_state_dict(dit.state_dict(), c.depth), strict=True)
    return twin.eval().requires_grad_(False)


def sd_vae() -> AutoencoderKL:
    """Stable Diffusion's VAE architecture (83M parameters) with random weights: no download."""
    torch.manual_seed(1)
    vae = AutoencoderKL(
        block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4, sample_size=256,
    )  # fmt: skip
    return vae.eval().requires_grad_(False)


def test_images(n: int, size: int) -> np.ndarray:
    """Smooth random images (low-frequency noise, upsampled): closer to photographs than white noise."""
    rng = np.random.default_rng(0)
    low = torch.from_numpy(rng.random((n, 3, size // 16, size // 16), dtype=np.float32))
    up = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return (up.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


@torch.inference_mode()
def naive_pair(twin, vae, pixels, keys, block: int, t: int, batch: int, bf16: bool, clock: Stopwatch) -> torch.Tensor:
    """One (block, t) feature the way a hook-based script computes it: VAE + full forward for this pair alone."""
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    seen: list[torch.Tensor] = []
    hook = twin.transformer_blocks[block].register_forward_hook(lambda m, i, o: seen.append(o.float().mean(dim=1)))
    try:
        for sl in batches(len(pixels), batch):
            with clock("vae"):
                z = vae.encode(pixels[sl]).latent_dist.mean * vae.config.scaling_factor
            with clock("dit"), torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
                noise = per_sample_randn(z.shape[1:], keys[sl], SEED, t)
                tt = torch.full((len(z),), t)
                xt = sched.add_noise(z, noise, tt)
                twin(xt, timestep=tt, class_labels=torch.full((len(z),), 1000))  # the hook keeps the block output
    finally:
        hook.remove()
    return torch.cat(seen)


def ours(extractor, images, keys, blocks, timesteps, batch: int, bf16: bool, fuse: bool, clock: Stopwatch) -> dict:
    """difffeat: latents once (as the latent cache does), then one truncated forward per timestep and batch."""
    parts: dict[tuple[int, int], list[torch.Tensor]] = {}
    for sl in batches(len(images), batch):
        with clock("vae"):
            x0 = extractor.encode(images[sl], ids=keys[sl], seed=SEED)
        with clock("dit"):
            feats = extractor(latents=x0, blocks=blocks, timesteps=timesteps, seed=SEED, ids=keys[sl], bf16=bf16,
                              fuse_timesteps=fuse)  # fmt: skip
        for bt, f in feats.items():
            parts.setdefault(bt, []).append(f)
    return {bt: torch.cat(p) for bt, p in parts.items()}


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=sorted(GRIDS), default="4x3", help="blocks x timesteps")
    parser.add_argument("--model", choices=["B", "XL"], default="B", help="DiT-B/2 or DiT-XL/2 sized")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the DiT on both sides")
    parser.add_argument("--fuse", action="store_true", help="ours: all timesteps in one forward")
    parser.add_argument("--naive-pairs", type=int, default=None, help="time only N naive pairs, extrapolate")
    args = parser.parse_args()

    blocks, timesteps = GRIDS[args.grid]
    pairs = [(b, t) for b in blocks for t in timesteps]
    dit, vae = random_dit(f"DiT-{args.model}/2"), sd_vae()
    twin = diffusers_twin(dit)
    images = test_images(args.images, args.size)
    pixels = images_to_tensor(images, args.size)
    keys = [f"img{i}" for i in range(args.images)]
    extractor = ImageFeatureExtractor(dit, vae, image_size=args.size, sample_posterior=False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}; "
          f"DiT-{args.model}/2 + SD-VAE, {args.images} images at {args.size} px, batch {args.batch}, "
          f"{'bf16' if args.bf16 else 'fp32'} DiT, grid {len(blocks)} blocks x {len(timesteps)} timesteps")  # fmt: skip

    # One untimed warm-up per side on two images: first calls pay oneDNN primitive creation and allocator growth,
    # which would otherwise land on whichever side happens to run first.
    ours(extractor, images[:2], keys[:2], blocks, timesteps[:1], 2, args.bf16, args.fuse, Stopwatch())
    naive_pair(twin, vae, pixels[:2], keys[:2], blocks[0], timesteps[0], 2, args.bf16, Stopwatch())
    mine, theirs = Stopwatch(), Stopwatch()
    ours_s, feats = timed(ours, extractor, images, keys, blocks, timesteps, args.batch, args.bf16, args.fuse, mine)
    measured = pairs[: args.naive_pairs] if args.naive_pairs else pairs
    naive_s, worst = 0.0, 0.0
    for b, t in measured:
        s, ref = timed(naive_pair, twin, vae, pixels, keys, b, t, args.batch, args.bf16, theirs)
        naive_s += s
        err = float((feats[(b, t)] - ref).abs().max() / ref.abs().max())
        worst = max(worst, err)
        print(f"  naive block {b:2d} t {t:3d}: {s:6.1f} s   max |ours - naive| / max |naive| = {err:.1e}")
    naive_total = naive_s * len(pairs) / len(measured)
    note = f" (measured {len(measured)} of {len(pairs)} pairs, extrapolated)" if len(measured) < len(pairs) else ""
    tol = 2e-2 if args.bf16 else 1e-4
    vae_pair, dit_pair = (theirs.seconds[k] / len(measured) for k in ("vae", "dit"))
    fused = ", fused" if args.fuse else ""
    verdict = "OK" if worst < tol else "TOO LARGE"
    print(f"naive (VAE + full forward per pair): {naive_total:7.1f} s{note}")
    print(f"    per pair: VAE {vae_pair:.1f} s, DiT {dit_pair:.1f} s")
    print(f"difffeat (VAE once, truncated forward per t{fused}): {ours_s:7.1f} s")
    print(f"    VAE {mine.seconds['vae']:.1f} s, DiT {mine.seconds['dit']:.1f} s for {len(timesteps)} timesteps")
    print(f"speed-up: {naive_total / ours_s:.1f}x; worst relative difference {worst:.1e} ({verdict}, tol {tol:.0e})")
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
