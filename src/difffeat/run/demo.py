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


def demo_config(out: str = "runs/demo", quick: bool = False) -> RunConfig:
    """The demo run: full demo data, full grid sweep plus local search; ``quick`` is a small smoke test."""
    sizes = {"n_train": 600, "n_val": 200, "n_test": 200} if quick else {}
    return RunConfig(
        out=out,
        data=DataOptions(kind="demo", options={"cache_dir": str(Path(out) / "data"), **sizes}),
        image=ImageModelOptions(dit=str(DEMO_DIT), name="demo-dit"),
        text=TextModelOptions(ddit=str(DEMO_DDIT), name="demo-ddit"),
        extract=ExtractOptions(batch_size=256, shard_size=2048),
        # 5000 train rows are 5 steps per epoch: at the default lr the probes and heads stop still improving
        # (benchmarks/README.md, section 8), so the demo raises lr and epochs until they converge.
        probe=ProbeOptions(epochs=200, lr=3e-2, patience=20, num_threads=None),  # sweeps fit many probes at once
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


def train_demo_dit(out: str | Path = DEMO_DIT, steps: int | None = None, seed: int = 0, **recipe) -> Path:
    """Train the tiny DiT from its recipe (``recipe`` overrides fields, e.g. ``pool=100_000, device="auto"``)."""
    from difffeat.demo.zoo import DiTRecipe, train_dit, training_data

    r = DiTRecipe(seed=seed, **recipe, **({} if steps is None else {"steps": steps}))
    return train_dit(training_data(r)[0], r, out)


def train_demo_ddit(out: str | Path = DEMO_DDIT, steps: int | None = None, seed: int = 0, **recipe) -> Path:
    """Train the tiny DDiT and its word tokenizer from their recipe (``recipe`` overrides fields)."""
    from difffeat.demo.zoo import DDiTRecipe, train_ddit, training_data
    from difffeat.models.tokenizers import load_tokenizer, train_word_tokenizer

    r = DDiTRecipe(seed=seed, **recipe, **({} if steps is None else {"steps": steps}))
    captions = training_data(r)[1]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok_path = train_word_tokenizer([c for caps in captions for c in caps], r.vocab_size, out / "tokenizer.json")
    return train_ddit(captions, load_tokenizer(tok_path), r, out)
