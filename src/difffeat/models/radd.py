"""RADD (Ou et al. 2024, "Your absorbing discrete diffusion secretly models the conditional distributions of clean
data"; code github.com/ML-GSAI/RADD, ``model/transformer.py`` at 60b772d): SEDD's DDiT with the time condition
removed, because an absorbing diffusion's score factors into a time term and p(x0 | unmasked tokens), which does not
depend on time.

What RADD's network changes against SEDD's (:mod:`difffeat.models.ddit`), all read from its source:

* no ``sigma_map`` and no ``adaLN_modulation`` anywhere: each block is a plain pre-LN block,
  ``x + attn_out(attn(norm1(x)))`` then ``x + mlp(norm2(x))``, with no shift, scale or gate;
* its LayerNorms (``LayerNormWot``) have a weight **and a bias** (both initialised to ones), eps 1e-5, in fp32;
* the output layer is ``linear(norm_final(x))``; ``RADD.forward`` log-softmaxes every column but the last ([MASK])
  one, which keeps its raw logit: the model outputs log p(x0 = v | x_t) for the clean token at each position.

Everything else is SEDD's: ``vocab_embed.embedding`` (a raw Parameter), the persistent ``rotary_emb.inv_freq``,
GPT-NeoX rotary on q and k, non-causal attention (SDPA in RADD already), tanh-GELU MLP, GPT-2 tokens with EOS after
each document and [MASK] = 50257. Parameters are registered in RADD's order (EMA shadows are listed by position).

**Time.** RADD has none: the fraction of masked tokens is the only noise level the network sees. We keep the masked
step grid of SEDD and MDLM (:data:`~difffeat.models.base.MASKED`): step s masks each caption token with probability
1 - exp(-sigma(s/1000)) = 0.999 s/1000, the corruption RADD's ``t_DCE`` loss trains with (its ``lambda_DCE`` loss
draws that probability uniformly, the same set of inputs); the same step and seed mask the same tokens as for a
SEDD or MDLM model, so the three are compared on identical inputs. Step 0 is the clean caption.

RADD runs its blocks under CUDA autocast in the config's ``model.dtype`` (float16 for the released models); here the
model runs in its own dtype and autocast is ``extract.bf16``'s choice, as for the DDiT.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from difffeat.models.base import hub_id_mentions
from difffeat.models.checkpoints import CheckpointError, read_json, read_state_dict, strict_load, tensors_by_name
from difffeat.models.common import resolve_indices
from difffeat.models.ddit import (
    DDiTBlock,
    DDiTConfig,
    EmbeddingLayer,
    OutputLayer,
    Rotary,
    block_outputs,
    token_inputs,
)
from difffeat.models.ddit_adapter import DDiTAdapter
from difffeat.models.ddit_load import (
    RADD_MODEL_TYPE,
    _ema_weights,
    _Found,
    _shadows,
    fetch_from_hub,
    folder_weights,
    is_radd_config,
    nested_architecture,
)
from difffeat.models.large import meta_parameter_count, refuse_large, torch_dtype

RADD_PRESETS: dict[str, dict] = {
    "radd-small": dict(hidden_size=768, n_heads=12, n_blocks=12),  # JingyangOu/radd-lambda-dce, radd-t-dce
    "radd-medium": dict(hidden_size=1024, n_heads=16, n_blocks=24),  # JingyangOu/radd-lambda-dce-medium
}


@dataclass
class RADDConfig(DDiTConfig):
    """Architecture of a RADD network: a DDiT's fields, checks and defaults (RADD-small on GPT-2 tokens plus [MASK],
    the last id), since RADD's network is SEDD's without the time condition. So the time fields are not read:
    ``cond_dim`` and ``scale_by_sigma`` mean nothing here, ``time_conditioning`` is off; ``kind`` stays "sedd",
    the GPT-2 tokens with EOS RADD trains on."""

    scale_by_sigma: bool = False
    time_conditioning: bool = False
    label: ClassVar[str] = "RADD"
    presets: ClassVar[dict[str, dict]] = RADD_PRESETS


class RADDBlock(DDiTBlock):
    """``DDiTBlockWot``: SEDD's block built without adaLN and with biased norms (layers, order and attention are
    DDiT's); only the forward differs, a plain pre-LN block with no shift, scale or gate."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: int):
        super().__init__(dim, n_heads, None, mlp_ratio, norm_bias=True)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], key_mask: torch.Tensor | None
    ) -> torch.Tensor:
        x = x + self.attn_out(self.attend(self.norm1(x), rope, key_mask))
        return x + self.mlp(self.norm2(x))


class RADD(nn.Module):
    """RADD's network with early exit and an optional key padding mask (RADD never pads: it sees 1024-token chunks;
    right-padded captions give the same features at real positions as one caption at a time)."""

    def __init__(self, config: RADDConfig):
        super().__init__()
        cfg = self.config = config
        self.depth, self.hidden_size, self.max_length = cfg.n_blocks, cfg.hidden_size, cfg.length
        self.mask_index = cfg.vocab_size - 1  # the absorbing [MASK] id: the last one (RADD's ``token_dim - 1``)
        self.vocab_embed = EmbeddingLayer(cfg.hidden_size, cfg.vocab_size)
        self.rotary_emb = Rotary(cfg.head_dim)
        self.blocks = nn.ModuleList(RADDBlock(cfg.hidden_size, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.n_blocks))
        self.output_layer = OutputLayer(cfg.hidden_size, cfg.vocab_size, None, norm_bias=True)  # DDitFinalLayerWot

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """RADD's output ``[B, L, V]``: log-probabilities of the clean token over the real vocabulary, the raw logit in
        the last ([MASK]) column, as ``RADD.forward``."""
        x, rope, key_mask = token_inputs(self, ids, attention_mask)
        for block in self.blocks:
            x = block(x, rope, key_mask)
        logits = self.output_layer(x)
        return torch.cat([logits[..., :-1].log_softmax(-1), logits[..., -1:]], dim=-1)

    def forward_intermediates(
        self, ids: torch.Tensor, blocks: Sequence[int], attention_mask: torch.Tensor | None = None
    ) -> dict[int, torch.Tensor]:
        """Residual stream ``[B, L, D]`` after each asked block (0-based); later blocks never run."""
        x, rope, key_mask = token_inputs(self, ids, attention_mask)
        return block_outputs(self.blocks, x, resolve_indices(blocks, self.depth), rope, key_mask)


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def radd_config(raw: dict, source: str) -> RADDConfig:
    """SEDD's nested config fields, as ``RADD.__init__`` reads them (vocab = tokens + 1)."""
    try:
        return RADDConfig(**nested_architecture(raw))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: cannot build a RADD config from it ({exc!r})") from exc


def save_radd(model: RADD, folder: str | Path, model_type: str = RADD_MODEL_TYPE) -> Path:
    """RADD's hub layout: the nested config.json its mixin writes and ``model.safetensors`` (the state dict)."""
    from safetensors.torch import save_file

    cfg = model.config
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    raw = {
        "tokens": cfg.vocab_size - 1,
        "model": {"name": "small_radd", "type": model_type, "hidden_size": cfg.hidden_size, "cond_dim": 128,
                  "length": cfg.length, "n_blocks": cfg.n_blocks, "n_heads": cfg.n_heads, "dropout": 0.02,
                  "use_checkpoint": False, "dtype": "float16"},
        "noise": {"type": "loglinear", "sigma_min": 1e-4, "sigma_max": 20},
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    return folder


def load_radd(
    source: str | Path,
    *,
    config: RADDConfig | str | None = None,
    dtype: str | torch.dtype = "float32",
    allow_large: bool = False,
) -> RADD:
    """A RADD network in eval mode with gradients off, from:

    * a hub folder or id (``JingyangOu/radd-lambda-dce``, ``radd-t-dce``, ``radd-lambda-dce-medium``): nested
      ``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``; its size is checked before weights are read;
    * a training checkpoint (``checkpoints-meta/checkpoint.pth``: ``{"model", "ema", "optimizer", "step"}``, SEDD's
      format): the EMA weights are used, as RADD's ``load_model_local`` does;
    * a bare state dict file. Without config.json the shapes give the architecture (``config`` overrides).

    Files are read without running code from them; keys and shapes must match exactly.
    """
    path = Path(source)
    if not path.exists():
        path = fetch_from_hub(str(source))
    cfg = RADDConfig.preset(config) if isinstance(config, str) else config
    if path.is_dir():
        cfg = cfg or radd_config(read_json(path / "config.json"), f"{path}/config.json")
        refuse_large(meta_parameter_count(lambda: RADD(cfg)), str(path), allow_large)
        found = _read_folder(path)
    else:
        found = _read_file(path)
        cfg = cfg or _infer_config(found.sd, path)
    with torch.device("meta"):  # skip random init: every tensor is overwritten by the strict load
        model = RADD(cfg)
    model.to_empty(device="cpu")
    sd, what = dict(found.sd), found.what
    if found.ema is not None:
        sd.update(_ema_weights(model, found, path))
        what += ", EMA weights"
    expected = f"a RADD network (hidden {cfg.hidden_size}, {cfg.n_blocks} blocks, vocab {cfg.vocab_size})"
    strict_load(model, sd, f"{path} ({what})", expected)
    return model.to(torch_dtype(dtype)).eval().requires_grad_(False)


def radd_config_of(source: str | Path) -> RADDConfig:
    """The architecture a RADD source holds, from its config.json or its tensor shapes alone: no weight is read."""
    path = Path(source)
    if not path.exists():
        path = fetch_from_hub(str(source), config_only=True)
    if path.is_dir():
        return radd_config(read_json(path / "config.json"), f"{path}/config.json")
    return _infer_config(_read_file(path, shapes_only=True).sd, path)


def _read_folder(folder: Path) -> _Found:
    return _Found(folder_weights(folder), "RADD hub folder")


def _read_file(path: Path, shapes_only: bool = False) -> _Found:
    obj = read_state_dict(path, shapes_only=shapes_only)
    if isinstance(obj.get("model"), dict):
        return _Found(tensors_by_name(obj["model"], f"{path} ('model')"), "RADD training checkpoint", ema=_shadows(obj))
    return _Found(tensors_by_name(obj, str(path)), "RADD state dict")


def _infer_config(sd: dict[str, torch.Tensor], path: Path) -> RADDConfig:
    """Architecture from tensor shapes; the head count comes from inv_freq (head_dim / 2 values)."""
    try:
        vocab, hidden = sd["vocab_embed.embedding"].shape
        ratio = sd["blocks.0.mlp.0.weight"].shape[0] // hidden
        head_dim = 2 * sd["rotary_emb.inv_freq"].numel()
    except KeyError as exc:
        raise CheckpointError(f"{path}: cannot infer a RADD architecture, {exc} is not in the file") from exc
    n_blocks = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    return RADDConfig(
        vocab_size=vocab, hidden_size=hidden, n_heads=hidden // head_dim, n_blocks=n_blocks, mlp_ratio=ratio
    )


# --------------------------------------------------------------------------------------------------------------
# The backbone adapter
# --------------------------------------------------------------------------------------------------------------


class RADDAdapter(DDiTAdapter):
    """RADD as a text backbone: the DDiT adapter's tokenizing and masking (same grid, same draws), a forward that
    takes no time. GPT-2's tokenizer with EOS after the caption, as RADD's training documents."""

    family = "radd"
    network = RADD
    no_condition = "RADD"

    @classmethod
    def recognises(cls, source: str) -> bool:
        """A RADD hub folder (its config.json) or a hub id naming RADD; bare files need ``backbone: radd``."""
        path = Path(source)
        if (path / "config.json").is_file():
            return is_radd_config(json.loads((path / "config.json").read_text()))
        return hub_id_mentions(source, "radd")

    @classmethod
    def load_model(cls, source: str, *, dtype: str, allow_large: bool = False) -> RADD:
        """Its tokenizer is the DDiT's default with the config's kind, "sedd": GPT-2's, EOS after the caption."""
        return load_radd(source, dtype=dtype, allow_large=allow_large)

    def model_time(self, t: float, n: int) -> torch.Tensor:
        """The masking probability of step ``t`` (CPU), for the record: RADD's forward reads no time."""
        return self.schedule.mask_prob(self.schedule.t_of_step(int(t))).float().expand(n)

    def _read_blocks(
        self, x: torch.Tensor, t: torch.Tensor, blocks: list[int], mask: torch.Tensor | None
    ) -> dict[int, torch.Tensor]:
        return self.module.forward_intermediates(x, blocks, attention_mask=mask)
