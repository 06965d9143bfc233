"""PixArt, SD3 and FLUX read through diffusers: tiny random pipelines of the real classes saved in the real layout,
loaded through our loader; features against hooks on diffusers' untouched full forward (inputs built here the way
each pipeline builds them), early exit by counting block calls, noising against each model's own scheduler."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from diffusers import (
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    PixArtSigmaPipeline,
    StableDiffusion3Pipeline,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from tests.models import tiny_pipelines
from tests.models.tiny_pipelines import TEXT_LEN, empty_prompt, hooked_full_forward

from difffeat.models.checkpoints import CheckpointError
from difffeat.models.describe import describe_source
from difffeat.models.diffusers_dits import load_diffusers_backbone, sniff_family


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipelines")
    return {name: getattr(tiny_pipelines, f"save_{name}")(base / name) for name in ("pixart", "sd3", "flux")}


def latents(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def count_calls(backbone, fn) -> Counter:
    calls = Counter()
    handles = [
        block.register_forward_pre_hook(lambda m, a, i=i: calls.update([i]))
        for i, (_, block) in enumerate(backbone._blocks)
    ]
    try:
        fn()
    finally:
        for handle in handles:
            handle.remove()
    return calls


# --- PixArt --------------------------------------------------------------------------------------------------------


def test_pixart_features_equal_hooks_on_diffusers_forward_and_stop_early(roots):
    backbone = load_diffusers_backbone(roots["pixart"], max_sequence_length=TEXT_LEN)
    assert (backbone.family, backbone.time.name, backbone.depth) == ("pixart", "ddpm", 3)
    x, t = latents(), 400
    cond = {
        k: v.expand(2, *v.shape[1:]) for k, v in empty_prompt(PixArtSigmaPipeline, roots["pixart"], "pixart").items()
    }
    reference, _ = hooked_full_forward(
        backbone.module,
        {"hidden_states": x, "timestep": torch.tensor([t, t]), "added_cond_kwargs": {"resolution": None,
         "aspect_ratio": None}, **cond},
    )  # fmt: skip
    calls = count_calls(backbone, lambda: backbone.forward_intermediates(x, t, [0, 1]))
    ours = backbone.forward_intermediates(x, t, [0, 1])
    assert calls == Counter({0: 1, 1: 1}), "block 2 ran although block 1 was the deepest asked for"
    for i in (0, 1):
        torch.testing.assert_close(ours[i], reference[i], rtol=0, atol=1e-5)


def test_pixart_noising_equals_its_scheduler_add_noise(roots):
    backbone = load_diffusers_backbone(roots["pixart"], max_sequence_length=TEXT_LEN)
    # The pipeline ships a DPM-Solver for sampling; training noised with DDPM's q_sample on the same betas.
    # (DPM-Solver's own add_noise reads its sigmas in reverse order before set_timesteps, so it is no reference.)
    sampler = DPMSolverMultistepScheduler.from_pretrained(str(roots["pixart"]), subfolder="scheduler")
    scheduler = DDPMScheduler.from_config(sampler.config)
    x0, eps = latents(3), latents(3, seed=1)
    for t in (0, 250, 999):
        expected = scheduler.add_noise(x0, eps, torch.tensor([t] * 3))
        torch.testing.assert_close(backbone.interpolate(x0, eps, t), expected, rtol=0, atol=1e-6)


# --- SD3 -----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd3(roots):
    return load_diffusers_backbone(roots["sd3"], max_sequence_length=TEXT_LEN, condition="caption")


def sd3_reference(roots, backbone, x, t: float):
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(roots["sd3"]), subfolder="scheduler")
    index = round((1 - t) * 1000)  # scheduler.timesteps run from t = 1 (index 0) down to t = 0.001
    sigma = scheduler.sigmas[index]
    cond = {
        k: v.expand(2, *v.shape[1:]) for k, v in empty_prompt(StableDiffusion3Pipeline, roots["sd3"], "sd3").items()
    }
    kwargs = {"hidden_states": x, "timestep": torch.full((2,), float(sigma) * 1000), **cond}
    return hooked_full_forward(backbone.module, kwargs)


def test_sd3_image_stream_equals_hooks_on_diffusers_forward_and_stops_early(roots, sd3):
    x, t = latents(), 0.3
    reference, calls = sd3_reference(roots, sd3, x, t)
    assert calls == Counter({0: 1, 1: 1, 2: 1})
    ours = sd3.forward_intermediates(x, t, [0, 1])
    assert count_calls(sd3, lambda: sd3.forward_intermediates(x, t, [0])) == Counter({0: 1})
    for i in (0, 1):
        torch.testing.assert_close(ours[i], reference[i][1], rtol=0, atol=1e-5)


def test_sd3_text_and_joint_streams(roots, sd3):
    x, t = latents(), 0.6
    reference, _ = sd3_reference(roots, sd3, x, t)
    sd3.stream = "text"
    try:
        text = sd3.forward_intermediates(x, t, [1])[1]
        with pytest.raises(ValueError, match="no text tokens"):
            sd3.forward_intermediates(x, t, [2])  # the last MMDiT block updates the image tokens only
        sd3.stream = "both"
        both = sd3.forward_intermediates(x, t, [1])[1]
    finally:
        sd3.stream = "image"
    torch.testing.assert_close(text, reference[1][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(both, torch.cat(reference[1], dim=1), rtol=0, atol=1e-5)


def test_sd3_noising_equals_scale_noise_with_the_model_shift(roots, sd3):
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(roots["sd3"]), subfolder="scheduler")
    assert scheduler.config.shift == 3.0
    x0, eps = latents(2), latents(2, seed=1)
    for index in (0, 200, 750, 999):
        t = 1 - index / 1000  # the unshifted time of that training timestep
        expected = scheduler.scale_noise(x0, scheduler.timesteps[index : index + 1].expand(2), eps)
        torch.testing.assert_close(sd3.interpolate(x0, eps, t), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(sd3.interpolate(x0, eps, 0.0), x0, rtol=0, atol=0)


def test_sd3_null_prompt_is_cached_and_captions_use_the_pipeline_encoder(roots, sd3):
    expected = empty_prompt(StableDiffusion3Pipeline, roots["sd3"], "sd3")
    for key, value in expected.items():
        torch.testing.assert_close(sd3.condition(3)[key], value.expand(3, *value.shape[1:]), rtol=0, atol=0)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(roots["sd3"]), transformer=None, vae=None)
    captions = ["a red cat", "two dogs in the sky"]
    embeds, _, pooled, _ = pipe.encode_prompt(
        captions, None, None, do_classifier_free_guidance=False, max_sequence_length=TEXT_LEN
    )
    cond = sd3.condition(2, captions=captions)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond["pooled_projections"], pooled, rtol=0, atol=0)
    assert not torch.equal(cond["pooled_projections"][0], sd3.condition(1)["pooled_projections"][0])


def test_null_condition_frees_the_text_encoders(roots):
    backbone = load_diffusers_backbone(roots["sd3"], max_sequence_length=TEXT_LEN)
    assert backbone.prompts is None
    with pytest.raises(ValueError, match="condition='caption'"):
        backbone.condition(1, captions=["a cat"])


# --- FLUX ----------------------------------------------------------------------------------------------------------


def test_flux_indexes_double_then_single_blocks_and_equals_hooks_on_diffusers_forward(roots):
    backbone = load_diffusers_backbone(roots["flux"], max_sequence_length=TEXT_LEN)
    names = [layer.name for layer in backbone.layers()]
    assert names == ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
                     "single_transformer_blocks.1"]  # fmt: skip
    x, t = latents(), 0.5
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(roots["flux"]), subfolder="scheduler")
    tokens = 4 * 4
    mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    scheduler.set_timesteps(sigmas=np.array([t]), mu=mu)
    cond = {k: v.expand(2, *v.shape[1:]) for k, v in empty_prompt(FluxPipeline, roots["flux"], "flux").items()}
    kwargs = {
        "hidden_states": FluxPipeline._pack_latents(x, 2, 4, 8, 8),
        "timestep": scheduler.timesteps[:1].expand(2) / 1000,
        "guidance": torch.full((2,), 3.5),
        "img_ids": FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
        "txt_ids": torch.zeros(TEXT_LEN, 3),
        **cond,
    }
    reference, _ = hooked_full_forward(backbone.module, kwargs)
    assert count_calls(backbone, lambda: backbone.forward_intermediates(x, t, [2])) == Counter({0: 1, 1: 1, 2: 1})
    ours = backbone.forward_intermediates(x, t, [1, 2])
    for i in (1, 2):
        torch.testing.assert_close(ours[i], reference[i][1], rtol=0, atol=1e-5)


def test_flux_dynamic_shift_noising_equals_its_scheduler(roots):
    backbone = load_diffusers_backbone(roots["flux"], max_sequence_length=TEXT_LEN)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(roots["flux"]), subfolder="scheduler")
    grid = np.linspace(1.0, 1 / 8, 8)  # as FluxPipeline builds its sigmas
    scheduler.set_timesteps(sigmas=grid, mu=calculate_shift(16, 256, 4096, 0.5, 1.15))
    x0, eps = latents(2), latents(2, seed=1)
    for i, t in enumerate(grid):
        expected = scheduler.scale_noise(x0, scheduler.timesteps[i : i + 1].expand(2), eps)
        torch.testing.assert_close(backbone.interpolate(x0, eps, float(t)), expected, rtol=0, atol=1e-6)


# --- generic and loading -------------------------------------------------------------------------------------------


def test_generic_adapter_reads_any_transformer_blocks_list_with_the_callers_conditioning(roots):
    pixart = load_diffusers_backbone(roots["pixart"], max_sequence_length=TEXT_LEN)
    generic = load_diffusers_backbone(
        roots["pixart"], family="diffusers", null_condition={k: v[:1] for k, v in pixart.condition(1).items()},
        fixed_inputs={"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}},
    )  # fmt: skip
    x = latents()
    ours = generic.forward_intermediates(x, 100, [1], **generic.condition(2))
    torch.testing.assert_close(ours[1], pixart.forward_intermediates(x, 100, [1])[1], rtol=0, atol=0)
    assert generic.family == "diffusers" and generic.time.name == "ddpm"


def test_family_is_sniffed_from_the_transformer_config_and_a_bad_root_is_named(roots, tmp_path):
    assert [sniff_family(roots[f]) for f in ("pixart", "sd3", "flux")] == ["pixart", "sd3", "flux"]
    with pytest.raises(CheckpointError, match=r"no transformer/config.json"):
        sniff_family(tmp_path)


def test_layers_table_needs_only_the_configs(roots, tmp_path):
    """The weights file is removed from a copy of the pipeline: the table is built from configs alone."""
    import shutil

    root = shutil.copytree(roots["flux"], tmp_path / "flux", ignore=shutil.ignore_patterns("*.safetensors"))
    table = str(describe_source(root)).splitlines()
    assert table[0] == "flux (image), 4 blocks"
    assert table[1].startswith("time: flow 0..1, clean = 0")
    assert table[-2:] == ["    2  single_transformer_blocks.0      16", "    3  single_transformer_blocks.1      16"]
