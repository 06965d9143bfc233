"""The ``difffeat`` command line. Every flag has a config twin; ``--set section.key=value`` reaches any option
(``difffeat options`` lists them). A mistake in a config or a flag is one line on stderr and exit code 2."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from difffeat.run.config import RunConfig, apply_overrides, load_config

# plain click help: the rich panels show every flag as taking a <bool> value, which they do not
PLAIN = {"rich_markup_mode": None, "pretty_exceptions_enable": False}
app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, **PLAIN)
zoo_app = typer.Typer(no_args_is_help=True, help="Train the embedded tiny models on the demo data.", **PLAIN)
app.add_typer(zoo_app, name="zoo")

ConfigArg = Annotated[Path, typer.Argument(help="YAML run config (see configs/)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override: section.key=value (repeatable)")]
OutOpt = Annotated[str | None, typer.Option("--out", help="run folder (config: out)")]
RecomputeOpt = Annotated[
    bool,
    typer.Option(
        "--recompute",
        help="run in a folder that holds another config: recompute what changed, reuse the rest, replace its results",
    ),
]
DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
STEPS_ALL = ("sweep", "search", "fit", "evaluate", "report")


def _help(path: str, example: str = "") -> str:
    """A flag's help: its option's help text (the one place it is written) and the config key it sets."""
    from difffeat.utils.options import option_paths

    text = next(f.metadata["help"] for p, f, _ in option_paths(RunConfig) if p == path)
    return f"{text}{', ' + example if example else ''} (config: {path})"


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg="red", err=True)
    return typer.Exit(2)


def _guarded(out: Callable[[], str | None], action: Callable[[], object]) -> None:
    """Run ``action``; a user mistake or an environment problem (disk full, read-only folder, folder in use)
    becomes one line and exit code 2. ``out`` names the run folder for errors that do not name a file."""
    from difffeat.data.core import DataError
    from difffeat.features.store import StoreError
    from difffeat.utils.lock import FolderInUse

    try:
        action()
    except OSError as exc:
        folder = exc.filename or out() or "the run folder"
        if exc.errno in DISK_FULL:
            raise _fail(
                f"disk full while writing to {folder}: free some space and rerun the same command "
                "(finished shards and entries are kept; it resumes where it stopped)"
            ) from exc
        if isinstance(
            exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
        ) or exc.errno in (
            errno.EROFS,
            errno.EEXIST,
        ):
            raise _fail(f"{exc.strerror or exc}: {folder}") from exc
        raise
    except (ValueError, RuntimeError, KeyError, DataError, StoreError, FolderInUse) as exc:
        raise _fail(exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)) from exc


def _config(path: Path | None, sets: list[str] | None, out: str | None, extra: list[str] = ()) -> RunConfig:
    cfg = load_config(path) if path else RunConfig()
    overrides = [*(sets or []), *extra] + ([f"out={out}"] if out else [])
    return apply_overrides(cfg, overrides)


def _run(make_config: Callable[[], RunConfig], pipeline_steps: tuple[str, ...], recompute: bool) -> RunConfig:
    """Read the config and run pipeline steps; under torchrun inside the process group (see
    difffeat.utils.distributed)."""
    from difffeat.run.pipeline import run
    from difffeat.utils import distributed

    cfg: RunConfig | None = None

    def action() -> None:
        nonlocal cfg
        cfg = make_config()
        with distributed.session(cfg.extract.device):
            run(cfg, pipeline_steps, recompute=recompute)

    _guarded(lambda: cfg.out if cfg else None, action)
    return cfg


@app.command()
def run(config: ConfigArg, set_: SetOpt = None, out: OutOpt = None, recompute: RecomputeOpt = False) -> None:
    """A whole experiment: sweep (grid mode), search, fit, evaluate, report; resumable."""
    _run(lambda: _config(config, set_, out), STEPS_ALL, recompute)


@app.command()
def extract(
    config: Annotated[Path | None, typer.Argument(help="YAML run config")] = None,
    set_: SetOpt = None,
    out: OutOpt = None,
    dit: Annotated[str | None, typer.Option(help=_help("image.dit"))] = None,
    vae: Annotated[str | None, typer.Option(help=_help("image.vae"))] = None,
    ddit: Annotated[str | None, typer.Option(help=_help("text.ddit"))] = None,
    data: Annotated[str | None, typer.Option(help=_help("data.kind"))] = None,
    root: Annotated[str | None, typer.Option(help=_help("data.root"))] = None,
    blocks: Annotated[str | None, typer.Option(help=_help("extract.image_blocks", "e.g. 5,11,-1"))] = None,
    timesteps: Annotated[str | None, typer.Option(help=_help("extract.image_timesteps", "e.g. 50,250"))] = None,
    limit: Annotated[int | None, typer.Option(help=_help("data.limit"))] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help=_help("extract.skip_bad"))] = False,
    bf16: Annotated[bool, typer.Option("--bf16", help=_help("extract.bf16"))] = False,
    recompute: RecomputeOpt = False,
) -> None:
    """Fill the feature store with the extract section's blocks x timesteps, for every split. Resumable."""
    flags = {
        "image.dit": dit, "image.vae": vae, "text.ddit": ddit, "data.kind": data, "data.root": root,
        "extract.image_blocks": f"[{blocks}]" if blocks else None,
        "extract.image_timesteps": f"[{timesteps}]" if timesteps else None,
        "data.limit": limit, "extract.skip_bad": skip_bad or None, "extract.bf16": bf16 or None,
    }  # fmt: skip
    extra = [f"{k}={v}" for k, v in flags.items() if v is not None]
    _run(lambda: _config(config, set_, out, extra), ("extract",), recompute)


def _step(name: str, doc: str) -> None:
    def command(config: ConfigArg, set_: SetOpt = None, out: OutOpt = None, recompute: RecomputeOpt = False) -> None:
        _run(lambda: _config(config, set_, out), (name,), recompute)

    command.__doc__ = doc
    app.command(name=name)(command)


_step(
    "sweep", "Probe every (block, t) of the grid per modality into sweep_<modality>.csv (resumable), whatever the mode."
)
_step("search", "Local search for the best (block, t) per modality and fused pair.")
_step("fit", "Train the fusion head, its ablations and baselines on the chosen features.")
_step("evaluate", "Test metrics of every trained head (results.json).")
_step("report", "metrics.json, heatmaps, t-SNE, clustering scores and report.html from a finished run.")


@app.command()
def demo(
    out: Annotated[str | None, typer.Option(help="run folder (default: runs/demo, runs/demo-quick)")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="fewer samples and a smaller grid (a smoke test)")] = False,
    set_: SetOpt = None,
    recompute: RecomputeOpt = False,
) -> None:
    """The whole method on the embedded demo data with the embedded tiny models, in minutes on a CPU."""
    from difffeat.run.demo import demo_config, print_summary

    out = out or ("runs/demo-quick" if quick else "runs/demo")  # a smoke test does not claim the full run's folder
    cfg = _run(lambda: apply_overrides(demo_config(out, quick=quick), set_ or []), STEPS_ALL, recompute)
    print_summary(Path(cfg.out))


@app.command()
def options() -> None:
    """List every option: its --set path, type, default, allowed values, and whether it changes the numbers."""
    from difffeat.utils.options import describe, option_paths

    for path, field, tp in option_paths(RunConfig):
        typer.echo(f"{path}: {describe(field, tp)}")


# The zoo trainers' shared options, declared once.
_CheckpointFolder = Annotated[str, typer.Option(help="checkpoint folder")]
_TrainSteps = Annotated[int | None, typer.Option(help="training steps (default: the recipe's)")]
_MaxSeconds = Annotated[
    float | None, typer.Option(help="stop after this many seconds (the committed models: 140 on an H200)")
]
_Device = Annotated[str | None, typer.Option(help="auto | cpu | cuda (default: the recipe's, auto)")]


def _overrides(steps: int | None, seed: int | None, device: str | None) -> dict:
    given = {"steps": steps, "seed": seed, "device": device}
    return {k: v for k, v in given.items() if v is not None}


def _zoo_trainer(name: str, trainer: str, default_out: str, doc: str) -> None:
    """Register ``zoo NAME``: both tiny models are trained the same way (the committed recipe.json, with only the
    flags given changed), so one command body serves them; ``trainer`` names the function in :mod:`run.demo`,
    imported only when the command runs."""

    def command(
        out: _CheckpointFolder = default_out,
        steps: _TrainSteps = None,
        seed: int | None = None,
        device: _Device = None,
        max_seconds: _MaxSeconds = None,
    ) -> None:
        from difffeat.run import demo

        getattr(demo, trainer)(out, max_seconds=max_seconds, **_overrides(steps, seed, device))

    command.__doc__ = doc
    zoo_app.command(name)(command)


_zoo_trainer(
    "train-dit",
    "train_demo_dit",
    "zoo/demo-dit",
    "Train the tiny pixel-space DiT (DDPM epsilon loss) on demo world 2's unlabeled pool, from the committed "
    "model's recipe.json.",
)
_zoo_trainer(
    "train-ddit",
    "train_demo_ddit",
    "zoo/demo-ddit",
    "Train the tiny text DDiT (SEDD's score entropy) and its word tokenizer on the pool's captions, from the "
    "committed model's recipe.json.",
)


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
