"""The VAE's weights' dtype (``image.vae_dtype``): bf16 latents are diffusers' own bf16 encoding, within bf16
rounding of the fp32 ones, and stored under their own key while the fp32 default keeps the keys it had."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from difffeat.features.store import EntryKey
from difffeat.models.dit_load import save_dit
from difffeat.models.schedule import per_sample_randn
from difffeat.models.vae import LatentEncoder, cast_vae, images_to_tensor
from difffeat.run.config import RunConfig, apply_overrides
from difffeat.run.pipeline import Experiment
from helpers import rounding_tolerance, tiny_dit

VAE_LAYERS = 14  # convolutions and the mid-block attention the encoder's 2-level tiny VAE runs, each rounding once
KEYS, SEED = ["a", "b", "c"], 3


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=4,
                         latent_channels=4, sample_size=32).eval()  # fmt: skip


def pixels() -> torch.Tensor:
    x = np.random.default_rng(1).integers(0, 256, size=(3, 40, 48, 3), dtype=np.uint8)
    return images_to_tensor(x, 32)


def test_bf16_latents_are_diffusers_bf16_encoding_within_bf16_rounding_of_the_fp32_ones():
    vae = tiny_vae()
    fp32 = LatentEncoder(copy.deepcopy(vae)).encode(pixels(), KEYS, SEED)
    encoder = LatentEncoder(cast_vae(copy.deepcopy(vae), "bfloat16"))
    bf16 = encoder.encode(pixels(), KEYS, SEED)
    assert next(encoder.vae.parameters()).dtype == torch.bfloat16 and bf16.dtype == torch.float32
    with torch.no_grad():  # the reference: diffusers' own bf16 VAE in its default layout, the same posterior noise
        dist = vae.to(torch.bfloat16).encode(pixels().bfloat16()).latent_dist
        eps = per_sample_randn(dist.mean.shape[1:], KEYS, SEED, "vae").bfloat16()
        ref = ((dist.mean + dist.std * eps) * vae.config.scaling_factor).float()
    bf16_bound = rounding_tolerance(fp32, VAE_LAYERS, 1, torch.bfloat16)
    assert (bf16 - ref).abs().max() <= bf16_bound, "our bf16 path is not diffusers' bf16 encoding"
    worst = (bf16 - fp32).abs().max().item()
    assert worst <= bf16_bound, f"bf16 latents off fp32 by {worst:.3g}, more than bf16 rounding ({bf16_bound:.3g})"
    fp32_bound = rounding_tolerance(fp32, VAE_LAYERS, 256)  # what fp32 kernels alone could differ by
    assert worst > fp32_bound, f"bf16 latents within fp32 rounding ({worst:.3g}): the VAE did not run in bf16"


def test_no_dtype_leaves_a_given_vae_as_it_is_and_an_unknown_one_is_refused():
    vae = tiny_vae().to(torch.bfloat16)
    assert cast_vae(vae, None) is vae and next(vae.parameters()).dtype == torch.bfloat16
    assert cast_vae(None, "bfloat16") is None
    with pytest.raises(ValueError, match="vae_dtype must be one of"):
        cast_vae(vae, "float16")


@pytest.fixture(scope="module")
def latent_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent")
    save_dit(tiny_dit(in_channels=4, input_size=16), root / "dit")  # the 2-level VAE: 16 x 16 latents of 32 px
    tiny_vae().save_pretrained(root / "vae")
    return root


def extracted(root, out, *sets: str) -> tuple[Experiment, EntryKey, EntryKey]:
    """Extract one cell of a latent DiT on the demo train split; the experiment, its feature and latent keys."""
    cfg = apply_overrides(RunConfig(), [
        f"out={out}", "data.kind=demo", "data.options={n_train: 6, n_val: 2, n_test: 2}", f"image.dit={root / 'dit'}",
        f"image.vae={root / 'vae'}", "image.name=tiny", "image.image_size=32", "extract.modalities=[image]",
        "extract.batch_size=4", "extract.shard_size=4", "extract.store_dtype=float32", *sets,
    ])  # fmt: skip
    exp = Experiment(cfg)
    exp.ensure("image", [1], [10], ["train"])
    latents = [EntryKey(**m["key"]) for m in exp.store.entries() if m["key"]["modality"] == "latent"]
    assert len(latents) == 1
    return exp, exp.key("image", (1, 10), "train"), latents[0]


def test_bf16_vae_gets_its_own_latent_and_feature_keys_and_the_fp32_default_keeps_the_old_ones(tmp_path, latent_models):
    base, base_key, base_latent = extracted(latent_models, tmp_path / "base")
    _, same_key, same_latent = extracted(latent_models, tmp_path / "same", "image.vae_dtype=float32")
    bf16, bf16_key, bf16_latent = extracted(latent_models, tmp_path / "bf16", "image.vae_dtype=bfloat16")
    assert (same_key, same_latent) == (base_key, base_latent)  # spelling out the default changes nothing
    assert bf16_key != base_key and bf16_latent != base_latent
    meta = {m["name"]: m for m in base.store.entries()}[base_key.name]
    assert "vae_dtype" not in str(meta["config"])  # the fp32 fingerprint is the one made before the option existed
    ref, got = (np.array(e.store.read(k)) for e, k in ((base, base_latent), (bf16, bf16_latent)))
    assert got.dtype == np.float32 and not np.array_equal(got, ref)
    assert np.abs(got - ref).max() <= rounding_tolerance(torch.from_numpy(ref), VAE_LAYERS, 1, torch.bfloat16)
