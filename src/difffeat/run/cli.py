"""The ``difffeat`` command line. Every flag has a config twin; ``--set section.key=value`` reaches any of them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from difffeat.run.config import ConfigError, RunConfig, apply_overrides, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
zoo_app = typer.Typer(no_args_is_help=True, help="Train the embedded tiny models on the demo data.")
app.add_typer(zoo_app, name="zoo")

ConfigArg = Annotated[Path, typer.Argument(help="YAML run config (see configs/)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override: section.key=value (repeatable)")]
OutOpt = Annotated[str | None, typer.Option("--out", help="run folder (config: out)")]


def _config(path: Path | None, sets: list[str] | None, out: str | None, extra: list[str] = ()) -> RunConfig:
    cfg = load_config(path) if path else RunConfig()
    overrides = [*(sets or []), *extra] + ([f"out={out}"] if out else [])
    return apply_overrides(cfg, overrides)


def _run(cfg: RunConfig, steps: tuple[str, ...]) -> None:
    """Run pipeline steps; under torchrun inside the process group (see difffeat.utils.distributed)."""
    from difffeat.run.pipeline import run
    from difffeat.utils import distributed

    try:
        with distributed.session(cfg.extract.device):
            run(cfg, steps)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc


@app.command()
def run(config: ConfigArg, set_: SetOpt = None, out: OutOpt = None) -> None:
    """A whole experiment: (sweep), search, fit, evaluate, report; resumable."""
    _run(_config(config, set_, out), ("sweep", "search", "fit", "evaluate", "report"))


@app.command()
def extract(
    config: Annotated[Path | None, typer.Argument(help="YAML run config")] = None,
    set_: SetOpt = None,
    out: OutOpt = None,
    dit: Annotated[str | None, typer.Option(help="DiT checkpoint (config: image.dit)")] = None,
    vae: Annotated[str | None, typer.Option(help="VAE folder or hub id (config: image.vae)")] = None,
    ddit: Annotated[str | None, typer.Option(help="text model (config: text.ddit)")] = None,
    data: Annotated[str | None, typer.Option(help="dataset kind (config: data.kind)")] = None,
    root: Annotated[str | None, typer.Option(help="dataset root (config: data.root)")] = None,
    blocks: Annotated[
        str | None, typer.Option(help="image blocks, e.g. 5,11,-1 (config: extract.image_blocks)")
    ] = None,
    timesteps: Annotated[
        str | None, typer.Option(help="image timesteps, e.g. 50,250 (extract.image_timesteps)")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="samples per split (config: data.limit)")] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="record unreadable images and go on")] = False,
    bf16: Annotated[bool, typer.Option("--bf16", help="bf16 autocast (config: extract.bf16)")] = False,
) -> None:
    """Fill the feature store with the extract section's blocks x timesteps, for every split. Resumable."""
    flags = {
        "image.dit": dit, "image.vae": vae, "text.ddit": ddit, "data.kind": data, "data.root": root,
        "extract.image_blocks": f"[{blocks}]" if blocks else None,
        "extract.image_timesteps": f"[{timesteps}]" if timesteps else None,
        "data.limit": limit, "extract.skip_bad": skip_bad or None, "extract.bf16": bf16 or None,
    }  # fmt: skip
    extra = [f"{k}={v}" for k, v in flags.items() if v is not None]
    _run(_config(config, set_, out, extra), ("extract",))


def _step(name: str, doc: str) -> None:
    def command(config: ConfigArg, set_: SetOpt = None, out: OutOpt = None) -> None:
        _run(_config(config, set_, out), (name,))

    command.__doc__ = doc
    app.command(name=name)(command)


_step("sweep", "Probe every (block, t) of the grid per modality; CSV tables and heatmaps (resumable).")
_step("search", "Local search for the best (block, t) per modality and fused pair.")
_step("fit", "Train the fusion head, its ablations and baselines on the chosen features.")
_step("evaluate", "Test metrics of every trained head (results.json).")
_step("report", "metrics.json, heatmaps, t-SNE, clustering scores and report.html from a finished run.")


@app.command()
def demo(
    out: Annotated[str, typer.Option(help="run folder")] = "runs/demo",
    quick: Annotated[bool, typer.Option("--quick", help="fewer samples and a smaller grid (a smoke test)")] = False,
    set_: SetOpt = None,
) -> None:
    """The whole method on the embedded demo data with the embedded tiny models, in minutes on a CPU."""
    from difffeat.run.demo import demo_config

    cfg = apply_overrides(demo_config(out, quick=quick), set_ or [])
    _run(cfg, ("sweep", "search", "fit", "evaluate", "report"))
    from difffeat.run.demo import print_summary

    print_summary(Path(cfg.out))


@zoo_app.command("train-dit")
def train_dit_cmd(
    out: Annotated[str, typer.Option(help="checkpoint folder")] = "zoo/demo-dit",
    steps: Annotated[int | None, typer.Option(help="training steps (default: the recipe's)")] = None,
    seed: int = 0,
) -> None:
    """Train the tiny pixel-space DiT (DDPM epsilon loss) on the demo train split."""
    from difffeat.run.demo import train_demo_dit

    train_demo_dit(out, steps=steps, seed=seed)


@zoo_app.command("train-ddit")
def train_ddit_cmd(
    out: Annotated[str, typer.Option(help="checkpoint folder")] = "zoo/demo-ddit",
    steps: Annotated[int | None, typer.Option(help="training steps (default: the recipe's)")] = None,
    seed: int = 0,
) -> None:
    """Train the tiny text DDiT (absorbing-state loss) and its word tokenizer on the demo captions."""
    from difffeat.run.demo import train_demo_ddit

    train_demo_ddit(out, steps=steps, seed=seed)


@app.command("layers")
def layers_cmd(
    source: Annotated[str, typer.Argument(help="a .pt checkpoint, a diffusers pipeline folder or a hub id")],
    backbone: Annotated[
        str | None, typer.Option(help="family when the source does not tell: sit, dit, pixart, sd3, flux, diffusers")
    ] = None,
) -> None:
    """A model's blocks (0-based), widths and time convention, from its configs or tensor shapes alone."""
    from difffeat.models.describe import describe_source

    try:
        typer.echo(describe_source(source, backbone))
    except (ValueError, OSError, KeyError) as exc:
        typer.secho(f"error: {exc}".splitlines()[0], fg="red", err=True)
        raise typer.Exit(2) from exc


if __name__ == "__main__":  # ``python -m difffeat.run.cli`` / ``torchrun -m difffeat.run.cli``
    app()
