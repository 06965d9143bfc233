"""Tokenizers for the text backbones: GPT-2 (SEDD, MDLM) through ``transformers``, our own through ``tokenizers``.

Special tokens follow how each model saw documents in training, so a caption looks like a training document:

* SEDD appends EOS (50256) after each document, no BOS: ``add_special="eos"``;
* MDLM wraps each block as [BOS] ... [EOS] (GPT-2's BOS = EOS = 50256): ``add_special="bos_eos"``;
* ``"none"`` adds nothing.

Neither tokenizer knows the diffusion [MASK] token: the DDiT adds it as one id past the tokenizer's vocabulary
(50257 for GPT-2), so a model's ``vocab_size`` is the tokenizer's plus one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from difffeat.models.checkpoints import CheckpointError

SPECIALS = ("none", "eos", "bos_eos")
SPECIALS_BY_KIND = {"sedd": "eos", "mdlm": "bos_eos"}
WORD_SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")


class TextTokenizer:
    """Turns captions into right-padded id batches; one class whatever library does the splitting."""

    def __init__(
        self,
        encode: Callable[[list[str]], list[list[int]]],
        vocab_size: int,
        eos_id: int | None,
        bos_id: int | None,
        pad_id: int | None,
        add_special: str = "none",
    ):
        if add_special not in SPECIALS:
            raise ValueError(f"add_special must be one of {SPECIALS}, got {add_special!r}")
        if (add_special != "none" and eos_id is None) or (add_special == "bos_eos" and bos_id is None):
            raise ValueError(f"add_special={add_special!r} needs BOS/EOS tokens this tokenizer does not have")
        self._encode = encode
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.bos_id = bos_id
        self.pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
        self.add_special = add_special

    def _wrap(self, ids: list[int], max_length: int) -> tuple[list[int], bool]:
        """Add the special tokens around the (possibly truncated) text; the specials always survive truncation."""
        head = [self.bos_id] if self.add_special == "bos_eos" else []
        tail = [self.eos_id] if self.add_special != "none" else []
        room = max_length - len(head) - len(tail)
        if room < 1:
            raise ValueError(f"max_length {max_length} leaves no room for text after the special tokens")
        return head + ids[:room] + tail, len(ids) > room

    def encode_batch(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(ids [B, L], attention_mask [B, L] bool, n_truncated)``, padded on the right to the longest text.

        L is at most ``max_length``; ``n_truncated`` counts texts that lost tokens to it.
        """
        wrapped = [self._wrap(ids, max_length) for ids in self._encode(list(texts))]
        rows = [row for row, _ in wrapped]
        length = max([1, *map(len, rows)])
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = True
        return ids, mask, sum(cut for _, cut in wrapped)


def load_tokenizer(source: str | Path, *, add_special: str | None = None, kind: str | None = None) -> TextTokenizer:
    """A ``tokenizer.json`` file (or a folder holding only one) via ``tokenizers``; else a hub id ("gpt2") or
    folder via ``transformers.AutoTokenizer``. ``add_special`` defaults to what the model saw in training:
    for GPT-2 tokenizers what the model ``kind`` did ("sedd" -> "eos", "mdlm" -> "bos_eos"); for a
    ``tokenizers`` file "none", because ``difffeat zoo train-ddit`` trains on bare captions.
    """
    path = Path(source)
    if path.is_dir() and (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        path = path / "tokenizer.json"
    if path.is_file() and path.suffix == ".json":
        return _from_tokenizers_file(path, add_special or "none")
    return _from_transformers(str(source), add_special or SPECIALS_BY_KIND.get(kind or "", "none"))


def _from_tokenizers_file(path: Path, add_special: str) -> TextTokenizer:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise CheckpointError(f"{path}: not a readable tokenizers JSON file ({exc})") from exc

    def encode(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]

    return TextTokenizer(
        encode,
        tok.get_vocab_size(with_added_tokens=True),
        eos_id=tok.token_to_id("[EOS]"),
        bos_id=tok.token_to_id("[BOS]"),
        pad_id=tok.token_to_id("[PAD]"),
        add_special=add_special,
    )


def _from_transformers(source: str, add_special: str) -> TextTokenizer:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # OSError offline, ValueError for folders without tokenizer files
        raise CheckpointError(
            f"{source}: could not load a tokenizer ({type(exc).__name__}: {exc}); SEDD and MDLM use GPT-2's, "
            "so pass 'gpt2' or a local folder holding it"
        ) from exc

    def encode(texts: list[str]) -> list[list[int]]:
        return tok(texts, add_special_tokens=False)["input_ids"]

    return TextTokenizer(
        encode, len(tok), tok.eos_token_id, tok.bos_token_id, tok.pad_token_id, add_special=add_special
    )


def train_word_tokenizer(texts: Iterable[str], vocab_size: int, path: str | Path) -> Path:
    """Train a lowercase word-level tokenizer (specials [PAD] [UNK] [BOS] [EOS] first) and save it as JSON.

    Small embedded models want a small vocabulary of whole words: sub-word merges buy nothing on short captions.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=list(WORD_SPECIALS)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path
