"""SiT (Ma et al., "SiT: Exploring Flow and Diffusion-based Generative Models with Scalable Interpolant
Transformers") as a backbone: DiT's network with flow-matching time.

Why no module of its own: the SiT repository's ``models.py`` is DiT's, block for block and key for key (same
timm Attention/Mlp, LayerNorm eps 1e-6, GLIDE frequencies over ``half``, adaLN-Zero), so our :class:`DiT` with the
official numerics *is* the SiT network and an official SiT ``.pt`` loads into it strictly. What differs is time:

* **Convention** (``transport/path.py``): ``x_t = alpha_t · x1 + sigma_t · x0`` with ``x1`` the data and ``x0``
  Gaussian noise. **t = 1 is the clean image and t = 0 pure noise** (the reverse of DDPM's index, and of
  the rectified-flow convention of SD3/FLUX); the sampler integrates from 0 to 1.
* **Interpolant** (``--path-type``): Linear (``alpha = t, sigma = 1 - t``, the released SiT-XL/2), GVP
  (``alpha = sin(πt/2), sigma = cos(πt/2)``) or VP (``alpha = exp(m(t)), sigma = sqrt(1 - exp(2 m(t)))`` with
  ``m(t) = -¼ (1-t)² (σmax - σmin) - ½ (1-t) σmin``, σmin 0.1, σmax 20).
* **Time fed to the network**: t itself, a float in [0, 1] (``model(xt, t)`` in ``Transport.training_losses``);
  the GLIDE embedding sees 0..1, never 0..1000.
* The released checkpoint has ``learn_sigma=True`` (256 px): the official forward drops the second half of the
  output channels; :meth:`SiTBackbone.velocity` does the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difffeat.models.base import Clean, TimeConvention, hub_id_mentions
from difffeat.models.dit import DiT, DiTConfig
from difffeat.models.dit_adapter import DiTAdapter, resolve_vae
from difffeat.models.dit_load import load_dit
from difffeat.models.schedule import per_sample_randn
from difffeat.models.vae import cast_vae

SIT_FLOW = TimeConvention(
    "sit-flow", 0.0, 1.0, 1.0, False,
    "SiT flow time t in [0, 1]: x_t = alpha_t x + sigma_t eps; t = 1 is the clean image, t = 0 pure noise; "
    "the network is fed t itself",
)  # fmt: skip

_VP_SIGMA_MIN, _VP_SIGMA_MAX = 0.1, 20.0


@dataclass(frozen=True)
class Interpolant:
    """One of SiT's paths: the data and noise coefficients ``(alpha_t, sigma_t)`` at flow time t."""

    name: str

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``alpha_t`` (multiplies the data) and ``sigma_t`` (multiplies the noise), float64."""
        t = t.double()
        if self.name == "linear":
            return t, 1 - t
        if self.name == "gvp":
            return torch.sin(t * math.pi / 2), torch.cos(t * math.pi / 2)
        log_mean = -0.25 * (1 - t) ** 2 * (_VP_SIGMA_MAX - _VP_SIGMA_MIN) - 0.5 * (1 - t) * _VP_SIGMA_MIN
        return torch.exp(log_mean), torch.sqrt(1 - torch.exp(2 * log_mean))


INTERPOLANTS = {name: Interpolant(name) for name in ("linear", "gvp", "vp")}


def interpolant(name: str) -> Interpolant:
    """The path by SiT's ``--path-type`` name (case-insensitive), or a ValueError listing them."""
    key = name.strip().lower()
    if key not in INTERPOLANTS:
        raise ValueError(f"unknown SiT path {name!r}; expected one of Linear, GVP, VP (SiT's --path-type)")
    return INTERPOLANTS[key]


class SiTBackbone(DiTAdapter):
    """A loaded SiT: DiT's network, VAE and null class (:class:`DiTAdapter`) with SiT's flow time.

    Not recognised from a file: no tensor tells a SiT ``.pt`` from a DiT one, so a user says ``backbone="sit"``
    (a hub id naming SiT is the one hint taken).
    """

    family = "sit"
    time = SIT_FLOW

    def __init__(self, model: DiT, vae: Any = None, *, path: str = "linear", **options: Any) -> None:
        super().__init__(model, vae, **options)
        self.path = interpolant(path)

    @classmethod
    def wraps(cls, model: nn.Module) -> bool:
        return False  # a bare DiT network is DiT's: nothing in it says it was trained with flow time

    @classmethod
    def recognises(cls, source: str) -> bool:
        return hub_id_mentions(source, "sit")

    @classmethod
    def from_pretrained(
        cls,
        source: str,
        *,
        vae: str | nn.Module | None = None,
        path: str = "linear",
        vae_dtype: str | None = None,
        image_size: int | None = None,
        sample_posterior: bool = True,
    ) -> SiTBackbone:
        """An official SiT checkpoint (see :func:`load_sit`) with its SD-VAE (``vae=``: a diffusers
        ``AutoencoderKL`` module, folder or hub id such as ``stabilityai/sd-vae-ft-ema``; no checkpoint file
        carries one). ``vae_dtype``, ``image_size`` and ``sample_posterior`` as for a DiT: keyword-only, so a run
        config's ``image.image_size`` reaches a SiT as it reaches a DiT (``loader_options`` reads them here)."""
        model = load_sit(source, path=path).module
        vae = resolve_vae(vae, source, model.config.in_channels, family="SiT", pipeline=False)
        vae = cast_vae(vae, vae_dtype)
        return cls(model, vae, path=path, image_size=image_size, sample_posterior=sample_posterior)

    def noise(self, x0: Clean, t: float, keys: Sequence[str | int], seed: int, draw: int = 0) -> torch.Tensor:
        """``x_t = alpha_t x0 + sigma_t eps`` with eps drawn per sample from (seed, key, t, draw)."""
        t = self.time.check(t)
        x = x0.x
        eps = per_sample_randn(x.shape[1:], keys, seed, t, draw).to(x.device, x.dtype)
        return self.interpolate(x, eps, torch.full((x.shape[0],), t))

    def interpolate(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The path at per-sample times ``t [N]`` for given noise (coefficients in float64, cast like x0)."""
        alpha, sigma = self.path.coefficients(t.reshape(-1))
        shape = (-1,) + (1,) * (x0.dim() - 1)
        alpha, sigma = (c.to(x0.device, x0.dtype).view(shape) for c in (alpha, sigma))
        return alpha * x0 + sigma * eps.to(x0.device, x0.dtype)

    def model_time(self, t: float, n: int) -> torch.Tensor:
        """The flow time itself: SiT's training loss calls ``model(x_t, t)`` with t in [0, 1]."""
        return torch.full((n,), float(self.time.check(t)), device=self.device)

    def _module_time(self, t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        return _flow_time(t, x)

    def velocity(self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor | int | None = None) -> torch.Tensor:
        """The official ``SiT.forward``: the full output, its first ``in_channels`` channels when learn_sigma."""
        out = self.module(x, _flow_time(t, x), y)
        return out[:, : self.module.config.in_channels]


def _flow_time(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Flow time as a float tensor; outside [0, 1] it is most likely a DDPM index passed by mistake."""
    tensor = torch.as_tensor(t, device=x.device).float()
    if bool(((tensor < 0) | (tensor > 1)).any()):
        raise ValueError(f"SiT time must be in [0, 1] (t = 1 clean, t = 0 noise), got {tensor.tolist()}")
    return tensor


def load_sit(
    source: str | Path,
    *,
    path: str = "linear",
    config: DiTConfig | None = None,
    map_location: str | torch.device = "cpu",
) -> SiTBackbone:
    """An official SiT checkpoint (plain state dict such as ``SiT-XL-2-256x256.pt``, or a ``train.py`` checkpoint,
    whose ``ema`` is preferred as ``find_model`` does), loaded strictly into DiT's network, without a VAE.

    ``path`` is the interpolant the checkpoint was trained with (``--path-type``; the released model: Linear). No
    tensor reveals it, nor whether a file is a SiT or a DiT: the caller says so.
    """
    interpolant(path)  # a wrong name fails before the (possibly multi-GB) read
    return SiTBackbone(load_dit(source, config=config, map_location=map_location), path=path)
