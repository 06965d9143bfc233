"""DiffusionGemma: a tiny random model of the real config classes, saved with save_pretrained and loaded through our
loader; decoder features against output_hidden_states and hooks on transformers' untouched forward."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    DiffusionGemmaConfig,
    DiffusionGemmaForBlockDiffusion,
    DiffusionGemmaTextConfig,
    PreTrainedTokenizerFast,
)

from difffeat.features.extract import TextFeatureExtractor
from difffeat.models import large
from difffeat.models.base import resolve_family
from difffeat.models.checkpoints import CheckpointError
from difffeat.models.diffusion_gemma import DiffusionGemmaBackbone, uniform_corrupt

WORDS = ["a", "red", "cat", "on", "the", "blue", "mat", "two", "dogs", "and", "one", "bird", "in", "sky"]
CAPTIONS = ["a red cat on the mat", "two dogs", "one blue bird in the sky and a cat"]
VOCAB, DEPTH, WIDTH = 64, 3, 32
ATOL = 1e-5  # the bound for our features against the reference forward, fp32


def tiny_config() -> DiffusionGemmaConfig:
    """The real config classes, shrunk: sliding and full attention layers, MoE with 4 experts, a tiny vision tower."""
    text = DiffusionGemmaTextConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=DEPTH, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, global_head_dim=16, num_global_key_value_heads=1, num_experts=4,
        top_k_experts=2, moe_intermediate_size=16, sliding_window=8, max_position_embeddings=128,
        layer_types=["sliding_attention", "full_attention", "full_attention"],
    )  # fmt: skip
    vision = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=8)  # fmt: skip
    return DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=16)


def save_tiny(folder: Path) -> Path:
    """Random weights everywhere (norm scales, router, experts), saved with save_pretrained, plus a word tokenizer."""
    torch.manual_seed(0)
    model = DiffusionGemmaForBlockDiffusion(tiny_config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.dim() < 2 else p.shape[-1] ** -0.5))
    model.save_pretrained(folder)
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("diffusion_gemma"))


@pytest.fixture(scope="module")
def backbone(folder) -> DiffusionGemmaBackbone:
    return DiffusionGemmaBackbone.from_pretrained(str(folder))


def reference(folder: Path, canvas: torch.Tensor) -> dict[int, torch.Tensor]:
    """Every decoder layer's output on the untouched forward of a separately loaded model, the prompt [BOS]:
    ``output_hidden_states`` for all but the last layer (whose entry is after the final norm), a hook for that."""
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(folder).eval()
    last = {}
    model.model.decoder.layers[-1].register_forward_hook(lambda m, a, out: last.__setitem__(0, out))
    prompt = torch.full((len(canvas), 1), model.config.text_config.bos_token_id)
    with torch.no_grad():
        out = model(input_ids=prompt, decoder_input_ids=canvas, output_hidden_states=True)
    return {**{i: out.hidden_states[i + 1] for i in range(DEPTH - 1)}, DEPTH - 1: last[0]}


@pytest.mark.parametrize("step", [0, 500])
def test_decoder_features_equal_the_untouched_forward(folder, backbone, step: int) -> None:
    x0 = backbone.encode(CAPTIONS[:1], ["c"], seed=0)
    canvas = backbone.noise(x0, step, ["c"], seed=0)
    assert torch.equal(canvas, x0.x) == (step == 0)
    expected = reference(folder, canvas)
    with torch.no_grad():
        got = backbone.forward_intermediates(canvas, backbone.model_time(step, 1), [0, 1, 2], mask=x0.mask)
    for b in range(DEPTH):
        assert (got[b] - expected[b]).abs().max() <= ATOL, f"block {b}"


def test_padded_batch_equals_one_caption_at_a_time(backbone) -> None:
    x0 = backbone.encode(CAPTIONS, [0, 1, 2], seed=0)
    assert not x0.mask.all()
    with torch.no_grad():
        batch = backbone.forward_intermediates(x0.x, backbone.model_time(0, 3), [1, 2], mask=x0.mask)
        for i in range(3):
            n = int(x0.mask[i].sum())
            alone = backbone.forward_intermediates(x0.x[i : i + 1, :n], backbone.model_time(0, 1), [1, 2])
            for b in (1, 2):
                assert (batch[b][i, :n] - alone[b][0]).abs().max() <= ATOL, (i, b)


def test_early_exit_runs_no_later_decoder_layer_and_no_head(backbone) -> None:
    calls = Counter()
    inner = backbone.module.model

    def count(module, name):
        return module.register_forward_hook(lambda m, a, o: calls.update([name]))

    hooks = [
        *(count(m, ("dec", i)) for i, m in enumerate(inner.decoder.layers)),
        *(count(m, ("enc", i)) for i, m in enumerate(inner.encoder.language_model.layers)),
        count(backbone.module.lm_head, "head"),
    ]
    x0 = backbone.encode(CAPTIONS[:2], [0, 1], seed=0)
    try:
        out = backbone.forward_intermediates(x0.x, backbone.model_time(0, 2), [0, 1], mask=x0.mask)
    finally:
        for h in hooks:
            h.remove()
    assert sorted(out) == [0, 1]
    assert calls == Counter({("dec", 0): 1, ("dec", 1): 1, ("enc", 0): 1, ("enc", 1): 1, ("enc", 2): 1})


def test_uniform_corruption() -> None:
    ids = torch.tensor([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6], dtype=torch.bool)
    assert torch.equal(uniform_corrupt(ids, mask, ["a", "b"], 0, VOCAB, 0, 0), ids)
    full = uniform_corrupt(ids, mask, ["a", "b"], 1000, VOCAB, 0, 0)
    assert torch.equal(full[0, 4:], ids[0, 4:])  # padding untouched
    assert ((full >= 0) & (full < VOCAB)).all() and not torch.equal(full, ids)
    alone = uniform_corrupt(ids[1:], mask[1:], ["b"], 1000, VOCAB, 0, 0)
    assert torch.equal(alone[0], full[1])  # a caption's draw does not depend on its batch
    long = torch.full((1, 20000), 3)
    half = uniform_corrupt(long, torch.ones_like(long, dtype=torch.bool), ["x"], 500, VOCAB, 0, 0)
    changed = (half != 3).float().mean().item()
    assert abs(changed - 0.5 * (1 - 1 / VOCAB)) < 0.02  # replaced w.p. 1/2; a replacement is 3 again w.p. 1/64
    counts = torch.bincount(uniform_corrupt(long, torch.ones_like(long, dtype=torch.bool), ["x"], 1000, VOCAB, 0, 0)[0])
    assert len(counts) == VOCAB and counts.min() > 0.5 * 20000 / VOCAB  # every id drawn, roughly evenly


def test_extractor_family_and_layers(folder, backbone) -> None:
    assert resolve_family(folder, "text") == "diffusion_gemma"
    assert [layer.name for layer in backbone.layers()] == [f"model.decoder.layers.{i}" for i in range(DEPTH)]
    feats = TextFeatureExtractor(backbone)(CAPTIONS, blocks=[-1], timesteps=[0, 300], ids=["a", "b", "c"])
    assert set(feats) == {(2, 0), (2, 300)} and feats[(2, 0)].shape == (3, WIDTH)
    assert not torch.allclose(feats[(2, 0)], feats[(2, 300)])
    with pytest.raises(ValueError, match="out of range"):
        TextFeatureExtractor(backbone)(CAPTIONS, blocks=[-1], timesteps=[1001])


def test_large_model_refused_before_its_weights_are_read(tmp_path, monkeypatch) -> None:
    folder = save_tiny(tmp_path / "dg")
    count = sum(p.numel() for p in DiffusionGemmaForBlockDiffusion(tiny_config()).parameters())
    assert large.meta_parameter_count(lambda: DiffusionGemmaForBlockDiffusion(tiny_config())) == count  # tied once
    (folder / "model.safetensors").write_bytes(b"not weights")  # would fail if it were read
    monkeypatch.setattr(large, "LARGE_PARAMS", count - 1)
    with pytest.raises(CheckpointError, match="allow_large: true") as err:
        DiffusionGemmaBackbone.from_pretrained(str(folder))
    assert "\n" not in str(err.value) and f"{count / 1e9:.2f}B" in str(err.value)
    with pytest.raises(Exception, match="(?i)safetensors|header"):  # allowed: now the weights are read
        DiffusionGemmaBackbone.from_pretrained(str(folder), allow_large=True)


def test_bfloat16_and_device_map(folder) -> None:
    bb = DiffusionGemmaBackbone.from_pretrained(str(folder), dtype="bfloat16", device_map="cpu")
    assert next(bb.module.parameters()).dtype == torch.bfloat16 and bb.placed
    assert bb.to("cpu") is bb
    x0 = bb.encode(CAPTIONS[:1], [0], seed=0)
    with torch.no_grad():
        got = bb.forward_intermediates(x0.x, bb.model_time(0, 1), [DEPTH - 1])[DEPTH - 1].float()
    expected = reference(folder, x0.x)[DEPTH - 1]
    assert (got - expected).abs().max() <= 0.1 * expected.abs().max()  # bf16 rounding, not another computation
