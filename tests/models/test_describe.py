"""``describe_source`` for the text families (and a DiT file read for shapes): the table equals what the loaded
adapter reports, and no weights are read (both full-read paths are made to fail)."""

from __future__ import annotations

import json

import pytest
import torch
from test_diffusion_gemma import save_tiny

import difffeat.models.checkpoints as checkpoints
from difffeat.models.base import DDPM, MASKED
from difffeat.models.ddit_adapter import DDiTAdapter
from difffeat.models.ddit_load import save_ddit
from difffeat.models.describe import describe_source
from difffeat.models.diffusion_gemma import UNIFORM, DiffusionGemmaBackbone
from difffeat.models.dit import DiT, DiTConfig
from difffeat.models.radd import RADD, RADDAdapter, RADDConfig, save_radd
from helpers import tiny_ddit, tiny_tokenizer


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Any read of tensor data fails the test: safetensors' full load and the torch pickle at map_location cpu."""
    real = checkpoints._load_torch_pickle

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read")

    def pickle_meta_only(path, map_location="cpu"):
        assert map_location == "meta", "weights were read"
        return real(path, map_location)

    monkeypatch.setattr("safetensors.torch.load_file", refuse)
    monkeypatch.setattr(checkpoints, "_load_torch_pickle", pickle_meta_only)


def assert_same_table(table, adapter, family: str, time) -> None:
    assert (table.family, table.modality, table.time) == (family, "text", time)
    assert list(table.blocks) == adapter.layers()


def test_own_ddit_folder(tmp_path):
    folder = tmp_path / "ddit"
    folder.mkdir()
    tok = tiny_tokenizer(folder)
    save_ddit(tiny_ddit(tok.vocab_size, depth=3), folder)
    adapter = DDiTAdapter.from_pretrained(str(folder))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("safetensors.torch.load_file", lambda *a, **k: pytest.fail("weights were read"))
        table = describe_source(folder)
    assert_same_table(table, adapter, "ddit", MASKED)
    assert len(table) == 3 and table[2].name == "blocks.2" and table[2].width == 32


def test_bare_sedd_state_dict_file_needs_the_family_and_reads_shapes_only(tmp_path, no_weight_reads):
    model = tiny_ddit(50, depth=2)
    torch.save(model.state_dict(), tmp_path / "sedd.pt")
    table = describe_source(tmp_path / "sedd.pt", "ddit")
    assert [(b.index, b.name, b.width) for b in table] == [(0, "blocks.0", 32), (1, "blocks.1", 32)]
    assert "masked 0..1000, clean = 0" in str(table)


def tiny_radd() -> RADD:
    return RADD(RADDConfig(vocab_size=51, hidden_size=32, n_heads=2, n_blocks=2, length=16))


def test_radd_folder_is_sniffed_and_a_bare_file_read_for_shapes(tmp_path, no_weight_reads):
    model = tiny_radd()
    table = describe_source(save_radd(model, tmp_path / "radd"))
    torch.save(model.state_dict(), tmp_path / "radd.pt")
    assert describe_source(tmp_path / "radd.pt", "radd") == table
    assert table.family == "radd" and len(table) == 2 and table[1].width == 32


def test_radd_table_equals_the_loaded_adapters(tmp_path):
    folder = save_radd(tiny_radd(), tmp_path / "radd")
    tiny_tokenizer(folder)
    assert_same_table(describe_source(folder), RADDAdapter.from_pretrained(str(folder)), "radd", MASKED)


def test_diffusion_gemma_folder_from_its_config_alone(tmp_path):
    folder = save_tiny(tmp_path / "gemma")
    adapter = DiffusionGemmaBackbone.from_pretrained(str(folder))
    for weights in folder.glob("*.safetensors"):
        weights.unlink()  # the table needs config.json only
    assert_same_table(describe_source(folder), adapter, "diffusion_gemma", UNIFORM)


def test_dit_file_is_read_for_shapes_only(tmp_path, no_weight_reads):
    cfg = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=384, depth=2, num_heads=6, num_classes=10)
    torch.save({"ema": DiT(cfg).state_dict()}, tmp_path / "DiT-S-2.pt")  # a training checkpoint's layout
    table = describe_source(tmp_path / "DiT-S-2.pt")
    assert (table.family, len(table), table[1].width, table.time) == ("dit", 2, 384, DDPM)


def test_a_config_no_family_reads_is_one_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match=r"config.json: not a model this library reads .*--backbone"):
        describe_source(tmp_path)
    with pytest.raises(ValueError, match="unknown family 'bert'"):
        describe_source(tmp_path, "bert")
