"""The DiT family as a backbone adapter: images -> SD-VAE latents (or pixels), DDPM noising, the null class.

Everything numerical is DiT's own code (``models.dit``, ``models.schedule``, ``models.vae``); this class only
says in what order it is called, so the extractors need not know they are reading a DiT.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difffeat.models.adapter import BlocksAdapter
from difffeat.models.base import DDPM, Clean, hub_id_mentions
from difffeat.models.dit import DiT
from difffeat.models.dit_load import load_dit
from difffeat.models.massive import MassiveChannels
from difffeat.models.schedule import DDPMSchedule, per_sample_randn
from difffeat.models.vae import LatentEncoder, cast_vae, images_to_tensor, load_vae

_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
_DIFFUSERS_CLASS = "DiTTransformer2DModel"
_SIT_NAME = re.compile(r"sit[-_]", re.IGNORECASE)  # SiT-XL-2-256x256.pt, sit_b2.pt (the official names)


def _vae_downsampling(vae: Any) -> int:
    """Pixels per latent cell: AutoencoderKL halves the side once per down block after the first (8 for SD)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


class DiTAdapter(BlocksAdapter):
    """A loaded :class:`~difffeat.models.dit.DiT` with its VAE (None for pixel-space DiTs, whose ``x0`` is the
    image in [-1, 1] at the model's input size)."""

    family = "dit"
    network = DiT
    modality = "image"
    time = DDPM

    def __init__(self, model: DiT, vae: Any = None, *, image_size: int | None = None, sample_posterior: bool = True):
        self.module = model.eval()
        self.encoder = LatentEncoder(vae, sample=sample_posterior) if vae is not None else None
        per_cell = _vae_downsampling(vae) if vae is not None else 1
        self.image_size = image_size or model.config.input_size * per_cell
        self.schedule = DDPMSchedule()

    # ---- loading -----------------------------------------------------------------------------------------------
    @classmethod
    def recognises(cls, source: str) -> bool:
        """An official checkpoint file, our folder (``architecture: dit``), a diffusers DiT transformer or
        pipeline folder, or a hub id naming a DiT.

        A file named like a SiT checkpoint (``SiT-XL-2-256x256.pt``) is refused with a ValueError: its tensors
        are a DiT's, so it would load, and be read with DDPM time instead of SiT's flow time."""
        path = Path(source)
        if path.is_file():
            if _SIT_NAME.match(path.name):
                raise ValueError(
                    f"{source}: the name says SiT, whose checkpoints no tensor tells from a DiT's; pass backbone='sit' "
                    "(config: image.backbone: sit) to read it with flow time, or backbone='dit' if it is a DiT"
                )
            return path.suffix in _WEIGHT_SUFFIXES
        for config in (path / "config.json", path / "transformer" / "config.json"):
            if config.is_file():
                cfg = json.loads(config.read_text())
                return cfg.get("architecture") == "dit" or cfg.get("_class_name") == _DIFFUSERS_CLASS
        return hub_id_mentions(source, "dit")

    @classmethod
    def from_pretrained(
        cls,
        source: str,
        *,
        vae: str | nn.Module | None = None,
        numerics: str | None = None,
        image_size: int | None = None,
        sample_posterior: bool = True,
        vae_dtype: str | None = None,
    ) -> DiTAdapter:
        """``vae``: a diffusers ``AutoencoderKL`` (module, folder or hub id); by default the pipeline's own
        ``vae/`` for a diffusers pipeline folder or hub id, none for a pixel-space DiT (3 input channels).
        ``vae_dtype`` ("float32", "bfloat16"; None: a module's own, float32 for a folder) is its weights' dtype."""
        model = load_dit(source, numerics=numerics)
        vae = cast_vae(resolve_vae(vae, source, model.config.in_channels), vae_dtype)
        return cls(model, vae, image_size=image_size, sample_posterior=sample_posterior)

    # ---- the five questions ------------------------------------------------------------------------------------
    # (depth, device, to, layers and compile_blocks are BlocksAdapter's)
    def _move_companions(self, device: torch.device | str) -> None:
        if self.encoder is not None:
            self.encoder.vae.to(device)

    def encode(self, inputs: Any, keys: Sequence[str | int], seed: int) -> Clean:
        """Images (PIL list / uint8 / float in [-1, 1]) -> VAE latents ``latent_dist.sample() * scale`` with
        per-sample seeded posterior noise, or the preprocessed pixels."""
        pixels = images_to_tensor(inputs, self.image_size)
        return Clean(pixels if self.encoder is None else self.encoder.encode(pixels, keys, seed))

    def noise(self, x0: Clean, t: float, keys: Sequence[str | int], seed: int, draw: int = 0) -> torch.Tensor:
        """``q_sample`` at DDPM index ``t`` (float64 coefficients cast to float32, as DiT's diffusion code)."""
        eps = per_sample_randn(x0.x.shape[1:], keys, seed, t, draw)
        return self.schedule.q_sample(x0.x, int(t), eps)

    def model_time(self, t: float, n: int) -> torch.Tensor:
        return torch.full((n,), int(t), dtype=torch.long, device=self.device)

    def condition(
        self, n: int, *, label: int | None = None, captions: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """The class label for every row; by default the null class (the unconditional branch)."""
        if captions is not None:
            raise ValueError("a DiT is conditioned on a class label, not on captions")
        label = self.module.null_class if label is None else label
        if label is None:
            raise ValueError("this DiT was trained without a null class: pass class_label=")
        return {"y": torch.full((n,), label, dtype=torch.long, device=self.device)}

    def forward_intermediates(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        blocks: list[int],
        mask: torch.Tensor | None = None,
        *,
        tap: str = "output",
        massive: MassiveChannels | None = None,
        **cond: Any,
    ) -> dict[int, torch.Tensor]:
        """Tokens ``[N, T, D]`` of each asked block at ``tap`` (:data:`~difffeat.models.massive.TAPS`; for
        ``"modulated"``, ``massive`` suppresses the block input's channels before its norm); ``y`` defaults to the
        null class."""
        suppress = None if massive is None else massive.apply
        return self.module.forward_intermediates(x, self._module_time(t, x), cond.get("y"), blocks, tap, suppress)

    def _module_time(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``t`` as the network reads it: for a DiT the DDPM index itself (SiT overrides this)."""
        return t


def resolve_vae(vae: Any, source: str, channels: int, *, family: str = "DiT", pipeline: bool = True) -> Any:
    """The VAE of a DiT-like model read from ``source`` with ``channels`` input channels: ``vae`` itself, loaded
    when it names a folder or hub id; else none for a pixel-space model (3 channels); else, with ``pipeline``,
    the ``vae/`` of a diffusers pipeline folder or hub id; else an error saying a latent model needs one."""
    if isinstance(vae, str | Path):
        return load_vae(vae)
    if vae is not None or channels == 3:
        return vae
    path = Path(source)
    if pipeline and (path / "vae" / "config.json").is_file():
        return load_vae(path)
    if pipeline and not path.exists() and hub_id_mentions(source, ""):
        return load_vae(source, subfolder="vae")
    raise ValueError(
        f"{source}: this {family} reads {channels}-channel latents, so it needs its VAE: pass vae= (a diffusers "
        "AutoencoderKL folder or hub id, e.g. stabilityai/sd-vae-ft-ema)"
    )
