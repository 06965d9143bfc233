"""The same computations on the device under test (``--device cuda`` / ``DIFFFEAT_TEST_DEVICE=cuda``) and on the CPU.

Default device is the CPU: then every test compares the CPU with itself, which keeps the code paths (device
moves, pinned copies, per-device autocast, store filling, head training) exercised in CI; the tests marked
``cuda`` need a GPU and skip with a reason elsewhere.

Tolerances are relative to the feature scale: ``max |device - cpu| <= rel * rms(cpu)`` over the whole tensor.

* fp32: ``FP32_REL`` = 1e-4, with TF32 **off** for matmuls and cuDNN convolutions (:func:`fp32_precision`
  ``"ieee"``). Both sides then round to fp32 (24-bit mantissa) and differ only in summation order, ~1e-6 of the
  scale per layer. TF32 keeps 10 mantissa bits: ``test_the_fp32_tolerance_tells_tf32_from_fp32`` checks, on one
  long matmul against a float64 reference, that TF32's error there exceeds the tolerance and fp32's does not.
  (In a whole DiT it need not: on the H200, TF32 moved the residual stream by only 7e-5 of its scale, since
  the blocks' contributions are small beside the embedded input.)
* bf16 autocast on the device against fp32 on the CPU: ``BF16_REL`` = 5e-2. bf16 keeps 8 mantissa bits (~4e-3
  per rounding); through a few blocks the CPU's own bf16 autocast lands at 0.8-1.5e-2 of the scale for these
  models (measured here, printed by the assertion message when it fails), so 5e-2 leaves a 3x margin and still
  fails on a wrong dtype path (an fp16 overflow, a missing cast: O(1) errors).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from difffeat.features.extract import ImageFeatureExtractor, TextFeatureExtractor
from difffeat.features.jobs import to_host
from difffeat.features.store import EntryKey, FeatureStore
from difffeat.heads.fusion import FusionOptions, fit_fusion
from difffeat.heads.probe import ProbeOptions, fit_probes
from difffeat.models.ddit import DDiT, DDiTConfig
from difffeat.models.ddit_load import save_ddit
from difffeat.models.dit import DiT, DiTConfig
from difffeat.models.dit_load import save_dit
from difffeat.run.config import RunConfig, apply_overrides
from difffeat.run.pipeline import run
from difffeat.utils.runtime import to_device
from helpers import CAPTIONS, tiny_tokenizer

FP32_REL = 1e-4
BF16_REL = 5e-2
CPU = torch.device("cpu")


@contextmanager
def fp32_precision(mode: str):
    """``"ieee"``: true fp32 matmuls and cuDNN convolutions (TF32 off); ``"tf32"``: TF32 allowed. Restored after.

    torch >= 2.9 has the per-backend ``fp32_precision`` switches (and refuses a mix with the legacy
    ``allow_tf32`` flags); older versions only the flags.
    """
    backends = [torch.backends.cuda.matmul, torch.backends.cudnn.conv]
    if all(hasattr(b, "fp32_precision") for b in backends):
        old = [b.fp32_precision for b in backends]
        for b in backends:
            b.fp32_precision = mode
    else:
        old = [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32]
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == "tf32"
    try:
        yield
    finally:
        if all(hasattr(b, "fp32_precision") for b in backends):
            for b, value in zip(backends, old, strict=True):
                b.fp32_precision = value
        else:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(autouse=True)
def ieee_fp32():
    """Every comparison here is fp32 against fp32 unless a test says otherwise: TF32 off."""
    with fp32_precision("ieee"):
        yield


def scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / rms(expected), both taken to the CPU in float64."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, (a.shape, e.shape)
    return float((a - e).abs().max() / e.pow(2).mean().sqrt().clamp_min(1e-30))


def assert_scaled_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str = "") -> None:
    err = scaled_error(actual, expected)
    record_error(what, err, rel, actual.device)
    assert err <= rel, f"{what}: max |diff| = {err:.2e} x rms(reference), tolerance {rel:.0e}"


ERRORS_ENV = "DIFFFEAT_TEST_ERRORS"


def record_error(what: str, err: float, rel: float, device: torch.device) -> None:
    """Append the measured error to the JSON-lines file ``$DIFFFEAT_TEST_ERRORS`` names (benchmarks/gpu.py sets
    it), so a GPU session brings back the errors behind every pass: the data to tighten the tolerances from."""
    path = os.environ.get(ERRORS_ENV)
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        row = {"test": test, "what": what, "error": err, "tolerance": rel, "device": str(device)}
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def default_init(model: nn.Module, seed: int = 0) -> nn.Module:
    """PyTorch's default init for every Linear/Conv (the official inits zero the adaLN gates: identity blocks)."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            m.reset_parameters()
    return model.eval().requires_grad_(False)


def small_dit(width: int = 64) -> DiT:
    """A latent DiT (4 channels, 8x8 latents, 2x2 patches: 16 tokens), 4 blocks of width 64."""
    cfg = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=width, depth=4, num_heads=4, num_classes=10)
    return default_init(DiT(cfg))


def small_ddit(vocab_size: int = 100) -> DDiT:
    cfg = DDiTConfig(vocab_size=vocab_size + 1, hidden_size=64, cond_dim=32, n_heads=4, n_blocks=3, length=24)
    return default_init(DDiT(cfg), seed=1)


def small_vae():
    """SD-VAE's layout in miniature: 4 down blocks (8x down), 4 latent channels, groups of 8."""
    from diffusers import AutoencoderKL

    torch.manual_seed(2)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8,
        sample_size=64,
    ).eval()  # fmt: skip


def on(model: nn.Module, device: torch.device) -> nn.Module:
    """A copy of ``model`` on ``device`` (the CPU original stays the reference)."""
    import copy

    return copy.deepcopy(model).to(device)


# ---------------------------------------------------------------- backbones


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_dit_blocks_and_output_on_device_match_the_cpu(device, bf16):
    dit = small_dit()
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(6, 4, 8, 8, generator=g), torch.tensor([0, 10, 100, 400, 700, 999]), torch.arange(6)
    with torch.no_grad():
        ref = dit.forward_intermediates(x, t, y, [0, 3])
        ref_out = dit(x, t, y)
        dev = on(dit, device)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            got = dev.forward_intermediates(x.to(device), t.to(device), y.to(device), [0, 3])
            got_out = dev(x.to(device), t.to(device), y.to(device))
    rel = BF16_REL if bf16 else FP32_REL
    assert set(got) == {0, 3} and got[3].device.type == device.type
    for b in (0, 3):
        assert_scaled_close(got[b], ref[b], rel, f"block {b}")
    assert_scaled_close(got_out, ref_out, rel, "output")


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_ddit_blocks_with_padding_on_device_match_the_cpu(device, bf16):
    ddit = small_ddit()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (4, 20), generator=g)
    mask = torch.arange(20)[None] < torch.tensor([20, 13, 5, 1])[:, None]
    sigma = torch.tensor([0.0, 0.5, 2.0, 7.0])
    with torch.no_grad():
        ref = ddit.forward_intermediates(ids, sigma, [0, 2], attention_mask=mask)
        dev = on(ddit, device)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            got = dev.forward_intermediates(ids.to(device), sigma.to(device), [0, 2], attention_mask=mask.to(device))
    for b in (0, 2):  # padded positions are junk by design; real ones must agree
        assert_scaled_close(got[b][mask.to(device)], ref[b][mask], BF16_REL if bf16 else FP32_REL, f"block {b}")


# ---------------------------------------------------------------- extractors


def test_image_extractor_with_vae_on_device_matches_the_cpu(device):
    """VAE posterior sample + noise are drawn per sample on the CPU: the device sees the same x_t."""
    dit, vae = small_dit(), small_vae()
    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 80, 72, 3), dtype=np.uint8)
    kw = dict(blocks=[1, 3], timesteps=[0, 250, 999], ids=list("abcde"), seed=4, ensemble=2)
    ref_ex = ImageFeatureExtractor(dit, vae, image_size=64)
    ref_lat = ref_ex.encode(pixels, ids=kw["ids"], seed=4)
    ref = ref_ex(latents=ref_lat, **kw)
    ex = ImageFeatureExtractor(on(dit, device), on(vae, device), image_size=64)
    lat = ex.encode(pixels, ids=kw["ids"], seed=4, keep_on_device=True)
    assert lat.device.type == device.type
    assert_scaled_close(lat, ref_lat, FP32_REL, "latents")
    got = ex(latents=lat, fuse_timesteps=True, keep_on_device=True, **kw)
    assert set(got) == set(ref) and all(f.device.type == device.type for f in got.values())
    for bt in ref:
        assert_scaled_close(got[bt], ref[bt], FP32_REL, f"(block, t) = {bt}")
    from_images = ex(pixels, blocks=[3], timesteps=[250], ids=kw["ids"], seed=4)[(3, 250)]
    assert from_images.device.type == "cpu"
    assert_scaled_close(from_images, ref_ex(pixels, blocks=[3], timesteps=[250], ids=kw["ids"], seed=4)[(3, 250)],
                        FP32_REL, "images in")  # fmt: skip


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_text_extractor_on_device_matches_the_cpu(device, bf16, tmp_path):
    tok = tiny_tokenizer(tmp_path)
    ddit = small_ddit(tok.vocab_size)
    caps = [[CAPTIONS[0], CAPTIONS[1]], [CAPTIONS[2]], [CAPTIONS[3], CAPTIONS[4], CAPTIONS[5]]]
    kw = dict(blocks=[0, -1], timesteps=[0, 300, 900], ids=["p", "q", "r"], seed=2)
    ref = TextFeatureExtractor(ddit, tok)(caps, **kw)
    got = TextFeatureExtractor(on(ddit, device), tok)(caps, bf16=bf16, **kw)
    for bs in ref:
        assert_scaled_close(got[bs], ref[bs], BF16_REL if bf16 else FP32_REL, f"(block, step) = {bs}")


# ---------------------------------------------------------------- the store, filled as `difffeat extract` does


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """A latent DiT with its VAE folder and a DDiT with its tokenizer, saved in the layouts the CLI loads."""
    root = tmp_path_factory.mktemp("models")
    dit_dir = save_dit(small_dit(), root / "dit")
    small_vae().save_pretrained(root / "vae")
    ddit_dir = root / "ddit"
    ddit_dir.mkdir()
    tok = tiny_tokenizer(ddit_dir)
    save_ddit(small_ddit(tok.vocab_size), ddit_dir)
    return dit_dir, root / "vae", ddit_dir


def extract_config(out: Path, models, device: str, **extract) -> RunConfig:
    dit, vae, ddit = models
    sets = {
        "out": out, "data.kind": "demo", "data.options": "{n_train: 20, n_val: 6, n_test: 6}",
        "data.splits": "[train, val]", "image.dit": dit, "image.vae": vae, "image.name": "dit",
        "image.image_size": 64, "text.ddit": ddit, "text.name": "ddit", "extract.image_blocks": "[1, 3]",
        "extract.image_timesteps": "[10, 500]", "extract.text_blocks": "[-1]", "extract.text_timesteps": "[0, 500]",
        "extract.batch_size": 4, "extract.shard_size": 8, "extract.store_dtype": "float32",
        "extract.device": device, **extract,
    }  # fmt: skip
    return apply_overrides(RunConfig(), [f"{k}={v}" for k, v in sets.items()])


def store_entries(out: Path) -> dict[str, np.ndarray]:
    store = FeatureStore(out / "store")
    return {EntryKey(**m["key"]).name: np.array(store.read(EntryKey(**m["key"]))) for m in store.entries()}


def test_store_filled_on_device_matches_the_cpu(device, saved_models, tmp_path):
    """The whole extract step: DataLoader workers with pinned memory, VAE latents, image and text grids, shards
    copied back non-blocking and written by the background thread."""
    run(extract_config(tmp_path / "cpu", saved_models, "cpu"), ("extract",))
    run(extract_config(tmp_path / "dev", saved_models, str(device), **{"extract.num_workers": 2}), ("extract",))
    ref, got = store_entries(tmp_path / "cpu"), store_entries(tmp_path / "dev")
    assert len(ref) == 2 * (1 + 2 * 2 + 1 * 2)  # per split: latents, image blocks x t, text blocks x steps
    assert got.keys() == ref.keys()
    for name in ref:
        assert got[name].dtype == np.float32
        assert_scaled_close(torch.from_numpy(got[name]), torch.from_numpy(ref[name]), FP32_REL, name)


def test_pinned_round_trip_through_the_device_is_exact(device):
    x = torch.randn(64, 33)
    on_dev = to_device(x, device)
    assert on_dev.device.type == device.type
    copy = to_host({"k": on_dev * 2})["k"]
    assert (copy.tensor.is_pinned() and copy.done is not None) == (device.type == "cuda")
    np.testing.assert_array_equal(copy.numpy(), (x * 2).numpy())


# ---------------------------------------------------------------- heads


def separable(n: int, d: int, c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features [n, d] whose first c directions carry the labels [n, c], plus noise."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < 0.3).astype(np.float32)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[:, :c] += 1.5 * y
    return x * 7.0 + 3.0, y  # off-scale on purpose: standardisation is part of the path


def test_probes_and_fusion_trained_on_device_match_the_cpu(device):
    """Few epochs, evaluated at the last one only (so the kept epoch cannot flip on a rounding tie)."""
    (x, y), (vx, vy) = separable(600, 24, 5, 0), separable(200, 24, 5, 1)
    xs, vxs = [x, x[:, ::-1].copy(), x * 0.5], [vx, vx[:, ::-1].copy(), vx * 0.5]
    common = dict(epochs=15, eval_every=15, batch_size=128, lr=1e-2)
    ref = fit_probes(xs, y, vxs, vy, ProbeOptions(**common))
    got = fit_probes(xs, y, vxs, vy, ProbeOptions(**common, device=str(device)))
    for r, g in zip(ref, got, strict=True):
        assert g.linear.weight.device.type == "cpu" and g.best_epoch == r.best_epoch == 15
        np.testing.assert_allclose(g.predict(vx), r.predict(vx), atol=1e-4)
        assert abs(g.best_score - r.best_score) < 0.5
    fcfg = dict(common, width=32)
    ref_f = fit_fusion([x, x[:, :8]], y, [vx, vx[:, :8]], vy, FusionOptions(**fcfg))
    got_f = fit_fusion([x, x[:, :8]], y, [vx, vx[:, :8]], vy, FusionOptions(**fcfg, device=str(device)))
    np.testing.assert_allclose(got_f.predict([vx, vx[:, :8]]), ref_f.predict([vx, vx[:, :8]]), atol=1e-4)


# ---------------------------------------------------------------- process groups


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_process_group_on_the_device_passes_our_barriers(device):
    """NCCL on CUDA (gloo on the CPU): the barrier with ``device_ids`` that NCCL needs, in a one-rank group
    (a single GPU cannot host two NCCL ranks; two GPUs run the next test)."""
    script = textwrap.dedent(f"""
        import torch, torch.distributed as dist
        from difffeat.utils.distributed import barrier, info, rank_zero_first
        on_cuda = {device.type == "cuda"}
        if on_cuda:
            torch.cuda.set_device({device.index or 0})
        dist.init_process_group("nccl" if on_cuda else "gloo", init_method="tcp://127.0.0.1:{free_port()}",
                                rank=0, world_size=1)
        barrier(2)
        with rank_zero_first(0, 2):
            x = torch.ones(3, device="{device}")
        dist.all_reduce(x)
        assert info().world == 1 and x.sum().item() == 3
        dist.destroy_process_group()
        print("ok")
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.cuda
@pytest.mark.slow
def test_two_cuda_ranks_write_the_single_process_store(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA devices for 2 NCCL ranks, this machine has {torch.cuda.device_count()}")
    sys.path.insert(0, str(Path(__file__).parent / "utils"))
    from test_distributed import difffeat, entries, write_config

    from helpers import save_tiny_models

    models = save_tiny_models(tmp_path / "models")
    cuda = {"extract": {"device": "cuda", "image_blocks": [0, 3], "image_timesteps": [10, 300],
                        "text_blocks": [-1], "text_timesteps": [0, 500], "batch_size": 4, "shard_size": 8}}  # fmt: skip
    difffeat("extract", str(write_config(tmp_path / "one.yaml", models, tmp_path / "one", **cuda)))
    difffeat("extract", str(write_config(tmp_path / "two.yaml", models, tmp_path / "two", **cuda)), nproc=2)
    assert entries(tmp_path / "two") == entries(tmp_path / "one")


# ---------------------------------------------------------------- CUDA only


TF32_UNIT = 2.0**-11  # TF32 keeps 10 explicit mantissa bits: an operand's relative rounding error is up to 2^-11


@pytest.mark.cuda
def test_the_fp32_tolerance_tells_tf32_from_fp32(device):
    """One matmul of normal entries, long reduction, against float64: fp32 stays within ``FP32_REL`` and TF32
    does not, by a margin derived from the formats.

    TF32 rounds an operand's mantissa m in [1, 2) to a spacing of 2u (u = 2^-11): an absolute error of variance
    u^2/3 (rounding to nearest; truncation, which tensor cores may do instead, has the same spread plus a bias),
    so a relative error of variance >= u^2/12 (m < 2). Each product a*b then errs with variance >= (u^2/6)(ab)^2,
    and an output, a sum of K independent such products, with standard deviation >= u/sqrt(6) rms(output),
    whatever K. The largest of the 256 x 256 outputs' errors exceeds 3 such deviations with certainty (each
    output stays below with chance 0.997). fp32 rounds only the sums: about eps32 sqrt(K) of the scale."""
    k = 4096
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(256, k, generator=g), torch.randn(k, 256, generator=g)
    ref = a.double() @ b.double()
    tf32_floor = 3 * TF32_UNIT / math.sqrt(6)
    fp32_ceiling = torch.finfo(torch.float32).eps * math.sqrt(k)
    assert fp32_ceiling < FP32_REL < tf32_floor  # the tolerance separates the two formats at this size
    fp32 = a.to(device) @ b.to(device)
    assert_scaled_close(fp32, ref, FP32_REL, "fp32 matmul")
    with fp32_precision("tf32"):
        tf32 = a.to(device) @ b.to(device)
    err = scaled_error(tf32, ref)
    record_error("tf32 matmul", err, FP32_REL, device)
    assert err > tf32_floor, f"TF32 error {err:.2e} x rms: under its floor {tf32_floor:.1e}, so TF32 was not used"


@pytest.mark.cuda
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_compiled_blocks_on_device_give_the_eager_features(device, bf16):
    """torch.compile (inductor/triton on CUDA) against eager on the same device."""
    dit = on(small_dit(), device)
    x0 = torch.randn(8, 4, 8, 8, device=device)
    kw = dict(latents=x0, blocks=[1, 3], timesteps=[50, 500], bf16=bf16)
    eager = ImageFeatureExtractor(dit)(**kw)
    compiled = ImageFeatureExtractor(on(dit, device), compile=True)(**kw)
    for bt in eager:
        assert_scaled_close(compiled[bt], eager[bt], BF16_REL if bf16 else FP32_REL, f"{bt}")


@pytest.mark.cuda
def test_extractors_queue_their_work_without_waiting_for_the_device(device, tmp_path):
    """With ``keep_on_device`` a batch's extraction must not block the host (so the CPU draws the next noise
    while the GPU computes): a blocking copy from pageable memory, ``.item()`` and the like raise here."""
    tok = tiny_tokenizer(tmp_path)
    image_ex = ImageFeatureExtractor(on(small_dit(), device), on(small_vae(), device), image_size=64)
    text_ex = TextFeatureExtractor(on(small_ddit(tok.vocab_size), device), tok)
    pixels = torch.rand(4, 3, 64, 64, device=device) * 2 - 1  # as the latent cache hands them over
    caps = [[CAPTIONS[0], CAPTIONS[1]], [CAPTIONS[2]]]
    x0 = image_ex.encode(pixels, ids=list("abcd"), keep_on_device=True)  # first calls: lazy CUDA set-up
    image_ex(latents=x0, blocks=[1], timesteps=[10], keep_on_device=True)
    text_ex(caps, blocks=[-1], timesteps=[300], keep_on_device=True)
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        x0 = image_ex.encode(pixels, ids=list("abcd"), keep_on_device=True)
        image_ex(latents=x0, blocks=[1, 3], timesteps=[10, 500], ids=list("abcd"), keep_on_device=True, bf16=True)
        text_ex(caps, blocks=[0, -1], timesteps=[0, 300], ids=["p", "q"], keep_on_device=True, bf16=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
