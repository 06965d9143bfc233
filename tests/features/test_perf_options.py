"""Performance options keep the features: fused timesteps, the background shard writer, DataLoader workers for the
latent cache, on-device accumulation, the tokenization memo, torch.compile's failure message."""

import numpy as np
import pytest
import torch

from difffeat.data.core import Sample, Split
from difffeat.features.extract import ImageFeatureExtractor, _forward
from difffeat.features.jobs import cache_latents, fill_entries, torch_dtype
from difffeat.features.options import ExtractOptions
from difffeat.features.store import EntryKey, FeatureStore
from difffeat.utils.distributed import barrier
from helpers import CAPTIONS, TINY_WIDTH, assert_features_close, images, tiny_dit


def test_fused_timesteps_give_the_unfused_features_deterministically(image_ex):
    kw = dict(blocks=[0, 3], timesteps=[0, 100, 600], ids=list("abcde"), seed=3, ensemble=2)
    x0 = image_ex.encode(images(5))
    plain = image_ex(latents=x0, **kw)
    fused = image_ex(latents=x0, fuse_timesteps=True, **kw)
    again = image_ex(latents=x0, fuse_timesteps=True, **kw)
    assert set(fused) == set(plain) == {(b, t) for b in (0, 3) for t in (0, 100, 600)}
    for bt in plain:
        assert_features_close(fused[bt], plain[bt], depth=bt[0] + 2, width=TINY_WIDTH, what=f"fused {bt}")
        assert torch.equal(fused[bt], again[bt])
        assert fused[bt].device.type == "cpu"
    alone = image_ex(latents=x0[3:4], fuse_timesteps=True, **{**kw, "ids": ["d"]})
    assert_features_close(alone[(3, 600)][0], fused[(3, 600)][3], depth=5, width=TINY_WIDTH, what="fused, alone")


def test_fused_text_steps_and_the_tokenization_memo(text_ex, monkeypatch):
    calls = []
    encode = text_ex.tokenizer.encode_batch
    monkeypatch.setattr(text_ex.tokenizer, "encode_batch", lambda *a, **k: calls.append(a) or encode(*a, **k))
    caps = [[CAPTIONS[0], CAPTIONS[1]], [CAPTIONS[2]], [CAPTIONS[5]]]
    kw = dict(blocks=[0, -1], timesteps=[0, 300, 900], ids=["p", "q", "r"], seed=2, ensemble=2)
    plain = text_ex(caps, **kw)
    fused = text_ex(caps, fuse_timesteps=True, **kw)
    for bs in plain:
        assert_features_close(fused[bs], plain[bs], depth=bs[0] + 2, width=TINY_WIDTH, what=f"fused text {bs}")
    assert len(calls) == 1  # one batch of texts, tokenized once for both calls and every step


def test_store_dtype_conversion_on_device_matches_numpy():
    x = np.random.default_rng(0).normal(scale=3e4, size=10_000).astype(np.float32)
    x[:4] = [7e4, -7e4, 1e-8, 3e-5]  # overflow, underflow and a subnormal
    dtype = torch_dtype("float16")
    assert dtype == torch.float16
    with np.errstate(over="ignore"):
        assert torch.from_numpy(x).to(dtype).numpy().tobytes() == x.astype(np.float16).tobytes()


def test_a_failed_background_write_surfaces_and_leaves_no_entry(tmp_path, monkeypatch):
    store = FeatureStore(tmp_path)
    key = EntryKey("image", "m", 0, 0, "mean", 0, "train")
    real = store.write_shard

    def flaky(k, index, array):
        if index == 2:
            raise OSError("disk full")
        real(k, index, array)

    monkeypatch.setattr(store, "write_shard", flaky)
    compute = lambda lo, hi: {key: np.arange(lo, hi, dtype=np.float32)[:, None]}  # noqa: E731
    with pytest.raises(OSError, match="disk full"):
        fill_entries(store, [key], 20, 4, compute, {}, "t")
    assert store.has_shard(key, 1) and not store.has_shard(key, 2) and not store.has(key)
    monkeypatch.setattr(store, "write_shard", real)
    fill_entries(store, [key], 20, 4, compute, {}, "t")  # resumes: writes what is missing, then finalizes
    assert store.read(key)[:, 0].tolist() == list(range(20))


def test_latent_cache_with_loader_workers_is_byte_identical(tmp_path, image_ex):
    split = Split("train", [Sample(f"s{i}", img) for i, img in enumerate(images(11, seed=1))])
    rows = list(range(len(split)))
    arrays = []
    for workers in (0, 2):
        store = FeatureStore(tmp_path / f"w{workers}")
        ex = ExtractOptions(batch_size=3, shard_size=5, num_workers=workers)
        arrays.append(np.asarray(store.read(cache_latents(store, image_ex, split, rows, "tiny", ex))).tobytes())
    assert arrays[0] == arrays[1]


def test_compile_failures_say_how_to_turn_compile_off():
    class FakeDynamoError(RuntimeError):
        pass

    FakeDynamoError.__module__ = "torch._dynamo.exc"

    def broken():
        raise FakeDynamoError("no C++ compiler")

    with pytest.raises(RuntimeError, match="extract.compile: false"):
        _forward(broken, True)
    with pytest.raises(FakeDynamoError):  # not compiled: the error is passed on as it is
        _forward(broken, False)


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_features(image_ex):
    x0 = image_ex.encode(images(3))
    eager = image_ex(latents=x0, blocks=[2], timesteps=[50])[(2, 50)]
    compiled = ImageFeatureExtractor(tiny_dit(), compile=True)(latents=x0, blocks=[2], timesteps=[50])[(2, 50)]
    assert_features_close(compiled, eager, depth=4, width=TINY_WIDTH, what="compiled vs eager")


def test_several_ranks_without_torchrun_is_a_clear_error():
    barrier(1)  # one process: nothing to wait for
    with pytest.raises(RuntimeError, match="torchrun"):
        barrier(2)
