"""SiT against the official transport code (its formulas re-typed here from willisma/SiT ``transport/path.py``
and ``models.py`` as the reference), its checkpoint layouts, and forward hooks on our own full forward."""

from __future__ import annotations

import argparse
import math
from collections import Counter

import numpy as np
import pytest
import torch
from tests.helpers import randomise

from difffeat.models.base import Clean
from difffeat.models.checkpoints import CheckpointError
from difffeat.models.describe import describe_source
from difffeat.models.dit import DiT, DiTConfig
from difffeat.models.sit import SIT_FLOW, SiTBackbone, load_sit

# A standard width (SiT-S: 384, 6 heads) so the loader reads the config from tensor shapes, as for real files.
CONFIG = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=384, depth=3, num_heads=6, num_classes=10)
NULL = CONFIG.num_classes


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def sit_file(tmp_path_factory):
    """A random SiT saved as the released files are: a plain state dict in a ``.pt``."""
    model = randomise(DiT(CONFIG), seed=3)
    path = tmp_path_factory.mktemp("sit") / "SiT-S-2-64x64.pt"
    torch.save(model.state_dict(), path)
    return path, model


# --- the official transport, re-typed from transport/path.py (ICPlan, GVPCPlan, VPCPlan.compute_mu_t) ----------


def official_xt(path: str, t: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """``compute_mu_t(t, x0, x1) = alpha_t * x1 + sigma_t * x0``; x0 is the noise, x1 the data."""
    t = t.view(t.size(0), *([1] * (x1.dim() - 1)))
    if path == "linear":
        alpha_t, sigma_t = t, 1 - t
    elif path == "gvp":
        alpha_t, sigma_t = torch.sin(t * np.pi / 2), torch.cos(t * np.pi / 2)
    else:
        sigma_min, sigma_max = 0.1, 20.0
        log_mean_coeff = -0.25 * ((1 - t) ** 2) * (sigma_max - sigma_min) - 0.5 * (1 - t) * sigma_min
        alpha_t = torch.exp(log_mean_coeff)
        sigma_t = torch.sqrt(1 - torch.exp(2 * log_mean_coeff))
    return alpha_t * x1 + sigma_t * x0


def official_timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: int = 10000) -> torch.Tensor:
    """models.py ``TimestepEmbedder.timestep_embedding``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


@pytest.mark.parametrize("path", ["linear", "gvp", "vp"])
def test_noising_equals_official_transport_on_the_same_noise(sit_file, path):
    backbone = SiTBackbone(sit_file[1], path=path)
    x1 = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.0, 0.1, 0.5, 0.93, 1.0])
    eps = torch.randn(x1.shape, generator=torch.Generator().manual_seed(1))
    ours = backbone.interpolate(x1, eps, t)
    torch.testing.assert_close(ours, official_xt(path, t, eps, x1), rtol=0, atol=2e-6)


def test_t_one_is_clean_and_t_zero_is_noise(sit_file):
    backbone = SiTBackbone(sit_file[1])
    x1 = torch.randn(2, 4, 8, 8)
    keys = ["a", "b"]
    torch.testing.assert_close(backbone.noise(Clean(x1), 1.0, keys, seed=0), x1, rtol=0, atol=0)
    noise_only = backbone.noise(Clean(x1), 0.0, keys, seed=0)
    assert torch.corrcoef(torch.stack([noise_only.flatten(), x1.flatten()]))[0, 1].abs() < 0.2
    assert SIT_FLOW.clean == 1.0


def test_noise_of_a_sample_does_not_depend_on_its_batch(sit_file):
    backbone = SiTBackbone(sit_file[1], path="gvp")
    x1 = torch.randn(3, 4, 8, 8)
    together = backbone.noise(Clean(x1), 0.3, ["a", "b", "c"], seed=7)
    alone = backbone.noise(Clean(x1[1:2]), 0.3, ["b"], seed=7)
    torch.testing.assert_close(together[1:2], alone, rtol=0, atol=0)
    assert not torch.equal(together[0], backbone.noise(Clean(x1[:1]), 0.3, ["a"], seed=8)[0])


def test_network_is_fed_the_flow_time_itself(sit_file):
    """The official training loss calls ``model(xt, t)`` with t in [0, 1]: the embedder must see 0.25, not 250."""
    backbone = SiTBackbone(sit_file[1])
    seen = []
    handle = backbone.module.t_embedder.mlp[0].register_forward_hook(lambda m, args, out: seen.append(args[0]))
    t = torch.tensor([0.25, 0.75])
    backbone.forward_intermediates(torch.randn(2, 4, 8, 8), t, [0])
    handle.remove()
    torch.testing.assert_close(seen[0], official_timestep_embedding(t), rtol=0, atol=1e-6)


def test_velocity_is_the_official_forward_without_the_sigma_channels(sit_file):
    backbone = SiTBackbone(sit_file[1])
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.2, 0.9]), torch.tensor([1, NULL])
    full = backbone.module(x, t, y)
    assert full.shape[1] == 8
    torch.testing.assert_close(backbone.velocity(x, t, y), full[:, :4], rtol=0, atol=0)


def test_ddpm_index_is_refused():
    backbone = SiTBackbone(DiT(CONFIG))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        backbone.forward_intermediates(torch.zeros(1, 4, 8, 8), 500, [0])
    with pytest.raises(ValueError, match="sit-flow"):
        backbone.noise(Clean(torch.zeros(1, 4, 8, 8)), 500, ["a"], seed=0)
    with pytest.raises(ValueError, match="Linear, GVP, VP"):
        SiTBackbone(DiT(CONFIG), path="cosine")


# --- loading -----------------------------------------------------------------------------------------------------


def test_official_file_loads_strictly_with_its_config_read_from_shapes(sit_file):
    path, model = sit_file
    backbone = load_sit(path)
    assert backbone.module.config == CONFIG
    for key, tensor in model.state_dict().items():
        assert torch.equal(backbone.module.state_dict()[key], tensor), key
    assert not any(p.requires_grad for p in backbone.module.parameters())


def test_training_checkpoint_prefers_ema(sit_file, tmp_path):
    model = sit_file[1]
    ema = model.state_dict()
    raw = {k: v + 1 for k, v in ema.items()}
    ckpt = {"model": raw, "ema": ema, "opt": {}, "args": argparse.Namespace(model="SiT-S/2", path_type="Linear")}
    torch.save(ckpt, tmp_path / "0400000.pt")
    loaded = load_sit(tmp_path / "0400000.pt")
    assert torch.equal(loaded.module.blocks[0].attn.qkv.weight, ema["blocks.0.attn.qkv.weight"])


def test_a_file_missing_a_block_tensor_is_refused(sit_file, tmp_path):
    sd = dict(sit_file[1].state_dict())
    del sd["blocks.1.mlp.fc2.bias"]
    torch.save(sd, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): blocks.1.mlp.fc2.bias"):
        load_sit(tmp_path / "broken.pt")


# --- early exit ----------------------------------------------------------------------------------------------------


def test_intermediates_equal_hooks_on_the_full_forward_and_later_blocks_never_run(sit_file):
    backbone = SiTBackbone(sit_file[1])
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.6])
    hooked, calls = {}, Counter()

    def record(index: int):
        def hook(module, args, out) -> None:
            hooked[index] = out
            calls.update([index])

        return hook

    handles = [block.register_forward_hook(record(i)) for i, block in enumerate(backbone.module.blocks)]
    backbone.velocity(x, t)  # y defaults to the null class on both sides
    assert calls == Counter({0: 1, 1: 1, 2: 1})
    calls.clear()
    ours = backbone.forward_intermediates(x, t, [0, 1])
    for handle in handles:
        handle.remove()
    assert calls == Counter({0: 1, 1: 1}), "block 2 ran although block 1 was the deepest asked for"
    assert sorted(ours) == [0, 1]
    for i in ours:
        torch.testing.assert_close(ours[i], hooked[i], rtol=0, atol=1e-6)
    assert [layer.name for layer in backbone.layers()] == ["blocks.0", "blocks.1", "blocks.2"]


def test_layers_table_of_a_sit_file_names_its_time_convention(sit_file):
    table = str(describe_source(sit_file[0], "sit")).splitlines()
    assert table[0] == "sit (image), 3 blocks"
    assert "clean = 1" in table[1] and "t = 0 pure noise" in table[1]
    assert table[-1] == "    2  blocks.2                         384"


def test_layers_table_refuses_to_guess_dit_for_a_sit_named_file(sit_file):
    with pytest.raises(ValueError, match="backbone='sit'"):
        describe_source(sit_file[0])


def test_a_run_configs_image_size_and_posterior_reach_a_sit_as_a_dit():
    """They were taken through ``**options``, which ``loader_options`` cannot see: a config setting them was refused
    for SiT although its loader reads them."""
    from difffeat.features.options import ImageModelOptions
    from difffeat.run.pipeline import family_options

    options = ImageModelOptions(image_size=512, sample_posterior=False)
    for family in ("sit", "dit"):
        taken = family_options(options, "image", family)
        assert taken["image_size"] == 512 and taken["sample_posterior"] is False
