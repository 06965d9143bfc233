"""One prepared GPU session: the CUDA tests and every throughput figure issue 16 asks for, into one JSON file.

A GPU is lent for minutes at a time, so this script is written to give answers, not debugging, on its first run.
Each section runs in its own process (spawned on CUDA) with a time box: one that fails (a CUDA error poisons its
process) or overruns records its error, and the next one starts clean. Every measured row is written at once to
``OUT/parts/<section>.json`` and every finished section to ``OUT/results.json`` (which names the section running
when the run was killed), so a kill keeps what is done. Sections, in order (what matters most first; the budget
skips the last ones when the first run long):

* ``dit``: bf16 / TF32 / fp32 matmul peaks, then DiT-XL/2 (random weights) truncated after block 11 and block 27:
  images/s, TFLOP/s and MFU against the bf16 matmul peak, for the bare forward and through
  ``ImageFeatureExtractor`` (noise, forward, pooling: what a job runs), eager; bf16 at a swept batch first;
* ``profile``: why bf16 is below half the peak: each block GEMM alone at its real shape, each SDPA backend at the
  real attention shape, one profiled forward (time per kernel kind, GPU busy fraction, host syncs; the table in
  ``OUT/profile.txt``), and bf16 weights against bf16 autocast;
* ``e2e``: ``python -m difffeat extract`` on generated 640x480 JPEGs (decode -> bf16 VAE -> DiT-XL/2 -> store)
  for 4 blocks x 3 timesteps, against the DiT-alone throughput of the same grid; every stage's rate (VAE in fp32
  and bf16), the slowest one named, and the start-up split into imports and model loading;
* ``tests``: ``pytest --device cuda tests/test_cuda.py`` (``OUT/pytest.log``), with every device-vs-CPU error the
  tests compared (``OUT/test_errors.jsonl``, summarised here) to tighten the tolerances from;
* ``input``: JPEG decode and ADM centre crop per image in one process, then in DataLoader workers (the job's own
  dataset class), images/s;
* ``compile``: the DiT rows with ``torch.compile``d blocks, bf16 first (the first row pays the compilation);
* ``vae``: SD-VAE encoder (``AutoencoderKL``, SD config, random weights) at 256 px through ``LatentEncoder``:
  bf16 weights, fp32 as ``difffeat extract`` runs it by default, bf16 autocast, at two batch sizes;
* ``ddit``: the SEDD-medium DDiT (random weights), captions/s at length 128 in bf16, bare and through
  ``TextFeatureExtractor`` (CPU corruption and tokenization included).

FLOPs: the DiT's are counted analytically (``benchmarks/throughput.py``) and checked against
``torch.utils.flop_counter`` on the meta device; the VAE's and the DDiT's come from the counter alone. A
multiply-add is 2 FLOPs. MFU = achieved FLOP/s / bf16 matmul FLOP/s measured in the same process.

Run on the GPU machine through ``benchmarks/gpu.sh OUT`` (installs the project first; see benchmarks/README.md);
``python benchmarks/gpu.py --out DIR --smoke`` runs every section with tiny sizes on the CPU in seconds (a test
runs it, so the script cannot rot).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.utils import logging as diffusers_logging
from throughput import truncated_forward_flops
from torch import nn

from difffeat.data.core import Sample, Split
from difffeat.features.extract import ImageFeatureExtractor, TextFeatureExtractor
from difffeat.features.jobs import _Pixels
from difffeat.models.ddit import DDiT, DDiTConfig
from difffeat.models.dit import DiT, DiTConfig, dit_config
from difffeat.models.dit_adapter import DiTAdapter
from difffeat.models.dit_load import save_dit
from difffeat.models.tokenizers import load_tokenizer, train_word_tokenizer
from difffeat.models.vae import LatentEncoder, cast_vae

ROOT = Path(__file__).resolve().parent.parent
GRID_BLOCKS, GRID_TIMESTEPS = (3, 6, 9, 11), (50, 250, 500)  # the 4 x 3 end-to-end grid


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the real run and ``--smoke``."""

    dit: DiTConfig
    depths: tuple[int, ...]  # blocks run (truncation after block depth - 1)
    batches: tuple[int, ...]  # swept for bf16 eager; the fastest is used everywhere else
    vae: dict  # AutoencoderKL kwargs
    image_size: int
    vae_batches: tuple[int, ...]
    jpegs: int
    jpeg_wh: tuple[int, int]
    workers: tuple[int, ...]
    grid_blocks: tuple[int, ...]
    e2e_batch: int
    ddit: DDiTConfig
    text_length: int
    text_batches: tuple[int, ...]
    matmul_n: int
    profile_batch: int  # the batch the profile section dissects (the sweep showed 256 as fast as 1024)
    min_seconds: float  # each rate is timed over at least this long (after one warm-up call)
    compile_backend: str  # torch.compile backend: inductor; the smoke run traces only ("eager": no C++ build)
    boxes: dict  # seconds per section at most (each gets what is left of the budget when less)
    budget: float  # seconds for all sections; gpu.sh's own time limit is a little above it
    tests: tuple[str, ...]  # pytest arguments


SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32)
# The H200 run's times set the boxes (benchmarks/README.md, GPU session): every section's model build and imports
# included; the budget is what gpu.sh leaves after installing (it stops the whole run at 8 minutes less a margin).
FULL = Sizes(
    dit=dit_config("DiT-XL/2"), depths=(12, 28), batches=(256, 1024), vae=SD_VAE, image_size=256,
    vae_batches=(256, 64), jpegs=4000, jpeg_wh=(640, 480), workers=(16,), grid_blocks=GRID_BLOCKS, e2e_batch=256,
    ddit=DDiTConfig.preset("sedd-medium"), text_length=128, text_batches=(256,), matmul_n=8192, profile_batch=256,
    min_seconds=1.5, compile_backend="inductor",
    boxes={"dit": 70, "profile": 45, "e2e": 110, "tests": 60, "input": 30, "compile": 130, "vae": 30, "ddit": 25},
    budget=400, tests=("tests/test_cuda.py",),
)  # fmt: skip
SMOKE = Sizes(
    dit=DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4),
    depths=(2, 4), batches=(2, 4), vae=dict(block_out_channels=(16, 16, 16, 16), layers_per_block=1,
    latent_channels=4, norm_num_groups=8), image_size=64, vae_batches=(2,), jpegs=12, jpeg_wh=(80, 60),
    workers=(2,), grid_blocks=(0, 1, 2, 3), e2e_batch=4, ddit=DDiTConfig(vocab_size=1000, hidden_size=64, cond_dim=32,
    n_heads=4, n_blocks=2, length=32), text_length=32, text_batches=(4,), matmul_n=256, profile_batch=4,
    min_seconds=0.0, compile_backend="eager",
    boxes={"dit": 120, "profile": 60, "e2e": 180, "tests": 240, "input": 60, "compile": 60, "vae": 60, "ddit": 60},
    budget=640,
    tests=("tests/test_cuda.py", "-k", "pinned_round_trip or ddit_blocks_with_padding"),
)  # fmt: skip


@dataclass
class Context:
    """What every section gets: the sizes, the device, where to write, and what earlier sections measured."""

    sizes: Sizes
    device: torch.device
    out: Path
    work: Path
    smoke: bool
    results: dict
    part: Path  # this section's own JSON file (merged by the parent)

    def record(self, **values) -> None:
        """Add to this section's results and write them at once (a kill keeps them)."""
        current = json.loads(self.part.read_text()) if self.part.exists() else {}
        for key, value in values.items():
            if key == "rows":
                current.setdefault("rows", []).extend(value)
            else:
                current[key] = value
        self.part.write_text(json.dumps(current, indent=1))
        for row in values.get("rows", []):
            log("   ", json.dumps(row))

    def earlier(self, section: str, key: str, default=None):
        return self.results.get("sections", {}).get(section, {}).get(key, default)


def log(*parts) -> None:
    print(*parts, flush=True)


# ---------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn: Callable[[], object], items: int, device: torch.device, min_seconds: float) -> float:
    """Items per second of ``fn``: one warm-up call, then as many calls as fill ``min_seconds`` (at least one)."""
    fn()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    once = time.perf_counter() - start
    calls = max(1, min(50, math.ceil(min_seconds / max(once, 1e-9))))
    if calls == 1:
        return items / once
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return items * calls / (time.perf_counter() - start)


@contextmanager
def precision(name: str, device: torch.device):
    """``bf16`` (autocast), ``tf32`` (fp32 with TF32 matmuls and convolutions) or ``fp32`` (TF32 off).

    torch >= 2.9 has per-backend ``fp32_precision`` switches (and refuses mixing them with the legacy flags).
    """
    backends = [torch.backends.cuda.matmul, torch.backends.cudnn.conv]
    new_api = all(hasattr(b, "fp32_precision") for b in backends)
    old = [b.fp32_precision for b in backends] if new_api else torch.get_float32_matmul_precision()
    mode = "tf32" if name == "tf32" else "ieee"
    if new_api:
        for b in backends:
            b.fp32_precision = mode
    else:
        torch.set_float32_matmul_precision("high" if mode == "tf32" else "highest")
    try:
        with torch.autocast(device.type, torch.bfloat16, enabled=name == "bf16"):
            yield
    finally:
        if new_api:
            for b, value in zip(backends, old, strict=True):
                b.fp32_precision = value
        else:
            torch.set_float32_matmul_precision(old)


def matmul_peak(device: torch.device, name: str, n: int, min_seconds: float) -> float:
    """TFLOP/s of an n x n x n matmul in ``name`` precision (bf16 operands for bf16): the practical peak."""
    dtype = torch.bfloat16 if name == "bf16" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    with precision("fp32" if name == "bf16" else name, device):
        return 2 * n**3 * rate(lambda: a @ b, 1, device, min_seconds) / 1e12


def counted_flops(model_fn: Callable[[], object]) -> float:
    """FLOPs of one call on meta tensors, by ``torch.utils.flop_counter`` (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model_fn()
    return float(counter.get_total_flops())


# ---------------------------------------------------------------- models with random weights


def default_init(model: nn.Module, seed: int = 0) -> nn.Module:
    """PyTorch's default init for every Linear/Conv: the official inits zero the adaLN gates (identity blocks),
    which would let a fused kernel skip real work."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            m.reset_parameters()
    return model.eval().requires_grad_(False)


def make_dit(cfg: DiTConfig, device: torch.device) -> DiT:
    """Built on the device (no CPU initialisation of DiT-XL/2's 675M parameters); ``.to`` catches CPU-made buffers."""
    with torch.device(device):
        return default_init(DiT(cfg)).to(device)


def make_vae(kwargs: dict, device: torch.device) -> AutoencoderKL:
    blocks = len(kwargs["block_out_channels"])
    with torch.device(device):
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * blocks,
                            up_block_types=("UpDecoderBlock2D",) * blocks, **kwargs)  # fmt: skip
    return default_init(vae, seed=1).to(device)


def make_ddit(cfg: DDiTConfig, device: torch.device) -> DDiT:
    with torch.device(device):
        return default_init(DDiT(cfg), seed=2).to(device)  # the rotary table is made on the CPU on purpose


def dit_flops(cfg: DiTConfig, depth: int) -> dict:
    """Per image, analytic and counted (they must agree: the analytic count is what MFU uses)."""
    with torch.device("meta"):
        meta = DiT(cfg)
        x = torch.empty(1, cfg.in_channels, cfg.input_size, cfg.input_size)
        zero = torch.zeros(1, dtype=torch.long)
    counted = counted_flops(lambda: meta.forward_intermediates(x, zero, zero, [depth - 1]))
    return {"analytic": truncated_forward_flops(cfg, depth), "counted": counted}


# ---------------------------------------------------------------- sections


def section_tests(ctx: Context) -> None:
    """The CUDA test selection (``--device`` is the section's device; on the CPU a one-test smoke selection)."""
    xml, logfile, errors = ctx.out / "pytest.xml", ctx.out / "pytest.log", ctx.out / "test_errors.jsonl"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", *ctx.sizes.tests,
           "--device", str(ctx.device), f"--junitxml={xml}"]  # fmt: skip
    errors.unlink(missing_ok=True)
    env = {**_child_env(), ERRORS_ENV: str(errors)}
    start = time.perf_counter()
    with logfile.open("w") as f:
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, check=False)
    ctx.record(command=" ".join(cmd[1:]), exit_code=done.returncode, seconds=round(time.perf_counter() - start, 1),
               **junit_summary(xml), measured_errors=error_summary(errors))  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"pytest exited with {done.returncode}: see pytest.log")


ERRORS_ENV = "DIFFFEAT_TEST_ERRORS"  # tests/test_cuda.py appends every compared error to this JSON-lines file


def error_summary(path: Path) -> dict:
    """The device-vs-CPU errors the CUDA tests measured (relative to the reference's RMS), worst first, and the
    worst per tolerance class: what the next session tightens the tolerances from."""
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: -r["error"])
    worst = {}
    for r in rows:
        worst.setdefault(f"tolerance {r['tolerance']:.0e}", r)
    return {"count": len(rows), "worst_by_tolerance": worst, "all": rows[:200]}


def junit_summary(path: Path) -> dict:
    """Counts and the failing tests' names and first lines, from pytest's JUnit XML."""
    if not path.exists():
        return {"junit": "missing"}
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures = []
    for case in ET.parse(path).getroot().iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            counts["failed"] += 1
            failures.append({"test": f"{case.get('classname')}::{case.get('name')}",
                             "message": (bad.get("message") or "")[:600]})  # fmt: skip
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures}


def section_dit(ctx: Context) -> None:
    """Matmul peaks, then the eager DiT rows."""
    s, dev = ctx.sizes, ctx.device
    peaks = {p: round(matmul_peak(dev, p, s.matmul_n, s.min_seconds), 2) for p in ("bf16", "tf32", "fp32")}
    ctx.record(peak_tflops=peaks, matmul_n=s.matmul_n)
    flops = {d: dit_flops(s.dit, d) for d in s.depths}
    ctx.record(gflop_per_image={d: {k: round(v / 1e9, 3) for k, v in f.items()} for d, f in flops.items()})
    dit = make_dit(s.dit, dev)
    sweep = [dit_row(ctx, dit, s.depths[0], "bf16", b, "forward", "eager", flops, peaks) for b in s.batches]
    batch = max(sweep, key=lambda r: r["images_per_s"])["batch"]
    ctx.record(batch=batch)
    # bf16 first (the setting to use), the extractor's overhead over the bare forward in bf16 only (2-3 % on the
    # H200), fp32 once: each precision's own MFU is known from the first run, so these rows check it held.
    rows = [
        (s.depths[0], "bf16", "extractor"),
        (s.depths[-1], "bf16", "forward"),
        (s.depths[-1], "bf16", "extractor"),
        (s.depths[0], "tf32", "forward"),
        (s.depths[-1], "tf32", "forward"),
        (s.depths[0], "fp32", "forward"),
    ]
    for depth, prec, path in rows:
        dit_row(ctx, dit, depth, prec, batch, path, "eager", flops, peaks)


def section_compile(ctx: Context) -> None:
    """The bf16 and TF32 rows with ``torch.compile``d blocks, at the eager section's batch."""
    s, dev = ctx.sizes, ctx.device
    peaks = ctx.earlier("dit", "peak_tflops") or {"bf16": matmul_peak(dev, "bf16", s.matmul_n, s.min_seconds)}
    batch = ctx.earlier("dit", "batch", s.batches[-1])
    flops = {d: dit_flops(s.dit, d) for d in s.depths}
    dit = make_dit(s.dit, dev)
    for block in dit.blocks:  # what extract.compile does (features.extract.compile_blocks), backend chosen here
        block.compile(backend=s.compile_backend)
    # bf16 first (the setting to use; the first row pays the compilation), TF32 last (it recompiles every block)
    plan = [(d, "bf16", "forward") for d in s.depths]
    plan += [(s.depths[0], "bf16", "extractor"), (s.depths[0], "tf32", "forward")]
    for depth, prec, path in plan:
        start = time.perf_counter()
        row = dit_row(ctx, dit, depth, prec, batch, path, "compile", flops, peaks, record=False)
        ctx.record(rows=[{**row, "seconds_with_compilation": round(time.perf_counter() - start, 1)}])


def dit_row(ctx, dit, depth, prec, batch, path, mode, flops, peaks, record: bool = True) -> dict:
    """One measured configuration: images/s, TFLOP/s, MFU (against the bf16 peak, and the row's own peak)."""
    cfg, dev = dit.config, ctx.device
    x0 = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=dev)
    t = torch.full((batch,), 100, device=dev)
    y = torch.full((batch,), dit.null_class, device=dev)
    extractor = ImageFeatureExtractor(dit)

    def forward() -> object:
        return dit.forward_intermediates(x0, t, y, [depth - 1])

    def extract() -> object:
        return extractor(latents=x0, blocks=[depth - 1], timesteps=[100], keep_on_device=True, bf16=prec == "bf16")

    mode_of_path = prec if path == "forward" else ("tf32" if prec == "tf32" else "fp32")  # extractor: own autocast
    with torch.inference_mode(), precision(mode_of_path, dev):
        per_s = rate(forward if path == "forward" else extract, batch, dev, ctx.sizes.min_seconds)
    tflops = per_s * flops[depth]["analytic"] / 1e12
    row = {"model": "dit", "blocks_run": depth, "truncated_after_block": depth - 1, "precision": prec, "path": path,
           "mode": mode, "batch": batch, "images_per_s": round(per_s, 2), "tflops": round(tflops, 2),
           "mfu_vs_bf16_peak": round(tflops / peaks["bf16"], 4),
           "mfu_vs_own_peak": round(tflops / peaks[prec], 4) if prec in peaks else None}  # fmt: skip
    if dev.type == "cuda":
        row["max_memory_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
    if record:
        ctx.record(rows=[row])
    return row


# ---------------------------------------------------------------- why the bf16 DiT is below 50 % of the peak

# Kernel (CUDA) or operator (CPU smoke) names -> what they are, first match wins. GEMMs: cuBLAS / cuBLASLt /
# CUTLASS kernels (sm90_xmma, nvjet, cutlass, gemm) or aten's matmul ops on the CPU.
KERNEL_KINDS = (
    ("attention", re.compile(r"flash|fmha|attention|sdpa|softmax", re.I)),
    ("gemm", re.compile(r"gemm|xmma|nvjet|cutlass|wgmma|aten::(addmm|mm|bmm|linear|matmul)$", re.I)),
    ("norm", re.compile(r"norm", re.I)),
    ("cast_copy", re.compile(r"copy|cast|convert|aten::to\b|_to_copy", re.I)),
)
SYNC_CALLS = re.compile(r"cudaStreamSynchronize|cudaDeviceSynchronize|cudaEventSynchronize|cudaMemcpy(?!Async)")


def kernel_kind(name: str) -> str:
    return next((kind for kind, pattern in KERNEL_KINDS if pattern.search(name)), "elementwise_other")


def section_profile(ctx: Context) -> None:
    """What separates the bf16 DiT-XL/2 forward from the matmul peak (36 % on the first H200 run), one measurement
    per suspect: the GEMMs alone at the block's real shapes (their own ceiling), each SDPA backend at the real
    attention shape (and which one the forward takes), a kernel table of one profiled forward (time in GEMMs vs
    attention vs norms vs casts vs other elementwise work, and how busy the GPU was), host syncs in the forward,
    and the same forward with bf16 weights instead of autocast (autocast keeps LayerNorm and the residual stream
    in fp32 and re-casts every weight per call)."""
    s, dev = ctx.sizes, ctx.device
    cfg, batch = s.dit, s.profile_batch
    peak = (ctx.earlier("dit", "peak_tflops") or {}).get("bf16") or matmul_peak(dev, "bf16", s.matmul_n, 0.0)
    ctx.record(batch=batch, peak_bf16_tflops=peak)
    ctx.record(gemm=gemm_ceilings(ctx, cfg, batch, peak))
    ctx.record(sdpa=sdpa_backends(ctx, cfg, batch))
    dit = make_dit(cfg, dev)
    x0 = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=dev)
    t, y = torch.full((batch,), 100, device=dev), torch.full((batch,), dit.null_class, device=dev)
    depth = s.depths[0]

    def forward() -> object:
        return dit.forward_intermediates(x0, t, y, [depth - 1])

    with torch.inference_mode(), precision("bf16", dev):
        ctx.record(kernels=profile_table(ctx, forward, f"DiT bf16 autocast, {depth} blocks, batch {batch}"))
        autocast = rate(forward, batch, dev, s.min_seconds)
    flops = truncated_forward_flops(cfg, depth)
    dit.to(torch.bfloat16)
    x0 = x0.bfloat16()
    with torch.inference_mode():
        weights = rate(forward, batch, dev, s.min_seconds)
    ctx.record(ablation=[{"precision": name, "blocks_run": depth, "batch": batch, "images_per_s": round(r, 1),
                          "mfu_vs_bf16_peak": round(r * flops / 1e12 / peak, 4)}
                         for name, r in (("bf16-autocast", autocast), ("bf16-weights", weights))])  # fmt: skip


def gemm_ceilings(ctx: Context, cfg: DiTConfig, batch: int, peak: float) -> list[dict]:
    """TFLOP/s of each of a block's linear layers alone (bf16, bias included) at the forward's token count."""
    dev, tokens = ctx.device, batch * (cfg.input_size // cfg.patch_size) ** 2
    width, hidden = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
    shapes = {"qkv": (tokens, width, 3 * width), "proj": (tokens, width, width), "fc1": (tokens, width, hidden),
              "fc2": (tokens, hidden, width), "adaLN": (batch, width, 6 * width)}  # fmt: skip
    rows = []
    for name, (m, k, n) in shapes.items():
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        w, b = torch.randn(n, k, device=dev, dtype=torch.bfloat16), torch.randn(n, device=dev, dtype=torch.bfloat16)
        with torch.inference_mode():
            per_s = rate(lambda x=x, w=w, b=b: torch.nn.functional.linear(x, w, b), 1, dev, ctx.sizes.min_seconds)
        tflops = 2 * m * k * n * per_s / 1e12
        rows.append({"layer": name, "m_k_n": [m, k, n], "tflops": float(f"{tflops:.4g}"),
                     "of_peak": float(f"{tflops / peak:.3g}")})  # fmt: skip
    return rows


def sdpa_backends(ctx: Context, cfg: DiTConfig, batch: int) -> list[dict]:
    """Milliseconds per attention call at the DiT's shape in bf16 with each SDPA backend forced, and the default."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev, heads = ctx.device, cfg.num_heads
    tokens, head_dim = (cfg.input_size // cfg.patch_size) ** 2, cfg.hidden_size // cfg.num_heads
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=dev, dtype=torch.bfloat16) for _ in range(3))
    names = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")  # those this torch has
    backends = {"default": None, **{n.lower(): getattr(SDPBackend, n) for n in names if hasattr(SDPBackend, n)}}
    rows = []
    for name, backend in backends.items():
        context = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
        try:
            with torch.inference_mode(), context:
                per_s = rate(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), 1, dev,
                             ctx.sizes.min_seconds / 3)  # fmt: skip
            rows.append({"backend": name, "ms": round(1e3 / per_s, 3), "shape": [batch, heads, tokens, head_dim]})
        except RuntimeError as exc:  # a backend that does not take this shape/dtype/device says why
            rows.append({"backend": name, "unsupported": str(exc).splitlines()[0][:200]})
    return rows


def profile_table(ctx: Context, fn: Callable[[], object], title: str, top: int = 15) -> dict:
    """One profiled call after a warm-up: the top kernels by device time (CPU ops on a CPU), the share of each
    kind, how much of the wall time the device was busy, and the host syncs; the full table in profile.txt."""
    from torch.profiler import ProfilerActivity, profile

    cuda = ctx.device.type == "cuda"
    fn()
    sync(ctx.device)
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        sync(ctx.device)
    wall_ms = (time.perf_counter() - start) * 1e3
    events = prof.key_averages()
    if cuda:
        kernels = [(e.key, e.count, e.device_time_total) for e in events if _is_kernel(e) and e.device_time_total > 0]
    else:
        kernels = [(e.key, e.count, e.self_cpu_time_total) for e in events if e.self_cpu_time_total > 0]
    busy_us = sum(us for _, _, us in kernels)
    kinds: dict[str, float] = {}
    for name, _, us in kernels:
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + us
    syncs = {e.key: e.count for e in events if SYNC_CALLS.search(e.key)}
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    with (ctx.out / "profile.txt").open("a") as f:
        f.write(f"== {title}\\n{events.table(sort_by=sort_by, row_limit=40, max_name_column_width=90)}\\n")
    kernels.sort(key=lambda k: -k[2])
    return {"title": title, "wall_ms": round(wall_ms, 2), "device_busy_ms": round(busy_us / 1e3, 2),
            "busy_fraction": round(busy_us / 1e3 / wall_ms, 3) if wall_ms else None,
            "share_by_kind": {k: round(v / busy_us, 3) for k, v in sorted(kinds.items())} if busy_us else {},
            "host_syncs": syncs, "host_syncs_note": "one cudaDeviceSynchronize is the profiled call's own end",
            "top": [{"kernel": n[:120], "kind": kernel_kind(n), "calls": c, "ms": round(us / 1e3, 3),
                     "share": round(us / busy_us, 3)} for n, c, us in kernels[:top]]}  # fmt: skip


def _is_kernel(event) -> bool:
    """A row of device work (kernel, memcpy, memset), not the host op that launched it."""
    return getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA


def section_vae(ctx: Context) -> None:
    """The SD-VAE encoder alone per batch size: bf16 weights (``image.vae_dtype: bfloat16``), fp32 (the default;
    cuDNN's TF32 convolutions), bf16 autocast."""
    s, dev = ctx.sizes, ctx.device
    peak = (ctx.earlier("dit", "peak_tflops") or {}).get("bf16") or matmul_peak(dev, "bf16", s.matmul_n, 0.0)
    with torch.device("meta"):
        meta = make_vae(s.vae, torch.device("meta"))
        gflop = counted_flops(lambda: meta.encode(torch.empty(1, 3, s.image_size, s.image_size))) / 1e9
    ctx.record(gflop_per_image=round(gflop, 3), image_size=s.image_size)
    vae = make_vae(s.vae, dev)
    for setting in ("bf16-weights", "fp32-default", "bf16-autocast"):  # image.vae_dtype bfloat16 first
        encoder = LatentEncoder(cast_vae(vae, "bfloat16" if setting == "bf16-weights" else "float32"))
        for batch in s.vae_batches:
            pixels = torch.rand(batch, 3, s.image_size, s.image_size, device=dev) * 2 - 1
            keys = list(range(batch))
            with torch.inference_mode(), torch.autocast(dev.type, torch.bfloat16, enabled=setting == "bf16-autocast"):
                per_s = rate(lambda enc=encoder, p=pixels, k=keys: enc.encode(p, k, 0), batch, dev, s.min_seconds)
            ctx.record(rows=[{"model": "sd-vae-encoder", "setting": setting, "batch": batch,
                              "images_per_s": round(per_s, 2), "tflops": round(per_s * gflop / 1e3, 2),
                              "mfu_vs_bf16_peak": round(per_s * gflop / 1e3 / peak, 4)}])  # fmt: skip


def ensure_jpegs(ctx: Context) -> list[Path]:
    """``sizes.jpegs`` smooth random 640x480 JPEGs (photo-like sizes, not white noise), made once per machine."""
    folder = ctx.work / f"jpegs-{ctx.sizes.jpegs}-{ctx.sizes.jpeg_wh[0]}x{ctx.sizes.jpeg_wh[1]}"
    paths = [folder / f"{i:05d}.jpg" for i in range(ctx.sizes.jpegs)]
    if all(p.exists() for p in paths):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with mp.get_context("fork").Pool(min(16, os.cpu_count() or 1)) as pool:
        pool.starmap(_write_jpeg, [(str(p), i, ctx.sizes.jpeg_wh) for i, p in enumerate(paths)], chunksize=16)
    ctx.record(jpegs=len(paths), jpeg_seconds=round(time.perf_counter() - start, 1),
               jpeg_mean_kib=round(sum(p.stat().st_size for p in paths) / len(paths) / 1024, 1))  # fmt: skip
    return paths


def _write_jpeg(path: str, seed: int, wh: tuple[int, int]) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = wh
    low = Image.fromarray(rng.integers(0, 256, (max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8))
    smooth = np.asarray(low.resize((w, h), Image.BICUBIC), dtype=np.int16)
    grain = rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
    Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(path, quality=90)


def section_input(ctx: Context) -> None:
    """The latent cache's CPU half (``difffeat.features.jobs._Pixels``: decode, ADM crop, scale): per image in
    this process, split into decode and crop (which one to speed up), then through DataLoader workers."""
    from torch.utils.data import DataLoader

    s = ctx.sizes
    paths = ensure_jpegs(ctx)
    split = Split("train", [Sample(p.stem, str(p)) for p in paths])
    ctx.record(per_image_ms=per_image_ms(split, min(len(paths), 200), s.image_size))
    for workers in s.workers:
        data = _Pixels(split, list(range(len(paths))), s.image_size)
        batch = 64 if not ctx.smoke else 4
        loader = DataLoader(data, batch_size=batch, num_workers=workers, pin_memory=ctx.device.type == "cuda")
        start = time.perf_counter()
        first = None
        for _ in loader:
            first = first or time.perf_counter()
        end = time.perf_counter()
        steady = (len(paths) - batch) / (end - first) if end > first else None
        ctx.record(rows=[{"stage": "decode+crop", "workers": workers, "batch": batch, "images": len(paths),
                          "images_per_s": round(len(paths) / (end - start), 1),
                          "images_per_s_after_first_batch": round(steady, 1) if steady else None}])  # fmt: skip


def per_image_ms(split: Split, n: int, size: int) -> dict:
    """Milliseconds per image in one process: the JPEG decode (``load_image``) and then the ADM crop + scale."""
    from difffeat.data.core import load_image
    from difffeat.models.vae import images_to_tensor

    start = time.perf_counter()
    decoded = [load_image(split.samples[i]) for i in range(n)]
    mid = time.perf_counter()
    for image in decoded:
        images_to_tensor([image], size)
    end = time.perf_counter()
    return {"images": n, "decode": round((mid - start) * 1e3 / n, 2), "crop_scale": round((end - mid) * 1e3 / n, 2)}


def section_e2e(ctx: Context) -> None:
    """``difffeat extract`` end to end with the VAE in bf16 (``image.vae_dtype``), each of its stages alone at the
    same settings, and where the start-up (everything before the first progress bar) goes."""
    s = ctx.sizes
    paths = ensure_jpegs(ctx)
    models = ctx.work / "models"
    grid = [list(s.grid_blocks), list(GRID_TIMESTEPS)]
    workers = max(s.workers)
    stages = stage_rates(ctx, models, grid)
    input_rows = [r for r in ctx.earlier("input", "rows", []) if r.get("workers") == workers]
    if input_rows:
        stages["decode_crop"] = input_rows[0]["images_per_s_after_first_batch"]
    ctx.record(stage_images_per_s=stages, startup_parts_seconds=startup_parts(ctx, models))
    wall, phases = run_extract(ctx, paths, models, grid, workers)
    images, dit_rate = len(paths), stages["dit_grid_bf16"]
    e2e = images / wall
    feature_phase = phases.get("image")
    busy = sum(phases.values())
    used = {k: v for k, v in stages.items() if k != "vae_fp32"}  # the run encodes with the bf16 VAE
    ctx.record(images=images, grid=grid, batch=s.e2e_batch, workers=workers, vae_dtype="bfloat16",
               wall_seconds=round(wall, 1), phase_seconds=phases, startup_seconds=round(wall - busy, 1),
               images_per_s=round(e2e, 1), images_per_s_without_startup=round(images / busy, 1) if busy else None,
               fraction_of_dit_alone=round(e2e / dit_rate, 3),
               fraction_without_startup=round(images / busy / dit_rate, 3) if busy else None,
               latent_phase_images_per_s=round(images / phases["latents"], 1) if phases.get("latents") else None,
               feature_phase_fraction_of_dit_alone=round(images / feature_phase / dit_rate, 3) if feature_phase
               else None,
               slowest_stage=min(used, key=lambda k: used[k] or math.inf),
               sequential_bound=round(sequential_bound(used), 1))  # fmt: skip


def sequential_bound(stages: dict) -> float:
    """Images/s the job can reach by arithmetic: the latent cache (decode in workers overlapped with the VAE, so
    the slower of the two) runs over the whole split before the feature pass (the DiT grid) starts."""
    latents = min(v for k, v in stages.items() if k != "dit_grid_bf16" and v)
    return 1 / (1 / latents + 1 / stages["dit_grid_bf16"])


def stage_rates(ctx: Context, models: Path, grid: list) -> dict:
    """Images/s of the DiT alone on random latents (the grid, bf16) and of the VAE as the job runs it (``fp32``:
    the default; ``bf16``: ``image.vae_dtype: bfloat16``); saves both models for the CLI on the way (their memory
    is freed on return, before the CLI needs its own)."""
    s, dev = ctx.sizes, ctx.device
    dit, vae = make_dit(s.dit, dev), make_vae(s.vae, dev)
    if not (models / "dit" / "model.safetensors").exists():
        save_dit(dit, models / "dit")
        vae.save_pretrained(models / "vae")
    latents = torch.randn(s.e2e_batch, s.dit.in_channels, s.dit.input_size, s.dit.input_size, device=dev)
    pixels = torch.rand(s.e2e_batch, 3, s.image_size, s.image_size, device=dev) * 2 - 1
    extractor, keys = ImageFeatureExtractor(dit, vae, image_size=s.image_size), list(range(s.e2e_batch))
    out = {}
    with torch.inference_mode():
        out["dit_grid_bf16"] = rate(
            lambda: extractor(
                latents=latents, blocks=grid[0], timesteps=grid[1], ids=keys, bf16=True, keep_on_device=True
            ),
            s.e2e_batch,
            dev,
            s.min_seconds,
        )
        for name, dtype in (("vae_fp32", "float32"), ("vae_bf16", "bfloat16")):
            extractor.encoder = LatentEncoder(cast_vae(vae, dtype))
            out[name] = rate(lambda: extractor.encode(pixels, keys, keep_on_device=True), s.e2e_batch, dev,
                             s.min_seconds)  # fmt: skip
    return {k: round(v, 1) for k, v in out.items()}


def startup_parts(ctx: Context, models: Path) -> dict:
    """Seconds of what the CLI does before its first batch that can be timed alone: importing difffeat and
    diffusers in a fresh interpreter, and loading the DiT and VAE folders onto the device."""
    code = "import time; t = time.perf_counter(); import difffeat.run.cli, diffusers; print(time.perf_counter() - t)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_child_env(), check=False)
    start = time.perf_counter()
    backbone = DiTAdapter.from_pretrained(str(models / "dit"), vae=str(models / "vae"), vae_dtype="bfloat16")
    backbone.to(ctx.device)
    sync(ctx.device)
    load = time.perf_counter() - start
    return {"import": round(float(done.stdout.strip() or "nan"), 1), "load_models": round(load, 1)}


def run_extract(ctx: Context, paths: list[Path], models: Path, grid: list, workers: int) -> tuple[float, dict]:
    """Run the CLI on a manifest of the JPEGs; wall time and the seconds of each progress bar (latents, image)."""
    import yaml

    s = ctx.sizes
    manifest = ctx.work / "e2e.jsonl"
    manifest.write_text("".join(json.dumps({"id": p.stem, "image": str(p), "labels": ["x"], "split": "train"}) + "\n"
                                for p in paths))  # fmt: skip
    out = ctx.work / f"e2e-run-{time.time_ns()}"
    cfg = {"out": str(out), "data": {"kind": "manifest", "root": str(manifest), "splits": ["train"],
                                     "options": {"val_size": 0}},
           "image": {"dit": str(models / "dit"), "vae": str(models / "vae"), "name": "xl",
                     "image_size": s.image_size, "vae_dtype": "bfloat16"},
           "extract": {"image_blocks": grid[0], "image_timesteps": grid[1], "modalities": ["image"], "bf16": True,
                       "batch_size": s.e2e_batch, "shard_size": 4 * s.e2e_batch, "num_workers": workers,
                       "device": str(ctx.device)}}  # fmt: skip
    (ctx.work / "e2e.yaml").write_text(yaml.safe_dump(cfg))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "difffeat", "extract", str(ctx.work / "e2e.yaml")], cwd=ROOT,
                          capture_output=True, text=True, env=_child_env(), check=False)  # fmt: skip
    wall = time.perf_counter() - start
    (ctx.out / "e2e.log").write_text(done.stdout[-20000:] + done.stderr[-100000:])
    if done.returncode != 0:
        raise RuntimeError(f"difffeat extract exited with {done.returncode}: {done.stderr[-1500:]}")
    return wall, bar_seconds(done.stderr)


def bar_seconds(stderr: str) -> dict:
    """Elapsed seconds of the last ``latents ...`` and ``image ...`` progress lines (tqdm's ``[MM:SS<``)."""
    found = {}
    for line in re.split(r"[\r\n]+", stderr):
        m = re.match(r"\s*(latents|image) \S+.*?\[(?:(\d+):)?(\d+):(\d+)[<\]]", line)
        if m:
            h, mi, se = (int(x or 0) for x in m.group(2, 3, 4))
            found[m.group(1)] = 3600 * h + 60 * mi + se
    return found


def section_ddit(ctx: Context) -> None:
    """Captions per second at length L, bf16: the bare DDiT (all blocks) and through the text extractor."""
    s, dev = ctx.sizes, ctx.device
    length = s.text_length
    peak = (ctx.earlier("dit", "peak_tflops") or {}).get("bf16") or matmul_peak(dev, "bf16", s.matmul_n, 0.0)
    gflop = ddit_flops(s.ddit, length) / 1e9
    ctx.record(gflop_per_caption=round(gflop, 3), length=length, config=asdict(s.ddit))
    ddit = make_ddit(s.ddit, dev)
    for batch in s.text_batches:
        tokens = torch.randint(0, s.ddit.vocab_size - 1, (batch, length), device=dev)
        sig = torch.full((batch,), 0.5, device=dev)
        with torch.inference_mode(), precision("bf16", dev):
            per_s = rate(lambda t=tokens, g=sig: ddit.forward_intermediates(t, g, [-1]), batch, dev, s.min_seconds)
        ctx.record(rows=[_text_row("forward", batch, per_s, gflop, peak)])
    captions = _captions(s.text_batches[0], length, min(3000, s.ddit.vocab_size - 16))
    tok_path = train_word_tokenizer(captions, 5000, ctx.work / "ddit-tokenizer.json")
    extractor = TextFeatureExtractor(ddit, load_tokenizer(tok_path), max_length=length)
    for step in (0, 500):
        per_s = rate(lambda st=step: extractor(captions, blocks=[-1], timesteps=[st], bf16=True, keep_on_device=True),
                     len(captions), dev, s.min_seconds)  # fmt: skip
        ctx.record(rows=[{**_text_row("extractor", len(captions), per_s, gflop, peak), "step": step}])


def ddit_flops(cfg: DDiTConfig, length: int) -> float:
    """Per caption through every block. Counted on the CPU for 1 and 2 blocks of the real width with a tiny
    vocabulary (the embedding lookup costs no FLOPs, the output layer is not run) and extrapolated linearly in
    depth: the model's autocast-off sections refuse the meta device."""
    ids, sigma = torch.zeros(1, length, dtype=torch.long), torch.zeros(1)
    small = []
    for n in (1, 2):
        model = DDiT(replace(cfg, n_blocks=n, vocab_size=64, mask_index=None))
        small.append(counted_flops(lambda m=model: m.forward_intermediates(ids, sigma, [-1])))
    return small[0] + (cfg.n_blocks - 1) * (small[1] - small[0])


def _text_row(path: str, batch: int, per_s: float, gflop: float, peak: float) -> dict:
    tflops = per_s * gflop / 1e3
    return {"model": "ddit", "path": path, "precision": "bf16", "batch": batch, "captions_per_s": round(per_s, 1),
            "tflops": round(tflops, 2), "mfu_vs_bf16_peak": round(tflops / peak, 4)}  # fmt: skip


def _captions(n: int, words: int, vocab_size: int) -> list[str]:
    """Random word captions long enough to fill ``words`` tokens (so the length is really L), from a vocabulary
    that fits the model's (a word tokenizer is trained on them)."""
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(vocab_size)]
    return [" ".join(rng.choice(vocab, size=words + 8)) for _ in range(n)]


SECTIONS: dict[str, Callable[[Context], None]] = {  # the order they run in: what matters most first
    "dit": section_dit, "profile": section_profile, "e2e": section_e2e, "tests": section_tests,
    "input": section_input, "compile": section_compile, "vae": section_vae, "ddit": section_ddit,
}  # fmt: skip


# ---------------------------------------------------------------- the parent: one forked process per section


def _child_env() -> dict:
    """Subprocesses find this checkout's package (also when it was not pip-installed) and print no live bars."""
    src = str(ROOT / "src")
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{path}" if path else src, "PYTHONUNBUFFERED": "1"}


def _run_section(name: str, ctx: Context) -> None:
    """In the forked child: run the section, leave an error (with traceback) in its part file if it fails."""
    os.setpgrp()  # its own process group, so the parent can stop it with everything it started
    try:
        SECTIONS[name](ctx)
    except BaseException as exc:  # recorded for the parent; the child exits non-zero either way
        ctx.record(error=f"{type(exc).__name__}: {str(exc)[:2000]}", traceback=traceback.format_exc()[-4000:])
        raise SystemExit(1) from None
    os._exit(0)  # skip interpreter teardown (CUDA contexts, worker pools): the parent only wants the part file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json and the logs")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (seconds): a test runs it")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--budget-s", type=float, default=None, help="stop starting sections after this long")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (JPEGs, model files, stores)")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --smoke")
    args = parser.parse_args()
    diffusers_logging.set_verbosity_error()  # its dtype-cast advice, once per VAE setting, is noise here
    sizes = SMOKE if args.smoke else FULL
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))  # not probed here: the parent forks
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or (args.out / "work" if args.smoke else Path("/tmp/difffeat-gpu"))
    work.mkdir(parents=True, exist_ok=True)
    budget = args.budget_s or sizes.budget
    results = {"meta": meta(device, args.smoke), "sections": {}}
    deadline = time.monotonic() + budget
    for name in [n for n in SECTIONS if n in args.sections]:
        left = deadline - time.monotonic()
        if left < 10:
            results["sections"][name] = {"status": "skipped", "error": f"out of time (budget {budget:.0f} s)"}
            continue
        # A kill from outside (the device tool's limit) leaves this file saying which section was running; its
        # rows so far are in OUT/parts/<section>.json.
        results["sections"][name] = {"status": "running"}
        write_json(args.out / "results.json", results)
        found, interrupted = run_child(name, sizes, device, args.out, work, args.smoke, results, left)
        results["sections"][name] = found
        write_json(args.out / "results.json", results)
        if interrupted:
            break
    results["meta"]["seconds"] = round(budget - (deadline - time.monotonic()), 1)
    write_json(args.out / "results.json", results)
    bad = [n for n, r in results["sections"].items() if r.get("status") != "ok"]
    log(f"== done in {results['meta']['seconds']} s; sections not ok: {bad or 'none'}; {args.out / 'results.json'}")


def run_child(
    name: str, sizes: Sizes, device, out: Path, work: Path, smoke: bool, results: dict, left: float
) -> tuple[dict, bool]:
    """Run one section in its own process group; its results, and whether we were interrupted (Ctrl-C, or
    gpu.sh's time limit) while it ran. Overrun or interrupted, the whole group goes: DataLoader workers and
    subprocesses too."""
    box = min(sizes.boxes[name], left)
    (out / "parts").mkdir(exist_ok=True)
    part = out / "parts" / f"{name}.json"  # in OUT, so a killed run still brings back the rows measured so far
    part.unlink(missing_ok=True)
    ctx = Context(sizes, device, out, work, smoke, results, part)
    log(f"== {name} (time box {box:.0f} s)")
    start = time.monotonic()
    # CUDA cannot be used in a forked child once anything in the parent has touched it (an import can), so on a GPU
    # each section starts a fresh interpreter; on the CPU fork is cheaper and lets tests patch SECTIONS.
    start_method = "spawn" if torch.device(device).type == "cuda" else "fork"
    proc = mp.get_context(start_method).Process(target=_run_section, args=(name, ctx), name=f"gpu-{name}")
    proc.start()
    interrupted = False
    try:
        proc.join(box)
    except KeyboardInterrupt:
        interrupted = True
    stopped = proc.is_alive()
    if stopped:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.kill()  # in case it had not made its group yet
        proc.join()
    found = json.loads(part.read_text()) if part.exists() else {}
    if stopped:
        what = "interrupted" if interrupted else f"timed out after {box:.0f} s"
        found["error"] = f"{what} (rows measured so far are kept)"
    elif proc.exitcode != 0 and "error" not in found:
        found["error"] = f"section process exited with {proc.exitcode}"
    found["status"] = "error" if "error" in found else "ok"
    found["seconds"] = round(time.monotonic() - start, 1)
    why = f": {found['error'][:300]}" if "error" in found else ""
    log(f"   {name}: {found['status']} in {found['seconds']} s{why}")
    return found, interrupted


def meta(device: torch.device, smoke: bool) -> dict:
    """Where and when (the CUDA device is described by a child: the parent must not initialise CUDA)."""
    info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cpus": os.cpu_count(), "device": str(device), "smoke": smoke}  # fmt: skip
    if device.type == "cuda":
        code = ("import torch; p = torch.cuda.get_device_properties(0); print(p.name, '|', "
                "round(p.total_memory / 2**30, 1), 'GiB |', p.multi_processor_count, 'SMs | cuDNN', "
                "torch.backends.cudnn.version(), '| driver CUDA', torch.version.cuda)")  # fmt: skip
        probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
        info["gpu"] = probe.stdout.strip() or probe.stderr.strip()[-500:]
    return info


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


if __name__ == "__main__":
    main()
