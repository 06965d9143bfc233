"""The extraction job as a user runs it: ``difffeat extract`` in a subprocess, killed and resumed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from difffeat.features.store import FeatureStore
from helpers import save_tiny_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


def write_config(path: Path, models, out: Path, n_train: int = 200, data: dict | None = None, **extract) -> Path:
    dit, ddit = models
    demo = {"kind": "demo", "options": {"n_train": n_train, "n_val": 8, "n_test": 8}, "splits": ["train", "val"]}
    cfg = {
        "out": str(out),
        "data": data or demo,
        "image": {"dit": str(dit), "name": "tiny"},
        "text": {"ddit": str(ddit), "name": "tinytext"},
        "extract": {"image_blocks": [0, 2], "image_timesteps": [10, 300], "text_blocks": [-1],
                    "text_timesteps": [0, 500], "batch_size": 4, "shard_size": 8, **extract},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    return path


def extract(cfg: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "difffeat", "extract", str(cfg), *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=check, env={**os.environ, "TQDM_DISABLE": "1"})


def arrays(out: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in sorted((out / "store" / "entries").glob("*/features.npy"))}


def kill_midway(cfg: Path, out: Path) -> bool:
    """Start an extraction, SIGKILL it once some shards exist; True if it was killed before finishing."""
    proc = subprocess.Popen([sys.executable, "-m", "difffeat", "extract", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list((out / "store" / "entries").glob("image__*/shard-*.npy"))) >= 3:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    return proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_killed_extraction_resumes_to_identical_bytes(tmp_path, models):
    ref_out = tmp_path / "ref"
    extract(write_config(tmp_path / "ref.yaml", models, ref_out))
    ref = arrays(ref_out)
    assert len(ref) == 2 * 4 + 2 * 2 + 2  # image (blocks x t) + text (blocks x steps) per split + latents per split
    for attempt in range(3):
        out = tmp_path / f"killed{attempt}"
        cfg = write_config(tmp_path / f"killed{attempt}.yaml", models, out)
        if kill_midway(cfg, out):
            break
    else:
        pytest.fail("the extraction finished before it could be killed three times")
    assert arrays(out) != ref  # the kill really left work undone
    extract(cfg)
    assert arrays(out) == ref
    assert not list((out / "store").rglob("shard-*.npy")) and not list((out / "store").rglob("*.tmp"))


def test_finished_entries_are_never_recomputed(tmp_path, models):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", models, out, n_train=16)
    extract(cfg)
    stamps = {p: p.stat().st_mtime_ns for p in (out / "store" / "entries").glob("*/features.npy")}
    assert stamps
    extract(cfg)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    st = FeatureStore(out / "store")
    meta = next(m for m in st.entries() if m["key"]["modality"] == "image")
    assert meta["dtype"] == "float16" and meta["shape"][1] == 32 and meta["difffeat_version"]
    assert json.loads((out / "store" / "manifest.json").read_text())["splits"] == {"train": 16, "val": 8}


def manifest_with_a_bad_image(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(6):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(p)
        lines.append({"id": f"s{i}", "image": p.name, "caption": "a seven", "labels": ["seven"], "split": "train"})
    (tmp_path / "img3.png").write_bytes(b"not a png")
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(rec) for rec in lines) + "\n")
    return path


def test_bad_image_is_a_clear_error_or_recorded_with_skip_bad(tmp_path, models):
    data = manifest_with_a_bad_image(tmp_path)
    manifest = {"kind": "manifest", "root": str(data), "splits": ["train"], "options": {"val_size": 0}}
    cfg = write_config(tmp_path / "c.yaml", models, tmp_path / "run", data=manifest, modalities=["image"])
    failed = extract(cfg, check=False)
    assert failed.returncode != 0 and "img3.png" in failed.stderr and "--skip-bad" in failed.stderr
    ok = extract(cfg, "--skip-bad", "--out", str(tmp_path / "run2"))
    assert ok.returncode == 0
    st = FeatureStore(tmp_path / "run2" / "store")
    assert st.ids("train") == ["s0", "s1", "s2", "s4", "s5"]
    assert [s[0] for s in st.skipped("train")] == ["s3"] and "img3.png" in st.skipped("train")[0][1]


def test_out_of_range_block_is_reported_with_the_value(tmp_path, models):
    cfg = write_config(tmp_path / "c.yaml", models, tmp_path / "run", n_train=8, image_blocks=[9])
    failed = extract(cfg, check=False)
    assert failed.returncode == 2 and "block 9 is out of range" in failed.stderr


def test_bf16_features_get_their_own_store_entries_and_fused_or_compiled_runs_share():
    from difffeat.features.jobs import entry_fingerprint, entry_variant
    from difffeat.features.options import ExtractOptions, ImageModelOptions, TextModelOptions

    def variant(modality, ex):
        model = ImageModelOptions() if modality == "image" else TextModelOptions()
        return entry_variant(entry_fingerprint(modality, model, ex, {"dit": "file:1"}, ["a", "b"]))

    plain, same = ExtractOptions(), ExtractOptions(fuse_timesteps=True, compile=True)
    for modality in ("image", "text"):
        assert variant(modality, ExtractOptions(bf16=True)) != variant(modality, plain)
        assert variant(modality, same) == variant(modality, plain)


def test_an_edited_caption_is_a_new_entry_for_the_text_branch_and_a_caption_conditioned_image():
    """Sample ids alone would let features of old captions pass for the new ones (a stale result)."""
    from types import SimpleNamespace

    from difffeat.features.jobs import entry_fingerprint, entry_texts, entry_variant
    from difffeat.features.options import ExtractOptions, ImageModelOptions, TextModelOptions

    before = [SimpleNamespace(id="a", captions=["a red cat", "a cat"]), SimpleNamespace(id="b", captions=["dogs"])]
    after = [before[0], SimpleNamespace(id="b", captions=["two dogs"])]

    def variant(modality, model, samples):
        texts = entry_texts(modality, model, samples)
        ids = [s.id for s in samples]
        return entry_variant(entry_fingerprint(modality, model, ExtractOptions(), {"x": "file:1"}, ids, None, texts))

    text, captioned, plain = TextModelOptions(), ImageModelOptions(condition="caption"), ImageModelOptions()
    assert variant("text", text, before) != variant("text", text, after)
    assert variant("image", captioned, before) != variant("image", captioned, after)
    assert variant("image", plain, before) == variant("image", plain, after)
    assert entry_texts("image", plain, before) is None  # unconditioned image keys are what they were
