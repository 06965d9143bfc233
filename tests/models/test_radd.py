"""RADD: key layout and per-block features against a transcription of RADD's own forward, loaders, family choice."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.functional import scaled_dot_product_attention

from difffeat.features.extract import TextFeatureExtractor
from difffeat.models import large
from difffeat.models.base import resolve_family
from difffeat.models.checkpoints import CheckpointError
from difffeat.models.ddit_load import load_ddit, save_ddit
from difffeat.models.radd import RADD, RADDAdapter, RADDConfig, load_radd, save_radd
from helpers import CAPTIONS, tiny_ddit, tiny_tokenizer

TINY = dict(vocab_size=65, hidden_size=32, n_heads=2, n_blocks=3, length=24)
ATOL = 1e-5  # the bound for our features against the reference forward, fp32


# --------------------------------------------------------------------------------------------------------------
# A transcription of RADD's model/transformer.py and model/rotary.py (ML-GSAI/RADD 60b772d), kept to what the
# forward does: einops' rearranges written as view/permute, dropout (eval: identity) and autocast (CPU: off) left out.
# --------------------------------------------------------------------------------------------------------------


class RefRotary(nn.Module):
    def __init__(self, dim, base=10_000):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq)

    def forward(self, x, seq_dim=1):
        t = torch.arange(x.shape[seq_dim], device=x.device).type_as(self.inv_freq)
        freqs = torch.einsum("i,j->ij", t, self.inv_freq.clone())
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos()[None, :, None, None, :].repeat(1, 1, 3, 1, 1)
        sin = emb.sin()[None, :, None, None, :].repeat(1, 1, 3, 1, 1)
        cos[:, :, 2, :, :].fill_(1.0)  # the transformation on v is the identity
        sin[:, :, 2, :, :].fill_(0.0)
        return cos, sin


def ref_rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class RefLayerNormWot(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones([dim]))
        self.bias = nn.Parameter(torch.ones([dim]))
        self.dim = dim

    def forward(self, x):
        x = F.layer_norm(x.float(), [self.dim])
        return x * self.weight[None, None, :] + self.bias[None, None, :]


class RefDDiTBlockWot(nn.Module):
    def __init__(self, dim, n_heads, mlp_ratio=4):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = RefLayerNormWot(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.dropout1 = nn.Dropout(0.0)
        self.norm2 = RefLayerNormWot(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim, bias=True), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * dim, dim)
        )
        self.dropout2 = nn.Dropout(0.0)

    def forward(self, x, rotary_cos_sin):
        b, s, d = x.shape
        x_skip = x
        x = self.norm1(x)
        qkv = self.attn_qkv(x).view(b, s, 3, self.n_heads, d // self.n_heads)  # 'b s (three h d) -> b s three h d'
        cos, sin = rotary_cos_sin
        qkv = qkv * cos.to(qkv.dtype) + ref_rotate_half(qkv) * sin.to(qkv.dtype)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 'b s three h d -> three b h s d'
        x = scaled_dot_product_attention(q, k, v)
        x = x.permute(0, 2, 1, 3).reshape(b, s, d)  # 'b h s d -> b s (h d)'
        x = x_skip + self.attn_out(x)
        return torch.add(x, self.mlp(self.norm2(x)))


class RefEmbeddingLayer(nn.Module):
    def __init__(self, dim, vocab_dim):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty((vocab_dim, dim)))

    def forward(self, x):
        return self.embedding[x]


class RefFinalLayerWot(nn.Module):
    def __init__(self, hidden_size, out_channels):
        super().__init__()
        self.norm_final = RefLayerNormWot(hidden_size)
        self.linear = nn.Linear(hidden_size, out_channels)

    def forward(self, x):
        return self.linear(self.norm_final(x))


class RefRADD(nn.Module):
    def __init__(self, tokens, hidden_size, n_heads, n_blocks):
        super().__init__()
        vocab_size = tokens + 1
        self.vocab_embed = RefEmbeddingLayer(hidden_size, vocab_size)
        self.rotary_emb = RefRotary(hidden_size // n_heads)
        self.blocks = nn.ModuleList([RefDDiTBlockWot(hidden_size, n_heads) for _ in range(n_blocks)])
        self.output_layer = RefFinalLayerWot(hidden_size, vocab_size)

    def forward(self, indices):
        x = self.vocab_embed(indices)
        rotary_cos_sin = self.rotary_emb(x)
        for i in range(len(self.blocks)):
            x = self.blocks[i](x, rotary_cos_sin)
        x = self.output_layer(x)
        x[:, :, :-1] = x[:, :, :-1].log_softmax(dim=-1)
        return x


# --------------------------------------------------------------------------------------------------------------


def reference() -> RefRADD:
    """The transcription with every tensor random (RADD's init zeroes the output layer and sets biases to one)."""
    torch.manual_seed(0)
    ref = RefRADD(TINY["vocab_size"] - 1, TINY["hidden_size"], TINY["n_heads"], TINY["n_blocks"])
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) / (p.shape[-1] ** 0.5 if p.dim() == 2 else 3))
    return ref.eval()


def hooked(ref: RefRADD, ids: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    outputs = {}
    handles = [
        block.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
        for i, block in enumerate(ref.blocks)
    ]
    try:
        with torch.no_grad():
            logits = ref(ids)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, logits


@pytest.fixture
def hub_folder(tmp_path):
    """The reference's weights in RADD's hub layout (nested config.json + model.safetensors), with a tokenizer."""
    model = RADD(RADDConfig(**TINY))
    model.load_state_dict(reference().state_dict())
    folder = save_radd(model, tmp_path / "radd")
    tiny_tokenizer(folder)  # tokenizer.json beside the weights
    return folder


def test_state_dict_and_parameter_order_are_radds() -> None:
    ours, ref = RADD(RADDConfig(**TINY)), reference()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]  # EMA order
    assert not any("sigma_map" in k or "adaLN" in k for k in ours.state_dict())


@pytest.mark.parametrize("step", [0, 500])
def test_block_features_equal_hooks_on_radds_forward(hub_folder, step: int) -> None:
    adapter = RADDAdapter.from_pretrained(str(hub_folder))
    x0 = adapter.encode(CAPTIONS[:1], ["c0"], seed=0)
    ids = adapter.noise(x0, step, ["c0"], seed=0)
    assert (ids == adapter.module.mask_index).any() == (step > 0)
    expected, logits = hooked(reference(), ids)
    with torch.no_grad():
        got = adapter.forward_intermediates(ids, adapter.model_time(step, 1), [0, 1, 2], mask=x0.mask)
        ours_logits = adapter.module(ids)
    for b in range(TINY["n_blocks"]):
        assert (got[b] - expected[b]).abs().max() <= ATOL, f"block {b}"
    assert (ours_logits - logits).abs().max() <= ATOL


def test_padded_batch_equals_one_caption_at_a_time(hub_folder) -> None:
    adapter = RADDAdapter.from_pretrained(str(hub_folder))
    x0 = adapter.encode(CAPTIONS[:3], [0, 1, 2], seed=0)
    assert not x0.mask.all()  # the captions differ in length
    with torch.no_grad():
        batch = adapter.forward_intermediates(x0.x, adapter.model_time(0, 3), [2], mask=x0.mask)[2]
        for i in range(3):
            n = int(x0.mask[i].sum())
            alone = adapter.module.forward_intermediates(x0.x[i : i + 1, :n], [2])[2]
            assert (batch[i, :n] - alone[0]).abs().max() <= ATOL


def test_early_exit_runs_no_later_block(hub_folder) -> None:
    adapter = RADDAdapter.from_pretrained(str(hub_folder))
    calls = Counter()
    for i, block in enumerate(adapter.module.blocks):
        block.register_forward_hook(lambda m, a, out, i=i: calls.update([i]))
    x0 = adapter.encode(CAPTIONS[:2], [0, 1], seed=0)
    out = adapter.forward_intermediates(x0.x, adapter.model_time(0, 2), [0, 1], mask=x0.mask)
    assert sorted(out) == [0, 1] and calls == Counter({0: 1, 1: 1})


def test_extractor_reads_radd_with_the_masked_grid(hub_folder) -> None:
    """Same steps, same seed: RADD's inputs are masked exactly as a SEDD/MDLM model's would be."""
    adapter = RADDAdapter.from_pretrained(str(hub_folder))
    feats = TextFeatureExtractor(adapter)(CAPTIONS[:2], blocks=[-1], timesteps=[0, 700], ids=["a", "b"])
    assert set(feats) == {(2, 0), (2, 700)} and feats[(2, 0)].shape == (2, TINY["hidden_size"])
    assert not torch.allclose(feats[(2, 0)], feats[(2, 700)])
    x0 = adapter.encode(CAPTIONS[:2], ["a#0", "b#0"], seed=0)
    expected = adapter.schedule.corrupt(x0.x, x0.mask, ["a#0", "b#0"], 700, adapter.module.mask_index, 0)
    assert torch.equal(adapter.noise(x0, 700, ["a#0", "b#0"], seed=0), expected)
    assert float(adapter.model_time(700, 1)[0]) == pytest.approx(0.999 * 0.7)


def test_training_checkpoint_loads_the_ema_weights(tmp_path) -> None:
    ref = reference()
    shadows = [p.detach() + 1 for p in ref.parameters()]
    state = {"model": ref.state_dict(), "ema": {"decay": 0.9999, "num_updates": 3, "shadow_params": shadows},
             "optimizer": {"state": {}}, "step": 3}  # fmt: skip
    torch.save(state, tmp_path / "checkpoint.pth")
    model = load_radd(tmp_path / "checkpoint.pth")  # architecture from the shapes
    assert model.config == RADDConfig(**{**TINY, "length": 1024})
    for (name, p), shadow in zip(model.named_parameters(), shadows, strict=True):
        assert torch.equal(p, shadow), name


def test_family_is_read_from_the_folder(hub_folder, tmp_path) -> None:
    assert resolve_family(hub_folder, "text") == "radd"
    raw = json.loads((hub_folder / "config.json").read_text())
    del raw["model"]["name"], raw["model"]["type"]  # still RADD's: dtype and use_checkpoint, no scale_by_sigma
    (hub_folder / "config.json").write_text(json.dumps(raw))
    assert resolve_family(hub_folder, "text") == "radd"
    sedd = tmp_path / "sedd"
    save_ddit(tiny_ddit(64), sedd)
    raw = json.loads((sedd / "config.json").read_text())
    assert resolve_family(sedd, "text") == "ddit" and raw["architecture"] == "ddit"
    with pytest.raises(CheckpointError, match="use backbone radd"):
        load_ddit(hub_folder)
    with pytest.raises(CheckpointError, match="looks like a RADD text checkpoint"):  # RADD weights, SEDD loader
        load_ddit(hub_folder / "model.safetensors", config="sedd-small")
    with pytest.raises(CheckpointError, match="missing keys"):  # a SEDD file given to the RADD loader
        load_radd(sedd / "model.safetensors", config=RADDConfig(vocab_size=65, hidden_size=32, n_heads=2, n_blocks=3))


def test_large_model_refused_before_its_weights_are_read(hub_folder, monkeypatch) -> None:
    count = sum(p.numel() for p in RADD(RADDConfig(**TINY)).parameters())
    (hub_folder / "model.safetensors").write_bytes(b"not weights")  # would fail if it were read
    monkeypatch.setattr(large, "LARGE_PARAMS", count - 1)
    with pytest.raises(CheckpointError, match=r"allow_large: true") as err:
        RADDAdapter.from_pretrained(str(hub_folder))
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):  # allowed: now the weights are read
        load_radd(hub_folder, allow_large=True)
    monkeypatch.setattr(large, "LARGE_PARAMS", count)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_radd(hub_folder)


def test_bfloat16_weights(hub_folder) -> None:
    adapter = RADDAdapter.from_pretrained(str(hub_folder), dtype="bfloat16")
    assert next(adapter.module.parameters()).dtype == torch.bfloat16
    x0 = adapter.encode(CAPTIONS[:1], [0], seed=0)
    with torch.no_grad():
        got = adapter.forward_intermediates(x0.x, adapter.model_time(0, 1), [2])[2].float()
    expected, _ = hooked(reference(), x0.x)
    scale = expected[2].abs().max()
    assert (got - expected[2]).abs().max() <= 0.1 * scale  # bf16 rounding, not another computation


def test_config_is_a_ddit_config_whose_time_fields_radd_does_not_read() -> None:
    cfg = RADDConfig.preset("radd-medium")
    assert (cfg.hidden_size, cfg.n_heads, cfg.n_blocks, cfg.mask_index) == (1024, 16, 24, 50257)
    assert (cfg.time_conditioning, cfg.scale_by_sigma, cfg.kind) == (False, False, "sedd")
    with pytest.raises(ValueError, match="unknown RADD preset 'sedd-small'"):
        RADDConfig.preset("sedd-small")
    shapes = {k: v.shape for k, v in RADD(RADDConfig(**TINY)).state_dict().items()}
    assert shapes == {k: v.shape for k, v in RADD(RADDConfig(**TINY, cond_dim=7)).state_dict().items()}
