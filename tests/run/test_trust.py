"""A run folder you can trust (issue 12, sections 2 and 3): outputs always come from the config, one writer at a
time, and every user mistake is one clear line with exit code 2 and no traceback."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from difffeat.features.store import FeatureStore
from difffeat.heads.fusion import FusionResult
from difffeat.models.dit_load import save_dit
from difffeat.run.cli import app
from difffeat.run.config import RunConfig, apply_overrides, load_config, save_config
from difffeat.run.pipeline import Experiment, run
from difffeat.utils.lock import FolderLock
from helpers import randomise, save_tiny_models, tiny_dit

DEMO = {"kind": "demo", "options": {"n_train": 16, "n_val": 8, "n_test": 8}}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


def write_config(path: Path, models, out: Path, **sections) -> Path:
    dit, ddit = models
    cfg = {
        "out": str(out),
        "data": DEMO,
        "image": {"dit": str(dit), "name": "tiny"},
        "text": {"ddit": str(ddit), "name": "tinytext"},
        "extract": {"image_blocks": [1], "image_timesteps": [10], "text_blocks": [-1], "text_timesteps": [0],
                    "batch_size": 4, "shard_size": 4},
    }  # fmt: skip
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values} if isinstance(values, dict) else values
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_clear(result, *needles: str) -> str:
    """Exit code 2, one line saying what is wrong, no traceback; returns that line."""
    text = result.output
    assert result.exit_code == 2, (result.exit_code, text, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and text.rstrip().endswith(errors[0]), text  # before it: progress bars at most
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


# ---------------------------------------------------------------- section 3: mistakes are one clear line


@pytest.mark.parametrize(
    ("yaml_text", "needles"),
    [
        ("extract: [1, 2\n", ["not valid YAML"]),
        ("extract:\n  image_blockz: [3]\n", ["extract: unknown key(s) ['image_blockz']"]),
        ("extract:\n  seed: three\n", ["extract.seed: expected int, got 'three'"]),
        ("extract: {shard_size: 0}\n", ["extract.shard_size: 0 is too small; must be >= 1"]),
        ("extract: {batch_size: 0}\n", ["extract.batch_size: 0 is too small"]),
        ("extract: {store_dtype: int8}\n", ["extract.store_dtype: 'int8' is not allowed", "'float32'"]),
        ("extract: {device: gpu}\n", ["extract.device: 'gpu' is not a device"]),
        ("search: {mode: grd}\n", ["search.mode: 'grd' is not allowed; choose from 'search', 'grid'"]),
        ("search: {image_start: [3]}\n", ["search.image_start: [3] is not a cell"]),
        ("fusion: {ablations: [imgae]}\n", ["fusion.ablations: 'imgae' is not an ablation"]),
        ("fusion: {baselines: [pixel]}\n", ["fusion.baselines: 'pixel' is not allowed"]),
        ("data: {splits: [train, vall]}\n", ["data.splits: 'vall' is not allowed"]),
        ("data: {limit: 0}\n", ["data.limit: 0 is too small"]),
        ("data: {kind: cocoa}\n", ["data.kind: unknown dataset kind 'cocoa'"]),
        ("data: {kind: demo, options: {n_trian: 5}}\n", ["data.options:", "n_trian", "'demo'"]),
        ("extract: {seed: 1}\nextract: {seed: 2}\n", ["key 'extract' appears twice"]),
        ("extract: 5\n", ["extract: expected a mapping, got 5"]),
        ("[1, 2]\n", ["expected a mapping of sections"]),
    ],
)
def test_a_config_mistake_is_one_clear_line(tmp_path, yaml_text, needles):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    line = assert_clear(cli("extract", path, "--dit", "x.pt", "--out", tmp_path / "run"), *needles)
    assert str(path) in line or "override" in line or "data" in line
    assert not (tmp_path / "run").exists()  # nothing written before the config is known to be good


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--set", "extract.seed=[1"], ["not valid YAML"]),
        (["--set", "extract.seed"], ["expected section.key=value"]),
        (["--set", "out.x=1"], ["'out' is not a config section"]),
        (["--set", "extract.shard_size=0"], ["extract.shard_size (--set or flag): 0 is too small"]),
        (["--limit", "0"], ["data.limit (--set or flag): 0 is too small"]),
        (["--limit", "-3"], ["data.limit (--set or flag): -3 is too small"]),
        ([], ["no modality to run"]),
    ],
)
def test_a_flag_mistake_is_one_clear_line(tmp_path, args, needles):
    assert_clear(cli("extract", "--out", tmp_path / "run", *args), *needles)
    assert not (tmp_path / "run").exists()


def test_the_real_process_prints_no_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("extract: {store_dtype: int8}\n")
    env = {**os.environ, "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, "-m", "difffeat", "extract", str(path), "--dit", "x.pt"],
                          capture_output=True, text=True, env=env)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"error: {path}.extract.store_dtype: 'int8' is not allowed; "
                                                "choose from 'float16', 'float32'"]  # fmt: skip


def test_an_existing_file_or_unwritable_out_is_one_clear_line(tmp_path, models):
    cfg = write_config(tmp_path / "c.yaml", models, tmp_path / "unused")
    (tmp_path / "file").write_text("x")
    assert_clear(cli("extract", cfg, "--out", tmp_path / "file"), "is a file", "another --out")
    assert_clear(cli("extract", cfg, "--out", tmp_path / "file" / "run"), "Not a directory", str(tmp_path / "file"))


def test_an_empty_split_is_said_before_anything_is_extracted(tmp_path, models):
    cfg = write_config(tmp_path / "c.yaml", models, tmp_path / "run", data={"options": {"n_train": 8, "n_val": 0}})
    assert_clear(cli("extract", cfg), "split 'val'", "has no samples")
    assert not list((tmp_path / "run" / "store" / "entries").glob("*"))


def test_an_out_of_range_search_start_is_an_error_not_a_wrap_around(tmp_path, models):
    cfg = write_config(tmp_path / "c.yaml", models, tmp_path / "run", search={"image_start": [9, 10]},
                       extract={"modalities": ["image"]})  # fmt: skip
    assert_clear(cli("search", cfg), "search.image_start", "block 9 is outside the model's 4 blocks")


# ---------------------------------------------------------------- section 2: the folder follows its config


def test_another_runs_folder_is_refused_and_its_config_kept(tmp_path, models):
    out = tmp_path / "run"
    first = write_config(tmp_path / "a.yaml", models, out, extract={"modalities": ["image"]})
    assert cli("extract", first).exit_code == 0
    saved = (out / "config.yaml").read_bytes()
    bad = write_config(tmp_path / "b.yaml", models, out, extract={"shard_size": 0})
    assert_clear(cli("extract", bad), "shard_size")
    other = write_config(tmp_path / "c.yaml", models, out, data={"limit": 5}, extract={"modalities": ["image"]})
    assert_clear(cli("extract", other), "holds a run with another config", "data.limit: None -> 5", "--recompute")
    assert (out / "config.yaml").read_bytes() == saved
    faster = write_config(tmp_path / "d.yaml", models, out, extract={"modalities": ["image"], "batch_size": 2})
    assert cli("extract", faster).exit_code == 0  # a setting that changes no numbers may change


def test_a_quick_trial_then_the_full_run_in_one_folder_uses_every_row(tmp_path, models):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", models, out, extract={"modalities": ["image"]})
    assert cli("extract", cfg, "--limit", "5").exit_code == 0
    assert cli("extract", cfg, "--recompute").exit_code == 0
    store = FeatureStore(out / "store")
    assert len(store.ids("train")) == 16
    image = [m for m in store.entries() if m["key"]["modality"] == "image" and m["key"]["split"] == "train"]
    assert sorted(m["shape"][0] for m in image) == [5, 16]  # the trial's entry is kept aside, never read


def reference(tmp_path: Path, models, name: str, modality: str, **sections) -> np.ndarray:
    """Train features of a clean run in a fresh folder."""
    path = write_config(tmp_path / f"{name}.yaml", models, tmp_path / name, **sections)
    assert cli("extract", path).exit_code == 0
    return read(path, modality)


def read(config: Path, modality: str) -> np.ndarray:
    """The train features of the extract section's cell, as the pipeline's later steps read them."""
    exp = Experiment(load_config(config))
    cell = (1, 10) if modality == "image" else (exp.depth("text") - 1, 0)
    return np.asarray(exp.features(modality, cell, "train"))


def test_other_weights_under_the_same_name_and_path_are_extracted_again(tmp_path, models):
    _, ddit = models
    own = tmp_path / "dit"
    save_dit(tiny_dit(input_size=32), own)
    mine = (Path(own), ddit)
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", mine, out, extract={"modalities": ["image"]})
    assert cli("extract", cfg).exit_code == 0
    before = read(cfg, "image")
    save_dit(randomise(tiny_dit(input_size=32), seed=7), own)  # retrained in place
    assert cli("extract", cfg).exit_code == 0
    fresh = reference(tmp_path, mine, "fresh", "image", extract={"modalities": ["image"]})
    assert not np.array_equal(before, fresh)
    assert np.array_equal(read(cfg, "image"), fresh)


@pytest.mark.parametrize("setting", [{"max_length": 3}, {"add_special": "eos"}])
def test_new_text_settings_are_extracted_again(tmp_path, models, setting):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", models, out, extract={"modalities": ["text"]})
    assert cli("extract", cfg).exit_code == 0
    changed = write_config(tmp_path / "d.yaml", models, out, extract={"modalities": ["text"]}, text=setting)
    assert cli("extract", changed, "--recompute").exit_code == 0
    before = read(cfg, "text")
    fresh = reference(tmp_path, models, "fresh", "text", extract={"modalities": ["text"]}, text=setting)
    assert not np.array_equal(before, fresh)
    assert np.array_equal(read(changed, "text"), fresh)


def test_a_failed_image_size_change_does_not_poison_the_latent_cache(tmp_path, models):
    out = tmp_path / "run"
    image_only = {"modalities": ["image"]}
    bad = write_config(tmp_path / "b.yaml", models, out, extract=image_only, image={"image_size": 16})
    assert cli("extract", bad).exit_code == 2  # the 32 px DiT cannot read 16 px images
    good = write_config(tmp_path / "c.yaml", models, out, extract=image_only)
    assert cli("extract", good, "--recompute").exit_code == 0
    assert np.array_equal(read(good, "image"), reference(tmp_path, models, "fresh", "image", extract=image_only))


def manifest(folder: Path) -> Path:
    """A 12-image manifest whose image b3 is not an image."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(12):
        name = f"b{i}.png"
        if i == 3:
            (folder / name).write_bytes(b"not a png")
        else:
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / name)
        split = "train" if i < 8 else ("val" if i < 10 else "test")
        lines.append(json.dumps({"image": name, "labels": ["x" if i % 2 else "y"], "split": split}))
    (folder / "m.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "m.jsonl"


def test_skip_bad_after_a_failed_run_skips_instead_of_repeating_the_error(tmp_path, models):
    data = {"kind": "manifest", "root": str(manifest(tmp_path / "data")), "options": {}}
    cfg = write_config(tmp_path / "c.yaml", models, tmp_path / "run", data=data, extract={"modalities": ["image"]})
    assert_clear(cli("extract", cfg), "b3", "--skip-bad")
    assert cli("extract", cfg, "--skip-bad").exit_code == 0
    store = FeatureStore(tmp_path / "run" / "store")
    assert [s[0] for s in store.skipped("train")] == ["b3.png"] and len(store.ids("train")) == 7


@pytest.mark.slow
def test_a_new_fusion_width_trains_the_head_again(tmp_path, models):
    base = apply_overrides(
        RunConfig(),
        [f"out={tmp_path / 'run'}", "data.kind=demo", "data.options={n_train: 32, n_val: 16, n_test: 16}",
         f"image.dit={models[0]}", "extract.modalities=[image]", "extract.batch_size=16", "extract.shard_size=16",
         "search.image_grid_blocks=[1, 2]", "search.image_grid_timesteps=[10]", "probe.epochs=3", "fusion.epochs=3",
         "fusion.width=8", "fusion.ablations=[]", "report.tsne_samples=16"],
    )  # fmt: skip
    run(base, ("search", "fit", "evaluate"))
    head = tmp_path / "run" / "heads" / "image.safetensors"
    assert FusionResult.load(head).head.width == 8
    run(apply_overrides(base, ["fusion.width=16"]), ("search", "fit", "evaluate"), recompute=True)
    assert FusionResult.load(head).head.width == 16


def test_sweep_in_search_mode_does_the_sweep(tmp_path, models):
    cfg = write_config(tmp_path / "c.yaml", models, tmp_path / "run", extract={"modalities": ["image"]},
                       search={"mode": "search", "image_grid_blocks": [1, 2], "image_grid_timesteps": [10]},
                       probe={"epochs": 2})  # fmt: skip
    assert cli("sweep", cfg).exit_code == 0
    rows = (tmp_path / "run" / "sweep_image.csv").read_text().splitlines()
    assert len(rows) == 1 + 2


# ---------------------------------------------------------------- one writer, full disks, old stores


def test_a_second_writer_is_told_who_holds_the_folder(tmp_path, models):
    cfg = write_config(tmp_path / "c.yaml", models, tmp_path / "run")
    with FolderLock(tmp_path / "run"):
        assert_clear(cli("extract", cfg), "is in use by pid", str(os.getpid()))
    assert cli("extract", cfg).exit_code == 0  # released


def test_a_full_disk_says_so_names_the_folder_and_the_rerun_resumes(tmp_path, models, monkeypatch):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", models, out, extract={"modalities": ["image"]})
    real = FeatureStore.write_shard
    written = []

    def fill_up(self, key, index, array):
        if len(written) >= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(index)
        real(self, key, index, array)

    monkeypatch.setattr(FeatureStore, "write_shard", fill_up)
    assert_clear(cli("extract", cfg), "disk full while writing to", str(out), "rerun the same command")
    monkeypatch.setattr(FeatureStore, "write_shard", real)
    assert cli("extract", cfg).exit_code == 0
    assert np.array_equal(
        read(cfg, "image"), reference(tmp_path, models, "fresh", "image", extract={"modalities": ["image"]})
    )


def test_a_store_from_before_fingerprints_asks_for_a_re_extraction(tmp_path, models):
    old = tmp_path / "run" / "store" / "entries" / "image__tiny__train__b1_t10_mean_s0"
    old.mkdir(parents=True)
    (old / "meta.json").write_text("{}")
    cfg = write_config(tmp_path / "c.yaml", models, tmp_path / "run")
    assert_clear(cli("extract", cfg), "re-extract into a new --out")


def test_config_is_saved_only_after_it_is_checked(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    save_config(RunConfig(out=str(out)), out / "config.yaml")
    saved = (out / "config.yaml").read_bytes()
    assert_clear(cli("extract", "--out", out, "--set", "extract.store_dtype=int8", "--dit", "x.pt"), "int8")
    assert (out / "config.yaml").read_bytes() == saved
