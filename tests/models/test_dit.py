"""Our DiT against independent references: diffusers' DiTTransformer2DModel, hand-worked embeddings, forward
hooks, and the checkpoint layouts the loader accepts."""

from __future__ import annotations

import argparse
import gc
import json
import math
from collections import Counter
from dataclasses import replace

import huggingface_hub
import pytest
import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from safetensors.torch import load_file, save_file

from difffeat.models.checkpoints import CheckpointError
from difffeat.models.dit import DiT, DiTConfig, dit_config, sincos_pos_embed_2d
from difffeat.models.dit_load import dit_to_diffusers_state_dict, load_dit, save_dit
from helpers import assert_features_close, rounding_tolerance

SMALL = {
    "input_size": 8,
    "patch_size": 2,
    "in_channels": 4,
    "hidden_size": 96,
    "depth": 3,
    "num_heads": 4,
    "num_classes": 10,
}
NULL = SMALL["num_classes"]
# Outputs pass the embedding, the blocks and the final layer; the longest dot product is the MLP's (4 x 96).
OUT_DEPTH, WIDTH = SMALL["depth"] + 2, 4 * SMALL["hidden_size"]
T = torch.tensor([0, 1, 500, 999])
Y = torch.tensor([0, 7, NULL, 3])


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def small_config(**overrides) -> DiTConfig:
    return DiTConfig(**{**SMALL, **overrides})


def randomize(model: DiT, seed: int = 0) -> DiT:
    """Non-zero random weights everywhere but the fixed pos_embed: the official zero-init would hide bugs in
    adaLN, gates and the final layer."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name == "pos_embed":
            continue
        std = 1.0 if "embedding_table" in name else p[0].numel() ** -0.5 if p.dim() > 1 else 0.1
        p.normal_(0.0, std, generator=g)
    return model.eval()


def make_dit(seed: int = 0, **overrides) -> DiT:
    return randomize(DiT(small_config(**overrides)), seed)


def latents(n: int = 4, config: DiTConfig | None = None, seed: int = 1) -> torch.Tensor:
    c = config or small_config()
    return torch.randn(n, c.in_channels, c.input_size, c.input_size, generator=torch.Generator().manual_seed(seed))


def diffusers_twin(model: DiT) -> DiTTransformer2DModel:
    """diffusers' DiT holding our weights; norm_eps 1e-5 as in the released config (which has no norm_eps key)."""
    c = model.config
    twin = DiTTransformer2DModel(
        num_attention_heads=c.num_heads,
        attention_head_dim=c.hidden_size // c.num_heads,
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        num_layers=c.depth,
        sample_size=c.input_size,
        patch_size=c.patch_size,
        num_embeds_ada_norm=c.num_classes,
        norm_eps=1e-5,
    )
    twin.load_state_dict(dit_to_diffusers_state_dict(model.state_dict(), c.depth), strict=True)
    return twin.eval()


def run_twin(twin: DiTTransformer2DModel, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return twin(x, timestep=t, class_labels=y).sample


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------------------------
# Numerics
# ------------------------------------------------------------------------------------------------------------


def test_diffusers_numerics_reproduce_diffusers():
    model = make_dit(numerics="diffusers")
    x = latents()
    ours, theirs = model(x, T, Y), run_twin(diffusers_twin(model), x, T, Y)
    assert ours.shape == (4, 8, 8, 8)
    assert ours.std() > 0.1  # a non-trivial output, so the comparison can fail
    assert_features_close(ours, theirs, depth=OUT_DEPTH, width=WIDTH, what="diffusers numerics vs diffusers")


def _eps_sensitive(model: DiT) -> DiT:
    """Make block 0's pre-MLP LayerNorm see inputs of variance ~1e-6, where eps 1e-6 vs 1e-5 matters: no
    position embedding or patch bias (tiny latents give tiny tokens) and a zero attention gate in block 0."""
    d = model.hidden_size
    model.pos_embed.zero_()
    model.x_embedder.proj.bias.zero_()
    ada = model.blocks[0].adaLN_modulation[1]
    ada.weight[2 * d : 3 * d] = 0
    ada.bias[2 * d : 3 * d] = 0
    return model


def test_official_and_diffusers_differ_exactly_by_two_constants():
    official = _eps_sensitive(make_dit())
    twin = diffusers_twin(official)
    twin.pos_embed.pos_embed.zero_()
    mine_diffusers = DiT(replace(official.config, numerics="diffusers")).eval()
    mine_diffusers.load_state_dict(official.state_dict())
    x = latents() * 1e-3
    t0, t_pos = torch.zeros(4, dtype=torch.long), torch.tensor([1, 100, 500, 999])

    def gap(t: torch.Tensor, freq_shift: int, eps: float) -> float:
        for block in twin.transformer_blocks:
            block.norm1.emb.time_proj.downscale_freq_shift = freq_shift
            block.norm3.eps = eps
        return max_diff(official(x, t, Y), run_twin(twin, x, t, Y))

    rounding = rounding_tolerance(official(x, T, Y), OUT_DEPTH, WIDTH)
    assert max_diff(mine_diffusers(x, T, Y), run_twin(twin, x, T, Y)) <= rounding  # unpatched diffusers
    assert gap(t0, 1, 1e-5) > 1e-2  # eps alone: visible even at t=0, where the frequencies cannot matter
    assert gap(t0, 1, 1e-6) <= rounding
    assert gap(t_pos, 1, 1e-6) > 1e-2  # frequencies alone
    assert gap(t_pos, 0, 1e-5) > 1e-2
    assert gap(t_pos, 0, 1e-6) <= rounding
    assert gap(T, 0, 1e-6) <= rounding


def test_official_differs_from_diffusers_in_the_ordinary_regime():
    model = make_dit()
    x = latents()
    assert max_diff(model(x, T, Y), run_twin(diffusers_twin(model), x, T, Y)) > 1e-2


@pytest.mark.slow
def test_xl_matches_diffusers():
    with torch.device("meta"):  # skip the official init: 675M parameters are randomised right after
        model = DiT(dit_config("DiT-XL/2", numerics="diffusers"))
    model = model.to_empty(device="cpu")
    model.pos_embed.copy_(sincos_pos_embed_2d(1152, 16).unsqueeze(0))
    randomize(model)
    twin = diffusers_twin(model)
    x = latents(1, model.config)
    t, y = torch.tensor([250]), torch.tensor([207])
    ours = model(x, t, y)
    theirs = run_twin(twin, x, t, y)
    del model, twin
    gc.collect()
    assert ours.shape == (1, 8, 32, 32)
    assert_features_close(ours, theirs, depth=28 + 2, width=4 * 1152, what="DiT-XL/2 vs diffusers")


def test_pos_embed_hand_worked():
    # dim 8: 4 channels per axis, ω = (1, 1/100); token n = row·2 + col; first half encodes the column.
    def axis(p: float) -> list[float]:
        return [math.sin(p), math.sin(p / 100), math.cos(p), math.cos(p / 100)]

    expected = torch.tensor([axis(col) + axis(row) for row in (0, 1) for col in (0, 1)])
    torch.testing.assert_close(sincos_pos_embed_2d(8, 2), expected, rtol=0, atol=1e-7)


def test_pos_embed_layout_and_storage():
    emb = sincos_pos_embed_2d(16, 4).reshape(4, 4, 16)  # [row, col, channel]
    assert torch.equal(emb[0, :, :8], emb[3, :, :8])  # first half: same along a column
    assert torch.equal(emb[:, 0, 8:], emb[:, 3, 8:])  # second half: same along a row
    assert not torch.equal(emb[:, 0, :8], emb[:, 3, :8])
    # diffusers' independent implementation agrees at the trained size
    theirs = get_2d_sincos_pos_embed(1152, 16, base_size=16, output_type="pt").float()
    assert max_diff(sincos_pos_embed_2d(1152, 16), theirs) <= 1e-6

    model = DiT(small_config())
    assert not model.pos_embed.requires_grad
    assert "pos_embed" in model.state_dict() and "pos_embed" in dict(model.named_parameters())
    assert list(model.buffers()) == []
    assert torch.equal(model.pos_embed[0], sincos_pos_embed_2d(96, 4))


@pytest.mark.parametrize(("numerics", "denominator"), [("official", 128), ("diffusers", 127)])
def test_timestep_features_cos_first(numerics: str, denominator: int):
    model = make_dit(numerics=numerics)
    seen = []
    model.t_embedder.mlp[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    model(latents(2), torch.tensor([3, 3]), 1)
    feats = seen[0][0]
    freqs = [10000 ** (-i / denominator) for i in range(128)]
    expected = torch.tensor([math.cos(3 * f) for f in freqs] + [math.sin(3 * f) for f in freqs])
    torch.testing.assert_close(feats, expected, rtol=0, atol=2e-6)
    assert feats[0].item() == pytest.approx(-0.9899925, abs=1e-6)  # cos(3): cos first
    assert feats[128].item() == pytest.approx(0.1411200, abs=1e-6)  # sin(3)
    # the last frequency is 10000^(-127/denominator): 1e-4 exactly only with the diffusers shift
    assert (feats[255].item() == pytest.approx(3e-4, rel=1e-4)) == (denominator == 127)


# ------------------------------------------------------------------------------------------------------------
# Intermediates and input checks
# ------------------------------------------------------------------------------------------------------------


def test_forward_intermediates_match_hooks():
    model = make_dit()
    x = latents()
    captured: dict[int, torch.Tensor] = {}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda _m, _i, out, i=i: captured.__setitem__(i, out))
    model(x, T, Y)
    for blocks, keys in [([0], [0]), ([1, -1], [1, 2]), ([-3, 2], [0, 2]), (-2, [1]), ([2, 2, -1], [2])]:
        feats = model.forward_intermediates(x, T, Y, blocks)
        assert sorted(feats) == keys
        for k in keys:
            assert feats[k].shape == (4, 16, 96)
            assert torch.equal(feats[k], captured[k])


def test_forward_intermediates_stop_after_deepest_block():
    model = make_dit()
    calls: Counter = Counter()
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda *_, i=i: calls.update([i]))
    model.final_layer.register_forward_hook(lambda *_: calls.update(["final"]))
    model.forward_intermediates(latents(), T, Y, [0, 1])
    assert calls == Counter({0: 1, 1: 1})


def test_invalid_requests():
    model = make_dit()
    x = latents(2)
    for blocks in ([3], [-4], [], [0.5]):
        with pytest.raises(ValueError, match="out of range|no block"):
            model.forward_intermediates(x, 5, 1, blocks)
    with pytest.raises(ValueError, match="expected input"):
        model(torch.zeros(2, 4, 16, 16), 5, 1)
    for bad in (NULL + 1, -1, torch.tensor([0, NULL + 1]), torch.tensor([0.0, 1.0])):
        with pytest.raises(ValueError, match="class labels"):
            model(x, 5, bad)
    with pytest.raises(ValueError, match="shape"):
        model(x, torch.tensor([1, 2, 3]), 1)
    torch.testing.assert_close(model(x, 5), model(x, torch.tensor([5, 5]), torch.tensor([NULL, NULL])))
    assert model.null_class == NULL
    assert make_dit(class_dropout_prob=0.0).null_class is None


def test_presets():
    xl = dit_config("DiT-XL/2")
    assert xl == dit_config("DiT-XL-2") == dit_config("dit-xl/2")
    shape = (xl.depth, xl.hidden_size, xl.num_heads, xl.patch_size, xl.input_size, xl.out_channels)
    assert shape == (28, 1152, 16, 2, 32, 8)
    s8 = dit_config("DiT-S/8", input_size=64, in_channels=3, learn_sigma=False)
    assert (s8.hidden_size, s8.num_heads, s8.patch_size, s8.num_tokens, s8.out_channels) == (384, 6, 8, 64, 3)
    with torch.device("meta"):  # the released DiT-XL/2: 292 tensors, 675,129,632 elements (checkpoints.md §1.2)
        sd = DiT(xl).state_dict()
    assert len(sd) == 292 and sum(v.numel() for v in sd.values()) == 675_129_632
    with pytest.raises(ValueError, match="unknown DiT preset"):
        dit_config("DiT-XXL/2")
    with pytest.raises(ValueError, match="numerics"):
        small_config(numerics="timm")


# ------------------------------------------------------------------------------------------------------------
# Loaders
# ------------------------------------------------------------------------------------------------------------


def _assert_same_weights(a: DiT, b: DiT) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_official_file_infers_config(tmp_path):
    # A pixel-space DiT-S-width model: 3 channels, no learned sigma, patch 4, input 16, 10 classes.
    model = make_dit(
        hidden_size=384, num_heads=6, depth=2, in_channels=3, learn_sigma=False, patch_size=4, input_size=16
    )
    torch.save(model.state_dict(), tmp_path / "dit.pt")
    loaded = load_dit(tmp_path / "dit.pt")
    assert loaded.config == model.config
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    _assert_same_weights(loaded, model)
    x = latents(2, model.config)
    assert torch.equal(loaded(x, 10, 2), model(x, 10, 2))


def test_load_training_checkpoint_prefers_ema(tmp_path):
    config = small_config()
    model, ema = make_dit(seed=0), make_dit(seed=1)
    ckpt = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": {}, "args": argparse.Namespace(lr=1e-4)}
    torch.save(ckpt, tmp_path / "0400000.pt")
    loaded = load_dit(tmp_path / "0400000.pt", config=config, numerics="diffusers")
    assert loaded.config == replace(config, numerics="diffusers")
    _assert_same_weights(loaded, ema)


def test_nonstandard_width_needs_config(tmp_path):
    torch.save(make_dit().state_dict(), tmp_path / "dit.pt")
    with pytest.raises(CheckpointError, match="pass config"):
        load_dit(tmp_path / "dit.pt")


@pytest.fixture
def diffusers_folder(tmp_path):
    """A pipeline root with ``transformer/`` written by diffusers itself, and the model it came from."""
    model = make_dit()
    diffusers_twin(model).save_pretrained(tmp_path / "transformer")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    return tmp_path, model


def test_load_diffusers_folders(diffusers_folder):
    root, model = diffusers_folder
    for source in (root, root / "transformer", str(root)):
        loaded = load_dit(source)
        assert loaded.config == model.config  # numerics "official" by default
        _assert_same_weights(loaded, model)  # qkv concatenated, embedders collapsed, pos_embed recomputed
    x = latents()
    as_diffusers = load_dit(root, numerics="diffusers")
    twin = DiTTransformer2DModel.from_pretrained(root / "transformer").eval()
    theirs = run_twin(twin, x, T, Y)
    assert_features_close(as_diffusers(x, T, Y), theirs, depth=OUT_DEPTH, width=WIDTH, what="loaded vs diffusers")


def test_load_diffusers_bin_folder(tmp_path):
    model = make_dit()
    diffusers_twin(model).save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    _assert_same_weights(load_dit(tmp_path), model)


def test_disagreeing_embedder_copies_are_refused(diffusers_folder):
    root, _ = diffusers_folder
    weights = root / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(weights)
    sd["transformer_blocks.2.norm1.emb.timestep_embedder.linear_1.bias"] += 1e-3
    save_file(sd, weights)
    with pytest.raises(CheckpointError, match=r"copies disagree \(block 2"):
        load_dit(root)


def test_hub_id(diffusers_folder, monkeypatch):
    root, model = diffusers_folder
    asked = []

    def fake_download(repo_id, allow_patterns):
        asked.append((repo_id, allow_patterns))
        return str(root)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    _assert_same_weights(load_dit("facebook/DiT-XL-2-256"), model)
    assert asked == [("facebook/DiT-XL-2-256", ["transformer/*"])]

    def offline(repo_id, allow_patterns):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match="could not be fetched.*local path"):
        load_dit("facebook/DiT-XL-2-256")
    for missing in ("/nonexistent/dit.pt", "checkpoints/dit.pt", "no_such_folder"):
        with pytest.raises(CheckpointError, match="not found"):
            load_dit(missing)


def test_own_format_round_trip(tmp_path):
    model = make_dit(numerics="diffusers", learn_sigma=False)
    save_dit(model, tmp_path / "mine")
    assert json.loads((tmp_path / "mine" / "config.json").read_text())["architecture"] == "dit"
    loaded = load_dit(tmp_path / "mine")
    assert loaded.config == model.config  # saved numerics kept
    _assert_same_weights(loaded, model)
    assert load_dit(tmp_path / "mine", numerics="official").config.numerics == "official"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"architecture": "ddit"}))
    with pytest.raises(CheckpointError, match="not a DiT"):
        load_dit(tmp_path / "other")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.pop("blocks.1.mlp.fc2.bias"), r"missing keys \(1\): blocks\.1\.mlp\.fc2\.bias"),
        (lambda sd: sd.update(extra=torch.zeros(1)), r"unexpected keys \(1\): extra"),
        (
            lambda sd: sd.update({"blocks.0.attn.proj.bias": torch.zeros(5)}),
            r"shape mismatches \(1\): blocks\.0\.attn\.proj\.bias: file \(5,\) vs model \(96,\)",
        ),
    ],
)
def test_strict_mismatches(tmp_path, edit, message):
    sd = make_dit().state_dict()
    edit(sd)
    torch.save(sd, tmp_path / "dit.pt")
    with pytest.raises(CheckpointError, match=message):
        load_dit(tmp_path / "dit.pt", config=small_config())


@pytest.mark.parametrize(
    ("sd", "looks_like"),
    [
        (
            {"encoder.down_blocks.0.resnets.0.conv1.weight": torch.zeros(2, 2), "quant_conv.weight": torch.zeros(2)},
            "VAE",
        ),
        (
            {"vocab_embed.embedding": torch.zeros(4, 2), "sigma_map.mlp.0.weight": torch.zeros(2, 2)},
            "SEDD",
        ),
    ],
)
def test_wrong_model_files(tmp_path, sd, looks_like):
    torch.save(sd, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=f"not an official-layout DiT.*{looks_like}"):
        load_dit(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=looks_like):  # also when a config skips the inference
        load_dit(tmp_path / "other.pt", config=small_config())
