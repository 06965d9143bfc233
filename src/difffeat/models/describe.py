"""``difffeat layers SOURCE``: a model's blocks, widths and time convention, without loading its weights.

Why a separate path from loading: a user choosing blocks for a 12B FLUX or an 8B DiffusionGemma wants the table in
a second, not after reading 24 GB. Diffusers transformers are built from their config on the meta device (shapes,
no memory); DiffusionGemma's layers come from its config; SiT/DiT/SEDD/MDLM/RADD files are opened for their tensor
shapes only (``read_state_dict(shapes_only=True)``), and a folder with a config.json needs nothing more.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from difffeat.models.base import DDPM, HUB_ID, Layers, block_layers
from difffeat.models.checkpoints import read_state_dict
from difffeat.models.dit_adapter import DiTAdapter

IMAGE_FOLDERS = ("pixart", "sd3", "flux", "diffusers")
TEXT = ("ddit", "radd", "diffusion_gemma")
FAMILIES = ("dit", "sit", *IMAGE_FOLDERS, *TEXT)


def describe_source(source: str | Path, family: str | None = None) -> Layers:
    """Every 0-based block (name, width), the time convention and the family of ``source``, printable as a table.

    ``family`` is needed only where the source does not tell: a bare SEDD/MDLM/RADD weights file (a bare ``.pt``
    is taken for a DiT) or a hub id that is not local.
    """
    path = Path(source)
    if not path.exists() and not HUB_ID.fullmatch(str(source)):
        raise ValueError(f"{source}: no such file or folder, and not a hub id")
    family = family or _sniff(path)
    if family not in FAMILIES:
        raise ValueError(f"{source}: unknown family {family!r}; use one of {', '.join(FAMILIES)}")
    if family in TEXT:
        return _text_layers(source, family)
    if family in IMAGE_FOLDERS and not path.is_file():
        return _diffusers_layers(source, family)
    if family in ("dit", "sit") and path.is_file():
        return _dit_layers(path, family)
    raise ValueError(f"{source}: cannot describe it as {family!r} (a file is a DiT/SiT .pt, a folder a pipeline)")


def _sniff(path: Path) -> str:
    """A folder's config tells its family; a file is a DiT's unless named otherwise (SiT files are refused); a
    pipeline root or hub id is sniffed from its transformer's class."""
    from difffeat.models.ddit_adapter import DDiTAdapter
    from difffeat.models.diffusers_dits import sniff_family
    from difffeat.models.diffusion_gemma import DiffusionGemmaBackbone
    from difffeat.models.radd import RADDAdapter

    if path.is_file():
        DiTAdapter.recognises(str(path))  # refuses a SiT-named file: its tensors are a DiT's, its time is not
        return "dit"
    if (path / "transformer" / "config.json").is_file() or not (path / "config.json").is_file():
        return sniff_family(path)
    for cls in (DiffusionGemmaBackbone, RADDAdapter, DDiTAdapter):
        if cls.recognises(str(path)):
            return cls.family
    keys = sorted(json.loads((path / "config.json").read_text()))[:8]
    raise ValueError(f"{path}/config.json: not a model this library reads (keys {keys}); pass --backbone")


def _diffusers_layers(source: str | Path, family: str) -> Layers:
    import diffusers

    from difffeat.models.diffusers_dits import ADAPTERS, _read_config

    cfg = _read_config(source, "transformer/config.json")
    cls = getattr(diffusers, ADAPTERS[family].spec.transformer_class or cfg["_class_name"])
    with torch.device("meta"):
        transformer = cls.from_config(cfg)
    scheduler = _read_config(source, "scheduler/scheduler_config.json")
    backbone = ADAPTERS[family](transformer, scheduler)
    return Layers(family, "image", backbone.time, tuple(backbone.layers()))


def _dit_layers(path: Path, family: str) -> Layers:
    from difffeat.models.dit_load import dit_config_from_state_dict
    from difffeat.models.sit import SIT_FLOW

    sd = read_state_dict(path, shapes_only=True)
    if isinstance(sd.get("ema"), dict):
        sd = sd["ema"]
    config = dit_config_from_state_dict(sd, source=str(path))
    time = SIT_FLOW if family == "sit" else DDPM
    return Layers(family, "image", time, tuple(block_layers(config.depth, config.hidden_size)))


def _text_layers(source: str | Path, family: str) -> Layers:
    if family == "diffusion_gemma":
        from transformers import DiffusionGemmaConfig

        from difffeat.models.diffusion_gemma import DiffusionGemmaBackbone, gemma_layers

        config = DiffusionGemmaConfig.from_pretrained(str(source))
        return Layers(family, "text", DiffusionGemmaBackbone.time, tuple(gemma_layers(config.text_config)))
    if family == "radd":
        from difffeat.models.radd import RADDAdapter, radd_config_of

        config = radd_config_of(source)
        return Layers(family, "text", RADDAdapter.time, tuple(block_layers(config.n_blocks, config.hidden_size)))
    from difffeat.models.ddit_adapter import DDiTAdapter
    from difffeat.models.ddit_load import ddit_config_of

    config = ddit_config_of(source)
    return Layers(family, "text", DDiTAdapter.time, tuple(block_layers(config.n_blocks, config.hidden_size)))
