"""``fusion.ablations: [streams]``: one MMDiT, both modalities. On a tiny SD3-style pipeline with a caption for
every sample, the run trains the MMDiT's own text tokens alone (``text_stream``) and fused with its image tokens
(``streams``) beside the two-backbone ``fused`` head, reading the text stream from the loaded backbone."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests.models.tiny_pipelines import TEXT_LEN, plant_massive_channel, save_pixart, save_sd3

from difffeat.data.core import load_image
from difffeat.features.featurizer import ImageFeaturizer
from difffeat.run.config import ConfigError, RunConfig, apply_overrides, check_run
from difffeat.run.pipeline import Experiment, run
from helpers import save_tiny_models

MASSIVE = 5
SMALL = [
    "data.kind=demo", "data.options={n_train: 24, n_val: 12, n_test: 24}", "extract.batch_size=12",
    "extract.shard_size=24", "search.mode=grid", "probe.epochs=5", "fusion.width=16", "fusion.epochs=5",
    "fusion.search_width=8", "fusion.search_epochs=3", "report.tsne_samples=24", "extract.store_dtype=float32",
    f"image.max_sequence_length={TEXT_LEN}", "search.image_grid_blocks=[0, 2]", "search.image_grid_timesteps=[0.25]",
    "search.text_grid_blocks=[0]", "search.text_grid_timesteps=[0]", "fusion.ablations=[image, text, streams]",
]  # fmt: skip


def config(out, *settings: str) -> RunConfig:
    return apply_overrides(RunConfig(), [f"out={out}", *SMALL, *settings])


@pytest.fixture(scope="module")
def streams_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("streams")
    sd3 = plant_massive_channel(save_sd3(base / "sd3"), MASSIVE)
    _, ddit = save_tiny_models(base / "models")
    out = base / "run"
    cfg = config(out, f"image.dit={sd3}", f"text.ddit={ddit}", "image.condition=caption", "image.massive=zero")
    run(cfg)
    return cfg, sd3, out


@pytest.mark.slow
def test_the_run_compares_one_backbone_with_two(streams_run):
    _, _, out = streams_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"fused", "image", "text", "text_stream", "streams"} <= set(metrics["test"])
    assert "fused_above_every_other_row" in metrics["checks"]  # streams is one of the rows fused is held against
    assert metrics["massive_text_stream"]["mode"] == "zero" and metrics["massive"]["channels"]
    assert "of the text stream (zero), block" in (out / "report.html").read_text()
    image, stream = metrics["chosen"]["image"], metrics["chosen"]["text_stream"]
    assert stream["t"] == image["t"] and stream["block"] == min(image["block"], 1)  # block 2 has no text tokens


@pytest.mark.slow
def test_text_stream_features_are_the_featurizers_text_tokens_for_each_caption(streams_run):
    cfg, sd3, _ = streams_run
    exp = Experiment(cfg)
    cell = (1, 0.25)
    stored = np.asarray(exp.features("text_stream", cell, "val"))
    image = np.asarray(exp.features("image", cell, "val"))
    assert exp.key("text_stream", cell, "val") != exp.key("image", cell, "val")
    samples = exp.samples("val")
    f = ImageFeaturizer.from_pretrained(
        sd3, device="cpu", condition="caption", stream="text", max_sequence_length=TEXT_LEN, massive="zero"
    )
    recorded = json.loads((exp.out / "massive_text_stream.json").read_text())["channels"]
    f.massive_channels.update({int(b): c for b, c in recorded.items()})
    expected = f(
        [load_image(s) for s in samples], blocks=[1], timesteps=[0.25], ids=[s.id for s in samples],
        captions=[s.captions[0] for s in samples],
    )[cell].numpy()  # fmt: skip
    np.testing.assert_allclose(stored, expected, rtol=1e-4, atol=1e-5)
    assert stored.shape[0] == image.shape[0] and not np.allclose(stored[:, : image.shape[1]], image)


def test_streams_needs_caption_conditioning(tmp_path):
    with pytest.raises(ConfigError, match=r"fusion.ablations.*needs image.condition: caption"):
        check_run(config(tmp_path / "run", "image.dit=x"))


@pytest.mark.slow
def test_streams_needs_a_joint_backbone(tmp_path):
    cfg = config(tmp_path / "run", f"image.dit={save_pixart(tmp_path / 'pixart')}", "image.condition=caption")
    with pytest.raises(ConfigError, match=r"fusion.ablations.*joint text\+image backbone.*pixart"):
        _ = Experiment(cfg).stream_extractor
