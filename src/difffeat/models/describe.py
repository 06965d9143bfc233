"""``difffeat layers SOURCE``: a model's blocks, widths and time convention, without loading its weights.

Why a separate path from loading: a user choosing blocks for a 12B FLUX wants the table in a second, not after
reading 24 GB. Diffusers transformers are built from their config on the meta device (shapes, no memory); SiT/DiT
files are opened with ``mmap`` and only their tensor shapes are read.
"""

from __future__ import annotations

from pathlib import Path

import torch

from difffeat.models.base import HUB_ID, Layer, TimeConvention
from difffeat.models.dit_adapter import DiTAdapter


def describe_source(source: str | Path, family: str | None = None) -> str:
    """A printable table: family, time convention, then one line per 0-based block (name, width)."""
    path = Path(source)
    if not path.exists() and not HUB_ID.fullmatch(str(source)):
        raise ValueError(f"{source}: no such file or folder, and not a hub id")
    if family in (None, "pixart", "sd3", "flux", "diffusers") and not path.is_file():
        family_name, time, layers = _diffusers_layers(source, family)
    elif family in (None, "sit", "dit") and path.is_file():
        if family is None:
            DiTAdapter.recognises(str(path))  # refuses a SiT-named file: its tensors are a DiT's, its time is not
        family_name, time, layers = _dit_layers(path, family or "dit")
    else:
        raise ValueError(f"{source}: cannot describe it as {family!r} (a file is a DiT/SiT .pt, a folder a pipeline)")
    head = [
        f"{family_name}: {len(layers)} blocks",
        f"time: {time.name} {time.low:g}..{time.high:g}, clean = {time.clean:g}: {time.doc}",
        f"{'block':>5}  {'name':<32} width",
    ]
    return "\n".join(head + [f"{layer.index:>5}  {layer.name:<32} {layer.width}" for layer in layers])


def _diffusers_layers(source: str | Path, family: str | None) -> tuple[str, TimeConvention, list[Layer]]:
    import diffusers

    from difffeat.models.diffusers_dits import ADAPTERS, _read_config, sniff_family

    family = family or sniff_family(source)
    cfg = _read_config(source, "transformer/config.json")
    cls = getattr(diffusers, ADAPTERS[family].spec.transformer_class or cfg["_class_name"])
    with torch.device("meta"):
        transformer = cls.from_config(cfg)
    scheduler = _read_config(source, "scheduler/scheduler_config.json")
    backbone = ADAPTERS[family](transformer, scheduler)
    return family, backbone.time, backbone.layers()


def _dit_layers(path: Path, family: str) -> tuple[str, TimeConvention, list[Layer]]:
    from difffeat.models.base import DDPM
    from difffeat.models.dit_load import dit_config_from_state_dict
    from difffeat.models.sit import SIT_FLOW

    sd = torch.load(path, map_location="meta", mmap=True, weights_only=True)
    if isinstance(sd.get("ema"), dict):
        sd = sd["ema"]
    config = dit_config_from_state_dict(sd, source=str(path))
    layers = [Layer(i, f"blocks.{i}", config.hidden_size) for i in range(config.depth)]
    return family, SIT_FLOW if family == "sit" else DDPM, layers
