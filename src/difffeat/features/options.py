"""What the extraction step reads its features from and how: the image and text model sources and the
extraction options. The run config composes these sections; the featurizers, the store keys and the extraction
jobs read them, so a new extraction option is declared once, here.

``numbers`` on each field says whether it changes the stored features (see :mod:`difffeat.utils.options`): the
store's entry key is a fingerprint of exactly those fields, so a changed option is never served stale features,
and an option that only changes speed (batch size, workers, compile, fused timesteps) reuses them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from difffeat.utils.options import Options, option


def _device(value: str) -> str | None:
    if re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        return None
    return f"{value!r} is not a device; use auto, cpu, mps, cuda or cuda:N"


@dataclass
class ImageModelOptions(Options):
    """Where the image branch's DiT (and VAE) come from and how they are read."""

    dit: str | None = option(None, help="DiT: official .pt, diffusers folder/hub id, or our folder; none: no image")
    vae: str | None = option(None, help="AutoencoderKL hub id or folder; none for pixel-space DiTs")
    name: str | None = option(None, help="short name in store keys and reports (default: from the path)")
    numerics: str = option(
        "official",
        choices=("official", "diffusers"),
        numbers=True,
        help="official DiT numerics or diffusers' (LayerNorm eps, timestep frequencies)",
    )
    class_label: int | None = option(None, min=0, numbers=True, help="class to condition on; none: the null class")
    image_size: int | None = option(
        None, min=8, numbers=True, help="centre-crop size; default: the DiT's input size x 8 (VAE) or x 1 (pixels)"
    )
    sample_posterior: bool = option(
        True, numbers=True, help="latent_dist.sample() with per-sample seeds (DiT's training) or its mean"
    )


@dataclass
class TextModelOptions(Options):
    """Where the text branch's DDiT and tokenizer come from and how captions are tokenized."""

    ddit: str | None = option(None, help="SEDD/MDLM hub id or folder, or our folder; none: no text branch")
    tokenizer: str | None = option(None, help="AutoTokenizer id/folder or tokenizer.json; default: next to the model")
    name: str | None = option(None, help="short name in store keys and reports (default: from the path)")
    max_length: int | None = option(None, min=1, numbers=True, help="tokens per caption; default: the model's")
    add_special: str | None = option(
        None,
        choices=("none", "eos", "bos_eos"),
        numbers=True,
        help="special tokens around a caption; default by model kind",
    )


@dataclass
class ExtractOptions(Options):
    """Which (block, t) cells to extract and how. Blocks are 0-based; negative ones count from the end."""

    image_blocks: list[int] = option(default_factory=lambda: [11], help="image blocks to extract")
    image_timesteps: list[int] = option(default_factory=lambda: [100], min=0, help="image DDPM timesteps")
    text_blocks: list[int] = option(default_factory=lambda: [-1], help="text blocks to extract")
    text_timesteps: list[int] = option(default_factory=lambda: [0], min=0, help="text noise steps")
    pool: str = option("mean", choices=("mean", "none"), numbers="image", help="image token pooling")
    text_pool: str = option("mean", choices=("mean", "last", "none"), numbers="text", help="text token pooling")
    token_norm: bool = option(False, numbers=True, help="normalise each token before pooling")
    seed: int = option(0, min=0, numbers=True, help="seeds the per-sample noise")
    ensemble: int = option(1, min=1, numbers=True, help="noise draws averaged per feature")
    caption_reduce: str = option(
        "mean",
        choices=("mean", "first", "concat"),
        numbers="text",
        help="how a sample's several captions become one feature",
    )
    batch_size: int = option(32, min=1, help="samples per forward")
    shard_size: int = option(512, min=1, help="rows per shard file: the unit of resumption")
    store_dtype: str = option("float16", choices=("float16", "float32"), numbers=True, help="dtype on disk")
    bf16: bool = option(False, numbers=True, help="bf16 autocast (changes the features beyond float rounding)")
    compile: bool = option(False, help="torch.compile the backbone blocks (needs a C++ compiler on CPU)")
    fuse_timesteps: bool = option(False, help="one forward for all timesteps of a batch (batch x timesteps rows)")
    num_workers: int = option(0, min=0, help="DataLoader processes decoding images (0: the main process)")
    device: str = option("auto", check=_device, help="auto | cpu | cuda | cuda:N; under torchrun: cuda:LOCAL_RANK")
    skip_bad: bool = option(
        False, help="record unreadable images in the id list and go on (the id list, not the key, records it)"
    )
    modalities: list[str] = option(
        default_factory=lambda: ["image", "text"],
        choices=("image", "text"),
        help="branches to run (each also needs its model)",
    )
