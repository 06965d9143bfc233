"""DDiT: official key layout, forward math against an explicit re-derivation, padding, loaders for every format."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from difffeat.models.checkpoints import CheckpointError
from difffeat.models.ddit import DDiT, DDiTConfig, apply_rotary, attention, rotary_inv_freq
from difffeat.models.ddit_load import load_ddit, save_ddit
from helpers import assert_features_close

TINY = dict(vocab_size=100, hidden_size=64, cond_dim=16, n_heads=4, n_blocks=2, length=32)
# Block b's output passes the embedding and b + 1 blocks, logits also the output layer; the longest dot product is
# the MLP's (4 x 64) or the sigma embedding's 256 frequencies.
LOGITS_DEPTH, WIDTH = TINY["n_blocks"] + 2, 256


def random_model(seed: int = 0, **overrides) -> DDiT:
    """A tiny DDiT with every weight random (SEDD's zero init would make the blocks identities)."""
    torch.manual_seed(seed)
    model = DDiT(DDiTConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name == "vocab_embed.embedding":
                p.copy_(torch.randn_like(p))
            elif p.dim() == 2:  # Linear weights: unit-variance outputs
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "n_tensors", "n_elements"), [("sedd-small", 131, 169_627_250), ("sedd-medium", 251, 424_477_042)]
)
def test_presets_have_the_official_state_dict(preset: str, n_tensors: int, n_elements: int) -> None:
    with torch.device("meta"):
        sd = DDiT(DDiTConfig.preset(preset)).state_dict()
    assert len(sd) == n_tensors
    assert sum(v.numel() for v in sd.values()) == n_elements
    if preset == "sedd-small":  # the table in reference/checkpoints.md §4.2
        expected = {
            "vocab_embed.embedding": (50258, 768),
            "sigma_map.mlp.0.weight": (128, 256),
            "sigma_map.mlp.2.bias": (128,),
            "rotary_emb.inv_freq": (32,),
            "blocks.11.attn_qkv.weight": (2304, 768),
            "blocks.0.attn_out.weight": (768, 768),
            "blocks.0.mlp.0.weight": (3072, 768),
            "blocks.0.mlp.2.bias": (768,),
            "blocks.0.adaLN_modulation.weight": (4608, 128),
            "output_layer.linear.bias": (50258,),
            "output_layer.adaLN_modulation.weight": (1536, 128),
        }
        assert {k: tuple(sd[k].shape) for k in expected} == expected
        assert "blocks.0.attn_qkv.bias" not in sd and "blocks.0.attn_out.bias" not in sd


def test_parameters_are_in_state_dict_order() -> None:
    """EMA shadow lists are mapped by position, so parameters() must follow SEDD's registration order."""
    model = DDiT(DDiTConfig(**TINY))
    sd_keys = [k for k in model.state_dict() if k != "rotary_emb.inv_freq"]
    assert [n for n, _ in model.named_parameters()] == sd_keys
    assert "rotary_emb.inv_freq" in model.state_dict()  # persistent buffer


def test_config_defaults_and_validation() -> None:
    cfg = DDiTConfig()
    assert (cfg.vocab_size, cfg.mask_index, cfg.head_dim) == (50258, 50257, 64)
    assert DDiTConfig.preset("mdlm-owt").time_conditioning is False
    with pytest.raises(ValueError, match="kind"):
        DDiTConfig(kind="gpt")
    with pytest.raises(ValueError, match="unknown DDiT preset"):
        DDiTConfig.preset("sedd-huge")


# --------------------------------------------------------------------------------------------------------------
# Math
# --------------------------------------------------------------------------------------------------------------


def test_rotary_hand_worked_case() -> None:
    # head dim 4: inv_freq = 1/10000^(0/4), 1/10000^(2/4) = [1, 0.01]; dims (0, 2) and (1, 3) pair up.
    # Position 1, x = [1, 2, 3, 4]: y0 = 1 cos1 - 3 sin1, y2 = 3 cos1 + 1 sin1,
    #                               y1 = 2 cos.01 - 4 sin.01, y3 = 4 cos.01 + 2 sin.01.
    inv = rotary_inv_freq(4)
    assert torch.allclose(inv, torch.tensor([1.0, 0.01]))
    rotary = DDiT(DDiTConfig(vocab_size=10, hidden_size=4, cond_dim=4, n_heads=1, n_blocks=1)).rotary_emb
    cos, sin = rotary(2, torch.device("cpu"))
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])  # positions 0 and 1
    y = apply_rotary(x, cos, sin)
    assert torch.allclose(y[0], x[0])  # position 0 is not rotated
    assert torch.allclose(y[1], torch.tensor([-1.9841106, 1.9599007, 2.4623779, 4.0197997]), atol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_attention_equals_explicit_softmax(masked: bool) -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, 5, 8).unbind(0)
    key_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool) if masked else None
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    if masked:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    expected = scores.softmax(-1) @ v
    assert torch.allclose(attention(q, k, v, key_mask), expected, atol=1e-6)


def reference_logits(sd: dict, ids: torch.Tensor, sigma: torch.Tensor, n_heads: int, mask=None) -> torch.Tensor:
    """SEDD's forward (reference/checkpoints.md §4.3) written out from the state dict, sharing no model code."""
    w = lambda name: sd[name]  # noqa: E731
    x = w("vocab_embed.embedding")[ids]
    B, L, D = x.shape
    hd = D // n_heads
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    emb = torch.cat([torch.cos(sigma[:, None] * freqs), torch.sin(sigma[:, None] * freqs)], -1)
    c = F.silu(
        F.linear(
            F.silu(F.linear(emb, w("sigma_map.mlp.0.weight"), w("sigma_map.mlp.0.bias"))),
            w("sigma_map.mlp.2.weight"),
            w("sigma_map.mlp.2.bias"),
        )
    )
    angle = torch.arange(L)[:, None, None] * w("rotary_emb.inv_freq")  # [L, 1, hd/2]

    def rotate(t):  # [B, L, H, hd]; pairs (j, j + hd/2)
        a, b = t[..., : hd // 2], t[..., hd // 2 :]
        return torch.cat([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()], -1)

    def norm(t, weight):
        mu = t.mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(((t - mu) ** 2).mean(-1, keepdim=True) + 1e-5) * weight

    def gelu_tanh(t):
        return 0.5 * t * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t**3)))

    for i in range(sum(k.endswith("norm1.weight") for k in sd)):
        p = f"blocks.{i}."
        mod = F.linear(c, w(p + "adaLN_modulation.weight"), w(p + "adaLN_modulation.bias"))[:, None]
        sh1, sc1, g1, sh2, sc2, g2 = mod.split(D, -1)
        h = norm(x, w(p + "norm1.weight")) * (1 + sc1) + sh1
        q, k, v = (h @ w(p + "attn_qkv.weight").T).split(D, -1)
        q, k, v = (t.reshape(B, L, n_heads, hd) for t in (q, k, v))
        scores = torch.einsum("blhd,bmhd->bhlm", rotate(q), rotate(k)) / math.sqrt(hd)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        o = torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v).reshape(B, L, D)
        x = x + g1 * (o @ w(p + "attn_out.weight").T)
        h = norm(x, w(p + "norm2.weight")) * (1 + sc2) + sh2
        h = F.linear(
            gelu_tanh(F.linear(h, w(p + "mlp.0.weight"), w(p + "mlp.0.bias"))),
            w(p + "mlp.2.weight"),
            w(p + "mlp.2.bias"),
        )
        x = x + g2 * h
    shift, scale = F.linear(c, w("output_layer.adaLN_modulation.weight"), w("output_layer.adaLN_modulation.bias"))[
        :, None
    ].split(D, -1)
    h = norm(x, w("output_layer.norm_final.weight")) * (1 + scale) + shift
    return F.linear(h, w("output_layer.linear.weight"), w("output_layer.linear.bias"))


@pytest.mark.parametrize("masked", [False, True])
def test_forward_matches_explicit_reference(masked: bool) -> None:
    model = random_model()
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.3, 2.0])
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool) if masked else None
    expected = reference_logits(model.state_dict(), ids, sigma, n_heads=4, mask=mask)
    with torch.no_grad():
        got = model(ids, sigma, attention_mask=mask)
    assert got.shape == (2, 7, 100)
    assert_features_close(got, expected, depth=LOGITS_DEPTH, width=WIDTH, what="logits vs the re-derivation")


def captions_batch() -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Three captions of lengths 5, 9, 3, right-padded with arbitrary ids (padding must not matter)."""
    g = torch.Generator().manual_seed(2)
    captions = [torch.randint(0, 99, (n,), generator=g) for n in (5, 9, 3)]
    ids = torch.randint(0, 99, (3, 9), generator=g)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    for i, cap in enumerate(captions):
        ids[i, : len(cap)] = cap
        mask[i, : len(cap)] = True
    return captions, ids, mask


@torch.no_grad()
def test_padded_batch_equals_one_caption_at_a_time() -> None:
    model = random_model()
    captions, ids, mask = captions_batch()
    sigma = torch.tensor([0.0, 0.7, 3.0])
    batched = model.forward_intermediates(ids, sigma, [0, 1], attention_mask=mask)
    logits = model(ids, sigma, attention_mask=mask)
    for i, cap in enumerate(captions):
        alone = model.forward_intermediates(cap[None], sigma[i : i + 1], [0, 1])
        n = len(cap)
        for b in (0, 1):
            assert_features_close(batched[b][i, :n], alone[b][0], depth=b + 2, width=WIDTH, what=f"{i}, block {b}")
        alone_logits = model(cap[None], sigma[i : i + 1])[0]
        assert_features_close(logits[i, :n], alone_logits, depth=LOGITS_DEPTH, width=WIDTH, what=f"{i}, logits")
    assert torch.isfinite(batched[1]).all() and torch.isfinite(logits).all()
    unmasked = model.forward_intermediates(ids, sigma, [1])[1]  # without the mask padding leaks in
    assert not torch.allclose(unmasked[0, :5], batched[1][0, :5], atol=1e-3)


@torch.no_grad()
def test_batch_order_and_companions_do_not_matter() -> None:
    model = random_model()
    _, ids, mask = captions_batch()
    full = model.forward_intermediates(ids, 0.5, [1], attention_mask=mask)[1]
    order = torch.tensor([2, 0, 1])
    permuted = model.forward_intermediates(ids[order], 0.5, [1], attention_mask=mask[order])[1]
    assert_features_close(permuted, full[order], depth=3, width=WIDTH, what="permuted batch")
    pair = model.forward_intermediates(ids[1:], 0.5, [1], attention_mask=mask[1:])[1]
    assert_features_close(pair[1, :3], full[2, :3], depth=3, width=WIDTH, what="batch of two vs three")


@torch.no_grad()
def test_sequence_without_real_tokens_attends_everywhere() -> None:
    """Not every SDPA kernel gives finite output for a fully masked row; such a row is treated as unmasked."""
    model = random_model()
    ids = torch.randint(0, 99, (2, 4))
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    out = model(ids, 0.0, attention_mask=mask)
    assert torch.isfinite(out).all()
    assert_features_close(out[1], model(ids[1:], 0.0)[0], depth=LOGITS_DEPTH, width=WIDTH, what="no real tokens")


@torch.no_grad()
def test_forward_intermediates_equal_hooks_and_stop_early() -> None:
    model = random_model(n_blocks=3)
    ids = torch.randint(0, 99, (2, 6))
    seen: dict[int, torch.Tensor] = {}
    handles = [
        blk.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out)) for i, blk in enumerate(model.blocks)
    ]
    model(ids, 0.4)
    feats = model.forward_intermediates(ids, 0.4, [0, -2])
    assert sorted(feats) == [0, 1]
    for b in (0, 1):
        assert torch.equal(feats[b], seen[b])
    seen.clear()
    model.forward_intermediates(ids, 0.4, [0])
    assert sorted(seen) == [0]  # blocks 1 and 2 never ran
    for h in handles:
        h.remove()
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(ids, 0.4, [3])


@torch.no_grad()
def test_sigma_scalar_broadcasts_and_length_is_bounded() -> None:
    model = random_model()
    ids = torch.randint(0, 99, (2, 5))
    assert torch.equal(model(ids, 0.25), model(ids, torch.tensor([0.25, 0.25])))
    with pytest.raises(ValueError, match="trained length"):
        model(torch.zeros(1, 33, dtype=torch.long), 0.0)
    with pytest.raises(ValueError, match="sigma has 3 values"):
        model(ids, torch.zeros(3))


@torch.no_grad()
def test_time_conditioning_off_ignores_sigma() -> None:
    ids = torch.randint(0, 99, (1, 5))
    mdlm = random_model(kind="mdlm", time_conditioning=False)
    assert torch.equal(mdlm(ids, 0.0), mdlm(ids, 5.0))
    sedd = random_model()
    assert not torch.allclose(sedd(ids, 0.0), sedd(ids, 5.0))


def test_layernorm_eps_and_weight() -> None:
    # x = [-0.005, 0.005]: mean 0, variance 2.5e-5, so eps 1e-5 matters: +-0.005 / sqrt(3.5e-5) = +-0.845154
    norm = DDiT(DDiTConfig(vocab_size=10, hidden_size=2, cond_dim=4, n_heads=1, n_blocks=1)).blocks[0].norm1
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0]))
    got = norm(torch.tensor([[[-0.005, 0.005]]]))
    assert torch.allclose(got, torch.tensor([[[-0.845154, 1.690309]]]), atol=1e-5)


@torch.no_grad()
def test_bf16_autocast_keeps_layernorm_in_fp32() -> None:
    model = random_model()
    x = torch.randn(1, 3, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.blocks[0].norm1(x).dtype == torch.float32
        feats = model.forward_intermediates(torch.arange(6)[None], 0.5, [1])[1]
    assert feats.dtype == torch.float32  # residual stream stays fp32, as in SEDD
    exact = model.forward_intermediates(torch.arange(6)[None], 0.5, [1])[1]
    assert_features_close(feats, exact, depth=3, width=1, dtype=torch.bfloat16, what="bf16 autocast")
    as_bf16 = random_model().to(torch.bfloat16).forward_intermediates(torch.arange(6)[None], 0.5, [1])[1]
    assert as_bf16.dtype == torch.bfloat16
    assert_features_close(as_bf16, exact, depth=3, width=1, dtype=torch.bfloat16, what="a bf16 model")


@torch.no_grad()
def test_sedd_log_score_scatter_and_sigma_shift() -> None:
    model = random_model()
    ids = torch.randint(0, 99, (2, 5))
    sigma = torch.tensor([0.3, 2.0])
    raw, score = model(ids, sigma), model.log_score(ids, sigma)
    current = score.gather(-1, ids[..., None])
    assert torch.equal(current, torch.zeros_like(current))
    # -log(expm1(0.3)) - log(99) and -log(e^2 - 1) - log(99), V = 100, worked out by hand
    others = torch.ones_like(raw, dtype=torch.bool).scatter(-1, ids[..., None], False)
    for b, shift in enumerate([-3.5448942, -6.4497064]):
        diff = (score - raw)[b][others[b]]
        assert torch.allclose(diff, torch.full_like(diff, shift), atol=1e-5)


@torch.no_grad()
def test_mdlm_subs_parameterization() -> None:
    model = random_model(kind="mdlm", scale_by_sigma=False)
    ids = torch.tensor([[3, 99, 7, 99]])  # 99 = [MASK]
    raw, out = model(ids, 0.0), model.log_score(ids, 0.0)
    for pos in (0, 2):  # clean positions: one-hot in log space
        expected = torch.full((100,), -1e6)
        expected[ids[0, pos]] = 0.0
        assert torch.equal(out[0, pos], expected)
    for pos in (1, 3):  # masked positions: log-softmax with the mask logit pushed down by 1e6
        suppressed = raw[0, pos].clone()
        suppressed[99] -= 1e6
        assert torch.allclose(out[0, pos], suppressed.log_softmax(-1), atol=1e-5)
        assert torch.allclose(out[0, pos, :99].exp().sum(), torch.tensor(1.0), atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def sedd_config_json(length_at_top: bool = False) -> dict:
    model = dict(
        name="tiny", type="ddit", hidden_size=64, cond_dim=16, n_heads=4, n_blocks=2, dropout=0.1, scale_by_sigma=True
    )
    cfg = dict(
        tokens=99, graph=dict(type="absorb"), noise=dict(type="loglinear", sigma_min=1e-4, sigma_max=20), model=model
    )
    (cfg if length_at_top else model)["length"] = 32
    return cfg


def write_folder(folder, config: dict, sd: dict, weights: str = "model.safetensors"):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    if weights.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / weights))
    else:
        torch.save(sd, folder / weights)
    return folder


def assert_loads_as(model: DDiT, loaded: DDiT, kind: str = "sedd") -> None:
    assert same_weights(model, loaded)
    assert loaded.config.kind == kind and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    ids = torch.randint(0, 99, (1, 6))
    assert torch.equal(model(ids, 0.5), loaded(ids, 0.5))


@pytest.mark.parametrize(("weights", "length_at_top"), [("model.safetensors", False), ("pytorch_model.bin", True)])
def test_load_sedd_hub_folder(tmp_path, weights: str, length_at_top: bool) -> None:
    model = random_model()
    folder = write_folder(tmp_path / "sedd", sedd_config_json(length_at_top), model.state_dict(), weights)
    loaded = load_ddit(folder)
    assert_loads_as(model, loaded)
    assert (loaded.config.vocab_size, loaded.mask_index, loaded.max_length) == (100, 99, 32)


@pytest.mark.parametrize("with_inv_freq", [True, False])
def test_load_mdlm_folder(tmp_path, with_inv_freq: bool) -> None:
    model = random_model(kind="mdlm", scale_by_sigma=False, time_conditioning=False)
    sd = {f"backbone.{k}": v for k, v in model.state_dict().items() if with_inv_freq or k != "rotary_emb.inv_freq"}
    config = dict(
        architectures=["MDLM"], model_type="mdlm", vocab_size=100, model_length=32, hidden_dim=64, cond_dim=16,
        n_blocks=2, n_heads=4, dropout=0.1, time_conditioning=False, return_dict=False,
    )  # fmt: skip
    loaded = load_ddit(write_folder(tmp_path / "mdlm", config, sd))
    assert_loads_as(model, loaded, kind="mdlm")
    assert loaded.config.time_conditioning is False and loaded.config.length == 32


def test_load_mdlm_lightning_checkpoint_prefers_ema(tmp_path) -> None:
    mdlm = dict(kind="mdlm", scale_by_sigma=False, time_conditioning=False)
    model, ema_model = random_model(seed=0, **mdlm), random_model(seed=1, **mdlm)
    sd = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    sd["noise.empty"] = torch.tensor(0.0)  # noise-schedule parameter: ignored
    shadows = [p.detach().clone() for p in ema_model.parameters()] + [torch.tensor(0.0)]
    ckpt = dict(
        state_dict=sd,
        ema=dict(decay=0.9999, num_updates=10, shadow_params=shadows),
        hyper_parameters=dict(config=dict(time_conditioning=False, model=dict(length=32))),
        epoch=0,
    )
    torch.save(ckpt, tmp_path / "last.ckpt")
    loaded = load_ddit(tmp_path / "last.ckpt")
    assert_loads_as(ema_model, loaded, kind="mdlm")
    assert loaded.config.length == 32 and loaded.config.n_heads == 4

    sd["optimizer_thing.weight"] = torch.zeros(2)  # not clearly outside the backbone: refused
    torch.save(dict(state_dict=sd), tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): optimizer_thing.weight"):
        load_ddit(tmp_path / "bad.ckpt")


def test_load_sedd_training_checkpoint_prefers_ema(tmp_path) -> None:
    model, ema_model = random_model(seed=0), random_model(seed=1)
    shadows = [p.detach().clone() for p in ema_model.parameters()]
    ema = dict(decay=0.9999, num_updates=10, shadow_params=shadows)
    torch.save(dict(model=model.state_dict(), ema=ema, optimizer={}, step=10), tmp_path / "checkpoint.pth")
    assert_loads_as(ema_model, load_ddit(tmp_path / "checkpoint.pth"))

    ema["shadow_params"] = shadows[:-1]
    torch.save(dict(model=model.state_dict(), ema=ema, step=10), tmp_path / "short.pth")
    with pytest.raises(CheckpointError, match="EMA holds 29 shadow parameters but the model has 30"):
        load_ddit(tmp_path / "short.pth")


def test_own_format_round_trip(tmp_path) -> None:
    model = random_model(kind="mdlm", time_conditioning=False, mask_index=0, length=16)
    folder = save_ddit(model, tmp_path / "own")
    assert json.loads((folder / "config.json").read_text())["architecture"] == "ddit"
    loaded = load_ddit(folder)
    assert loaded.config == model.config
    assert_loads_as(model, loaded, kind="mdlm")


def test_config_argument_overrides(tmp_path) -> None:
    model = random_model()
    sd = {k: v for k, v in model.state_dict().items() if k != "rotary_emb.inv_freq"}
    torch.save(sd, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="cannot infer.*inv_freq.*pass config"):
        load_ddit(tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="missing keys \\(1\\): rotary_emb.inv_freq"):
        load_ddit(tmp_path / "bare.pt", config=DDiTConfig(**TINY))
    torch.save(model.state_dict(), tmp_path / "full.pt")
    assert_loads_as(model, load_ddit(tmp_path / "full.pt"))


def dit_state_dict() -> dict[str, torch.Tensor]:
    """A (tiny) official DiT layout: what users hand to the wrong loader."""
    return {
        "x_embedder.proj.weight": torch.zeros(64, 4, 2, 2),
        "t_embedder.mlp.0.weight": torch.zeros(64, 256),
        "y_embedder.embedding_table.weight": torch.zeros(11, 64),
        "blocks.0.attn.qkv.weight": torch.zeros(192, 64),
        "final_layer.linear.weight": torch.zeros(32, 64),
    }


def test_wrong_files_are_reported(tmp_path) -> None:
    with pytest.raises(CheckpointError, match=r"(?s)missing keys.*unexpected keys.*official DiT"):
        load_ddit(write_folder(tmp_path / "dit_in_sedd", sedd_config_json(), dit_state_dict()))
    torch.save(dit_state_dict(), tmp_path / "dit.pt")
    with pytest.raises(CheckpointError, match=r"(?s)cannot infer.*official DiT"):
        load_ddit(tmp_path / "dit.pt")

    sd = random_model().state_dict()
    del sd["blocks.1.norm2.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): blocks.1.norm2.weight"):
        load_ddit(write_folder(tmp_path / "missing", sedd_config_json(), sd))
    sd = random_model(cond_dim=8).state_dict()
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatches \(7\): blocks.0.adaLN_modulation.weight: file \(384, 8\) vs model \(384, 16\)",
    ):
        load_ddit(write_folder(tmp_path / "shape", sedd_config_json(), sd))
    with pytest.raises(CheckpointError, match="not a DDiT config"):
        load_ddit(write_folder(tmp_path / "other", {"_class_name": "DiTTransformer2DModel"}, sd))
    uniform = {**sedd_config_json(), "graph": {"type": "uniform"}}
    with pytest.raises(CheckpointError, match="absorbing"):
        load_ddit(write_folder(tmp_path / "uniform", uniform, sd))


def test_hub_ids_resolve_through_snapshot_download(tmp_path, monkeypatch) -> None:
    import huggingface_hub

    model = random_model()
    folder = write_folder(tmp_path / "snap", sedd_config_json(), model.state_dict())
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: calls.append(repo) or str(folder))
    assert_loads_as(model, load_ddit("louaaron/sedd-small"))
    assert calls == ["louaaron/sedd-small"]

    def offline(repo, **kw):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match="could not be fetched.*pass the local folder"):
        load_ddit("kuleshov-group/mdlm-owt")
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_ddit(tmp_path / "nothing" / "here")
