"""Noise schedules and per-sample seeded noise.

Two schedules, one per modality:

* images: the DDPM linear schedule DiT was trained with (betas 1e-4..0.02 over 1000 steps, float64, integer
  timesteps 0..999, 0 the least noisy);
* text: the log-linear schedule of SEDD/MDLM (sigma(t) = -log(1 - (1 - eps) t), t in [0, 1]) with
  absorbing-state corruption (a token becomes [MASK] with probability 1 - exp(-sigma)).

Noise is drawn per sample from a generator seeded by (seed, sample key, timestep, draw), never from a shared
stream, so a sample's feature does not depend on which batch it sits in, on the batch size, or on the device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from difffeat.utils.runtime import to_device

NUM_DDPM_STEPS = 1000
LOGLINEAR_EPS = 1e-3


def sample_seed(seed: int, key: str | int, t: int | float, draw: int = 0) -> int:
    """A 63-bit generator seed that depends only on its arguments (stable across runs and machines)."""
    text = f"{int(seed)}|{key}|{t!r}|{int(draw)}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & (2**63 - 1)


def _generator(seed: int, key: str | int, t: int | float, draw: int) -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(seed, key, t, draw))


def per_sample_randn(
    shape: Sequence[int], keys: Sequence[str | int], seed: int, t: int | float, draw: int = 0
) -> torch.Tensor:
    """Standard normal noise of shape ``[len(keys), *shape]`` (float32, CPU), one seeded stream per sample."""
    return torch.stack([torch.randn(tuple(shape), generator=_generator(seed, k, t, draw)) for k in keys])


def per_sample_rand(
    shape: Sequence[int], keys: Sequence[str | int], seed: int, t: int | float, draw: int = 0
) -> torch.Tensor:
    """Uniform [0, 1) noise of shape ``[len(keys), *shape]`` (float32, CPU), one seeded stream per sample."""
    return torch.stack([torch.rand(tuple(shape), generator=_generator(seed, k, t, draw)) for k in keys])


class DDPMSchedule:
    """DiT's DDPM linear schedule: betas in float64 exactly as ``gaussian_diffusion.get_named_beta_schedule``.

    ``q_sample`` gathers the float64 coefficients and casts them to float32, as DiT's ``_extract_into_tensor``.
    """

    def __init__(self, num_steps: int = NUM_DDPM_STEPS, beta_start: float = 1e-4, beta_end: float = 0.02):
        scale = 1000 / num_steps
        self.num_steps = num_steps
        self.betas = np.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=np.float64)
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)

    def check_timestep(self, t: int) -> int:
        if isinstance(t, bool) or int(t) != t or not 0 <= int(t) < self.num_steps:
            raise ValueError(f"timestep {t!r} is out of range: expected an integer DDPM index 0..{self.num_steps - 1}")
        return int(t)

    def q_sample(self, x0: torch.Tensor, t: int | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, for one timestep or one per sample."""
        t_idx = torch.as_tensor(t, dtype=torch.long).reshape(-1).cpu().numpy()
        for ti in t_idx:
            self.check_timestep(int(ti))
        shape = (-1,) + (1,) * (x0.dim() - 1)
        # Pinned, non-blocking copies: a plain .to(cuda) from pageable memory waits for every queued kernel.
        a = to_device(torch.from_numpy(self.sqrt_alphas_cumprod[t_idx]).float(), x0.device).view(shape)
        s = to_device(torch.from_numpy(self.sqrt_one_minus_alphas_cumprod[t_idx]).float(), x0.device).view(shape)
        return a * x0 + s * to_device(noise, x0.device).to(x0.dtype)


class LogLinearSchedule:
    """SEDD/MDLM log-linear noise: sigma(t) = -log(1 - (1 - eps) t); sigma(0) = 0 is the clean sequence.

    Sweeps use an integer grid: step s of ``num_steps`` means t = s / num_steps (so step 0 is noise-free).
    """

    def __init__(self, eps: float = LOGLINEAR_EPS, num_steps: int = 1000):
        self.eps = eps
        self.num_steps = num_steps

    def check_step(self, step: int) -> int:
        if isinstance(step, bool) or int(step) != step or not 0 <= int(step) <= self.num_steps:
            raise ValueError(f"text step {step!r} is out of range: expected an integer 0..{self.num_steps}")
        return int(step)

    def t_of_step(self, step: int) -> float:
        return self.check_step(step) / self.num_steps

    def sigma(self, t: float | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return -torch.log1p(-(1 - self.eps) * t)

    def mask_prob(self, t: float | torch.Tensor) -> torch.Tensor:
        """Probability that a token is absorbed into [MASK]: 1 - exp(-sigma(t)) = (1 - eps) t."""
        return -torch.expm1(-self.sigma(t))

    def corrupt(
        self,
        ids: torch.Tensor,
        attention_mask: torch.Tensor,
        keys: Sequence[str | int],
        step: int,
        mask_index: int,
        seed: int,
        draw: int = 0,
    ) -> torch.Tensor:
        """Absorbing-state corruption of a padded batch ``ids [B, L]``; padding is never touched.

        Each sample draws one uniform per real token from its own seeded stream, in order, so whether the
        p-th real token of a caption is masked does not depend on the batch or on how much padding it got.
        """
        t = self.t_of_step(step)
        out = ids.clone()
        if t == 0:
            return out
        p = float(self.mask_prob(t))
        for i, key in enumerate(keys):
            real = attention_mask[i].bool()
            u = per_sample_rand([int(real.sum())], [key], seed, f"text{step}", draw)[0].to(ids.device)
            row = out[i, real]
            out[i, real] = torch.where(u < p, torch.full_like(row, mask_index), row)
        return out
