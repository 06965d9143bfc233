"""Loading a DiT from every layout we know, and converting between the official and diffusers layouts.

Everything is converted to the official key layout (:mod:`difffeat.models.dit`), so one strict load covers all
sources: official ``.pt`` files (plain state dicts or ``train.py`` checkpoints), diffusers pipeline or
transformer folders, hub ids, and our own folders. Files are read by :mod:`difffeat.models.checkpoints`, which
never runs code from them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from difffeat.models.checkpoints import (
    CheckpointError,
    read_json,
    read_state_dict,
    save_own_folder,
    sniff_format,
    strict_load,
    tensors_by_name,
)
from difffeat.models.dit import DIT_PRESETS, DiT, DiTConfig, sincos_pos_embed_2d

# ----------------------------------------------------------------------------------------------------------------
# Layout conversion official <-> diffusers (the key mapping of diffusers' scripts/convert_dit_to_diffusers.py)
# ----------------------------------------------------------------------------------------------------------------

_TOP_TO_DIFFUSERS = {
    "x_embedder.proj": "pos_embed.proj",
    "final_layer.adaLN_modulation.1": "proj_out_1",
    "final_layer.linear": "proj_out_2",
}
_BLOCK_TO_DIFFUSERS = {
    "adaLN_modulation.1": "norm1.linear",
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
# One shared embedder officially, a copy in every block in diffusers.
_EMBEDDER_TO_DIFFUSERS = {
    "t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
    "y_embedder.embedding_table": "norm1.emb.class_embedder.embedding_table",
}
_QKV = ("to_q", "to_k", "to_v")
_BLOCK_KEY = re.compile(r"transformer_blocks\.(\d+)\.(.+)\.(weight|bias)")


def dit_to_diffusers_state_dict(sd: Mapping[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Official → diffusers ``DiTTransformer2DModel`` layout (tensors shared, not copied).

    ``pos_embed`` has no counterpart (diffusers recomputes it as a non-persistent buffer) and is left out.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        if key == "pos_embed":
            continue
        stem, _, leaf = key.rpartition(".")
        block = re.fullmatch(r"blocks\.(\d+)\.(.+)", stem)
        if stem in _TOP_TO_DIFFUSERS:
            out[f"{_TOP_TO_DIFFUSERS[stem]}.{leaf}"] = tensor
        elif stem in _EMBEDDER_TO_DIFFUSERS:
            for i in range(depth):
                out[f"transformer_blocks.{i}.{_EMBEDDER_TO_DIFFUSERS[stem]}.{leaf}"] = tensor
        elif block and block.group(2) == "attn.qkv":
            for name, part in zip(_QKV, tensor.chunk(3, dim=0), strict=True):
                out[f"transformer_blocks.{block.group(1)}.attn1.{name}.{leaf}"] = part
        elif block and block.group(2) in _BLOCK_TO_DIFFUSERS:
            out[f"transformer_blocks.{block.group(1)}.{_BLOCK_TO_DIFFUSERS[block.group(2)]}.{leaf}"] = tensor
        else:
            raise KeyError(f"no diffusers counterpart for official key {key!r}")
    return out


def dit_state_dict_from_diffusers(
    sd: Mapping[str, torch.Tensor], source: str = "state dict"
) -> dict[str, torch.Tensor]:
    """Diffusers → official layout: q, k, v concatenated, the per-block embedder copies collapsed into one.

    The copies must all be equal, otherwise no official model reproduces the file and we refuse. Keys we do not
    know pass through unchanged so that the strict load reports them instead of them vanishing.
    """
    top_from = {v: k for k, v in _TOP_TO_DIFFUSERS.items()} | {"pos_embed.pos_embed": "pos_embed"}
    block_from = {v: k for k, v in _BLOCK_TO_DIFFUSERS.items()}
    embedder_from = {v: k for k, v in _EMBEDDER_TO_DIFFUSERS.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    copies: dict[str, dict[str, torch.Tensor]] = {}  # block index -> {official embedder key: tensor}
    for key, tensor in sd.items():
        stem, _, leaf = key.rpartition(".")
        match = _BLOCK_KEY.fullmatch(key)
        if key in top_from or stem in top_from:
            out[top_from[key] if key in top_from else f"{top_from[stem]}.{leaf}"] = tensor
        elif match and match.group(2) in embedder_from:
            copies.setdefault(match.group(1), {})[f"{embedder_from[match.group(2)]}.{leaf}"] = tensor
        elif match and match.group(2) in block_from:
            out[f"blocks.{match.group(1)}.{block_from[match.group(2)]}.{leaf}"] = tensor
        elif match and match.group(2) in {f"attn1.{name}" for name in _QKV}:
            qkv.setdefault((match.group(1), leaf), {})[match.group(2)[len("attn1.") :]] = tensor
        else:
            out[key] = tensor
    for (block, leaf), parts in qkv.items():
        if set(parts) == set(_QKV):
            out[f"blocks.{block}.attn.qkv.{leaf}"] = torch.cat([parts[name] for name in _QKV], dim=0)
        else:  # incomplete: keep the originals so the mismatch report shows them
            out.update({f"transformer_blocks.{block}.attn1.{name}.{leaf}": part for name, part in parts.items()})
    out.update(_shared_embedder(copies, source))
    return out


def _shared_embedder(copies: dict[str, dict[str, torch.Tensor]], source: str) -> dict[str, torch.Tensor]:
    """The one embedder all blocks agree on, or a CheckpointError naming the first disagreement."""
    if not copies:
        return {}
    first, *rest = sorted(copies, key=int)
    reference = copies[first]
    for block in rest:
        for key in sorted(set(reference) | set(copies[block])):
            a, b = reference.get(key), copies[block].get(key)
            if a is None or b is None or a.shape != b.shape or not torch.equal(a, b):
                raise CheckpointError(
                    f"{source}: the per-block timestep/label embedder copies disagree (block {block} {key!r} vs "
                    f"block {first}). The official DiT has a single shared embedder, so this diffusers model "
                    "cannot be converted to it without changing its outputs."
                )
    return dict(reference)


# ----------------------------------------------------------------------------------------------------------------
# Configs read from checkpoints
# ----------------------------------------------------------------------------------------------------------------


def dit_config_from_state_dict(sd: Mapping[str, torch.Tensor], source: str = "state dict") -> DiTConfig:
    """Recover the config of an official-layout state dict from its tensor shapes.

    Heads are not visible in any shape; they come from the standard preset for that width. A table with
    ``num_classes + 1`` rows is assumed (trained with label dropout, as all released DiTs are).
    """
    needed = ["x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight", "final_layer.linear.weight"]
    needed.append("blocks.0.mlp.fc1.weight")
    absent = [k for k in needed if k not in sd]
    if absent:
        raise CheckpointError(
            f"{source}: not an official-layout DiT state dict (no {', '.join(absent)}); "
            f"the file looks like {sniff_format(sd)}."
        )
    hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
    tokens = sd["pos_embed"].shape[1]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise CheckpointError(f"{source}: pos_embed has {tokens} tokens, not a square grid")
    out_channels, rem = divmod(sd["final_layer.linear.weight"].shape[0], patch * patch)
    if rem or out_channels not in (in_channels, 2 * in_channels):
        raise CheckpointError(
            f"{source}: final layer width {sd['final_layer.linear.weight'].shape[0]} fits neither "
            f"{in_channels} nor {2 * in_channels} output channels at patch {patch}"
        )
    if hidden not in _HEADS_BY_WIDTH:
        raise CheckpointError(
            f"{source}: hidden size {hidden} is not a standard DiT width ({sorted(_HEADS_BY_WIDTH)}), so the "
            "number of heads is unknown; pass config=DiTConfig(...)"
        )
    return DiTConfig(
        input_size=grid * patch,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")),
        num_heads=_HEADS_BY_WIDTH[hidden],
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1,
        learn_sigma=out_channels == 2 * in_channels,
    )


def _config_from_diffusers(cfg: Mapping, source: str) -> DiTConfig:
    """DiTConfig from a diffusers ``transformer/config.json``, refusing variants the DiT math does not cover."""
    unsupported = {
        "norm_type": "ada_norm_zero",
        "activation_fn": "gelu-approximate",
        "norm_elementwise_affine": False,
        "attention_bias": True,
    }
    for key, want in unsupported.items():
        if cfg.get(key, want) != want:
            raise CheckpointError(f"{source}: {key}={cfg[key]!r} is not a DiT (expected {want!r})")
    try:
        in_channels = cfg["in_channels"]
        out_channels = cfg.get("out_channels") or in_channels
        if out_channels not in (in_channels, 2 * in_channels):
            raise CheckpointError(f"{source}: out_channels {out_channels} with in_channels {in_channels}")
        return DiTConfig(
            input_size=cfg["sample_size"],
            patch_size=cfg["patch_size"],
            in_channels=in_channels,
            hidden_size=cfg["num_attention_heads"] * cfg["attention_head_dim"],
            depth=cfg["num_layers"],
            num_heads=cfg["num_attention_heads"],
            num_classes=cfg["num_embeds_ada_norm"],
            learn_sigma=out_channels == 2 * in_channels,
        )
    except KeyError as exc:
        raise CheckpointError(f"{source}: diffusers config lacks {exc}") from exc


# ----------------------------------------------------------------------------------------------------------------
# Loading and saving
# ----------------------------------------------------------------------------------------------------------------

_EXPECTED = "an official-layout DiT state dict"
# The official code picks heads by model size; a width is enough to recover them from a checkpoint.
_HEADS_BY_WIDTH = {preset["hidden_size"]: preset["num_heads"] for preset in DIT_PRESETS.values()}
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+")


@dataclass
class _Checkpoint:
    """What a source holds: official-layout tensors, how to get its own config, whether pos_embed is implied."""

    state_dict: dict[str, torch.Tensor]
    own_config: Callable[[], DiTConfig]
    implied_pos_embed: bool = False  # diffusers never stores the fixed position embedding


def save_dit(model: DiT, folder: str | Path) -> Path:
    """Write our format (:func:`~difffeat.models.checkpoints.save_own_folder`, ``architecture: dit``)."""
    return save_own_folder(model, asdict(model.config), "dit", folder)


def load_dit(
    source: str | Path,
    *,
    numerics: str | None = None,
    config: DiTConfig | None = None,
    map_location: str | torch.device = "cpu",
) -> DiT:
    """Load a DiT in eval mode with frozen parameters from any layout we know.

    ``source``: an official checkpoint file (plain state dict, or a training checkpoint whose ``ema`` is
    preferred over ``model``); a diffusers pipeline folder (with ``transformer/``) or transformer folder; a hub id
    such as ``facebook/DiT-XL-2-256``; or our own folder (see :func:`save_dit`).

    ``numerics`` defaults to "official" for every layout, diffusers' included: those are the numerics the weights
    were trained with. Only our own format keeps the numerics it was saved with. ``config`` replaces the config
    read from the source (needed for non-standard widths, whose head count no tensor shape reveals).
    """
    path = Path(source)
    if not path.exists():
        path = _fetch_from_hub(source)
    checkpoint = _read_file(path) if path.is_file() else _read_folder(path)
    config = config or checkpoint.own_config()
    if numerics is not None:
        config = replace(config, numerics=numerics)
    sd = checkpoint.state_dict
    if checkpoint.implied_pos_embed and "pos_embed" not in sd:
        sd = {**sd, "pos_embed": sincos_pos_embed_2d(config.hidden_size, config.grid_size).unsqueeze(0)}
    model = DiT(config)
    strict_load(model, sd, source=str(path), expected=_EXPECTED)
    model.requires_grad_(False)
    return model.eval().to(map_location)


def _fetch_from_hub(source: str | Path) -> Path:
    """Download the transformer of a hub pipeline; anything that cannot be a hub id is a missing local path."""
    text = str(source)
    if isinstance(source, Path) or not _HUB_ID.fullmatch(text) or text.endswith(_WEIGHT_SUFFIXES):
        raise CheckpointError(f"DiT checkpoint not found: {text} (no such file or folder)")
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(text, allow_patterns=["transformer/*"]))
    except Exception as exc:
        raise CheckpointError(
            f"{text!r} is not a local path and could not be fetched from the Hugging Face hub ({exc}); "
            "pass a local path to the checkpoint file or the downloaded folder."
        ) from exc


def dit_config_of(source: str | Path) -> DiTConfig:
    """The config :func:`load_dit` builds for a file (its tensor shapes, read as meta tensors: no weight is read),
    a folder or a hub id (its config.json alone), for ``difffeat layers``."""
    path = Path(source)
    if path.is_file():
        return _read_file(path, shapes_only=True).own_config()
    if not path.exists():  # a hub id: its transformer/config.json alone
        from huggingface_hub import hf_hub_download

        return _diffusers_folder_config(path, read_json(hf_hub_download(str(source), "transformer/config.json")))
    path, cfg = _transformer_config(path)
    return _own_config(path, cfg) if "architecture" in cfg else _diffusers_folder_config(path, cfg)


def _read_file(path: Path, shapes_only: bool = False) -> _Checkpoint:
    """An official state dict, or a DiT training checkpoint (``find_model`` prefers ``ema`` over ``model``)."""
    sd = read_state_dict(path, shapes_only=shapes_only)
    source = str(path)
    for wrapper in ("ema", "model"):
        if isinstance(sd.get(wrapper), Mapping):
            sd, source = sd[wrapper], f"{path} ({wrapper!r} weights)"
            break
    sd = tensors_by_name(sd, source)
    return _Checkpoint(sd, lambda: dit_config_from_state_dict(sd, source=str(path)))


def _read_folder(path: Path) -> _Checkpoint:
    """Our own folder, a diffusers transformer folder, or a diffusers pipeline root holding ``transformer/``."""
    path, cfg = _transformer_config(path)
    if "architecture" in cfg:
        config = _own_config(path, cfg)
        return _Checkpoint(read_state_dict(path / "model.safetensors"), lambda: config)
    config = _diffusers_folder_config(path, cfg)
    sd = dit_state_dict_from_diffusers(_read_diffusers_weights(path), source=str(path))
    return _Checkpoint(sd, lambda: config, implied_pos_embed=True)


def _transformer_config(path: Path) -> tuple[Path, dict]:
    """The folder holding the transformer's config.json (a pipeline root's ``transformer/``) and that config."""
    if (path / "transformer").is_dir() and not (path / "config.json").is_file():
        path = path / "transformer"
    return path, read_json(path / "config.json")


def _diffusers_folder_config(path: Path, cfg: dict) -> DiTConfig:
    if "num_layers" not in cfg:
        raise CheckpointError(f"{path}: config.json is neither ours nor a diffusers DiT transformer config")
    return _config_from_diffusers(cfg, str(path))


def _own_config(path: Path, cfg: dict) -> DiTConfig:
    if cfg["architecture"] != "dit":
        raise CheckpointError(f"{path}: holds a {cfg['architecture']!r} model, not a DiT")
    known = {f.name for f in fields(DiTConfig)}
    unknown = sorted(set(cfg) - known - {"architecture"})
    if unknown:
        raise CheckpointError(f"{path}: config.json has fields DiTConfig does not know: {unknown}")
    return DiTConfig(**{k: v for k, v in cfg.items() if k in known})


def _read_diffusers_weights(path: Path) -> dict[str, torch.Tensor]:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (path / name).is_file():
            return tensors_by_name(read_state_dict(path / name), str(path / name))
    raise CheckpointError(
        f"{path}: no diffusion_pytorch_model.safetensors or .bin next to config.json "
        f"(found: {sorted(p.name for p in path.iterdir())})"
    )
