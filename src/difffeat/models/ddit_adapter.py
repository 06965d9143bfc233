"""The SEDD/MDLM family (DDiT) as a backbone adapter: captions -> token ids with the model's special tokens,
absorbing-state masking at a noise step, no conditioning beyond the noise level.

Everything numerical is the DDiT's own code (``models.ddit``, ``models.schedule``, ``models.tokenizers``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from difffeat.models.adapter import BlocksAdapter, CaptionsAdapter
from difffeat.models.base import MASKED, Clean, hub_id_mentions
from difffeat.models.ddit import DDiT
from difffeat.models.ddit_load import is_radd_config, load_ddit
from difffeat.models.large import torch_dtype
from difffeat.models.schedule import LogLinearSchedule
from difffeat.models.tokenizers import TextTokenizer, load_tokenizer

_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def default_tokenizer(source: str) -> str:
    """Our own models keep ``tokenizer.json`` next to the weights; SEDD and MDLM use GPT-2's tokenizer."""
    path = Path(source)
    return str(path / "tokenizer.json") if (path / "tokenizer.json").is_file() else "gpt2"


class DDiTAdapter(BlocksAdapter, CaptionsAdapter):
    """A loaded :class:`~difffeat.models.ddit.DDiT` with its tokenizer (captions read as :class:`CaptionsAdapter`
    says)."""

    family = "ddit"
    network = DDiT
    time = MASKED
    no_condition = "a DDiT (SEDD/MDLM)"

    def __init__(self, model: DDiT, tokenizer: TextTokenizer, *, max_length: int | None = None):
        super().__init__(model.eval(), tokenizer, max_length, model.max_length)
        self.schedule = LogLinearSchedule()

    # ---- loading -----------------------------------------------------------------------------------------------
    @classmethod
    def recognises(cls, source: str) -> bool:
        """A checkpoint file, our folder (``architecture: ddit``), an MDLM or SEDD hub folder (not RADD's, whose
        config nests alike), or a hub id naming SEDD or MDLM."""
        path = Path(source)
        if path.is_file():
            return path.suffix in _WEIGHT_SUFFIXES
        if (path / "config.json").is_file():
            cfg = json.loads((path / "config.json").read_text())
            sedd = "tokens" in cfg and not is_radd_config(cfg)
            return cfg.get("architecture") == "ddit" or cfg.get("model_type") == "mdlm" or sedd
        return hub_id_mentions(source, "sedd", "mdlm")

    @classmethod
    def load_model(cls, source: str, *, dtype: str) -> DDiT:
        return load_ddit(source).to(torch_dtype(dtype))

    @classmethod
    def load_tokenizer(cls, source: str, model: DDiT, tokenizer: str | None, add_special: str | None) -> TextTokenizer:
        """``tokenizer.json`` beside our own models, else GPT-2's; its special tokens default to what the model kind
        saw in training (SEDD: EOS, MDLM: BOS + EOS)."""
        return load_tokenizer(tokenizer or default_tokenizer(source), add_special=add_special, kind=model.config.kind)

    # ---- the five questions ------------------------------------------------------------------------------------
    # (depth, device, to, layers and compile_blocks are BlocksAdapter's; encode, condition and
    # forward_intermediates CaptionsAdapter's)
    def noise(self, x0: Clean, t: float, keys: Sequence[str | int], seed: int, draw: int = 0) -> torch.Tensor:
        """Absorbing-state corruption at step ``t``, on the CPU ids (per-caption seeded draws), so the device
        gets one copy and no per-caption indexing."""
        return self.schedule.corrupt(x0.x, x0.mask, keys, int(t), self.module.mask_index, seed, draw)

    def model_time(self, t: float, n: int) -> torch.Tensor:
        """sigma(step / 1000), the noise level the DDiT's sigma embedding reads (CPU)."""
        return self.schedule.sigma(self.schedule.t_of_step(int(t))).float().expand(n)

    def _read_blocks(
        self, x: torch.Tensor, t: torch.Tensor, blocks: list[int], mask: torch.Tensor | None
    ) -> dict[int, torch.Tensor]:
        return self.module.forward_intermediates(x, t, blocks, attention_mask=mask)
