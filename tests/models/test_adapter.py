"""The shared adapter bases: which family wraps a bare model, and how every text family reads captions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from difffeat.models.base import adapt
from difffeat.models.ddit_adapter import DDiTAdapter
from difffeat.models.dit_adapter import DiTAdapter
from difffeat.models.radd import RADD, RADDAdapter, RADDConfig
from helpers import CAPTIONS, tiny_ddit, tiny_dit, tiny_tokenizer


def test_a_bare_model_is_wrapped_by_its_own_family_only(tmp_path) -> None:
    tok = tiny_tokenizer(tmp_path)
    assert type(adapt(tiny_ddit(64), tokenizer=tok)) is DDiTAdapter
    radd = RADD(RADDConfig(vocab_size=65, hidden_size=32, n_heads=2, n_blocks=2, length=24))
    assert type(adapt(radd, tokenizer=tok)) is RADDAdapter  # not the DDiT adapter it derives from
    assert type(adapt(tiny_dit())) is DiTAdapter  # not SiT, which shares DiT's network
    with pytest.raises(TypeError, match="no registered backbone family wraps a Linear"):
        adapt(nn.Linear(2, 2))


def test_captions_are_tokenized_once_truncated_to_max_length_and_take_no_condition(tmp_path) -> None:
    adapter = DDiTAdapter(tiny_ddit(64), tiny_tokenizer(tmp_path), max_length=4)
    long = [c for c in CAPTIONS if int(adapter.tokenizer.encode_batch([c], 24)[1].sum()) > 4][:2]
    assert long, "needs captions longer than 4 tokens"
    first = adapter.encode(long, [0, 1], seed=0)
    again = adapter.encode(long, [0, 1], seed=5)
    assert first.x.shape == (len(long), 4) and first.mask.dtype == torch.bool
    assert first.x is again.x and adapter.num_truncated == len(long)  # memoised: counted once
    assert adapter.condition(3) == {}
    with pytest.raises(ValueError, match=r"^a DDiT \(SEDD/MDLM\) takes no class label or caption condition$"):
        adapter.condition(3, label=0)
    with pytest.raises(ValueError, match="^RADD takes no class label"):
        RADDAdapter.condition(RADDAdapter.__new__(RADDAdapter), 1, captions=["a"])
