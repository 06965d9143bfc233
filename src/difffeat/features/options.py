"""What the extraction step reads its features from and how: the image and text model sources and the
extraction options. The run config composes these sections; the store keys and the extraction jobs read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ImageModelConfig:
    dit: str | None = None  # official .pt, diffusers folder/hub id, or our folder; None = no image branch
    vae: str | None = None  # AutoencoderKL hub id or folder; None for pixel-space DiTs
    name: str | None = None  # short name used in store keys (default: derived from the path)
    numerics: str = "official"  # official | diffusers
    class_label: int | None = None  # None = the null class (1000 for ImageNet DiTs)
    image_size: int | None = None  # default: the DiT's input size x 8 (VAE) or x 1 (pixels)
    sample_posterior: bool = True  # latent_dist.sample() with per-sample seeds (DiT's training) or the mean


@dataclass
class TextModelConfig:
    ddit: str | None = None  # SEDD/MDLM hub id or folder, or our folder; None = no text branch
    tokenizer: str | None = None  # AutoTokenizer id/folder or tokenizer.json; default: next to the model
    name: str | None = None
    max_length: int | None = None
    add_special: str | None = None  # none | eos | bos_eos (default by model kind)


@dataclass
class ExtractConfig:
    image_blocks: list[int] = field(default_factory=lambda: [11])
    image_timesteps: list[int] = field(default_factory=lambda: [100])
    text_blocks: list[int] = field(default_factory=lambda: [-1])
    text_timesteps: list[int] = field(default_factory=lambda: [0])
    pool: str = "mean"  # image: mean | none; text: mean | last | none
    text_pool: str = "mean"
    token_norm: bool = False
    seed: int = 0
    ensemble: int = 1
    caption_reduce: str = "mean"  # mean | first | concat
    batch_size: int = 32
    shard_size: int = 512  # rows per shard file: the unit of resumption
    store_dtype: str = "float16"  # float16 | float32
    bf16: bool = False
    compile: bool = False  # torch.compile the backbone blocks (needs a C++ compiler on CPU)
    fuse_timesteps: bool = False  # one forward for all timesteps of a batch (batch_size x timesteps rows)
    num_workers: int = 0  # DataLoader processes decoding images for the latent cache (0: in the main process)
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...; under torchrun auto/cuda = cuda:LOCAL_RANK
    skip_bad: bool = False  # record unreadable images in the store's id list instead of failing
    modalities: list[str] = field(default_factory=lambda: ["image", "text"])
