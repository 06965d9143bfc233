"""Tokenizer loading: a tiny tokenizer trained here (no downloads), through the tokenizers-JSON and folder paths."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from difffeat.models.checkpoints import CheckpointError
from difffeat.models.tokenizers import load_tokenizer, train_word_tokenizer

SENTENCES = [
    "A dog runs on the beach",
    "Two cats sleep on a red sofa",
    "A man rides a bike down the street",
    "the dog and the cat play in the park",
]
TEXTS = ["a dog", "two cats sleep on the red sofa", "A DOG runs"]  # 2, 7 and 3 words


@pytest.fixture
def json_path(tmp_path):
    return train_word_tokenizer(SENTENCES, vocab_size=40, path=tmp_path / "tok" / "tokenizer.json")


@pytest.fixture
def folder(json_path, tmp_path):
    """The same tokenizer saved the transformers way (tokenizer_config.json + tokenizer.json)."""
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(str(json_path)),
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
    )
    wrapped.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_word_tokenizer_specials_and_lowercase(json_path) -> None:
    tok = load_tokenizer(json_path)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)  # [PAD] [UNK] [BOS] [EOS] come first
    assert tok.vocab_size <= 40
    ids, _, _ = tok.encode_batch(["A Dog", "a dog", "a zebra"], max_length=8)
    assert torch.equal(ids[0], ids[1])
    assert ids[2, 1] == 1  # unknown word -> [UNK]


def test_truncation_is_counted_and_padding_masked(json_path) -> None:
    tok = load_tokenizer(json_path)
    ids, mask, n_truncated = tok.encode_batch(TEXTS, max_length=5)
    assert ids.shape == (3, 5) and ids.dtype == torch.long and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [2, 5, 3]
    assert n_truncated == 1
    assert (ids[~mask] == tok.pad_id).all()
    assert mask[0].tolist() == [True, True, False, False, False]  # right padding
    full, _, none_cut = tok.encode_batch(TEXTS, max_length=16)
    assert none_cut == 0 and full.shape == (3, 7)  # padded to the longest text, not to max_length
    assert torch.equal(full[1, :5], ids[1])


@pytest.mark.parametrize(("kind", "add_special"), [("sedd", "eos"), ("mdlm", "bos_eos"), (None, "none")])
def test_gpt2_style_special_tokens_follow_the_model_kind(json_path, folder, kind: str | None, add_special: str) -> None:
    tok = load_tokenizer(folder, kind=kind)
    assert tok.add_special == add_special
    plain, _, _ = load_tokenizer(json_path).encode_batch(["a dog"], max_length=8)
    ids, mask, _ = tok.encode_batch(["a dog"], max_length=8)
    head, tail = {"none": ([], []), "eos": ([], [3]), "bos_eos": ([2], [3])}[add_special]  # [BOS] 2, [EOS] 3
    assert ids[0, : int(mask.sum())].tolist() == head + plain[0].tolist() + tail


@pytest.mark.parametrize("kind", ["sedd", "mdlm", None])
def test_our_tokenizer_files_add_nothing_by_default_as_in_zoo_training(json_path, kind: str | None) -> None:
    assert load_tokenizer(json_path, kind=kind).add_special == "none"
    assert load_tokenizer(json_path, kind=kind, add_special="eos").add_special == "eos"


def test_truncation_keeps_the_special_tokens(json_path) -> None:
    tok = load_tokenizer(json_path, add_special="bos_eos")
    ids, mask, n_truncated = tok.encode_batch(["two cats sleep on the red sofa"], max_length=4)
    assert n_truncated == 1 and mask.all()
    assert ids[0, 0] == tok.bos_id and ids[0, -1] == tok.eos_id
    with pytest.raises(ValueError, match="no room"):
        tok.encode_batch(["a dog"], max_length=2)


def test_transformers_folder_matches_json_file(json_path, folder) -> None:
    from_json = load_tokenizer(json_path, add_special="bos_eos")
    from_folder = load_tokenizer(folder, add_special="bos_eos")
    assert (from_folder.vocab_size, from_folder.eos_id, from_folder.bos_id, from_folder.pad_id) == (
        from_json.vocab_size,
        from_json.eos_id,
        from_json.bos_id,
        from_json.pad_id,
    )
    for a, b in zip(from_json.encode_batch(TEXTS, 6), from_folder.encode_batch(TEXTS, 6), strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_folder_with_only_tokenizer_json(json_path) -> None:
    assert load_tokenizer(json_path.parent).encode_batch(["a dog"], 4)[0].tolist() == (
        load_tokenizer(json_path).encode_batch(["a dog"], 4)[0].tolist()
    )


def test_unloadable_sources_are_reported(tmp_path, json_path) -> None:
    with pytest.raises(CheckpointError, match="could not load a tokenizer.*gpt2"):
        load_tokenizer(tmp_path / "missing")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(CheckpointError, match="not a readable tokenizers JSON"):
        load_tokenizer(bad)
    with pytest.raises(ValueError, match="add_special"):
        load_tokenizer(json_path, add_special="both")
