"""Loading a DDiT from SEDD and MDLM files and folders (hub, Lightning ``.ckpt``, training checkpoints) and ours.

Keys are SEDD's everywhere (:mod:`difffeat.models.ddit`); MDLM only adds a ``backbone.`` prefix. Files are read
by :mod:`difffeat.models.checkpoints`, which never runs code from them.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
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
from difffeat.models.ddit import DDiT, DDiTConfig, rotary_inv_freq

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
RADD_MODEL_TYPE = "ddit_wot"  # RADD's configs/model/*_radd.yaml: "type: ddit_wot" (a DDiT "without time")

# --------------------------------------------------------------------------------------------------------------
# Loading and saving
# --------------------------------------------------------------------------------------------------------------


def save_ddit(model: DDiT, folder: str | Path) -> Path:
    """Write our own format (:func:`~difffeat.models.checkpoints.save_own_folder`, ``architecture: ddit``)."""
    return save_own_folder(model, asdict(model.config), "ddit", folder)


@dataclass
class _Found:
    """What a source holds before the model exists: weights, maybe a config, maybe EMA shadows."""

    sd: dict[str, torch.Tensor]
    what: str
    config: DDiTConfig | None = None
    ema: list[torch.Tensor] | None = None
    ema_is_exact: bool = True  # SEDD's list covers the parameters exactly; MDLM's adds the noise schedule's
    mdlm: bool = False  # MDLM files may lack rotary_emb.inv_freq (recomputed)
    hints: dict = field(default_factory=dict)  # config values a file knows but its shapes don't (length, ...)


def load_ddit(
    source: str | Path, *, config: DDiTConfig | str | None = None, map_location: str | torch.device = "cpu"
) -> DDiT:
    """Load a DDiT in eval mode with gradients off, from any of:

    * a SEDD hub folder (nested ``config.json`` + ``model.safetensors``/``pytorch_model.bin``) or hub id
      (``louaaron/sedd-small``, ``louaaron/sedd-medium``);
    * an MDLM hub folder (flat ``config.json``, ``model_type: mdlm``, ``backbone.``-prefixed weights) or hub id
      (``kuleshov-group/mdlm-owt``, ``kuleshov-group/mdlm-no_flashattn-fp32-owt``);
    * an MDLM Lightning ``.ckpt``: ``state_dict`` with ``backbone.`` keys; keys under ``noise.`` (the noise
      schedule, not the network) are ignored, nothing else is; EMA weights are used when present, since MDLM
      evaluates and releases EMA weights;
    * a SEDD training ``checkpoint.pth`` (``{"model", "ema", ...}``): EMA shadow weights are used;
    * our own folder (``config.json`` with ``architecture: ddit``) written by :func:`save_ddit`;
    * a bare state dict file (SEDD keys, or MDLM ``backbone.`` keys).

    ``config`` (a DDiTConfig or preset name) overrides what config.json says or the tensor shapes imply; a file
    without config.json needs it only if it lacks ``rotary_emb.inv_freq`` (which gives the head count).
    Keys and shapes must match exactly; otherwise one CheckpointError lists every mismatch.
    """
    path = Path(source)
    if not path.exists():
        path = fetch_from_hub(str(source))
    found = _read_folder(path) if path.is_dir() else _read_file(path)
    if isinstance(config, str):
        config = DDiTConfig.preset(config)
    cfg = config or found.config or _infer_config(found, path)
    with torch.device("meta"):  # skip random init: every tensor is overwritten by the strict load
        model = DDiT(cfg)
    model.to_empty(device=map_location)
    sd = dict(found.sd)
    if found.mdlm:
        sd.setdefault("rotary_emb.inv_freq", rotary_inv_freq(cfg.head_dim))
    what = found.what
    if found.ema is not None:
        sd.update(_ema_weights(model, found, path))
        what += ", EMA weights"
    expected = f"a DDiT (hidden {cfg.hidden_size}, {cfg.n_blocks} blocks, {cfg.n_heads} heads, vocab {cfg.vocab_size})"
    strict_load(model, sd, f"{path} ({what})", expected)
    return model.eval().requires_grad_(False)


def ddit_config_of(source: str | Path) -> DDiTConfig:
    """The architecture a DDiT source holds, from its config.json or its tensor shapes alone: no weight is read
    (``difffeat layers``)."""
    path = Path(source)
    if not path.exists():
        path = fetch_from_hub(str(source), config_only=True)
    if path.is_dir():
        return _read_folder(path, shapes_only=True).config
    return _infer_config(_read_file(path, shapes_only=True), path)


def fetch_from_hub(repo_id: str, config_only: bool = False) -> Path:
    """Download config.json and one weights file (pytorch_model.bin only where there is no safetensors), or
    config.json alone (``config_only``: to describe a model without its weights)."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise CheckpointError(f"{repo_id}: no such file or folder, and not a Hugging Face hub id")
    from huggingface_hub import snapshot_download

    try:
        wanted = ["config.json"] if config_only else ["config.json", "model.safetensors"]
        folder = Path(snapshot_download(repo_id, allow_patterns=wanted))
        if not config_only and not (folder / "model.safetensors").is_file():
            folder = Path(snapshot_download(repo_id, allow_patterns=["config.json", "pytorch_model.bin"]))
    except Exception as exc:  # network, auth, missing repo: all mean "not available here"
        raise CheckpointError(
            f"{repo_id} could not be fetched from the Hugging Face Hub ({type(exc).__name__}: {exc}); "
            "download it where there is network access and pass the local folder instead"
        ) from exc
    return folder


def _read_folder(folder: Path, shapes_only: bool = False) -> _Found:
    """config.json tells the layout: ours, MDLM's flat one or SEDD's nested Hydra one."""
    raw = read_json(folder / "config.json")
    sd = folder_weights(folder, shapes_only)
    if raw.get("architecture") == "ddit":
        own = {k: v for k, v in raw.items() if k != "architecture"}
        return _Found(sd, "difffeat DDiT folder", config=_build_config(folder, lambda: DDiTConfig(**own)))
    if raw.get("model_type") == "mdlm":
        return _Found(
            _strip_backbone(sd), "MDLM folder", config=_build_config(folder, lambda: _mdlm_config(raw)), mdlm=True
        )
    if is_radd_config(raw):
        raise CheckpointError(f"{folder} holds RADD (no time conditioning), not a SEDD/MDLM DDiT: use backbone radd")
    if "tokens" in raw and isinstance(raw.get("model"), dict):
        return _Found(sd, "SEDD folder", config=_build_config(folder, lambda: _sedd_config(raw)))
    raise CheckpointError(
        f"{folder}/config.json is not a DDiT config (expected our 'architecture: ddit', MDLM's 'model_type: mdlm' "
        f"or SEDD's nested 'tokens' and 'model'); its keys: {sorted(raw)[:12]}; "
        f"the weights look like {sniff_format(sd)}"
    )


def folder_weights(folder: Path, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a hub folder's weights file (the first of :data:`WEIGHT_FILES` it holds); with
    ``shapes_only``, meta tensors, and none where the folder holds only its config (describing needs no weights)."""
    weights = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is None:
        if shapes_only:
            return {}
        raise CheckpointError(f"{folder}: no weights file (looked for {' and '.join(WEIGHT_FILES)})")
    return tensors_by_name(read_state_dict(weights, shapes_only=shapes_only), str(weights))


def is_radd_config(raw: dict) -> bool:
    """RADD's Hydra config (what its ``PyTorchModelHubMixin`` writes as config.json) nests ``tokens`` and ``model``
    as SEDD's does. It is told apart by ``model.type: ddit_wot`` or a ``*radd`` model name (in every model config
    of the RADD repository), or else by the keys each network's ``__init__`` reads: RADD's ``model.dtype`` and
    ``model.use_checkpoint``, never SEDD's ``model.scale_by_sigma`` (no hub file could be read here to confirm)."""
    model = raw.get("model")
    if "tokens" not in raw or not isinstance(model, dict):
        return False
    named = model.get("type") == RADD_MODEL_TYPE or str(model.get("name", "")).endswith("radd")
    return named or ("scale_by_sigma" not in model and {"dtype", "use_checkpoint"} <= set(model))


def _build_config(folder: Path, build) -> DDiTConfig:
    try:
        return build()
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder}/config.json: cannot build a DDiT config from it ({exc!r})") from exc


def _sedd_config(raw: dict) -> DDiTConfig:
    """SEDD's Hydra config: vocab = tokens + 1 (the absorbing [MASK] is the last id)."""
    graph = (raw.get("graph") or {}).get("type", "absorb")
    if graph != "absorb":
        raise ValueError(f"graph type {graph!r}: only SEDD's absorbing graph has a [MASK] token to corrupt with")
    m = raw["model"]
    return DDiTConfig(
        **nested_architecture(raw, raw.get("length", 1024)),
        cond_dim=m["cond_dim"],
        scale_by_sigma=m.get("scale_by_sigma", True),
        kind="sedd",
    )


def nested_architecture(raw: dict, default_length: int = 1024) -> dict:
    """What SEDD's nested Hydra config says of any network in its family (SEDD's DDiT, RADD's): vocab = tokens + 1
    (the absorbing [MASK] is the last id), width, heads, blocks, and the trained length (``default_length`` when
    ``model.length`` is absent)."""
    m = raw["model"]
    return dict(
        vocab_size=raw["tokens"] + 1,
        hidden_size=m["hidden_size"],
        n_heads=m["n_heads"],
        n_blocks=m["n_blocks"],
        length=m.get("length", default_length),
    )


def _mdlm_config(raw: dict) -> DDiTConfig:
    return DDiTConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_dim"],
        cond_dim=raw["cond_dim"],
        n_heads=raw["n_heads"],
        n_blocks=raw["n_blocks"],
        length=raw.get("model_length", 1024),
        scale_by_sigma=False,
        kind="mdlm",
        time_conditioning=raw.get("time_conditioning", False),
    )


def _read_file(path: Path, shapes_only: bool = False) -> _Found:
    """One file: MDLM Lightning ckpt, SEDD training checkpoint, or a bare state dict."""
    obj = read_state_dict(path, shapes_only=shapes_only)
    if isinstance(obj.get("state_dict"), dict):
        sd = tensors_by_name(obj["state_dict"], f"{path} ('state_dict')")
        sd = {k: v for k, v in sd.items() if not k.startswith("noise.")}
        return _Found(
            _strip_backbone(sd),
            "MDLM Lightning checkpoint",
            ema=_shadows(obj),
            ema_is_exact=False,
            mdlm=True,
            hints=_mdlm_hparams(obj),
        )
    if isinstance(obj.get("model"), dict):
        sd = tensors_by_name(obj["model"], f"{path} ('model')")
        return _Found(sd, "SEDD training checkpoint", ema=_shadows(obj))
    sd = tensors_by_name(obj, str(path))
    if any(k.startswith("backbone.") for k in sd):
        return _Found(_strip_backbone(sd), "MDLM state dict", mdlm=True)
    return _Found(sd, "state dict")


def _strip_backbone(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("backbone."): v for k, v in sd.items()}


def _shadows(obj: dict) -> list[torch.Tensor] | None:
    ema = obj.get("ema")
    shadows = ema.get("shadow_params") if isinstance(ema, dict) else None
    return list(shadows) if isinstance(shadows, list | tuple) else None


def _mdlm_hparams(obj: dict) -> dict:
    """Trained length and time conditioning from a Lightning ckpt's saved Hydra config, when it has one.

    Only values of the expected types count: anything else in a pickle may be an unloaded record.
    """
    hparams = obj.get("hyper_parameters")
    config = hparams.get("config") if isinstance(hparams, dict) else None
    config = config if isinstance(config, dict) else {}
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    hints = {}
    if isinstance(config.get("time_conditioning"), bool):
        hints["time_conditioning"] = config["time_conditioning"]
    if isinstance(model.get("length"), int) and not isinstance(model.get("length"), bool):
        hints["length"] = model["length"]
    return hints


def _ema_weights(model: DDiT, found: _Found, path: Path) -> dict[str, torch.Tensor]:
    """Name the EMA shadows: they are listed in ``parameters()`` order (buffers such as inv_freq excluded)."""
    names = [name for name, _ in model.named_parameters()]
    n = len(found.ema)
    if n < len(names) or (found.ema_is_exact and n != len(names)):
        raise CheckpointError(
            f"{path} ({found.what}): its EMA holds {n} shadow parameters but the model has {len(names)} "
            "parameters, so they cannot be matched by position"
        )
    return dict(zip(names, found.ema, strict=False))


def _infer_config(found: _Found, path: Path) -> DDiTConfig:
    """Architecture from tensor shapes; the head count comes from inv_freq (head_dim / 2 values)."""
    sd = found.sd
    try:
        vocab, hidden = sd["vocab_embed.embedding"].shape
        cond = sd["sigma_map.mlp.0.weight"].shape[0]
        ratio = sd["blocks.0.mlp.0.weight"].shape[0] // hidden
        head_dim = 2 * sd["rotary_emb.inv_freq"].numel()
    except KeyError as exc:
        raise CheckpointError(
            f"{path} ({found.what}): cannot infer the DDiT architecture, {exc} is not in the file (pass config=...); "
            f"the file looks like {sniff_format(sd)}"
        ) from exc
    n_blocks = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    kind = dict(kind="mdlm", scale_by_sigma=False, time_conditioning=False) if found.mdlm else dict(kind="sedd")
    return DDiTConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        cond_dim=cond,
        n_heads=hidden // head_dim,
        n_blocks=n_blocks,
        mlp_ratio=ratio,
        **{**kind, **found.hints},
    )
