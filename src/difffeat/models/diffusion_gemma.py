"""DiffusionGemma (transformers 5.x ``models/diffusion_gemma``) as a text backbone, read through transformers' own
modules and untouched forward.

What the model is (``modeling_diffusion_gemma.py``, ``generation_diffusion_gemma.py``): a block-diffusion language
model. A causal **encoder** reads the prompt and only writes a KV cache; a **decoder** with the same (tied) layer
weights denoises a *canvas* of ``canvas_length`` tokens, attending bidirectionally over the cached prompt and the
canvas, with a self-conditioning input (the previous step's logits as soft embeddings). The noise is **uniform
over the vocabulary**, not absorbing: the sampler starts from a canvas of uniformly random ids and re-draws every
token it does not accept from the uniform distribution again. There is no [MASK] token and no time input.

What a "block feature at noise step t" is here, so that it is a diffusion feature in the model's own sense:

* **which stack reads the caption**: the decoder. The caption is the canvas (``decoder_input_ids``), so block i is
  decoder layer i, the denoiser; the encoder reads only the prompt every Gemma prompt starts with, ``[BOS]``
  (``text_config.bos_token_id``), and its cache is the decoder's context. The caption is not given to the encoder
  as well: its features would then be conditioned on the clean text they are meant to denoise.
* **noise at step t** (:data:`UNIFORM`, steps 0..1000): each real caption token is replaced, with probability
  t / 1000, by an id drawn uniformly from the whole vocabulary (``randint(0, vocab_size)``, as the sampler's
  ``initialize_canvas`` and ``renoise_canvas``); step 0 is the clean caption, step 1000 the sampler's starting
  canvas. Draws are per caption and seeded, as for the masked text models. The decoder reads no time, so the
  fraction of random tokens is the only noise level; the linear map from step to fraction is ours (transformers
  ships no training schedule to follow).
* **self-conditioning**: none (a zero signal), as on the sampler's first denoising step of every canvas: the only
  state that needs no previous prediction.
* **length**: a caption is the canvas, truncated to ``canvas_length`` (the trained block length, 256); right
  padding is masked out of attention through ``decoder_attention_mask``, so a padded caption's features at its
  real positions are those of the caption alone.

Early exit: a forward hook on the deepest asked decoder layer raises once its output is stored, so the untouched
forward (encoder on [BOS], then decoder) runs up to there and no later decoder layer, and no LM head, runs. The
encoder runs in full over the single [BOS] token (the decoder's layer i reads the encoder's cache of layer i).

Large checkpoints (``google/diffusiongemma-26B-A4B-it`` has 26B parameters) are refused unless ``allow_large``;
``dtype`` and ``device_map`` go to transformers' ``from_pretrained``.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difffeat.models.adapter import CaptionsAdapter
from difffeat.models.base import Clean, Layer, TimeConvention, hub_id_mentions
from difffeat.models.checkpoints import CheckpointError
from difffeat.models.common import StopForward, resolve_indices, run_until_stopped
from difffeat.models.large import meta_parameter_count, refuse_large, torch_dtype
from difffeat.models.schedule import per_sample_rand
from difffeat.models.tokenizers import TextTokenizer, load_tokenizer

UNIFORM = TimeConvention(
    "uniform", 0, 1000, 0, True,
    "step 0..1000: each caption token is replaced by a uniformly random vocabulary id with probability step/1000 "
    "(uniform-state noise, no [MASK]); 0 is the clean caption, 1000 an all-random canvas",
)  # fmt: skip
MODEL_TYPE = "diffusion_gemma"


def uniform_corrupt(
    ids: torch.Tensor, mask: torch.Tensor, keys: Sequence[str | int], step: int, vocab_size: int, seed: int, draw: int
) -> torch.Tensor:
    """Replace each real token with a uniform id in [0, vocab_size) with probability step / 1000; padding is never
    touched. Each caption draws (replace?, id) per real token from its own seeded stream, in order, so the result
    does not depend on the batch or on the padding."""
    out = ids.clone()
    if step == 0:
        return out
    for i, key in enumerate(keys):
        real = mask[i].bool()
        u = per_sample_rand([2, int(real.sum())], [key], seed, f"uniform{step}", draw)[0]
        random_ids = (u[1] * vocab_size).long().clamp(max=vocab_size - 1)
        row = out[i, real]
        out[i, real] = torch.where(u[0] < step / 1000, random_ids.to(row.device), row)
    return out


class DiffusionGemmaBackbone(CaptionsAdapter):
    """A loaded ``DiffusionGemmaForBlockDiffusion`` with its tokenizer (see the module docstring for what is read;
    the canvas is the caption, so nothing per row conditions it: the prompt is the fixed [BOS])."""

    family = MODEL_TYPE
    time = UNIFORM
    no_condition = "DiffusionGemma's canvas is the caption; it"

    def __init__(
        self, model: nn.Module, tokenizer: TextTokenizer, *, max_length: int | None = None, placed: bool = False
    ):
        super().__init__(model.eval().requires_grad_(False), tokenizer, max_length, model.config.canvas_length)
        self.text_config = model.config.text_config
        self.placed = placed

    # ---- loading -----------------------------------------------------------------------------------------------
    @classmethod
    def wraps(cls, model: nn.Module) -> bool:
        return type(model).__name__ == "DiffusionGemmaForBlockDiffusion"

    @classmethod
    def recognises(cls, source: str) -> bool:
        """A folder whose config.json says ``model_type: diffusion_gemma``, or a hub id naming DiffusionGemma."""
        config = Path(source) / "config.json"
        if config.is_file():
            return json.loads(config.read_text()).get("model_type") == MODEL_TYPE
        return hub_id_mentions(source, "diffusiongemma", "diffusion-gemma", "diffusion_gemma")

    @classmethod
    def load_model(
        cls, source: str, *, dtype: str, device_map: str | None = None, allow_large: bool = False
    ) -> nn.Module:
        """The config is read first and the parameter count checked before any weight is fetched or read.
        ``device_map`` (e.g. ``"cuda"``, ``"auto"``) places the weights as transformers does; the backbone then
        stays where it was put."""
        from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

        if device_map is not None and importlib.util.find_spec("accelerate") is None:
            raise CheckpointError("text.device_map needs the accelerate package: pip install 'difffeat[large]'")
        config = DiffusionGemmaConfig.from_pretrained(source)
        refuse_large(meta_parameter_count(lambda: DiffusionGemmaForBlockDiffusion(config)), source, allow_large)
        return DiffusionGemmaForBlockDiffusion.from_pretrained(
            source, config=config, dtype=torch_dtype(dtype), device_map=device_map
        )

    @classmethod
    def load_tokenizer(
        cls, source: str, model: nn.Module, tokenizer: str | None, add_special: str | None
    ) -> TextTokenizer:
        """The model's own (its folder / hub id); captions get no special tokens by default, since [BOS] is the
        prompt and a canvas is plain text."""
        return load_tokenizer(tokenizer or source, add_special=add_special or "none")

    @classmethod
    def _wrap_options(cls, load: dict[str, Any]) -> dict[str, Any]:
        return {"placed": load.get("device_map") is not None}

    # ---- the five questions ------------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def _layers(self) -> nn.ModuleList:
        return self.module.model.decoder.layers

    def layers(self) -> list[Layer]:
        return [Layer(i, f"model.decoder.layers.{i}", self.text_config.hidden_size) for i in range(self.depth)]

    def to(self, device: torch.device | str) -> DiffusionGemmaBackbone:
        """Move the model, unless a ``device_map`` placed it (a split model must stay split)."""
        if not self.placed:
            self.module.to(device)
        return self

    def noise(self, x0: Clean, t: float, keys: Sequence[str | int], seed: int, draw: int = 0) -> torch.Tensor:
        return uniform_corrupt(x0.x, x0.mask, keys, int(t), self.text_config.vocab_size, seed, draw)

    def model_time(self, t: float, n: int) -> torch.Tensor:
        """The replaced fraction step / 1000 (CPU), for the record: the decoder reads no time."""
        return torch.full((n,), int(t) / 1000)

    def _read_blocks(
        self, x: torch.Tensor, t: torch.Tensor, blocks: list[int], mask: torch.Tensor | None
    ) -> dict[int, torch.Tensor]:
        """Decoder tokens ``[N, L, D]`` after each asked layer, from the untouched forward stopped after the deepest
        one. ``mask`` (True at real tokens) masks right padding out of every attention."""
        wanted = resolve_indices(blocks, self.depth)
        out: dict[int, torch.Tensor] = {}

        def capture(index: int):
            def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
                out[index] = output
                if index == wanted[-1]:
                    raise StopForward

            return hook

        prompt = torch.full((len(x), 1), self.text_config.bos_token_id, dtype=torch.long, device=x.device)
        padded = mask is not None and not bool(mask.all())
        decoder_mask = torch.cat([torch.ones_like(prompt, dtype=torch.bool), mask.bool()], dim=1) if padded else None
        handles = [self._layers[i].register_forward_hook(capture(i)) for i in wanted]
        run_until_stopped(
            lambda: self.module(input_ids=prompt, decoder_input_ids=x, decoder_attention_mask=decoder_mask), handles
        )
        return out

    def compile_blocks(self) -> None:
        """``torch.compile`` each decoder layer's forward; the capturing hooks stay outside the graphs."""
        for layer in self._layers:
            layer.forward = torch.compile(layer.forward)
