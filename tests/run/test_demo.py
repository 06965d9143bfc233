"""`difffeat demo --quick`: the whole method on the embedded data with the committed tiny models."""

import dataclasses
import json
import math

import pytest
from typer.testing import CliRunner

from difffeat.models.ddit_load import load_ddit
from difffeat.models.dit_load import load_dit
from difffeat.run.cli import app
from difffeat.run.demo import DEMO_DDIT, DEMO_DIT, committed_recipe, demo_config

OUTPUTS = ("config.yaml", "sweep_image.csv", "sweep_text.csv", "search.json", "results.json", "metrics.json",
           "report.html", "heatmap_image.png", "heatmap_text.png", "tsne.png")  # fmt: skip


def test_the_committed_models_load_through_the_real_loaders_and_fit_the_size_budget():
    dit, ddit = load_dit(DEMO_DIT), load_ddit(DEMO_DDIT)
    assert dit.config.input_size == 32 and dit.depth == 6 and ddit.depth == 6
    size = sum(p.stat().st_size for p in [*DEMO_DIT.iterdir(), *DEMO_DDIT.iterdir()])
    assert size <= 30 * 2**20
    for folder in (DEMO_DIT, DEMO_DDIT):
        recipe = json.loads((folder / "recipe.json").read_text())
        assert recipe["final_loss"] < recipe["first_loss"] and recipe["seconds"] > 0


@pytest.mark.slow
def test_quick_demo_writes_a_complete_run_with_metrics_in_range(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["test"]) >= {"fused", "image", "text", "concat", "pixels", "random_init_image", "random_init_text"}
    for name, res in m["test"].items():
        for key in ("mAP", "CF1", "OF1", "CF1_top3", "OF1_top3"):
            assert math.isfinite(res[key]) and 0 <= res[key] <= 100, (name, key, res[key])
    assert m["search"]["grid_size_unimodal"] == 3 * 4 + 3 * 3
    assert set(m["checks"]) >= {"fused_above_every_other_row", "search_used_at_most_a_third_of_grid"}
    assert "difffeat demo: test metrics" in result.output and "report:" in result.output
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3
    curve = m["label_efficiency"]  # the demo's curve: every head at each labeled-set size of the quick run
    assert set(curve) == set(m["test"]) and all(set(row) == {"100", "300"} for row in curve.values())
    assert all(row["300"] == pytest.approx(m["test"][name]["mAP"], abs=1e-6) for name, row in curve.items())


def test_the_committed_models_were_trained_on_world_2s_pool_and_the_demo_probes_world_2():
    cfg = demo_config("unused")
    assert cfg.data.options["world"] == 2 and cfg.data.options["n_train"] < 5000  # the few-label set
    for folder in (DEMO_DIT, DEMO_DDIT):
        assert committed_recipe(folder)["pool"] >= 10 * cfg.data.options["n_train"]


def test_zoo_trainers_start_from_the_committed_recipe(tmp_path, monkeypatch):
    """`difffeat zoo train-*` reproduce the committed models: their recipe.json, with only what is given changed."""
    import difffeat.demo.zoo as zoo

    seen = {}

    def data(recipe):  # the pool is 100k scenes: what matters here is the recipe it is asked for
        seen["recipe"] = recipe
        return [], []

    monkeypatch.setattr(zoo, "training_data", data)
    monkeypatch.setattr(zoo, "train_dit", lambda images, r, out, max_seconds=None: seen.update(max_seconds=max_seconds))
    result = CliRunner().invoke(app, ["zoo", "train-dit", "--out", str(tmp_path), "--steps", "7", "--max-seconds", "9"])
    assert result.exit_code == 0, result.output
    expected = {**committed_recipe(DEMO_DIT), "steps": 7}
    assert dataclasses.asdict(seen["recipe"]) == expected and seen["max_seconds"] == 9


@pytest.mark.parametrize(("command", "trainer", "default_out"), [
    ("train-dit", "train_demo_dit", "zoo/demo-dit"), ("train-ddit", "train_demo_ddit", "zoo/demo-ddit"),
])  # fmt: skip
def test_each_zoo_command_calls_its_own_trainer_with_the_flags_given(monkeypatch, command, trainer, default_out):
    import difffeat.run.demo as demo

    calls = []
    for name in ("train_demo_dit", "train_demo_ddit"):
        monkeypatch.setattr(demo, name, lambda out, name=name, **kw: calls.append((name, out, kw)))
    result = CliRunner().invoke(app, ["zoo", command, "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert calls == [(trainer, default_out, {"max_seconds": None, "seed": 3})]
