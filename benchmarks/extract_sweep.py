"""Extracting a (block x timestep) grid three ways, side by side in one run (a benchmark, not a test).

- **naive**, per (block, t) pair: encode the images (VAE, or the pixel preprocessing of a pixel-space DiT), noise
  them to t, run the full diffusers ``DiTTransformer2DModel`` forward with a hook on that one block.
- **peer**, what a competent user writes without difffeat (DDAE, generic-diffusion-feature, DIFT): latents
  computed once; one full diffusers forward per timestep and batch with forward hooks on every block asked for;
  with ``--ensemble E`` the E noised copies stacked in one batch and the features averaged (DIFT).
- **difffeat**: latents once (channels-last VAE), then one forward per timestep (and draw) that stops after the
  deepest block asked for and captures every asked block on the way (``--fuse``: all timesteps in one forward).

The three ratios are printed: difffeat vs naive, difffeat vs peer, peer vs naive. All three sides use the same
weights (ours with diffusers' numerics, converted with ``dit_to_diffusers_state_dict``), the VAE posterior mean,
the same per-sample noise and the same batches, so the features must agree (to float32 rounding in fp32, to bf16
rounding with ``--bf16``); the check is printed beside the times. Models: ``demo`` (the embedded demo DiT, pixel
space, no VAE), ``B`` and ``XL`` (DiT-B/2 and DiT-XL/2 sized, random weights, with an SD-VAE sized random
``AutoencoderKL``). Grids: ``early`` (the deepest block is early: truncation pays) and ``last`` (the deepest block
is the last one: it cannot).

Run: ``python benchmarks/extract_sweep.py --model demo|B|XL --grid early|last [--images N] [--batch N]
[--ensemble E] [--bf16] [--fuse] [--naive-pairs N] [--repeats R] [--threads N] [--vae-layouts]``. Every naive
pair costs the same (the full encode and the full forward, whatever the block), so ``--naive-pairs N`` times N of
them and extrapolates to the grid; the output says so. ``--repeats R`` runs the three sides in turn R times and
keeps each side's fastest round (a neighbour's load spike then hits one round, not one side). ``--vae-layouts``
instead times the VAE encoder alone, default vs channels-last memory format, at a few batch sizes, interleaved.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

from difffeat.features.extract import ImageFeatureExtractor
from difffeat.features.store import EntryKey, FeatureStore
from difffeat.models.dit import DiT, dit_config
from difffeat.models.dit_load import dit_to_diffusers_state_dict, load_dit
from difffeat.models.schedule import per_sample_randn
from difffeat.models.vae import images_to_tensor
from difffeat.utils.runtime import autocast

DEMO_DIT = Path(__file__).resolve().parents[1] / "src" / "difffeat" / "assets" / "zoo" / "demo-dit"
TIMESTEPS = [50, 250, 500]
GRIDS = {  # model -> grid -> blocks (0-based); demo depth 6, B depth 12, XL depth 28
    "demo": {"early": [0, 1, 2], "last": [1, 3, 5]},
    "B": {"early": [1, 3, 5], "last": [3, 7, 11]},
    "XL": {"early": [3, 7, 11], "last": [9, 18, 27]},
}
SIZES = {"demo": (256, 64), "B": (4, 4), "XL": (4, 4)}  # default images, batch: each run ends in minutes here
SEED = 0

Encode = Callable[[torch.Tensor], torch.Tensor]


class Stopwatch:
    """Seconds per stage (encode, DiT), to show where each way's time goes."""

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
    # diffusers recomputes the fixed sin-cos position embedding; a checkpoint may hold it rounded (the demo DiT's
    # is float16, 2.4e-4 off), and the same weights means that one on both sides.
    twin.pos_embed.pos_embed.copy_(dit.pos_embed)
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
    low = torch.from_numpy(rng.random((n, 3, max(2, size // 16), max(2, size // 16)), dtype=np.float32))
    up = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return (up.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def user_encoder(vae: AutoencoderKL | None, size: int) -> Encode:
    """uint8 images -> x0 the way a user's script does it: preprocess, then diffusers' VAE in its default layout."""

    def encode(images: np.ndarray) -> torch.Tensor:
        pixels = images_to_tensor(images, size)
        return pixels if vae is None else vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor

    return encode


class HookedTwin:
    """The diffusers DiT with a forward hook on each wanted block that mean-pools the block's output."""

    def __init__(self, twin: DiTTransformer2DModel, label: int, bf16: bool):
        self.twin, self.label, self.bf16 = twin, label, bf16
        self.sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")

    def __call__(self, x0: torch.Tensor, keys: list[str], blocks: list[int], t: int, ensemble: int) -> dict:
        """Full forward of x0 noised ``ensemble`` times (stacked, as DIFT does); {block: draw-averaged [N, D]}."""
        seen: dict[int, torch.Tensor] = {}
        hooks = [
            self.twin.transformer_blocks[b].register_forward_hook(
                lambda m, i, o, b=b: seen.__setitem__(b, o.float().mean(dim=1))
            )
            for b in blocks
        ]
        try:
            noise = torch.cat([per_sample_randn(x0.shape[1:], keys, SEED, t, d) for d in range(ensemble)])
            n = len(x0) * ensemble
            tt = torch.full((n,), t)
            xt = self.sched.add_noise(x0.repeat(ensemble, 1, 1, 1), noise, tt)
            with autocast(xt.device, self.bf16):
                self.twin(xt, timestep=tt, class_labels=torch.full((n,), self.label))
        finally:
            for h in hooks:
                h.remove()
        return {b: f.view(ensemble, len(x0), -1).mean(dim=0) for b, f in seen.items()}


@torch.inference_mode()
def naive_pair(
    hooked: HookedTwin, encode: Encode, images, keys, b: int, t: int, args, clock: Stopwatch
) -> torch.Tensor:
    """One (block, t) feature the way a one-pair-at-a-time script computes it: encode + full forward."""
    parts = []
    for sl in batches(len(images), args.batch):
        with clock("encode"):
            x0 = encode(images[sl])
        with clock("dit"):
            parts.append(hooked(x0, keys[sl], [b], t, args.ensemble)[b])
    return torch.cat(parts)


@torch.inference_mode()
def peer(hooked: HookedTwin, encode: Encode, images, keys, blocks, timesteps, args, clock: Stopwatch) -> dict:
    """Latents once, then one full hooked forward per timestep and batch catching every wanted block."""
    with clock("encode"):
        x0 = torch.cat([encode(images[sl]) for sl in batches(len(images), args.batch)])
    parts: dict[tuple[int, int], list[torch.Tensor]] = defaultdict(list)
    with clock("dit"):
        for t in timesteps:
            for sl in batches(len(images), args.batch):
                for b, f in hooked(x0[sl], keys[sl], blocks, t, args.ensemble).items():
                    parts[(b, t)].append(f)
    return {bt: torch.cat(p) for bt, p in parts.items()}


def ours(
    extractor: ImageFeatureExtractor, images, keys, blocks, timesteps, args, clock: Stopwatch, fuse: bool = False
) -> dict:
    """difffeat: latents once (as the latent cache does), then one truncated forward per timestep and batch
    (``fuse``: one per batch, every timestep and draw stacked)."""
    parts: dict[tuple[int, int], list[torch.Tensor]] = defaultdict(list)
    for sl in batches(len(images), args.batch):
        with clock("encode"):
            x0 = extractor.encode(images[sl], ids=keys[sl], seed=SEED)
        with clock("dit"):
            feats = extractor(latents=x0, blocks=blocks, timesteps=timesteps, seed=SEED, ids=keys[sl],
                              ensemble=args.ensemble, bf16=args.bf16, fuse_timesteps=fuse)  # fmt: skip
        for bt, f in feats.items():
            parts[bt].append(f)
    return {bt: torch.cat(p) for bt, p in parts.items()}


def store_write_seconds(feats: dict) -> float:
    """Writing these features as store shards (float16, as jobs do), timed: is the write path worth moving?"""
    with tempfile.TemporaryDirectory() as root:
        store = FeatureStore(root)
        start = time.perf_counter()
        for (b, t), f in feats.items():
            store.write_shard(EntryKey("image", "bench", b, t, "mean", SEED, "train"), 0, f.half().numpy())
        return time.perf_counter() - start


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@torch.inference_mode()
def vae_layouts(vae: AutoencoderKL, images: np.ndarray, size: int, sizes: list[int], rounds: int = 2) -> None:
    """The SD-VAE encoder alone, default vs channels-last layout, interleaved, best of ``rounds`` per image."""
    pixels = images_to_tensor(images, size)
    plain, last = vae, copy.deepcopy(vae).to(memory_format=torch.channels_last)
    for bs in sizes:
        x = pixels[:bs]
        best = {"default": float("inf"), "channels-last": float("inf")}
        sides = (("default", plain, x), ("channels-last", last, x.contiguous(memory_format=torch.channels_last)))
        means: dict[str, torch.Tensor] = {}
        for counted in [False] + [True] * rounds:  # the first round warms up both layouts
            for name, model, inp in sides:
                start = time.perf_counter()
                means[name] = model.encode(inp).latent_dist.mean
                if counted:
                    best[name] = min(best[name], (time.perf_counter() - start) / bs)
        diff = relative_difference(means["channels-last"], means["default"])
        print(f"  VAE encode, batch {bs:2d}: default {best['default']:.2f} s/img, channels-last "
              f"{best['channels-last']:.2f} s/img: channels-last {best['default'] / best['channels-last']:.2f}x, "
              f"latents differ by {diff:.1e} (load {os.getloadavg()[0]:.2f})")  # fmt: skip


def build(model: str) -> tuple[DiT, AutoencoderKL | None, int]:
    """Our DiT (diffusers numerics), the VAE (None for pixel space) and the image size."""
    if model == "demo":
        dit = load_dit(DEMO_DIT, numerics="diffusers")
        return dit, None, dit.config.input_size
    return random_dit(f"DiT-{model}/2"), sd_vae(), 256


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(GRIDS), default="B")
    parser.add_argument("--grid", choices=["early", "last"], default="last", help="where the deepest block is")
    parser.add_argument("--images", type=int, default=None, help="default: 256 (demo), 4 (B, XL)")
    parser.add_argument("--batch", type=int, default=None, help="default: 64 (demo), 4 (B, XL)")
    parser.add_argument("--ensemble", type=int, default=1, help="noise draws averaged per (block, t)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the DiT on every side")
    parser.add_argument("--fuse", action="store_true", help="also difffeat with all timesteps in one forward")
    parser.add_argument("--naive-pairs", type=int, default=None, help="time only N naive pairs, extrapolate")
    parser.add_argument("--repeats", type=int, default=1, help="rounds (sides take turns); fastest round kept")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--vae-layouts", action="store_true", help="only time the VAE alone in both layouts")
    args = parser.parse_args()
    default_images, default_batch = SIZES[args.model]
    args.images = args.images or default_images
    args.batch = args.batch or default_batch
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    blocks, timesteps = GRIDS[args.model][args.grid], TIMESTEPS
    pairs = [(b, t) for b in blocks for t in timesteps]
    dit, vae, size = build(args.model)
    hooked = HookedTwin(diffusers_twin(dit), dit.null_class, args.bf16)
    encode = user_encoder(copy.deepcopy(vae) if vae is not None else None, size)  # diffusers' default layout
    extractor = ImageFeatureExtractor(dit, vae, image_size=size, sample_posterior=False)  # makes vae channels-last
    images = test_images(args.images, size)
    keys = [f"img{i}" for i in range(args.images)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}; "
          f"{args.model} DiT (depth {dit.depth}){' + SD-VAE' if vae is not None else ', pixel space'}, "
          f"{args.images} images at {size} px, batch {args.batch}, ensemble {args.ensemble}, "
          f"{'bf16' if args.bf16 else 'fp32'} DiT; grid {args.grid}: blocks {blocks} x t {timesteps}")  # fmt: skip
    if args.vae_layouts and vae is not None:
        vae_layouts(sd_vae(), images, size, sorted({1, min(4, args.images), args.images}))
        return

    # One untimed warm-up per side on two images: first calls pay oneDNN primitive creation and allocator growth,
    # which would otherwise land on whichever side happens to run first.
    warm = argparse.Namespace(**{**vars(args), "batch": 2})
    ours(extractor, images[:2], keys[:2], blocks, timesteps[:1], warm, Stopwatch())
    peer(hooked, encode, images[:2], keys[:2], blocks, timesteps[:1], warm, Stopwatch())
    measured = pairs[: args.naive_pairs] if args.naive_pairs else pairs
    feats: dict[str, dict] = {}
    best: dict[str, tuple[float, Stopwatch]] = {}
    for _ in range(args.repeats):  # the sides take turns; each keeps its fastest round
        for side, seconds, clock, out in one_round(args, extractor, hooked, encode, images, keys, blocks, measured):
            if side not in best or seconds < best[side][0]:
                best[side] = (seconds, clock)
            feats[side] = out
    sides = [s for s in ("difffeat", "fused") if s in feats]
    worst_peer = max(relative_difference(feats[s][bt], feats["peer"][bt]) for s in sides for bt in pairs)
    worst_naive = max(
        relative_difference(feats[side][bt], feats["naive"][bt]) for side in ("difffeat", "peer") for bt in measured
    )
    report(args, pairs, measured, best, worst_peer, worst_naive, feats["difffeat"])


def one_round(args, extractor, hooked, encode, images, keys, blocks, measured) -> Iterator[tuple]:
    """(side, seconds, stage clock, features) for difffeat, the peer and the naive pairs, in that order."""
    clock = Stopwatch()
    start = time.perf_counter()
    out = ours(extractor, images, keys, blocks, TIMESTEPS, args, clock)
    yield "difffeat", time.perf_counter() - start, clock, out
    if args.fuse:
        clock = Stopwatch()
        start = time.perf_counter()
        out = ours(extractor, images, keys, blocks, TIMESTEPS, args, clock, fuse=True)
        yield "fused", time.perf_counter() - start, clock, out
    clock = Stopwatch()
    start = time.perf_counter()
    out = peer(hooked, encode, images, keys, blocks, TIMESTEPS, args, clock)
    yield "peer", time.perf_counter() - start, clock, out
    clock, out = Stopwatch(), {}
    start = time.perf_counter()
    for b, t in measured:
        out[(b, t)] = naive_pair(hooked, encode, images, keys, b, t, args, clock)
    yield "naive", time.perf_counter() - start, clock, out


def report(args, pairs, measured, best, worst_peer, worst_naive, mine) -> None:
    tol = 2e-2 if args.bf16 else 1e-4
    note = f" (measured {len(measured)} of {len(pairs)} pairs, extrapolated)" if len(measured) < len(pairs) else ""
    per = {side: clock.seconds for side, (_, clock) in best.items()}
    ours_s, peer_s = best["difffeat"][0], best["peer"][0]
    naive_total = best["naive"][0] * len(pairs) / len(measured)
    n_t = len(TIMESTEPS)
    rounds = f", best of {args.repeats} rounds" if args.repeats > 1 else ""
    print(f"naive (encode + full forward per pair):        {naive_total:7.1f} s{note}{rounds}")
    print(f"    per pair: encode {per['naive']['encode'] / len(measured):.1f} s, "
          f"DiT {per['naive']['dit'] / len(measured):.1f} s")  # fmt: skip
    print(f"peer (encode once, full hooked forward per t):  {peer_s:7.1f} s")
    print(f"    encode {per['peer']['encode']:.1f} s, DiT {per['peer']['dit']:.1f} s for {n_t} timesteps")
    print(f"difffeat (encode once, truncated forward per t): {ours_s:7.1f} s")
    print(f"    encode {per['difffeat']['encode']:.1f} s, DiT {per['difffeat']['dit']:.1f} s for {n_t} timesteps")
    if "fused" in best:
        fused_dit = per["fused"]["dit"]
        print(f"difffeat fused (every t in one forward): {best['fused'][0]:7.1f} s; DiT {fused_dit:.1f} s, "
              f"unfused / fused DiT time {per['difffeat']['dit'] / fused_dit:.2f}x")  # fmt: skip
    write_s = store_write_seconds(mine)
    print(f"    writing these features to a store (float16 shards): {write_s:.3f} s = {write_s / ours_s:.1%} "
          "of difffeat's time (jobs write from a background thread)")  # fmt: skip
    cached = per["difffeat"]["dit"]
    print(f"    a second grid on the same split finds the latents in the store: difffeat {cached:.1f} s, "
          f"{peer_s / cached:.2f}x the peer")  # fmt: skip
    verdict = "OK" if max(worst_peer, worst_naive) < tol else "TOO LARGE"
    print(f"difffeat vs naive {naive_total / ours_s:.2f}x | difffeat vs peer {peer_s / ours_s:.2f}x | "
          f"peer vs naive {naive_total / peer_s:.2f}x")  # fmt: skip
    print(f"max relative difference: difffeat-peer {worst_peer:.1e}, naive-(peer, difffeat) {worst_naive:.1e} "
          f"({verdict}, tol {tol:.0e}); load {os.getloadavg()[0]:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
