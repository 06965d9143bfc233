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
class ImageModelConfig:
    dit: str | None = None  # official .pt, diffusers folder/hub id, or our folder; None = no image branch
    vae: str | None = None  # AutoencoderKL hub id or folder; None for pixel-space DiTs
    name: str | None = None  # short name used in store keys (default: derived from the path)
    numerics: str = "official"  # official | diffusers
    class_label: int | None = None  # None = the null class (1000 for ImageNet DiTs)
    image_size: int | None = None  # default: the DiT's input size x 8 (VAE) or x 1 (pixels)
    sample_posterior: bool = True  # latent_dist.sample() with per-sample seeds (DiT's training) or the mean


@dataclass
class TextModelConfig:
    ddit: str | None = None  # SEDD/MDLM hub id or folder, or our folder; None = no text branch
    tokenizer: str | None = None  # AutoTokenizer id/folder or tokenizer.json; default: next to the model
    name: str | None = None
    max_length: int | None = None
    add_special: str | None = None  # none | eos | bos_eos (default by model kind)


@dataclass
class ExtractConfig:
    image_blocks: list[int] = field(default_factory=lambda: [11])
    image_timesteps: list[int] = field(default_factory=lambda: [100])
    text_blocks: list[int] = field(default_factory=lambda: [-1])
    text_timesteps: list[int] = field(default_factory=lambda: [0])
    pool: str = "mean"  # image: mean | none; text: mean | last | none
    text_pool: str = "mean"
    token_norm: bool = False
    seed: int = 0
    ensemble: int = 1
    caption_reduce: str = "mean"  # mean | first | concat
    batch_size: int = 32
    shard_size: int = 512  # rows per shard file: the unit of resumption
    store_dtype: str = "float16"  # float16 | float32
    bf16: bool = False
    compile: bool = False  # torch.compile the backbone blocks (needs a C++ compiler on CPU)
    fuse_timesteps: bool = False  # one forward for all timesteps of a batch (batch_size x timesteps rows)
    num_workers: int = 0  # DataLoader processes decoding images for the latent cache (0: in the main process)
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...; under torchrun auto/cuda = cuda:LOCAL_RANK
    skip_bad: bool = False  # record unreadable images in the store's id list instead of failing
    modalities: list[str] = field(default_factory=lambda: ["image", "text"])


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
