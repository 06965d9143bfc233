"""The front door on today's families: ``ImageFeaturizer.from_pretrained(<saved tiny pipeline or .pt>)`` gives the
features of hooks on the reference model's untouched forward, for inputs built independently here from the
pipeline's own VAE (``(mean - shift_factor) * scaling_factor``), its scheduler's noising, and its
``encode_prompt``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    PixArtSigmaPipeline,
    StableDiffusion3Pipeline,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from tests.helpers import randomise
from tests.models import tiny_pipelines
from tests.models.tiny_pipelines import TEXT_LEN, empty_prompt, hooked_full_forward

from difffeat.features.featurizer import ImageFeaturizer
from difffeat.models.dit import DiT, DiTConfig
from difffeat.models.schedule import per_sample_randn
from difffeat.models.vae import images_to_tensor

IDS = ["a", "b"]
SEED = 3


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipelines")
    return {name: getattr(tiny_pipelines, f"save_{name}")(base / name) for name in ("pixart", "sd3", "flux")}


def load(root, **options) -> ImageFeaturizer:
    return ImageFeaturizer.from_pretrained(
        root, device="cpu", sample_posterior=False, max_sequence_length=TEXT_LEN, **options
    )


def pictures(n: int = 2) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, size=(n, 20, 24, 3), dtype=np.uint8)


def pipeline_latents(root, size: int = 16) -> torch.Tensor:
    """The pipeline VAE's posterior mean, centred and scaled as SD3's / FLUX's img2img pipelines encode."""
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae").eval()
    with torch.no_grad():
        z = vae.encode(images_to_tensor(pictures(), size)).latent_dist.mean
    return (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def eps_like(z: torch.Tensor, t: float) -> torch.Tensor:
    return per_sample_randn(z.shape[1:], IDS, SEED, t)


def expand(cond: dict, n: int) -> dict:
    return {k: v.expand(n, *v.shape[1:]) for k, v in cond.items()}


def means(outputs: dict, blocks, part=None) -> dict:
    return {b: (outputs[b] if part is None else outputs[b][part]).mean(dim=1) for b in blocks}


def sd3_reference(root, transformer, t: float, cond: dict) -> dict:
    """SD3 at flow time t: the scheduler's own shifted sigma and ``scale_noise``, hooks on the full forward."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler")
    index = round((1 - t) * 1000)  # the scheduler's training timesteps run from t = 1 down
    z = pipeline_latents(root)
    xt = scheduler.scale_noise(z, scheduler.timesteps[index : index + 1].expand(2), eps_like(z, t))
    with torch.no_grad():
        outputs, _ = hooked_full_forward(
            transformer, {"hidden_states": xt, "timestep": scheduler.timesteps[index].expand(2), **cond}
        )
    return outputs


def test_sd3_from_a_saved_pipeline_equals_hooks_on_diffusers_forward(roots):
    f = load(roots["sd3"])  # recognised from transformer/config.json, no backbone= needed
    assert f.layers().family == "sd3" and f.backbone.image_size == 16
    feats = f(pictures(), blocks=[0, 1], timesteps=[0.3], ids=IDS, seed=SEED)
    cond = expand(empty_prompt(StableDiffusion3Pipeline, roots["sd3"], "sd3"), 2)
    reference = means(sd3_reference(roots["sd3"], f.backbone.module, 0.3, cond), [0, 1], part=1)
    for b in (0, 1):
        torch.testing.assert_close(feats[(b, 0.3)], reference[b], rtol=1e-5, atol=1e-5)


def test_sd3_text_and_both_streams_and_caption_conditioning_through_the_featurizer(roots):
    captions = ["a red cat", "two dogs in the sky"]
    pipe = StableDiffusion3Pipeline.from_pretrained(roots["sd3"], transformer=None, vae=None)
    embeds, _, pooled, _ = pipe.encode_prompt(
        captions, None, None, do_classifier_free_guidance=False, max_sequence_length=TEXT_LEN
    )
    both = load(roots["sd3"], backbone="sd3", stream="both", condition="caption")
    cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
    outputs = sd3_reference(roots["sd3"], both.backbone.module, 0.6, cond)
    feats = both(pictures(), blocks=[1], timesteps=[0.6], ids=IDS, seed=SEED, captions=captions)
    torch.testing.assert_close(feats[(1, 0.6)], torch.cat(outputs[1], dim=1).mean(dim=1), rtol=1e-5, atol=1e-5)
    text = load(roots["sd3"], stream="text", condition="caption")
    feats = text(pictures(), blocks=[0], timesteps=[0.6], ids=IDS, seed=SEED, captions=captions)
    torch.testing.assert_close(feats[(0, 0.6)], outputs[0][0].mean(dim=1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prompt, not on a class label"):
        text(pictures(), blocks=[0], timesteps=[0.6], class_label=1)


def test_pixart_from_a_saved_pipeline_equals_hooks_on_diffusers_forward(roots):
    f = load(roots["pixart"], backbone="pixart")
    assert f.layers().time.name == "ddpm"
    feats = f(pictures(), blocks=[2], timesteps=[400], ids=IDS, seed=SEED)
    z = pipeline_latents(roots["pixart"])  # PixArt's VAE has no shift_factor: latents * scaling_factor
    xt = DDPMScheduler.from_pretrained(roots["pixart"], subfolder="scheduler").add_noise(
        z, eps_like(z, 400), torch.tensor([400, 400])
    )
    cond = expand(empty_prompt(PixArtSigmaPipeline, roots["pixart"], "pixart"), 2)
    kwargs = {"hidden_states": xt, "timestep": torch.tensor([400, 400]), **cond,
              "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}  # fmt: skip
    with torch.no_grad():
        outputs, _ = hooked_full_forward(f.backbone.module, kwargs)
    torch.testing.assert_close(feats[(2, 400)], outputs[2].mean(dim=1), rtol=1e-5, atol=1e-5)


def test_the_generic_adapter_through_the_featurizer_equals_pixarts(roots):
    pixart = load(roots["pixart"])
    null = {k: v[:1] for k, v in pixart.backbone.condition(1).items()}
    generic = ImageFeaturizer.from_pretrained(
        roots["pixart"], backbone="diffusers", device="cpu", sample_posterior=False, null_condition=null,
        fixed_inputs={"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}},
    )  # fmt: skip
    assert generic.layers().family == "diffusers"
    ours = generic(pictures(), blocks=[1], timesteps=[250], ids=IDS, seed=SEED)
    theirs = pixart(pictures(), blocks=[1], timesteps=[250], ids=IDS, seed=SEED)
    torch.testing.assert_close(ours[(1, 250)], theirs[(1, 250)], rtol=0, atol=0)


def test_flux_from_a_saved_pipeline_equals_hooks_on_diffusers_forward(roots):
    f = load(roots["flux"])
    assert [b.name for b in f.layers()][-1] == "single_transformer_blocks.1"
    assert f.backbone.image_size == 16  # no sample_size in FLUX's transformer config: the VAE's
    feats = f(pictures(), blocks=[1, 2], timesteps=[0.5], ids=IDS, seed=SEED)
    z = pipeline_latents(roots["flux"])
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(roots["flux"], subfolder="scheduler")
    scheduler.set_timesteps(sigmas=np.array([0.5]), mu=calculate_shift(16, 256, 4096, 0.5, 1.15))
    xt = scheduler.scale_noise(z, scheduler.timesteps[:1].expand(2), eps_like(z, 0.5))
    kwargs = {
        "hidden_states": FluxPipeline._pack_latents(xt, 2, 4, 8, 8),
        "timestep": scheduler.timesteps[:1].expand(2) / 1000,
        "guidance": torch.full((2,), 3.5),
        "img_ids": FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
        "txt_ids": torch.zeros(TEXT_LEN, 3),
        **expand(empty_prompt(FluxPipeline, roots["flux"], "flux"), 2),
    }
    with torch.no_grad():
        outputs, _ = hooked_full_forward(f.backbone.module, kwargs)
    for b in (1, 2):
        torch.testing.assert_close(feats[(b, 0.5)], outputs[b][1].mean(dim=1), rtol=1e-5, atol=1e-5)


# --- SiT ---------------------------------------------------------------------------------------------------------


def official_sit_xt(x1: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
    """SiT's Linear path (``transport/path.py`` ICPlan): alpha_t = t on the data, sigma_t = 1 - t on the noise."""
    return t * x1 + (1 - t) * noise


def test_sit_from_an_official_file_with_its_vae_equals_hooks_on_the_full_forward(tmp_path):
    cfg = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=384, depth=3, num_heads=6, num_classes=10)
    model = randomise(DiT(cfg), seed=5)
    torch.save(model.state_dict(), tmp_path / "SiT-S-2.pt")
    vae = tiny_pipelines.vae(4).eval()
    f = ImageFeaturizer.from_pretrained(
        tmp_path / "SiT-S-2.pt", backbone="sit", vae=vae, device="cpu", sample_posterior=False
    )
    assert f.layers().time.name == "sit-flow" and f.backbone.image_size == 16
    feats = f(pictures(), blocks=[1], timesteps=[0.7], ids=IDS, seed=SEED)
    with torch.no_grad():
        z = vae.encode(images_to_tensor(pictures(), 16)).latent_dist.mean * vae.config.scaling_factor
        xt = official_sit_xt(z, eps_like(z, 0.7), 0.7)
        seen = {}
        handle = model.blocks[1].register_forward_hook(lambda m, i, o: seen.__setitem__(1, o))
        model(xt, torch.full((2,), 0.7), torch.full((2,), cfg.num_classes))  # the null class, flow time itself
        handle.remove()
    torch.testing.assert_close(feats[(1, 0.7)], seen[1].mean(dim=1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs its VAE"):
        ImageFeaturizer.from_pretrained(tmp_path / "SiT-S-2.pt", backbone="sit", device="cpu")
