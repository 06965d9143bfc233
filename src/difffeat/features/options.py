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
from typing import Any

from difffeat.utils.options import Options, added_later, option

Time = int | float  # a time in the backbone's own convention: DDPM index, masked step, flow time in [0, 1]


def _backbone(modality: str, known: str) -> Any:
    """The ``backbone`` option of a model section: a registered family of ``modality``, checked when a name is
    given (looked up then, so reading the options never imports the adapters' heavy dependencies)."""

    def check(value: str) -> str | None:
        from difffeat.models.base import families

        names = families(modality)
        return None if value in names else f"{value!r} is not an {modality} backbone; choose from {', '.join(names)}"

    return option(None, check=check, numbers=True, help=f"family: {known}; none: read from the source")


def _name() -> Any:
    """The ``name`` option of a model section (a function: each dataclass needs its own field object)."""
    return option(None, help="short name in store keys and reports (default: from the path)")


def _device(value: str) -> str | None:
    if re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        return None
    return f"{value!r} is not a device; use auto, cpu, mps, cuda or cuda:N"


def _device_map(value: str) -> str | None:
    if re.fullmatch(r"auto|balanced|sequential|cpu|cuda(:\d+)?", value):
        return None
    return f"{value!r} is not a device map; use auto, balanced, sequential, cpu, cuda or cuda:N"


@dataclass
class ImageModelOptions(Options):
    """Where the image branch's diffusion transformer (and VAE) come from and how they are read.

    The family options (``vae_dtype``, ``path``, ``condition``, ``stream``, ``dtype``, ``max_sequence_length``,
    ``guidance``, ``shift``) go to the family's loader; one set on a family that does not take it is an error, not
    silently ignored.
    """

    dit: str | None = option(
        None,
        help="the image model: official .pt, diffusers pipeline folder/hub id, or our folder; none: no image branch",
    )
    backbone: str | None = _backbone("image", "dit, sit, pixart, sd3, flux, diffusers (generic)")
    vae: str | None = option(None, help="AutoencoderKL hub id or folder; default: the pipeline's own, none for pixels")
    name: str | None = _name()
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
    vae_dtype: str = added_later(
        "float32",
        choices=("float32", "bfloat16"),
        help="dit, sit: the VAE's weights' dtype for the latents (bfloat16: faster on GPUs, latents within bf16 "
        "rounding); the diffusers families load it in image.dtype",
    )
    path: str | None = option(
        None, choices=("linear", "gvp", "vp"), numbers=True, help="sit: the interpolant it was trained with"
    )
    condition: str = option(
        "null",
        choices=("null", "caption"),
        numbers=True,
        help="pixart, sd3, flux: the cached empty prompt, or each sample's (first) caption",
    )
    stream: str = option(
        "image", choices=("image", "text", "both"), numbers=True, help="sd3, flux: which tokens of a joint block"
    )
    dtype: str = option(
        "float32",
        choices=("float32", "bfloat16", "float16"),
        numbers=True,
        help="pixart, sd3, flux, diffusers: weights' dtype (bfloat16 for the large ones)",
    )
    max_sequence_length: int | None = option(
        None, min=1, numbers=True, help="pixart, sd3, flux: prompt tokens (T5); none: the pipeline's default"
    )
    massive: str = option(
        "none",
        choices=("none", "zero", "normalise"),
        numbers=True,
        help="massive-activation channels (found per block on train rows) kept, zeroed or normalised",
    )
    tap: str = added_later(
        "output",
        choices=("output", "modulated"),
        help="a block's feature: its output, or its input after the block's own norm and AdaLN modulation (DiTF)",
    )
    guidance: float | None = added_later(
        None,
        min=0,
        help="flux: the guidance embedding's value; none: FluxPipeline's 3.5 (schnell has no guidance embedder)",
    )
    shift: float | None = added_later(
        None,
        min=0.001,
        help="sd3, flux: static flow shift replacing the scheduler's; none: the scheduler config's own",
    )


@dataclass
class TextModelOptions(Options):
    """Where the text branch's model and tokenizer come from and how captions are tokenized.

    As for images, the family options (``dtype``, ``device_map``, ``allow_large``) go to the family's loader; one
    set on a family that does not take it is an error, not silently ignored.
    """

    ddit: str | None = option(
        None, help="the text model: SEDD/MDLM/RADD/DiffusionGemma hub id or folder, or our folder; none: no text"
    )
    backbone: str | None = _backbone("text", "ddit (SEDD/MDLM), radd, diffusion_gemma")
    tokenizer: str | None = option(None, help="AutoTokenizer id/folder or tokenizer.json; default: next to the model")
    name: str | None = _name()
    max_length: int | None = option(None, min=1, numbers=True, help="tokens per caption; default: the model's")
    add_special: str | None = option(
        None,
        choices=("none", "eos", "bos_eos"),
        numbers=True,
        help="special tokens around a caption; default by model kind",
    )
    dtype: str = added_later(
        "float32",
        choices=("float32", "bfloat16", "float16"),
        help="the weights' dtype (bfloat16 for the large ones)",
    )
    device_map: str | None = option(
        None,
        check=_device_map,
        help="diffusion_gemma: transformers' weight placement (auto, cuda, cuda:N, cpu; needs accelerate)",
    )
    allow_large: bool = option(
        False, help="radd, diffusion_gemma: load a model above the size limit (3B parameters, read from its config)"
    )


@dataclass
class ExtractOptions(Options):
    """Which (block, t) cells to extract and how. Blocks are 0-based; negative ones count from the end."""

    image_blocks: list[int] = option(default_factory=lambda: [11], help="image blocks to extract")
    image_timesteps: list[Time] = option(
        default_factory=lambda: [100], min=0, help="image times in the backbone's convention (DDPM index, flow t)"
    )
    text_blocks: list[int] = option(default_factory=lambda: [-1], help="text blocks to extract")
    text_timesteps: list[Time] = option(
        default_factory=lambda: [0], min=0, help="text times in the backbone's convention (masked step)"
    )
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
