"""The label-efficiency curve (``fusion.curve_sizes``): every head refitted on nested prefixes of the train split,
the full size reproducing the run's own heads, reported in metrics.json and the report, resumable, and refitted
when what a head depends on changes."""

import json

import pytest

import difffeat.run.pipeline as pipeline_mod
from difffeat.run.config import RunConfig, apply_overrides
from difffeat.run.pipeline import Experiment, run, step_curve
from difffeat.run.summary import build_report
from helpers import save_tiny_models


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    dit, ddit = save_tiny_models(tmp_path_factory.mktemp("models"))
    out = tmp_path_factory.mktemp("curve") / "run"
    cfg = apply_overrides(
        RunConfig(),
        [
            f"out={out}", "data.kind=demo", "data.options={n_train: 120, n_val: 60, n_test: 60}", f"image.dit={dit}",
            f"text.ddit={ddit}", "extract.batch_size=64", "extract.shard_size=128", "search.mode=grid",
            "search.image_grid_blocks=[1, 3]", "search.image_grid_timesteps=[0, 100]", "search.text_grid_blocks=[0]",
            "search.text_grid_timesteps=[0]", "probe.epochs=20", "fusion.width=32", "fusion.epochs=15",
            "fusion.search_width=16", "fusion.search_epochs=5", "fusion.baselines=[pixels, random_init]",
            "fusion.ablations=[image, text]", "report.tsne_samples=40", "fusion.curve_sizes=[40, 120, 500]",
        ],
    )  # fmt: skip
    return run(cfg)


def test_curve_refits_every_head_on_prefixes(finished, monkeypatch):
    exp = finished
    results = json.loads((exp.out / "results.json").read_text())
    curve = json.loads((exp.out / "metrics.json").read_text())["label_efficiency"]  # the run made it
    assert set(curve) == set(results) >= {"fused", "image", "text", "pixels", "random_init_image"}
    seen = []
    real = pipeline_mod.fit_fusion
    monkeypatch.setattr(pipeline_mod, "fit_fusion", lambda xs, y, *a, **k: seen.append(len(y)) or real(xs, y, *a, **k))
    (exp.out / "label_efficiency.json").unlink()
    assert step_curve(exp, (40, 120, 500)) == curve  # refitted from scratch: the same numbers
    assert sorted(set(seen)) == [40, 120] and len(seen) == 2 * len(results)
    for name, row in curve.items():
        assert row["500"] is None  # more labels than the train split has
        assert row["120"] == pytest.approx(results[name]["mAP"], abs=1e-9), name  # the run's own head, refitted
        assert 0 < row["40"] <= 100
    monkeypatch.setattr(pipeline_mod, "fit_fusion", lambda *a, **k: pytest.fail("refitted a finished point"))
    assert step_curve(exp, (40, 120, 500)) == curve

    build_report(exp)
    metrics = json.loads((exp.out / "metrics.json").read_text())
    assert metrics["label_efficiency"] == curve
    section = (exp.out / "report.html").read_text().split('<section id="curve">')[1].split("</section>")[0]
    assert "<th>40 labels</th>" in section and "<td>fused</td>" in section and "data:image/png" in section
    assert (exp.out / "label_efficiency.png").exists()


def test_a_changed_recipe_refits_the_curve(finished, monkeypatch):
    """Points fitted under another fusion recipe are not served: the run's config claims them."""
    before = json.loads((finished.out / "label_efficiency.json").read_text())
    cfg = apply_overrides(finished.cfg, ["fusion.width=24"])
    exp = Experiment(cfg)
    seen = []
    real = pipeline_mod.fit_fusion
    monkeypatch.setattr(pipeline_mod, "fit_fusion", lambda xs, y, *a, **k: seen.append(len(y)) or real(xs, y, *a, **k))
    step_curve(exp, (40,))
    assert len(seen) == len(before)  # every head refitted at 40
    after = json.loads((finished.out / "label_efficiency.json").read_text())
    assert all(after[n]["fingerprint"] != before[n]["fingerprint"] for n in before)
    assert all(set(after[n]["points"]) == {"40"} for n in before)
