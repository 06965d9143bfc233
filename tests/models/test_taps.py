"""Features after the AdaLN modulation (``tap="modulated"``, DiTF's recipe) for every DiT-style family, against
hooks on the untouched reference forward: what the official DiT's attention reads (``modulate(norm1(x), shift_msa,
scale_msa)``), the first output of diffusers' ``norm1`` / ``norm1_context`` / single-stream ``norm`` (AdaLayerNormZero,
AdaLayerNormZeroSingle, AdaLayerNormContinuous) and PixArt's inline ``norm1(x) * (1 + scale_msa) + shift_msa``
(what its ``attn1`` reads); early exit by counting block calls; massive channels suppressed before the norm by hand;
FLUX guidance and the flow shift option against diffusers' own computation."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    StableDiffusion3Pipeline,
    Transformer2DModel,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from tests.models import tiny_pipelines
from tests.models.test_dit import diffusers_twin, make_dit
from tests.models.test_dit import latents as dit_latents
from tests.models.tiny_pipelines import TEXT_LEN, empty_prompt

from difffeat.features.extract import ImageFeatureExtractor
from difffeat.models.base import Clean
from difffeat.models.diffusers_dits import DiffusersBackbone, FluxBackbone, load_diffusers_backbone
from difffeat.models.dit import DiT, DiTConfig
from difffeat.models.dit_adapter import DiTAdapter
from difffeat.models.massive import MassiveChannels
from difffeat.models.sit import SiTBackbone

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def record(modules: dict, kind: str = "output") -> tuple[dict, list]:
    """Hooks recording each module's first output (``kind="output"``) or first input (``"input"``)."""
    seen: dict = {}

    def hook(key):
        if kind == "input":
            return lambda m, args, kwargs: seen.__setitem__(key, args[0] if args else kwargs["hidden_states"])
        return lambda m, args, out: seen.__setitem__(key, out[0] if isinstance(out, tuple) else out)

    if kind == "input":
        return seen, [m.register_forward_pre_hook(hook(k), with_kwargs=True) for k, m in modules.items()]
    return seen, [m.register_forward_hook(hook(k)) for k, m in modules.items()]


def run_hooked(modules: dict, kind: str, fn) -> dict:
    seen, handles = record(modules, kind)
    try:
        fn()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def block_calls(blocks, fn) -> Counter:
    calls = Counter()
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: calls.update([i])) for i, b in enumerate(blocks)]
    try:
        fn()
    finally:
        for handle in handles:
            handle.remove()
    return calls


# --- DiT (official and diffusers numerics) and SiT --------------------------------------------------------------


@pytest.mark.parametrize("numerics", ["official", "diffusers"])
def test_dit_modulated_tap_is_what_each_blocks_attention_reads_and_stops_before_the_block(numerics):
    model = make_dit(numerics=numerics)
    x, t, y = dit_latents(2), torch.tensor([10, 600]), torch.tensor([3, 10])
    reference = run_hooked({i: b.attn for i, b in enumerate(model.blocks)}, "input", lambda: model(x, t, y))
    calls = block_calls(model.blocks, lambda: model.forward_intermediates(x, t, y, [0, 1], tap="modulated"))
    ours = model.forward_intermediates(x, t, y, [0, 1], tap="modulated")
    assert calls == Counter({0: 1}), "block 1 ran although only its modulated input was asked for"
    for i in (0, 1):
        torch.testing.assert_close(ours[i], reference[i], rtol=0, atol=ATOL)
    assert (ours[1] - model.forward_intermediates(x, t, y, [1])[1]).abs().max() > 0.1  # not the output


def test_dit_diffusers_numerics_modulated_tap_equals_diffusers_norm1():
    model = make_dit(numerics="diffusers")
    twin = diffusers_twin(model)
    x, t, y = dit_latents(2), torch.tensor([10, 600]), torch.tensor([3, 10])
    norms = {i: b.norm1 for i, b in enumerate(twin.transformer_blocks)}
    reference = run_hooked(norms, "output", lambda: twin(x, timestep=t, class_labels=y))
    ours = model.forward_intermediates(x, t, y, [0, 2], tap="modulated")
    for i in (0, 2):
        torch.testing.assert_close(ours[i], reference[i], rtol=0, atol=ATOL)


def test_the_generic_adapter_reads_diffusers_dit_norm1_like_our_dit():
    model = make_dit(numerics="diffusers")
    twin = diffusers_twin(model)
    x, y = dit_latents(2), torch.tensor([3, 10])
    generic = DiffusersBackbone(twin, {"_class_name": "DDPMScheduler"}, fixed_inputs={"class_labels": y})
    ours = generic.forward_intermediates(x, torch.tensor([10.0, 600.0]), [1], tap="modulated")[1]
    expected = model.forward_intermediates(x, torch.tensor([10, 600]), y, [1], tap="modulated")[1]
    torch.testing.assert_close(ours, expected, rtol=0, atol=ATOL)


def test_a_block_without_an_adaln_norm_is_refused_with_the_option_named():
    torch.manual_seed(0)
    plain = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1,
                               norm_num_groups=2).eval()  # fmt: skip
    backbone = DiffusersBackbone(plain, {"_class_name": "DDPMScheduler"})
    with pytest.raises(ValueError, match=r"image\.tap: modulated.*block 0 \(transformer_blocks\.0.*LayerNorm"):
        backbone.forward_intermediates(torch.randn(1, 4, 4, 4), 10.0, [0], tap="modulated")


def test_sit_modulated_tap_reads_the_flow_time():
    backbone = SiTBackbone(make_dit())
    x, t = dit_latents(2), torch.tensor([0.3, 0.3])
    model = backbone.module
    reference = run_hooked({1: model.blocks[1].attn}, "input", lambda: backbone.velocity(x, t))
    ours = backbone.forward_intermediates(x, t, [1], tap="modulated", y=torch.tensor([10, 10]))
    torch.testing.assert_close(ours[1], reference[1], rtol=0, atol=ATOL)


def one_token_dit() -> DiT:
    """A DiT whose block-0 input is the input pixel itself (1x1 patch, identity embedding, no position term) and
    whose block-0 modulation is the identity (shift = scale = 0): its modulated tap is LayerNorm of the pixel."""
    model = DiT(DiTConfig(input_size=1, patch_size=1, in_channels=4, hidden_size=4, depth=2, num_heads=1)).eval()
    model.x_embedder.proj.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
    model.pos_embed.zero_()
    return model  # the official init zeroes every adaLN layer


def test_massive_zero_with_the_modulated_tap_zeroes_the_channel_before_the_norm():
    x = torch.tensor([1.0, 2.0, 3.0, 1000.0]).view(1, 4, 1, 1)
    suppress = MassiveChannels({0: [3]}, "zero").apply
    ours = one_token_dit().forward_intermediates(x, 0, None, [0], tap="modulated", suppress=suppress)[0]
    # [1, 2, 3, 0]: mean 1.5, variance (0.25 + 0.25 + 2.25 + 2.25) / 4 = 1.25; LayerNorm eps 1e-6
    expected = torch.tensor([-0.5, 0.5, 1.5, -1.5]) / (1.25 + 1e-6) ** 0.5
    torch.testing.assert_close(ours.flatten(), expected, rtol=0, atol=1e-6)
    after = MassiveChannels({0: [3]}, "zero").apply(
        0, one_token_dit().forward_intermediates(x, 0, None, [0], tap="modulated")[0]
    )
    assert (after.flatten() - expected).abs().max() > 0.3  # zeroing after the norm is another feature


def test_the_extractor_hands_the_massive_channels_to_the_backbone_for_the_modulated_tap():
    adapter = DiTAdapter(make_dit())
    extractor = ImageFeatureExtractor(adapter)
    x = dit_latents(2)
    massive = MassiveChannels({1: [0, 5]}, "zero")
    feats = extractor(latents=x, blocks=[1], timesteps=[0], tap="modulated", massive=massive, pool="none")
    xt = adapter.noise(Clean(x), 0, [0, 1], 0)
    expected = adapter.forward_intermediates(xt, adapter.model_time(0, 2), [1], tap="modulated", massive=massive)
    torch.testing.assert_close(feats[(1, 0)], expected[1], rtol=0, atol=ATOL)
    assert feats[(1, 0)][..., [0, 5]].abs().min() > 0  # suppressed before the norm, not zero after it
    with pytest.raises(ValueError, match="tap 'sideways'"):
        extractor(latents=x, blocks=[1], timesteps=[0], tap="sideways")


# --- diffusers families ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipelines")
    return {name: getattr(tiny_pipelines, f"save_{name}")(base / name) for name in ("pixart", "sd3", "flux")}


def latents(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def expanded(cond: dict, n: int = 2) -> dict:
    return {k: v.expand(n, *v.shape[1:]) for k, v in cond.items()}


def test_pixart_modulated_tap_is_what_attn1_reads_and_stops_inside_the_block(roots):
    backbone = load_diffusers_backbone(roots["pixart"], max_sequence_length=TEXT_LEN)
    x, t = latents(), 400
    added = {"resolution": None, "aspect_ratio": None}
    cond = expanded(empty_prompt(PixArtSigmaPipeline, roots["pixart"], "pixart"))
    kwargs = {"hidden_states": x, "timestep": torch.tensor([t, t]), "added_cond_kwargs": added, **cond}
    blocks = backbone.module.transformer_blocks
    reference = run_hooked({i: b.attn1 for i, b in enumerate(blocks)}, "input",
                           lambda: backbone.module(**kwargs, return_dict=False))  # fmt: skip
    attn_calls = block_calls(
        [b.attn1 for b in blocks], lambda: backbone.forward_intermediates(x, t, [0, 1], tap="modulated")
    )
    assert attn_calls == Counter({0: 1}), "block 1's attention ran although only its modulated input was asked for"
    ours = backbone.forward_intermediates(x, t, [0, 1], tap="modulated")
    for i in (0, 1):
        torch.testing.assert_close(ours[i], reference[i], rtol=0, atol=ATOL)


def sd3_kwargs(roots, x, t: float) -> dict:
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(roots["sd3"]), subfolder="scheduler")
    sigma = scheduler.sigmas[round((1 - t) * 1000)]
    cond = expanded(empty_prompt(StableDiffusion3Pipeline, roots["sd3"], "sd3"))
    return {"hidden_states": x, "timestep": torch.full((2,), float(sigma) * 1000), **cond}


def test_sd3_modulated_tap_equals_norm1_and_norm1_context_for_each_stream(roots):
    backbone = load_diffusers_backbone(roots["sd3"], max_sequence_length=TEXT_LEN)
    x, t = latents(), 0.3
    blocks = backbone.module.transformer_blocks
    norms = {(i, s): getattr(b, n) for i, b in enumerate(blocks) for s, n in (("image", "norm1"), ("text",
             "norm1_context"))}  # fmt: skip
    reference = run_hooked(norms, "output", lambda: backbone.module(**sd3_kwargs(roots, x, t), return_dict=False))
    assert block_calls(blocks, lambda: backbone.forward_intermediates(x, t, [1], tap="modulated")) == Counter(
        {0: 1, 1: 1}
    )
    for stream in ("image", "text", "both"):
        backbone.stream = stream
        ours = backbone.forward_intermediates(x, t, [0, 2], tap="modulated")  # block 2's text norm: continuous
        for i in (0, 2):
            parts = [reference[(i, s)] for s in ("text", "image") if stream in (s, "both")]
            torch.testing.assert_close(ours[i], torch.cat(parts, dim=1), rtol=0, atol=ATOL)


def flux_kwargs(roots, x, t: float, guidance: float = 3.5) -> dict:
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(roots["flux"]), subfolder="scheduler")
    scheduler.set_timesteps(sigmas=np.array([t]), mu=calculate_shift(16, 256, 4096, 0.5, 1.15))
    return {
        "hidden_states": FluxPipeline._pack_latents(x, 2, 4, 8, 8),
        "timestep": scheduler.timesteps[:1].expand(2) / 1000,
        "guidance": torch.full((2,), guidance),
        "img_ids": FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
        "txt_ids": torch.zeros(TEXT_LEN, 3),
        **expanded(empty_prompt(FluxPipeline, roots["flux"], "flux")),
    }


def flux_norms(transformer) -> dict:
    double = {(i, s): getattr(b, n) for i, b in enumerate(transformer.transformer_blocks)
              for s, n in (("image", "norm1"), ("text", "norm1_context"))}  # fmt: skip
    first = len(transformer.transformer_blocks)
    return double | {(first + j, "joint"): b.norm for j, b in enumerate(transformer.single_transformer_blocks)}


@pytest.mark.parametrize("stream", ["image", "text", "both"])
def test_flux_modulated_tap_equals_double_and_single_block_norms(roots, stream):
    backbone = load_diffusers_backbone(roots["flux"], max_sequence_length=TEXT_LEN, stream=stream)
    x, t = latents(), 0.5
    reference = run_hooked(flux_norms(backbone.module), "output",
                           lambda: backbone.module(**flux_kwargs(roots, x, t), return_dict=False))  # fmt: skip
    ours = backbone.forward_intermediates(x, t, [1, 3], tap="modulated")
    double = torch.cat([reference[(1, s)] for s in ("text", "image") if stream in (s, "both")], dim=1)
    torch.testing.assert_close(ours[1], double, rtol=0, atol=ATOL)
    joint = reference[(3, "joint")]  # [text; image] through the single block's AdaLayerNormZeroSingle
    single = {"image": joint[:, TEXT_LEN:], "text": joint[:, :TEXT_LEN], "both": joint}[stream]
    torch.testing.assert_close(ours[3], single, rtol=0, atol=ATOL)
    calls = block_calls(
        [b for _, b in backbone._blocks], lambda: backbone.forward_intermediates(x, t, [2], tap="modulated")
    )
    assert calls == Counter({0: 1, 1: 1, 2: 1})  # block 2 entered, stopped in its norm; block 3 never


def test_flux_massive_channels_are_suppressed_on_the_block_input_before_its_norm(roots):
    backbone = load_diffusers_backbone(roots["flux"], max_sequence_length=TEXT_LEN)
    x, t, massive = latents(), 0.5, MassiveChannels({2: [1, 4]}, "zero")
    ours = backbone.forward_intermediates(x, t, [2], tap="modulated", massive=massive)[2]
    block_input = backbone.forward_intermediates(x, t, [2], tap="input")[2]
    assert block_input.shape == ours.shape  # the image tokens of the single block's [text; image] input
    norm = backbone.module.single_transformer_blocks[0].norm
    kwargs = flux_kwargs(roots, x, t)
    seen = {}  # the conditioning the single block hands its norm
    handle = norm.register_forward_pre_hook(lambda m, a, k: seen.update(emb=k["emb"]), with_kwargs=True)
    try:
        backbone.module(**kwargs, return_dict=False)
    finally:
        handle.remove()
    expected = norm(massive.apply(2, block_input), emb=seen["emb"])[0]
    torch.testing.assert_close(ours, expected, rtol=0, atol=ATOL)
    assert (ours - backbone.forward_intermediates(x, t, [2], tap="modulated")[2]).abs().max() > 0.01


# --- FLUX guidance and the flow shift ----------------------------------------------------------------------------


def test_flux_guidance_option_is_what_the_guidance_embedding_reads(roots):
    backbone = load_diffusers_backbone(roots["flux"], max_sequence_length=TEXT_LEN, guidance=5.0)
    x, t = latents(), 0.5
    reference = run_hooked(flux_norms(backbone.module), "output",
                           lambda: backbone.module(**flux_kwargs(roots, x, t, 5.0), return_dict=False))  # fmt: skip
    torch.testing.assert_close(backbone.forward_intermediates(x, t, [0], tap="modulated")[0],
                               reference[(0, "image")], rtol=0, atol=ATOL)  # fmt: skip
    default = load_diffusers_backbone(roots["flux"], max_sequence_length=TEXT_LEN)
    assert default.guidance == 3.5
    assert (default.forward_intermediates(x, t, [0])[0] - backbone.forward_intermediates(x, t, [0])[0]).abs().max() > 0


def test_a_model_without_a_guidance_embedder_refuses_guidance(roots):
    torch.manual_seed(0)
    schnell = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=False, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0}
    assert FluxBackbone(schnell, config).guidance is None
    with pytest.raises(ValueError, match=r"guidance=2\.0: .*no guidance embedder.*FLUX\.1-schnell"):
        FluxBackbone(schnell, config, guidance=2.0)
    with pytest.raises(ValueError, match="no guidance embedder"):
        load_diffusers_backbone(roots["sd3"], max_sequence_length=TEXT_LEN, guidance=3.5)


def test_sd3_shift_option_equals_the_scheduler_with_that_shift(roots):
    backbone = load_diffusers_backbone(roots["sd3"], max_sequence_length=TEXT_LEN, shift=1.5)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(roots["sd3"]), subfolder="scheduler", shift=1.5)
    x0, eps = latents(2), latents(2, seed=1)
    for index in (0, 200, 750, 999):
        t = 1 - index / 1000
        expected = scheduler.scale_noise(x0, scheduler.timesteps[index : index + 1].expand(2), eps)
        torch.testing.assert_close(backbone.interpolate(x0, eps, t), expected, rtol=0, atol=1e-6)


def test_flux_shift_option_replaces_the_dynamic_shift_by_a_static_one(roots):
    backbone = load_diffusers_backbone(roots["flux"], max_sequence_length=TEXT_LEN, shift=2.0)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
        str(roots["flux"]), subfolder="scheduler", shift=2.0, use_dynamic_shifting=False
    )
    grid = np.linspace(1.0, 1 / 8, 8)
    scheduler.set_timesteps(sigmas=grid)
    x0, eps = latents(2), latents(2, seed=1)
    for i, t in enumerate(grid):
        expected = scheduler.scale_noise(x0, scheduler.timesteps[i : i + 1].expand(2), eps)
        torch.testing.assert_close(backbone.interpolate(x0, eps, float(t)), expected, rtol=0, atol=1e-6)
    kwargs = backbone.model_inputs(x0, 0.5, backbone.condition(2))
    torch.testing.assert_close(kwargs["timestep"], torch.full((2,), 2 * 0.5 / (1 + 0.5)), rtol=0, atol=1e-6)


def test_a_ddpm_model_refuses_a_flow_shift(roots):
    with pytest.raises(ValueError, match="pixart model has DDPM time, which has no flow shift"):
        load_diffusers_backbone(roots["pixart"], max_sequence_length=TEXT_LEN, shift=2.0)
