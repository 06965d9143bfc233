"""The embedded default: demo data, the tiny models trained on it, and the ``difffeat demo`` configuration.

The tiny models live in ``difffeat/assets/zoo`` (our safetensors format, EMA weights, fp16 on disk) with the
recipe that made them; ``difffeat zoo train-dit`` / ``train-ddit`` reproduce them from that recipe.
"""

from __future__ import annotations

import json
from pathlib import Path

from difffeat.data.registry import DataOptions
from difffeat.features.options import ExtractOptions, ImageModelOptions, TextModelOptions
from difffeat.heads.fusion import FusionOptions
from difffeat.heads.probe import ProbeOptions
from difffeat.run.config import RunConfig
from difffeat.run.report import ReportOptions
from difffeat.search import SearchOptions

ZOO = Path(__file__).parents[1] / "assets" / "zoo"
DEMO_DIT = ZOO / "demo-dit"
DEMO_DDIT = ZOO / "demo-ddit"
# A timestep grid concentrated at low and middle t: at 32 px, t >= 400 leaves almost no signal (chance-level
# probes), so one column there shows the fall-off.
DEMO_IMAGE_TIMESTEPS = [0, 25, 50, 100, 200, 500]
DEMO_TEXT_STEPS = [0, 100, 250, 500, 750]


# World 2's few-label set: what pretraining on the 100k-scene pool is for. 1000 labeled rows, the size of many
# real labeled sets next to ImageNet-scale pretraining; the curve refits every head on fewer.
DEMO_SIZES = {"n_train": 1000, "n_val": 500, "n_test": 1000}
DEMO_CURVE = [100, 300, 1000]


def demo_config(out: str = "runs/demo", quick: bool = False) -> RunConfig:
    """The demo run: world 2's few-label set, full grid sweep plus local search, every baseline and the
    label-efficiency curve; ``quick`` is a small smoke test."""
    sizes = {"n_train": 300, "n_val": 150, "n_test": 150} if quick else DEMO_SIZES
    return RunConfig(
        out=out,
        data=DataOptions(kind="demo", options={"cache_dir": str(Path(out) / "data"), "world": 2, **sizes}),
        image=ImageModelOptions(dit=str(DEMO_DIT), name="demo-dit"),
        text=TextModelOptions(ddit=str(DEMO_DDIT), name="demo-ddit"),
        extract=ExtractOptions(batch_size=256, shard_size=2048),
        # 1000 train rows are one step per epoch at the default batch: the probes would stop still improving
        # (benchmarks/README.md, section 8), so the demo takes smaller batches and a higher lr until they converge.
        probe=ProbeOptions(epochs=200, lr=3e-2, batch_size=250, patience=20, num_threads=None),
        search=SearchOptions(
            mode="grid",
            image_grid_timesteps=[0, 50, 200, 500] if quick else DEMO_IMAGE_TIMESTEPS,
            text_grid_timesteps=DEMO_TEXT_STEPS[::2] if quick else DEMO_TEXT_STEPS,
            image_grid_blocks=[1, 3, 5] if quick else [],
            text_grid_blocks=[1, 3, 5] if quick else [],
        ),
        fusion=FusionOptions(
            width=512,
            epochs=300,
            lr=1e-2,
            patience=30,
            search_width=256,
            search_epochs=40,
            baselines=["pixels", "random_init"],
            curve_sizes=DEMO_CURVE[:2] if quick else DEMO_CURVE,
        ),
        report=ReportOptions(tsne_samples=300 if quick else 800),
    )


def print_summary(out: Path) -> None:
    """The demo's result table and its measured checks, on the terminal."""
    from rich.console import Console
    from rich.table import Table

    m = json.loads((out / "metrics.json").read_text())
    table = Table(title=f"difffeat demo: test metrics ({out})")
    cols = ["mAP", "CF1", "OF1", "CF1_top3", "OF1_top3"]
    table.add_column("features")
    for c in cols:
        table.add_column(c, justify="right")
    for name, res in m["test"].items():
        table.add_row(name, *[f"{res[c]:.1f}" if res.get(c) is not None else "-" for c in cols])
    console = Console()
    console.print(table)
    if m.get("label_efficiency"):
        console.print(_curve_rich(m["label_efficiency"]))
    chosen = ", ".join(f"{k}: block {v['block']}, t {v['t']}" for k, v in m["chosen"].items())
    s = m["search"]
    console.print(f"chosen cells: {chosen}")
    console.print(
        f"local search: scored {s['num_scored_unimodal']} of the {s['grid_size_unimodal']} unimodal cells and "
        f"{s['num_scored_pair']} fused pairs"
    )
    for name, ok in m["checks"].items():
        console.print(f"  {name}: {'yes' if ok else 'NO' if ok is not None else 'n/a'}")
    console.print(f"report: {out / 'report.html'}  ({m['seconds']:.0f} s)")


def _curve_rich(curve: dict):
    """The label-efficiency table (test mAP of each head refitted on n labeled rows) for the terminal."""
    from rich.table import Table

    from difffeat.run.summary import curve_table

    rows = curve_table(curve)
    table = Table(title="label efficiency: test mAP with n labeled train rows")
    for column in rows[0]:
        table.add_column("features" if column == "name" else column, justify="left" if column == "name" else "right")
    for row in rows:
        table.add_row(row["name"], *[f"{v:.1f}" if v is not None else "-" for k, v in row.items() if k != "name"])
    return table


def committed_recipe(folder: Path) -> dict:
    """The recipe fields a committed zoo model was trained with (its ``recipe.json``)."""
    return json.loads((folder / "recipe.json").read_text())["recipe"]


def train_demo_dit(
    out: str | Path = DEMO_DIT, recipe_from: Path = DEMO_DIT, max_seconds: float | None = None, **overrides
) -> Path:
    """Train the tiny DiT from the committed model's recipe (``overrides`` change fields, e.g. ``steps=300``);
    ``max_seconds`` stops early, as the committed one was stopped (its recipe.json says where and when)."""
    from difffeat.demo.zoo import DiTRecipe, train_dit, training_data

    r = DiTRecipe(**{**committed_recipe(Path(recipe_from)), **overrides})
    return train_dit(training_data(r)[0], r, out, max_seconds=max_seconds)


def train_demo_ddit(
    out: str | Path = DEMO_DDIT, recipe_from: Path = DEMO_DDIT, max_seconds: float | None = None, **overrides
) -> Path:
    """Train the tiny DDiT and its word tokenizer from the committed model's recipe (``overrides`` change fields)."""
    from difffeat.demo.zoo import DDiTRecipe, train_ddit, training_data
    from difffeat.models.tokenizers import load_tokenizer, train_word_tokenizer

    r = DDiTRecipe(**{**committed_recipe(Path(recipe_from)), **overrides})
    captions = training_data(r)[1]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok_path = train_word_tokenizer([c for caps in captions for c in caps], r.vocab_size, out / "tokenizer.json")
    return train_ddit(captions, load_tokenizer(tok_path), r, out, max_seconds=max_seconds)
