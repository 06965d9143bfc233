"""Tiny random diffusers pipelines of the real classes, saved in the real on-disk layout (pipeline root with
transformer/, scheduler/, vae/, text_encoder*/, tokenizer*/), built offline: tokenizers are word-level
`tokenizers` models wrapped in PreTrainedTokenizerFast, text encoders tiny T5 / CLIP configs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

WORDS = ["a", "red", "cat", "on", "the", "blue", "mat", "two", "dogs", "and", "one", "bird", "in", "sky"]
T5_WIDTH = 32
TEXT_LEN = 16  # max_sequence_length for the T5 prompt: short keeps the tiny models fast


def tokenizer(max_length: int) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def t5(seed: int = 0) -> T5EncoderModel:
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(WORDS) + 3, d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    return T5EncoderModel(cfg).eval()


def clip(hidden: int, projection: int | None, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=len(WORDS) + 3, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=projection or hidden, eos_token_id=1,
        pad_token_id=0, bos_token_id=0,
    )  # fmt: skip
    return (CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)).eval()


def vae(latent_channels: int, **extra):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=16, **extra,
    )  # fmt: skip


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (the zero-init adaLN / output layers of a fresh DiT would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


def save_pixart(root: Path) -> Path:
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=3, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        out_channels=8, cross_attention_dim=16, caption_channels=T5_WIDTH, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6,
    )  # fmt: skip
    PixArtSigmaPipeline(
        tokenizer=tokenizer(300), text_encoder=t5(), vae=vae(4), transformer=randomise(transformer, 1),
        scheduler=DPMSolverMultistepScheduler(),
    ).save_pretrained(root)  # fmt: skip
    return root


def save_sd3(root: Path) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=T5_WIDTH, caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=16,
    )  # fmt: skip
    StableDiffusion3Pipeline(
        transformer=randomise(transformer, 2), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(4, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=clip(8, 16, 1), tokenizer=tokenizer(77), text_encoder_2=clip(8, 16, 2), tokenizer_2=tokenizer(77),
        text_encoder_3=t5(3), tokenizer_3=tokenizer(256),
    ).save_pretrained(root)  # fmt: skip
    return root


def save_flux(root: Path) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=T5_WIDTH, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
        max_shift=1.15,
    )  # fmt: skip
    FluxPipeline(
        transformer=randomise(transformer, 3), scheduler=scheduler,
        vae=vae(4, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=clip(16, None, 4), tokenizer=tokenizer(77), text_encoder_2=t5(5), tokenizer_2=tokenizer(512),
    ).save_pretrained(root)  # fmt: skip
    return root


# --- references: diffusers' own forward and prompt encoding, independent of our backbone ---------------------


def hooked_full_forward(transformer, kwargs) -> tuple[dict[int, object], Counter]:
    """Every block's output on diffusers' untouched forward, and how often each block ran."""
    blocks = [*transformer.transformer_blocks, *getattr(transformer, "single_transformer_blocks", [])]
    outputs, calls = {}, Counter()

    def record(index: int):
        def hook(module, args, out) -> None:
            outputs[index] = out
            calls.update([index])

        return hook

    handles = [block.register_forward_hook(record(i)) for i, block in enumerate(blocks)]
    try:
        transformer(**kwargs, return_dict=False)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, calls


def empty_prompt(pipeline_cls, root, family):
    """The pipeline's own encoding of "" computed here, independently of the backbone's cache."""
    pipe = pipeline_cls.from_pretrained(str(root), transformer=None, vae=None)
    if family == "pixart":
        embeds, mask, _, _ = pipe.encode_prompt([""], False, clean_caption=False, max_sequence_length=TEXT_LEN)
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
    if family == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(
            [""], None, None, do_classifier_free_guidance=False, max_sequence_length=TEXT_LEN
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
    embeds, pooled, _ = pipe.encode_prompt([""], None, max_sequence_length=TEXT_LEN)
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


def plant_massive_channel(root: Path, channel: int) -> Path:
    """Make ``channel`` of the residual stream massive from SD3 block 0 on, as in trained DiTs: its MLP adds 1000
    to that channel of every image token, through a gate fixed at 1 (adaLN row of gate_mlp zeroed, bias 1)."""
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(root, subfolder="transformer")
    block, width = transformer.transformer_blocks[0], transformer.inner_dim
    gate = 5 * width + channel  # AdaLayerNormZero's chunks: shift, scale, gate (attention); shift, scale, gate (MLP)
    with torch.no_grad():
        block.norm1.linear.weight[gate] = 0
        block.norm1.linear.bias[gate] = 1.0
        block.ff.net[2].weight[channel] = 0
        block.ff.net[2].bias[channel] = 1000.0
    transformer.save_pretrained(root / "transformer")
    return root
