"""The run config: YAML that composes the options each piece owns, read and checked in one place.

Each section is the options dataclass of the piece that uses it (``extract:`` is
:class:`~difffeat.features.options.ExtractOptions`, ``probe:`` is :class:`~difffeat.heads.probe.ProbeOptions`,
...), so a notebook call and the CLI run the same thing with the same defaults, and ``--set section.key=value``
reaches every field. Everything is checked before anything is written: unknown keys, duplicate keys, wrong types,
values outside their allowed set or range, unknown dataset kinds and misspelt reader options are each one line
naming the file and the key, because a silently ignored typo in a config is a wasted GPU-day.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from difffeat.data.registry import DataOptions, available_datasets, check_data_options, register_dataset
from difffeat.features.options import ExtractOptions, ImageModelOptions, TextModelOptions
from difffeat.heads.fusion import FusionOptions
from difffeat.heads.probe import ProbeOptions
from difffeat.run.report import ReportOptions
from difffeat.search import SearchOptions
from difffeat.utils.io import atomic_write_text
from difffeat.utils.options import OptionError, Options, from_dict, numbers_fields, option, to_dict


class ConfigError(OptionError):
    """A config file or override that does not fit the schema."""


@dataclass
class RunConfig(Options):
    out: str = option("runs/demo", help="run folder")
    data: DataOptions = option(default_factory=DataOptions, help="which samples")
    image: ImageModelOptions = option(default_factory=ImageModelOptions, help="the image model")
    text: TextModelOptions = option(default_factory=TextModelOptions, help="the text model")
    extract: ExtractOptions = option(default_factory=ExtractOptions, help="feature extraction")
    probe: ProbeOptions = option(default_factory=ProbeOptions, help="linear probes of the sweep and search")
    search: SearchOptions = option(default_factory=SearchOptions, help="choice of (block, t)")
    fusion: FusionOptions = option(default_factory=FusionOptions, help="the fusion head and its ablations")
    report: ReportOptions = option(default_factory=ReportOptions, help="the report")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error: PyYAML keeps the last one,
    so two ``extract:`` sections would silently drop the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"line {line}", f"key {key!r} appears twice (first on line {seen[key]})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except ConfigError as exc:
        raise ConfigError(f"{where}, {exc.field}", exc.message) from None
    except yaml.YAMLError as exc:
        raise ConfigError(where, f"not valid YAML ({' '.join(str(exc).split())})") from None


def register_demo() -> None:
    """The embedded demo set is a reader like any other once registered (the data layer cannot import it)."""
    if "demo" not in available_datasets():
        from difffeat.demo.data import demo_dataset

        register_dataset("demo", demo_dataset)


def check_run(cfg: RunConfig, where: str = "config") -> RunConfig:
    """Checks that need more than one field or the registry; :class:`Options` checked each field already."""
    register_demo()
    try:
        check_data_options(cfg.data, f"{where}.data")
    except OptionError as exc:
        raise ConfigError(exc.field, exc.message) from None
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{where}.out", f"{out} is a file; the run folder must be a folder (give another --out)")
    sources = {"image": cfg.image.dit, "text": cfg.text.ddit}
    if not any(sources.get(m) for m in cfg.extract.modalities):
        raise ConfigError(
            f"{where}.extract.modalities",
            f"no modality to run: {cfg.extract.modalities} need image.dit (--dit) and/or text.ddit (--ddit)",
        )
    if "streams" in cfg.fusion.ablations and (cfg.image.condition, cfg.image.stream) != ("caption", "image"):
        raise ConfigError(
            f"{where}.fusion.ablations", "streams pairs the image backbone's image tokens with its own text tokens "
            "for each sample's caption: it needs image.condition: caption (the text tokens of the empty prompt are "
            "the same for every sample) and image.stream: image"
        )  # fmt: skip
    return cfg


def _build(data: dict, where: str) -> RunConfig:
    try:
        return from_dict(RunConfig, data, where)
    except OptionError as exc:
        raise ConfigError(exc.field, exc.message) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config and apply ``section.key=value`` overrides (values parsed as YAML)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), "config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), f"cannot read the config ({exc})") from None
    data = _parse_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), "expected a mapping of sections at the top level")
    return apply_overrides(_build(data, str(path)), overrides or [])


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """``section.key=value`` overrides (``--set``); the value is YAML, so lists and none work."""
    if not overrides:
        return cfg
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}", "expected section.key=value")
        dotted, raw = item.split("=", 1)
        *sections, key = dotted.strip().lstrip("-").split(".")
        target = data
        for part in sections:
            if not isinstance(target.get(part), dict):
                raise ConfigError(f"override {item!r}", f"{part!r} is not a config section")
            target = target[part]
        target[key] = _parse_yaml(raw, f"override {item!r}")
    try:
        return from_dict(RunConfig, data, "cmdline")
    except OptionError as exc:
        raise ConfigError(f"{exc.field.removeprefix('cmdline.')} (--set or flag)", exc.message) from None


def save_config(cfg: RunConfig, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def run_identity(cfg: RunConfig) -> dict[str, Any]:
    """What makes two configs the same experiment: the model sources and every numbers-changing option.

    Two configs that agree here may share a run folder (a rerun, a resumed run, a faster batch size); two that
    differ must not silently overwrite each other's ``config.yaml`` and results.
    """
    sources = {"image.dit": cfg.image.dit, "image.vae": cfg.image.vae, "text.ddit": cfg.text.ddit,
               "text.tokenizer": cfg.text.tokenizer}  # fmt: skip
    return {**sources, **numbers_fields(cfg, scope="all")}


def config_changes(saved: RunConfig, cfg: RunConfig) -> list[str]:
    """``key: old -> new`` for every field of :func:`run_identity` that differs."""
    old, new = run_identity(saved), run_identity(cfg)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
