"""A whole experiment on tiny random models and a small demo set: outputs, ranges, resumption."""

import json
import math

import pytest

from difffeat.run.config import RunConfig, apply_overrides
from difffeat.run.pipeline import Experiment, run
from helpers import save_tiny_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


def small_config(out, models, mode: str) -> RunConfig:
    dit, ddit = models
    return apply_overrides(
        RunConfig(),
        [
            f"out={out}",
            "data.kind=demo",
            "data.options={n_train: 120, n_val: 60, n_test: 60}",
            f"image.dit={dit}",
            f"text.ddit={ddit}",
            "extract.batch_size=32",
            "extract.shard_size=64",
            f"search.mode={mode}",
            "search.image_grid_blocks=[0, 1, 2, 3]",
            "search.image_grid_timesteps=[0, 100, 400]",
            "search.text_grid_timesteps=[0, 500]",
            "probe.epochs=30",
            "fusion.width=64",
            "fusion.epochs=20",
            "fusion.search_width=32",
            "fusion.search_epochs=10",
            "fusion.baselines=[pixels, random_init]",
            "report.tsne_samples=60",
        ],
    )


@pytest.fixture(scope="module", params=["grid", "search"])
def finished(request, tmp_path_factory, models):
    """One whole run per search mode, shared by the tests that read it (each run costs about a minute)."""
    out = tmp_path_factory.mktemp(request.param) / "run"
    cfg = small_config(out, models, request.param)
    run(cfg)
    return request.param, cfg, out


@pytest.mark.slow
def test_a_whole_run_writes_every_output_with_sane_metrics(finished):
    mode, _, out = finished
    for name in ("config.yaml", "search.json", "results.json", "metrics.json", "report.html", "heatmap_image.png",
                 "heatmap_text.png", "tsne.png"):  # fmt: skip
        assert (out / name).exists(), name
    assert (out / "sweep_image.csv").exists() == (mode == "grid")
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["test"]) >= {"fused", "image", "text", "concat", "pixels", "random_init_image", "random_init_text"}
    for name, res in m["test"].items():
        for key in ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1", "OF1_top3"):
            assert res[key] is not None and 0 <= res[key] <= 100 and math.isfinite(res[key]), (name, key)
    assert set(m["chosen"]) == {"image", "text"} and 0 <= m["chosen"]["image"]["block"] <= 3
    assert m["search"]["grid_size_unimodal"] == 4 * 3 + 3 * 2
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "fused" in html


@pytest.mark.slow
def test_a_rerun_skips_finished_steps(finished):
    mode, cfg, out = finished
    heads = {p: p.stat().st_mtime_ns for p in (out / "heads").glob("*.safetensors")}
    first = json.loads((out / "search.json").read_text())
    run(cfg)
    again = json.loads((out / "search.json").read_text())
    # every fit came from the cache (grid mode looks unimodal scores up in the sweep table, which it keeps)
    counted = "num_evaluations" if mode == "search" else "num_evaluations_pair"
    assert first[counted] > 0 and again[counted] == 0
    for key in ("num_scored_unimodal", "num_scored_pair"):  # the search's cost is the same, whoever paid it
        assert again[key] == first[key] > 0
    assert again["best_pair"] == first["best_pair"]
    assert {p: p.stat().st_mtime_ns for p in heads} == heads


@pytest.mark.parametrize(("setting", "expected"), [("text.add_special=eos", "eos"), ("text.max_length=8", "none")])
def test_text_settings_reach_the_extractor(tmp_path, models, setting, expected):
    cfg = apply_overrides(small_config(tmp_path / "run", models, "grid"), [setting])
    extractor = Experiment(cfg).text_extractor
    assert extractor.tokenizer.add_special == expected  # our tokenizer files default to bare captions
    ids, mask, _ = extractor.tokenizer.encode_batch(["a dog"], extractor.max_length)
    assert (ids[0, int(mask.sum()) - 1] == extractor.tokenizer.eos_id) == (expected == "eos")
