"""``difffeat run`` end to end on today's families: a tiny SD3-style pipeline (flow time, caption conditioning,
a planted massive-activation channel) and a tiny PixArt-style one (DDPM time, with a text branch for fusion), both
saved in the real diffusers layout and chosen by the registry from the folder alone."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from tests.models.tiny_pipelines import TEXT_LEN, plant_massive_channel, save_pixart, save_sd3

from difffeat.data.core import load_image
from difffeat.features.featurizer import ImageFeaturizer
from difffeat.run.config import RunConfig, apply_overrides
from difffeat.run.pipeline import Experiment, run
from helpers import save_tiny_models

MASSIVE = 5  # the planted channel
SMALL = [
    "data.kind=demo", "data.options={n_train: 24, n_val: 12, n_test: 48}", "extract.batch_size=12",
    "extract.shard_size=24", "search.mode=grid", "probe.epochs=5", "fusion.width=16", "fusion.epochs=5",
    "fusion.search_width=8", "fusion.search_epochs=3", "fusion.baselines=[random_init]", "report.tsne_samples=48",
    f"image.max_sequence_length={TEXT_LEN}",
]  # fmt: skip


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipelines")
    return {"sd3": plant_massive_channel(save_sd3(base / "sd3"), MASSIVE), "pixart": save_pixart(base / "pixart")}


def config(out, *settings: str) -> RunConfig:
    return apply_overrides(RunConfig(), [f"out={out}", *SMALL, *settings])


@pytest.fixture(scope="module")
def sd3_run(roots, tmp_path_factory):
    out = tmp_path_factory.mktemp("sd3") / "run"
    cfg = config(
        out, f"image.dit={roots['sd3']}", "image.condition=caption", "image.massive=zero", "extract.modalities=[image]",
        "search.image_grid_blocks=[0, 2]", "search.image_grid_timesteps=[0.1, 0.5]", "fusion.ablations=[]",
    )  # fmt: skip
    run(cfg)
    return out


@pytest.mark.slow
def test_sd3_run_reads_flow_times_and_records_its_massive_channels(sd3_run):
    metrics = json.loads((sd3_run / "metrics.json").read_text())
    assert {"image", "random_init_image"} <= set(metrics["test"])
    chosen = metrics["chosen"]["image"]
    assert chosen["time"] == "flow" and chosen["t"] in (0.1, 0.5) and chosen["block"] in (0, 2)
    entries = [p.name for p in (sd3_run / "store" / "entries").iterdir() if p.name.startswith("image__")]
    assert entries and all("-flow_" in name for name in entries), entries
    # found on train rows, for every block the run read, and the residual stream carries it on from block 0
    assert metrics["massive"]["mode"] == "zero"
    assert metrics["massive"]["channels"] == {"0": [MASSIVE], "2": [MASSIVE]}
    html = (sd3_run / "report.html").read_text()
    for block in (0, 2):
        assert f"block {block}: channels [{MASSIVE}]" in html


@pytest.mark.slow
def test_caption_condition_feeds_each_samples_own_caption(roots, tmp_path):
    """The stored features are the featurizer's with each sample's first caption (not the empty prompt, not
    another sample's caption)."""
    cfg = config(tmp_path / "run", f"image.dit={roots['sd3']}", "image.condition=caption",
                 "extract.modalities=[image]", "extract.store_dtype=float32")  # fmt: skip
    exp = Experiment(cfg)
    exp.ensure("image", [1], [0.25], ["val"])
    stored = np.asarray(exp.store.read(exp.key("image", (1, 0.25), "val")))
    samples = exp.samples("val")
    f = ImageFeaturizer.from_pretrained(
        roots["sd3"], device="cpu", condition="caption", max_sequence_length=TEXT_LEN
    )  # fmt: skip
    pictures, ids = [load_image(s) for s in samples], [s.id for s in samples]

    def features(captions):
        return f(pictures, blocks=[1], timesteps=[0.25], ids=ids, captions=captions)[(1, 0.25)].numpy()

    own = [s.captions[0] for s in samples]
    np.testing.assert_allclose(stored, features(own), rtol=1e-4, atol=1e-5)
    assert not np.allclose(stored, features(own[1:] + own[:1]), rtol=1e-4, atol=1e-5)
    assert not np.allclose(stored, features(None), rtol=1e-4, atol=1e-5)  # the empty prompt


@pytest.mark.slow
def test_pixart_run_fuses_with_a_text_backbone(roots, tmp_path):
    _, ddit = save_tiny_models(tmp_path / "models")
    out = tmp_path / "run"
    cfg = config(
        out, f"image.dit={roots['pixart']}", f"text.ddit={ddit}", "search.image_grid_blocks=[0, 2]",
        "search.image_grid_timesteps=[100, 500]", "search.text_grid_timesteps=[0, 500]", "fusion.ablations=[concat]",
    )  # fmt: skip
    run(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"fused", "concat", "random_init_image", "random_init_text"} <= set(metrics["test"])
    assert metrics["chosen"]["image"]["time"] == "ddpm" and metrics["chosen"]["text"]["time"] == "masked"
    assert metrics["massive"] is None
    assert (out / "heatmap_image.png").exists() and "ddpm" in (out / "report.html").read_text()


def test_a_time_outside_the_backbones_convention_is_one_line_naming_the_key(roots, tmp_path):
    """DDPM indices given to a flow model: refused before extraction, by the CLI with exit code 2."""
    cfg = config(tmp_path / "run", f"image.dit={roots['sd3']}", "extract.modalities=[image]")
    with pytest.raises(ValueError, match=r"search.image_grid_timesteps.*out of range.*flow"):
        Experiment(replace(cfg, search=replace(cfg.search, image_grid_timesteps=[100]))).grid("image")
    args = [f"--set=image.dit={roots['sd3']}", "--set=extract.modalities=[image]", "--set=data.kind=demo",
            "--set=data.options={n_train: 4, n_val: 2, n_test: 2}", f"--out={tmp_path / 'cli'}"]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "difffeat", "extract", *args], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]  # diffusers logs the rest
    assert "Traceback" not in done.stderr and len(errors) == 1, done.stderr
    assert "extract.image_timesteps: time 100 is out of range" in errors[0] and "flow" in errors[0]


def test_an_option_the_family_does_not_take_is_refused(roots, tmp_path):
    cfg = config(tmp_path / "run", f"image.dit={roots['pixart']}", "image.path=gvp", "extract.modalities=[image]")
    with pytest.raises(ValueError, match=r"image.path: the pixart backbone takes no path \(it is for sit\)"):
        Experiment(cfg).depth("image")


@pytest.mark.slow
def test_modulated_tap_run_finds_the_massive_channels_on_block_inputs_and_keys_its_features_apart(roots, tmp_path):
    """The planted channel enters the residual stream in block 0's MLP: block 0's input does not carry it, block 2's
    does. With ``image.tap: modulated`` the channels are found where they are suppressed, on the block inputs."""
    settings = [f"image.dit={roots['sd3']}", "image.massive=zero", "extract.modalities=[image]",
                "search.image_grid_timesteps=[0.5]"]  # fmt: skip
    modulated = Experiment(config(tmp_path / "modulated", *settings, "image.tap=modulated"))
    assert modulated.massive([0, 2]).channels.channels == {0: [], 2: [MASSIVE]}
    output = Experiment(config(tmp_path / "output", *settings))
    assert output.massive([0, 2]).channels.channels == {0: [MASSIVE], 2: [MASSIVE]}
    keys = [exp.key("image", (2, 0.5), "train") for exp in (modulated, output)]
    assert keys[0].variant != keys[1].variant
    modulated.ensure("image", [2], [0.5], ["train"])
    assert modulated.store.meta(keys[0])["config"]["model"]["tap"] == "modulated"  # recorded with the entry


def test_an_unknown_family_is_one_line_listing_the_known_ones():
    with pytest.raises(ValueError, match=r"image.backbone.*: 'sdxl' is not an image backbone; choose from dit, sit, "):
        apply_overrides(RunConfig(), ["image.backbone=sdxl"])
    with pytest.raises(ValueError, match=r"search.image_start.*integer block"):
        apply_overrides(RunConfig(), ["search.image_start=[1.5, 0.25]"])


def test_a_sit_named_file_is_not_taken_for_a_dit(tmp_path):
    path = tmp_path / "SiT-XL-2-256x256.pt"
    torch.save({}, path)
    cfg = config(tmp_path / "run", f"image.dit={path}", "extract.modalities=[image]")
    with pytest.raises(ValueError, match="backbone='sit'"):
        Experiment(cfg).depth("image")
