"""``difffeat layers SOURCE``: a model's blocks, widths and time convention, without loading its weights.

Why a separate path from loading: a user choosing blocks for a 12B FLUX or a 26B DiffusionGemma wants the table in
a second, not after reading tens of GB. Every family's network is built on the meta device (shapes, no memory)
from the config its own loader would build: a diffusers or transformers config.json, our own or SEDD/MDLM/RADD's
config.json, or the tensor shapes of a checkpoint file read as meta tensors. The family's own adapter is then
wrapped around it, so the table is what the loaded adapter's ``layers()`` and ``time`` say, by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from difffeat.models.base import HUB_ID, Backbone, Layers, backbone_class


def describe_source(source: str | Path, family: str | None = None) -> Layers:
    """Every 0-based block (name, width), the time convention and the family of ``source``, printable as a table
    (``str()``). ``family`` is needed only where the source does not tell (a SiT file: its tensors are a DiT's)."""
    path = Path(source)
    if not path.exists() and not HUB_ID.fullmatch(str(source)):
        raise ValueError(f"{source}: no such file or folder, and not a hub id")
    family = family or sniff_source(source)
    if family not in _BUILDERS:
        raise ValueError(f"{source}: cannot describe it as {family!r}; families: {', '.join(FAMILIES)}")
    backbone = _BUILDERS[family](str(source), family)
    return Layers(family, backbone.modality, backbone.time, tuple(backbone.layers()))


def sniff_source(source: str | Path) -> str:
    """The family of a file from its tensor names (read as meta tensors); of a folder or hub id, the first family
    whose adapter recognises it (as loading does), else a diffusers pipeline's from its transformer config."""
    if Path(source).is_file():
        return _file_family(Path(source))
    found = next((f for f in FAMILIES if backbone_class(f).recognises(str(source))), None)
    if found is not None:
        return found
    from difffeat.models.diffusers_dits import sniff_family

    return sniff_family(source)


def _file_family(path: Path) -> str:
    """dit, ddit or radd from the keys of the state dict a checkpoint holds, or one under a training checkpoint's
    ``state_dict`` (MDLM's Lightning file), ``model`` or ``ema`` (DiT's and SEDD/RADD's training files)."""
    from difffeat.models.checkpoints import read_state_dict, sniff_format
    from difffeat.models.dit_adapter import DiTAdapter

    obj = read_state_dict(path, shapes_only=True)
    nested = [obj[k] for k in ("state_dict", "model", "ema") if isinstance(obj.get(k), Mapping)]
    keys = {str(k).removeprefix("backbone.") for sd in (obj, *nested) for k in sd}
    if "vocab_embed.embedding" in keys:  # a text DDiT: SEDD/MDLM condition on time through sigma_map, RADD not
        return "ddit" if any(k.startswith("sigma_map.") for k in keys) else "radd"
    if "x_embedder.proj.weight" in keys:
        DiTAdapter.recognises(str(path))  # refuses a SiT-named file: its tensors are a DiT's, its time is not
        return "dit"
    raise ValueError(f"{path}: cannot tell its family (the file looks like {sniff_format(obj)}); pass the backbone")


def _on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"):
        return build()


def _local(source: str, family: str) -> Path:
    path = Path(source)
    if not path.exists():
        raise ValueError(f"{source}: {family} is described from a local folder or file; download it first")
    return path


def _dit(source: str, family: str) -> Backbone:
    """dit and sit: an official file (its shapes), our folder, a diffusers DiT folder or hub id (its config)."""
    from difffeat.models.dit import DiT
    from difffeat.models.dit_load import dit_config_of

    config = dit_config_of(source)
    return backbone_class(family)(_on_meta(lambda: DiT(config)))


def _ddit(source: str, family: str) -> Backbone:
    """SEDD/MDLM folders and files; the tokenizer plays no part in the table, so none is loaded."""
    from difffeat.models.ddit import DDiT
    from difffeat.models.ddit_load import ddit_config_of

    config = ddit_config_of(_local(source, family))
    return backbone_class(family)(_on_meta(lambda: DDiT(config)), tokenizer=None)


def _radd(source: str, family: str) -> Backbone:
    from difffeat.models.radd import RADD, radd_config_of

    config = radd_config_of(_local(source, family))
    return backbone_class(family)(_on_meta(lambda: RADD(config)), tokenizer=None)


def _diffusion_gemma(source: str, family: str) -> Backbone:
    """transformers' own config class and model class, from the folder's or hub id's config.json alone."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    config = DiffusionGemmaConfig.from_pretrained(source)
    return backbone_class(family)(_on_meta(lambda: DiffusionGemmaForBlockDiffusion(config)), tokenizer=None)


def _diffusers(source: str, family: str) -> Backbone:
    import diffusers

    from difffeat.models.diffusers_dits import ADAPTERS, _read_config

    cfg = _read_config(source, "transformer/config.json")
    cls = getattr(diffusers, ADAPTERS[family].spec.transformer_class or cfg["_class_name"])
    transformer = _on_meta(lambda: cls.from_config(cfg))
    return ADAPTERS[family](transformer, _read_config(source, "scheduler/scheduler_config.json"))


# In the registry's order, the order loading tries families in when sniffing; "diffusers" (the generic pipeline
# adapter) recognises nothing and is what an unknown pipeline root falls back to.
_BUILDERS: dict[str, Callable[[str, str], Backbone]] = {
    "dit": _dit, "ddit": _ddit, "radd": _radd, "diffusion_gemma": _diffusion_gemma, "sit": _dit,
    "pixart": _diffusers, "sd3": _diffusers, "flux": _diffusers, "diffusers": _diffusers,
}  # fmt: skip
FAMILIES = tuple(_BUILDERS)
