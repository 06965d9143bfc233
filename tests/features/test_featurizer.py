"""The front door: featurizers loaded from the layouts users have, checked against the reference models' own
forwards (hooks on diffusers' DiT, the DDiT's forward), keyed as asked, with clear refusals."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel

import difffeat
from difffeat.features.featurizer import Features, ImageFeaturizer, TextFeaturizer
from difffeat.models import base
from difffeat.models.dit import DiT, DiTConfig
from difffeat.models.dit_adapter import DiTAdapter
from difffeat.models.dit_load import dit_to_diffusers_state_dict
from difffeat.models.schedule import DDPMSchedule, per_sample_randn
from difffeat.models.vae import images_to_tensor
from helpers import CAPTIONS, TINY_WIDTH, assert_features_close, images, randomise, save_tiny_models, tiny_dit


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def image_f(tiny_folders):
    return ImageFeaturizer.from_pretrained(tiny_folders[0], device="cpu")


@pytest.fixture(scope="module")
def text_f(tiny_folders):
    return TextFeaturizer.from_pretrained(tiny_folders[1], device="cpu")


def diffusers_pipeline(root):
    """A DiT pipeline root written by diffusers itself: ``transformer/`` (4 latent channels) and a tiny ``vae/``."""
    cfg = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, num_classes=5)
    model = randomise(DiT(cfg))
    twin = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                 num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=5,
                                 norm_eps=1e-5)  # fmt: skip
    twin.load_state_dict(dit_to_diffusers_state_dict(model.state_dict(), cfg.depth), strict=True)
    twin.save_pretrained(root / "transformer")
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=4,
                        latent_channels=4, sample_size=16)  # fmt: skip
    vae.save_pretrained(root / "vae")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    return twin.eval(), vae.eval()


def test_a_diffusers_pipeline_gives_hooked_diffusers_features_with_its_own_vae(tmp_path):
    twin, vae = diffusers_pipeline(tmp_path)
    f = ImageFeaturizer.from_pretrained(tmp_path, numerics="diffusers", sample_posterior=False, device="cpu")
    assert f.backbone.image_size == 16  # 8 latent cells x 2 pixels per cell for this 2-level VAE
    x = np.random.default_rng(0).integers(0, 256, size=(3, 20, 24, 3), dtype=np.uint8)
    feats = f(x, blocks=[0, -1], timesteps=[300], ids=["a", "b", "c"], seed=5)
    with torch.no_grad():  # the reference: diffusers' VAE mean, DiT's q_sample, hooks on diffusers' full forward
        z = vae.encode(images_to_tensor(x, 16)).latent_dist.mean * vae.config.scaling_factor
        xt = DDPMSchedule().q_sample(z, 300, per_sample_randn(z.shape[1:], ["a", "b", "c"], 5, 300))
        seen = {}
        for b in (0, 2):
            twin.transformer_blocks[b].register_forward_hook(lambda m, i, o, b=b: seen.__setitem__(b, o))
        twin(xt, timestep=torch.full((3,), 300), class_labels=torch.full((3,), 5))
    # Our VAE runs channels-last (other conv kernels): the VAE's 14 layers, then the embedding and the blocks.
    for b, key in ((0, (0, 300)), (2, (-1, 300))):
        assert_features_close(feats[key], seen[b].mean(dim=1), depth=14 + b + 2, width=TINY_WIDTH, what=f"{key}")


def test_features_are_keyed_as_asked_and_by_normalised_index(image_f):
    feats = image_f(_images32(2), blocks=[-1, 1], timesteps=[0, 100])
    assert isinstance(feats, Features)
    assert list(feats) == [(-1, 0), (-1, 100), (1, 0), (1, 100)]
    assert feats[(3, 100)] is feats[(-1, 100)]
    assert feats[(1, 100.0)] is feats[(1, 100)] is feats[(np.int64(1), np.int64(100))]
    assert feats[(-1, 0)].shape == (2, 32)
    assert (2, 0) not in feats and (9, 0) not in feats and "x" not in feats
    with pytest.raises(KeyError):
        feats[(2, 0)]


def _images32(n: int) -> np.ndarray:
    """uint8 images at the saved tiny DiT's 32 px."""
    return np.random.default_rng(n).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def test_image_features_equal_hooks_on_the_loaded_models_full_forward(image_f):
    x = _images32(3)
    feats = image_f(x, blocks=[2], timesteps=[250], ids=["p", "q", "r"], seed=1)
    model = image_f.backbone.module
    x0 = images_to_tensor(x, 32)
    xt = DDPMSchedule().q_sample(x0, 250, per_sample_randn(x0.shape[1:], ["p", "q", "r"], 1, 250))
    seen = {}
    handle = model.blocks[2].register_forward_hook(lambda m, i, o: seen.__setitem__(2, o))
    with torch.no_grad():
        model(xt, torch.full((3,), 250), torch.full((3,), model.null_class))
    handle.remove()
    assert_features_close(feats[(2, 250)], seen[2].mean(dim=1), depth=4, width=TINY_WIDTH, what="block 2")


def test_text_features_equal_the_ddits_forward_over_real_tokens(text_f):
    feats = text_f([CAPTIONS[0], CAPTIONS[3]], blocks=[-1], timesteps=[0])
    tok = text_f.backbone.tokenizer
    model = text_f.backbone.module
    for i, caption in enumerate([CAPTIONS[0], CAPTIONS[3]]):
        ids, _, _ = tok.encode_batch([caption], 24)
        with torch.no_grad():
            tokens = model.forward_intermediates(ids, torch.zeros(1), [model.depth - 1])[model.depth - 1][0]
        assert_features_close(feats[(-1, 0)][i], tokens.mean(dim=0), depth=4, width=TINY_WIDTH, what=caption)


def test_an_int_block_count_and_a_bare_time_are_refused_clearly(image_f, text_f):
    with pytest.raises(ValueError, match=r"ambiguous.*last 3 blocks.*blocks=\[3\]"):
        image_f(_images32(1), blocks=3, timesteps=[0])
    with pytest.raises(ValueError, match=r"timesteps=\[100\]"):
        text_f(["a"], blocks=[0], timesteps=100)
    with pytest.raises(ValueError, match=r"0\.\.999 \(ddpm"):
        image_f(_images32(1), blocks=[0], timesteps=[1000])
    with pytest.raises(ValueError, match=r"0\.\.1000 \(masked"):
        text_f(["a"], blocks=[0], timesteps=[0.5])


def test_layers_name_every_block_with_its_width_and_the_time_convention(image_f, text_f):
    layers = image_f.layers()
    assert [(b.index, b.name, b.width) for b in layers] == [(i, f"blocks.{i}", 32) for i in range(4)]
    assert layers.time.name == "ddpm" and text_f.layers().time.name == "masked"
    shown = str(text_f.layers())
    assert "ddit (text), 3 blocks" in shown and "masked 0..1000" in shown and "blocks.2" in shown


def test_the_demo_models_load_by_name():
    f = TextFeaturizer.from_pretrained("demo", device="cpu")
    assert f.backbone.tokenizer.add_special == "none"  # the zoo trains on bare captions
    feats = f(["two fives on a dark background"], blocks=[0], timesteps=[0])
    assert feats[(0, 0)].shape == (1, f.layers()[0].width)
    assert ImageFeaturizer.from_pretrained("demo", device="cpu").layers().family == "dit"


def test_sources_no_family_recognises_are_clear_errors(tiny_folders, tmp_path):
    with pytest.raises(ValueError, match="cannot tell which image backbone.*backbone= one of dit"):
        ImageFeaturizer.from_pretrained(tiny_folders[1])  # a text model handed to the image side
    with pytest.raises(ValueError, match="cannot tell"):
        TextFeaturizer.from_pretrained(tmp_path / "nothing-here")
    with pytest.raises(ValueError, match="reads text, not image"):
        ImageFeaturizer.from_pretrained(tiny_folders[1], backbone="ddit")
    with pytest.raises(ValueError, match="needs its VAE: pass vae="):
        DiTAdapter.from_pretrained(str(_save_latent_dit(tmp_path)))


def _save_latent_dit(folder):
    from difffeat.models.dit_load import save_dit

    return save_dit(tiny_dit(in_channels=4), folder / "latent-dit")


def test_a_new_family_is_one_registered_adapter(monkeypatch):
    class Toy(DiTAdapter):
        family = "toy"

        @classmethod
        def from_pretrained(cls, source, **options):
            return cls(tiny_dit())

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    base.register_backbone("toy", Toy)
    with pytest.raises(ValueError, match="already registered"):
        base.register_backbone("toy", Toy)
    f = ImageFeaturizer.from_pretrained("anything", backbone="toy", device="cpu")
    assert f.layers().family == "toy" and "toy" in base.families("image")
    assert f(images(1), blocks=[0], timesteps=[0])[(0, 0)].shape == (1, 32)


def test_device_and_to(image_f):
    assert image_f.device == torch.device("cpu")
    assert image_f.to("cpu") is image_f


def test_import_difffeat_is_lazy_and_exports_the_api():
    code = "import sys, difffeat; print('torch' in sys.modules, set(difffeat.__all__) <= set(dir(difffeat)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False"  # nothing heavy until a name is touched
    for name in difffeat.__all__:
        assert getattr(difffeat, name) is not None
    assert difffeat.ImageFeaturizer is ImageFeaturizer
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        difffeat.nope  # noqa: B018


# --- massive activations -------------------------------------------------------------------------------------------


@pytest.fixture
def planted_f(tiny_folders):
    """A featurizer whose residual stream carries one massive channel (7) from the patch embedding on, as the
    massive activations of real DiTs persist through the blocks."""
    f = ImageFeaturizer.from_pretrained(tiny_folders[0], device="cpu", massive="zero")
    with torch.no_grad():
        f.backbone.module.x_embedder.proj.bias[7] += 1000.0
    return f


def hooked_tokens(f, x, block: int, t: int, ids, seed: int) -> torch.Tensor:
    model = f.backbone.module
    x0 = images_to_tensor(x, 32)
    xt = DDPMSchedule().q_sample(x0, t, per_sample_randn(x0.shape[1:], ids, seed, t))
    seen = {}
    handle = model.blocks[block].register_forward_hook(lambda m, i, o: seen.__setitem__(block, o))
    with torch.no_grad():
        model(xt, torch.full((len(ids),), t), torch.full((len(ids),), model.null_class))
    handle.remove()
    return seen[block]


def test_massive_channels_are_found_on_a_calibration_batch_and_suppressed_before_pooling(planted_f):
    with pytest.raises(ValueError, match=r"blocks \[1\]: call f.calibrate"):
        planted_f(_images32(2), blocks=[1], timesteps=[100])
    found = planted_f.calibrate(_images32(4), blocks=[1, -1], timesteps=[0, 100])
    assert found == planted_f.massive_channels == {1: [7], 3: [7]}
    x, ids = _images32(3), ["p", "q", "r"]
    tokens = hooked_tokens(planted_f, x, 1, 100, ids, seed=2)
    assert tokens[..., 7].abs().min() > 100  # the planted channel is there in the untouched forward
    zeroed = planted_f(x, blocks=[1], timesteps=[100], ids=ids, seed=2)[(1, 100)]
    expected = tokens.clone()
    expected[..., 7] = 0
    torch.testing.assert_close(zeroed, expected.mean(dim=1), rtol=1e-5, atol=1e-5)
    planted_f.massive = "normalise"  # its mean over tokens is 0 by construction: it matters for tokens / token_norm
    normalised = planted_f(x, blocks=[1], timesteps=[100], ids=ids, seed=2, pool="none")[(1, 100)]
    channel = tokens[..., 7]
    expected[..., 7] = (channel - channel.mean(dim=1, keepdim=True)) / channel.std(dim=1, keepdim=True, unbiased=False)
    torch.testing.assert_close(normalised, expected, rtol=1e-5, atol=1e-4)  # fp32 at magnitude 1000: ~6e-5
    others = [c for c in range(32) if c != 7]
    torch.testing.assert_close(zeroed[:, others], tokens[..., others].mean(dim=1), rtol=1e-5, atol=1e-5)


def test_a_random_model_has_no_massive_channels_and_bad_modes_are_refused(tiny_folders):
    f = ImageFeaturizer.from_pretrained(tiny_folders[0], device="cpu")
    assert f.calibrate(_images32(4), blocks=[0, 2], timesteps=[50]) == {0: [], 2: []}
    with pytest.raises(ValueError, match=r"massive must be one of \('none', 'zero', 'normalise'\)"):
        ImageFeaturizer.from_pretrained(tiny_folders[0], device="cpu", massive="clip")


def test_modulated_tap_finds_the_massive_channels_on_block_inputs_and_zeroes_them_before_the_norm(tiny_folders):
    f = ImageFeaturizer.from_pretrained(tiny_folders[0], device="cpu", massive="zero", tap="modulated")
    model = f.backbone.module
    with torch.no_grad():
        model.x_embedder.proj.bias[7] += 1000.0  # channel 7 of every block's input, as in planted_f
    assert f.calibrate(_images32(4), blocks=[1], timesteps=[0, 100]) == {1: [7]}
    x, ids = _images32(3), ["p", "q", "r"]
    x0 = images_to_tensor(x, 32)
    xt = DDPMSchedule().q_sample(x0, 100, per_sample_randn(x0.shape[1:], ids, 2, 100))
    seen = {}  # block 1's input and conditioning in the untouched forward
    handle = model.blocks[1].register_forward_pre_hook(lambda m, args: seen.update(h=args[0], c=args[1]))
    with torch.no_grad():
        model(xt, torch.full((3,), 100), torch.full((3,), model.null_class))
        handle.remove()
        h = seen["h"].clone()
        h[..., 7] = 0
        expected = model.blocks[1].modulated_input(h, seen["c"]).mean(dim=1)
    ours = f(x, blocks=[1], timesteps=[100], ids=ids, seed=2)[(1, 100)]
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"tap must be one of \('output', 'modulated'\)"):
        ImageFeaturizer.from_pretrained(tiny_folders[0], device="cpu", tap="input")
