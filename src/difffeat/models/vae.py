"""Image preprocessing as DiT does it, and SD-VAE encoding with per-sample seeds.

Latents do not depend on the diffusion timestep, so they are computed once per dataset and cached; the
SD-VAE encoder costs about as much as a truncated DiT-XL forward on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from difffeat.models.schedule import per_sample_randn
from difffeat.utils.runtime import to_device

SD_VAE_SCALE = 0.18215
VAE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # not float16: SD-VAEs can overflow in it


def center_crop_arr(image: Image.Image, size: int) -> Image.Image:
    """ADM/DiT centre crop: halve with BOX while the short side is >= 2*size, BICUBIC to short side = size,
    then crop the centre (offsets ``(H-size)//2``, ``(W-size)//2``)."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image.convert("RGB"))
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top : top + size, left : left + size])


def images_to_tensor(images: Sequence[Image.Image] | np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """PIL images, uint8 arrays/tensors (NHWC or NCHW) or float tensors in [-1, 1] -> float32 [N, 3, size, size].

    PIL and uint8 inputs are centre-cropped to ``size`` and mapped to [-1, 1]; float tensors are taken as
    already preprocessed and must already be ``size`` x ``size``.
    """
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        if images.dim() != 4 or images.shape[-1] != size or images.shape[-2] != size:
            raise ValueError(f"float image tensor must be [N, C, {size}, {size}] in [-1, 1], got {tuple(images.shape)}")
        return images.float()
    if isinstance(images, (np.ndarray, torch.Tensor)):
        arr = images.cpu().numpy() if isinstance(images, torch.Tensor) else images
        if arr.dtype != np.uint8 or arr.ndim != 4:
            raise ValueError(f"image arrays must be uint8 [N, H, W, 3] or [N, 3, H, W], got {arr.dtype} {arr.shape}")
        if arr.shape[1] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = arr.transpose(0, 2, 3, 1)
        images = [Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a) for a in arr]
    out = np.stack([np.asarray(center_crop_arr(im.convert("RGB"), size)) for im in images])
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def load_vae(source: str | Path, subfolder: str | None = None, dtype: torch.dtype = torch.float32):
    """diffusers ``AutoencoderKL`` from a hub id or folder (a DiT pipeline root is looked into for ``vae/``)."""
    from diffusers import AutoencoderKL

    path = Path(source)
    if subfolder is None and path.is_dir() and (path / "vae" / "config.json").exists():
        subfolder = "vae"
    try:
        vae = AutoencoderKL.from_pretrained(str(source), subfolder=subfolder, torch_dtype=dtype)
    except Exception as exc:
        raise ValueError(
            f"could not load a VAE (diffusers AutoencoderKL) from {source!r}: {exc}. Pass a local folder with "
            "config.json + diffusion_pytorch_model.* (e.g. a download of stabilityai/sd-vae-ft-ema)"
        ) from exc
    return vae.eval().requires_grad_(False)


def cast_vae(vae, dtype: str | None):
    """``vae`` with its weights in ``dtype`` (a :data:`VAE_DTYPES` name; None: as it is). In bfloat16 the encoder
    runs on a GPU's bf16 tensor cores, which is what bounds a latent cache there (benchmarks/README.md, GPU
    session); its latents then differ from the float32 ones by bf16 rounding, so the dtype is part of their key."""
    if vae is None or dtype is None:
        return vae
    if dtype not in VAE_DTYPES:
        raise ValueError(f"vae_dtype must be one of {sorted(VAE_DTYPES)}, got {dtype!r}")
    # nn.Module's own .to: diffusers' override warns about modules to keep in fp32 even where a VAE has none
    return torch.nn.Module.to(vae, VAE_DTYPES[dtype])


class LatentEncoder:
    """``(latent_dist.sample() - shift) * scale`` with the posterior noise drawn per sample from (seed, id), so a
    sample's latent is the same in any batch; ``sample=False`` takes the posterior mean instead. ``shift`` and
    ``scale`` are the VAE config's ``shift_factor`` (SD3 / FLUX latents are centred, as their img2img pipelines
    encode; none for the SD-VAE) and ``scaling_factor``.

    The VAE runs in channels-last memory format, the layout oneDNN's and cuDNN's convolutions prefer: on the CPUs
    measured it is as fast as the default layout or faster, with the same latents up to float rounding
    (``benchmarks/extract_sweep.py --vae-layouts``, figures in benchmarks/README.md).
    """

    def __init__(self, vae, scaling_factor: float | None = None, sample: bool = True):
        self.vae = vae.to(memory_format=torch.channels_last)
        cfg_scale = getattr(getattr(vae, "config", None), "scaling_factor", None)
        self.scaling_factor = scaling_factor or cfg_scale or SD_VAE_SCALE
        self.shift_factor = getattr(getattr(vae, "config", None), "shift_factor", None) or 0.0
        self.sample = sample

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor, keys: Sequence[str | int], seed: int) -> torch.Tensor:
        param = next(self.vae.parameters())
        x = pixels.to(param.device, param.dtype).contiguous(memory_format=torch.channels_last)
        dist = self.vae.encode(x).latent_dist
        z = dist.mean
        if self.sample:
            eps = to_device(per_sample_randn(z.shape[1:], keys, seed, "vae"), z.device).to(z.dtype)  # no host wait
            z = z + dist.std * eps
        return ((z - self.shift_factor) * self.scaling_factor).float()
