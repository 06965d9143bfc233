"""Experiment configuration: YAML files that map one-to-one onto dataclasses.

Every command-line flag has a config twin (``--extract.seed 3`` sets ``extract.seed``). Unknown keys are an
error naming the file and the key, because a silently ignored typo in a config is a wasted GPU-day.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from difffeat.features.options import ExtractConfig, ImageModelConfig, TextModelConfig


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class DataConfig:
    kind: str = "demo"  # coco | vg500 | voc2007 | nuswide | cifar100 | manifest | demo
    root: str | None = None  # dataset folder (or manifest file) as distributed
    options: dict[str, Any] = field(default_factory=dict)  # reader keyword arguments
    splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])
    limit: int | None = None  # keep only the first N samples of each split (quick trials)


@dataclass
class ProbeSettings:
    epochs: int = 200
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 1024  # 0 = full batch
    patience: int = 20
    standardize: bool = True
    seed: int = 0
    num_threads: int | None = 1  # small heads run fastest single-threaded on a shared CPU


@dataclass
class SearchSettings:
    mode: str = "search"  # search: local search, probes on demand | grid: full sweep, then the search on its table
    image_grid_blocks: list[int] = field(default_factory=list)
    image_grid_timesteps: list[int] = field(default_factory=list)
    text_grid_blocks: list[int] = field(default_factory=list)
    text_grid_timesteps: list[int] = field(default_factory=list)
    image_start: list[int] | None = None  # [block, t]; default: middle block, middle t
    text_start: list[int] | None = None  # default: deepest block, t = 0
    budget: int | None = None
    radius: int = 1
    strategy: str = "first"  # first: first improving neighbour (momentum first) | best: steepest ascent


@dataclass
class FusionSettings:
    width: int = 2048
    mode: str = "add"  # add | concat
    activation: str | None = None
    ablations: list[str] = field(default_factory=lambda: ["image", "text", "concat"])
    baselines: list[str] = field(default_factory=list)  # pixels | random_init
    epochs: int = 100
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 1024
    patience: int = 15
    seed: int = 0
    num_threads: int | None = None
    search_width: int = 512  # cheaper fused fits while the local search scores candidate pairs
    search_epochs: int = 40


@dataclass
class ReportSettings:
    tsne_samples: int = 1000
    tsne_classes: int = 10
    html: bool = True


@dataclass
class RunConfig:
    out: str = "runs/demo"
    data: DataConfig = field(default_factory=DataConfig)
    image: ImageModelConfig = field(default_factory=ImageModelConfig)
    text: TextModelConfig = field(default_factory=TextModelConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    search: SearchSettings = field(default_factory=SearchSettings)
    fusion: FusionSettings = field(default_factory=FusionSettings)
    report: ReportSettings = field(default_factory=ReportSettings)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML value against a (simple) type annotation."""
    origin = typing.get_origin(tp)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, a, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (tp is int and int(value) != value):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return tp(value)
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, data: dict, where: str = "config") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()})


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config and apply ``section.key=value`` overrides (values parsed as YAML)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return apply_overrides(from_dict(RunConfig, data, str(path)), overrides or [])


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        dotted, raw = item.split("=", 1)
        node, *rest = dotted.strip().lstrip("-").split(".")
        target = data
        for part in [node, *rest][:-1]:
            if not isinstance(target.get(part), dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a config section")
            target = target[part]
        target[[node, *rest][-1]] = yaml.safe_load(raw)
    return from_dict(RunConfig, data, "overrides")


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
