import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from difffeat.features.extract import ImageFeatureExtractor
from difffeat.models.schedule import DDPMSchedule, LogLinearSchedule, per_sample_randn
from difffeat.models.vae import images_to_tensor
from helpers import CAPTIONS, TINY_WIDTH, assert_features_close, images, tiny_dit


def hooked_reference(dit, x0, t, keys, seed, blocks):
    """Block outputs from forward hooks on a full forward of the same model (independent of early exit)."""
    xt = DDPMSchedule().q_sample(x0, t, per_sample_randn(x0.shape[1:], keys, seed, t))
    seen = {}
    handles = [dit.blocks[b].register_forward_hook(lambda m, i, o, b=b: seen.__setitem__(b, o)) for b in blocks]
    with torch.no_grad():
        dit(xt, torch.full((len(x0),), t), torch.full((len(x0),), dit.null_class))
    for h in handles:
        h.remove()
    return seen


def test_image_features_equal_hooks_on_a_full_forward(image_ex):
    x = images(3)
    out = image_ex(x, blocks=[1, -1], timesteps=[0, 250], seed=7, ids=["a", "b", "c"])
    assert set(out) == {(1, 0), (3, 0), (1, 250), (3, 250)}
    x0 = image_ex.encode(x)
    for t in (0, 250):
        ref = hooked_reference(image_ex.dit, x0, t, ["a", "b", "c"], 7, [1, 3])
        for b in (1, 3):
            assert_features_close(out[(b, t)], ref[b].mean(dim=1), depth=b + 2, width=TINY_WIDTH, what=f"({b}, {t})")


def test_a_samples_feature_does_not_depend_on_its_batch(image_ex):
    x = images(4)
    ids = ["w", "x", "y", "z"]
    full = image_ex(x, blocks=[2], timesteps=[100], ids=ids)[(2, 100)]
    alone = image_ex(x[2:3], blocks=[2], timesteps=[100], ids=["y"])[(2, 100)]
    reordered = image_ex(x[[3, 2]], blocks=[2], timesteps=[100], ids=["z", "y"])[(2, 100)]
    assert_features_close(full[2], alone[0], depth=4, width=TINY_WIDTH, what="batch of 4 vs alone")
    assert_features_close(full[2], reordered[1], depth=4, width=TINY_WIDTH, what="batch of 4 vs another pair")
    other_seed = image_ex(x[2:3], blocks=[2], timesteps=[100], ids=["y"], seed=1)[(2, 100)]
    assert not torch.allclose(alone, other_seed)


def test_pil_and_uint8_inputs_agree_and_latents_skip_encoding(image_ex):
    x = images(2)
    a = image_ex(x, blocks=[0], timesteps=[10])[(0, 10)]
    b = image_ex([Image.fromarray(i) for i in x], blocks=[0], timesteps=[10])[(0, 10)]
    c = image_ex(latents=image_ex.encode(x), blocks=[0], timesteps=[10])[(0, 10)]
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_pool_none_token_norm_and_ensemble(image_ex):
    x = images(2)
    tokens = image_ex(x, blocks=[1], timesteps=[50], pool="none")[(1, 50)]
    assert tokens.shape == (2, 16, 32)
    mean = image_ex(x, blocks=[1], timesteps=[50])[(1, 50)]
    torch.testing.assert_close(mean, tokens.mean(dim=1))
    normed = image_ex(x, blocks=[1], timesteps=[50], token_norm=True)[(1, 50)]
    torch.testing.assert_close(normed, F.layer_norm(tokens, (32,)).mean(dim=1), rtol=1e-5, atol=1e-6)
    one = image_ex(x, blocks=[1], timesteps=[50], ensemble=1)[(1, 50)]
    three = image_ex(x, blocks=[1], timesteps=[50], ensemble=3)[(1, 50)]
    torch.testing.assert_close(one, mean)
    assert not torch.allclose(one, three)


@pytest.mark.parametrize("kwargs, match", [
    (dict(blocks=[4]), "out of range"), (dict(timesteps=[1000]), "0..999"), (dict(pool="max"), "pool"),
])  # fmt: skip
def test_bad_requests_are_clear_errors(image_ex, kwargs, match):
    with pytest.raises(ValueError, match=match):
        image_ex(images(1), **{"blocks": [0], "timesteps": [0], **kwargs})


def test_vae_latents_are_seeded_per_sample():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=4,
                        latent_channels=4, sample_size=32).eval()  # fmt: skip
    ex = ImageFeatureExtractor(tiny_dit(in_channels=4, input_size=16), vae, image_size=32)
    x = np.random.default_rng(1).integers(0, 256, size=(3, 40, 48, 3), dtype=np.uint8)
    z = ex.encode(x, ids=["a", "b", "c"], seed=3)
    assert z.shape == (3, 4, 16, 16)
    alone = ex.encode(x[1:2], ids=["b"], seed=3)  # 14 layers (13 convs, one attention over 16 x 16 latent pixels)
    assert_features_close(z[1:2], alone, depth=14, width=256, what="a latent in a batch of 3 vs alone")
    mean_only = ImageFeatureExtractor(ex.dit, vae, image_size=32, sample_posterior=False).encode(x[:1])
    with torch.no_grad():  # diffusers' own posterior mean, times the SD scaling factor
        ref = vae.encode(images_to_tensor(x[:1], 32)).latent_dist.mean * 0.18215
    torch.testing.assert_close(mean_only, ref)
    assert not torch.allclose(mean_only, z[:1])


def test_text_mean_over_captions_is_the_mean_of_single_caption_features(text_ex):
    caps = [[CAPTIONS[0], CAPTIONS[1]], [CAPTIONS[2]]]
    out = text_ex(caps, blocks=[-1], timesteps=[0], ids=["s0", "s1"])[(2, 0)]
    one = text_ex([CAPTIONS[0], CAPTIONS[1]], blocks=[-1], timesteps=[0])[(2, 0)]
    assert_features_close(out[0], one.mean(dim=0), depth=4, width=TINY_WIDTH, what="mean of two captions")
    alone = text_ex([CAPTIONS[2]], blocks=[-1], timesteps=[0])[(2, 0)][0]
    assert_features_close(out[1], alone, depth=4, width=TINY_WIDTH, what="one caption in a batch vs alone")
    first = text_ex(caps, blocks=[-1], timesteps=[0], caption_reduce="first")[(2, 0)]
    assert_features_close(first[0], one[0], depth=4, width=TINY_WIDTH, what="first caption")
    concat = text_ex(caps, blocks=[-1], timesteps=[0], caption_reduce="concat")[(2, 0)]
    assert not torch.allclose(concat[0], out[0])


def test_text_features_are_padding_and_batch_invariant_under_noise(text_ex):
    short, long = CAPTIONS[2], CAPTIONS[3]
    batch = text_ex([long, short], blocks=[0, 2], timesteps=[500], ids=["L", "S"], seed=4)
    alone = text_ex([short], blocks=[0, 2], timesteps=[500], ids=["S"], seed=4)
    for b in (0, 2):
        assert_features_close(batch[(b, 500)][1], alone[(b, 500)][0], depth=b + 2, width=TINY_WIDTH, what=f"block {b}")


def test_text_pooling_matches_a_hand_computation(text_ex):
    ids, mask = text_ex.tokenize([CAPTIONS[4]])
    sigma = LogLinearSchedule().sigma(0.0).float().expand(1)
    with torch.no_grad():
        tokens = text_ex.ddit.forward_intermediates(ids, sigma, [1], attention_mask=mask)[1][0]
    n = int(mask.sum())
    mean = text_ex([CAPTIONS[4]], blocks=[1], timesteps=[0])[(1, 0)][0]
    last = text_ex([CAPTIONS[4]], blocks=[1], timesteps=[0], pool="last")[(1, 0)][0]
    torch.testing.assert_close(mean, tokens[:n].mean(dim=0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(last, tokens[n - 1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="caption_reduce"):
        text_ex([CAPTIONS[0]], pool="none")
