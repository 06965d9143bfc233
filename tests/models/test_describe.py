"""``difffeat layers``' table against the real loaded adapter, for every family and on-disk layout, with no weight
read: tiny random models saved in each layout, loaded by the family's own loader for the reference, then described
with every full read of a weights file made to fail (and, where configs suffice, the weights files deleted)."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path

import huggingface_hub
import pytest
import torch
from tests.helpers import randomise, tiny_dit, tiny_tokenizer
from tests.models.test_checkpoints import ddit_training_checkpoint, write_mdlm_ckpt
from tests.models.test_ddit import random_model, sedd_config_json, write_folder
from tests.models.test_diffusion_gemma import DEPTH as GEMMA_DEPTH
from tests.models.test_diffusion_gemma import save_tiny as save_tiny_gemma
from tests.models.test_dit import diffusers_twin, make_dit

from difffeat.models import checkpoints
from difffeat.models.base import Backbone, families, load_backbone
from difffeat.models.ddit_load import save_ddit
from difffeat.models.describe import FAMILIES, describe_source, sniff_source
from difffeat.models.dit import DiT, DiTConfig
from difffeat.models.dit_load import save_dit
from difffeat.models.radd import RADD, RADDConfig, save_radd

# A standard width (DiT-S: 384, 6 heads), so the config comes from tensor shapes as for released files; pixels in.
DIT = DiTConfig(input_size=8, patch_size=2, in_channels=3, hidden_size=384, depth=2, num_heads=6, num_classes=10)
RADD_TINY = RADDConfig(vocab_size=65, hidden_size=32, n_heads=2, n_blocks=3, length=24)
WEIGHTS = ("*.safetensors", "*.bin")


def dit_file(tmp_path: Path, name: str = "DiT-S-2.pt") -> Path:
    sd = randomise(DiT(DIT)).state_dict()
    if name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(sd, tmp_path / name)
    else:
        torch.save(sd, tmp_path / name)
    return tmp_path / name


def dit_training_file(tmp_path: Path) -> Path:
    """DiT's train.py checkpoint: model, EMA, optimizer and an argparse.Namespace (the restricted unpickler's)."""
    model, ema = randomise(DiT(DIT), 0), randomise(DiT(DIT), 1)
    ckpt = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": {}, "args": argparse.Namespace(lr=1e-4)}
    torch.save(ckpt, tmp_path / "0400000.pt")
    return tmp_path / "0400000.pt"


def diffusers_dit_root(tmp_path: Path) -> Path:
    with torch.no_grad():  # make_dit fills parameters in place
        diffusers_twin(make_dit(in_channels=3)).save_pretrained(tmp_path / "dit-pipe" / "transformer")
    (tmp_path / "dit-pipe" / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    return tmp_path / "dit-pipe"


def mdlm_folder(tmp_path: Path) -> Path:
    model = random_model(kind="mdlm", scale_by_sigma=False, time_conditioning=False)
    config = dict(model_type="mdlm", vocab_size=100, model_length=32, hidden_dim=64, cond_dim=16, n_blocks=2,
                  n_heads=4, time_conditioning=False)  # fmt: skip
    return write_folder(tmp_path / "mdlm", config, {f"backbone.{k}": v for k, v in model.state_dict().items()})


def sedd_training_file(tmp_path: Path) -> Path:
    torch.save(ddit_training_checkpoint()[0], tmp_path / "checkpoint.pth")
    return tmp_path / "checkpoint.pth"


def mdlm_lightning_file(tmp_path: Path) -> Path:
    write_mdlm_ckpt(tmp_path / "last.ckpt")  # omegaconf and transformers 4.x records: the restricted unpickler's
    return tmp_path / "last.ckpt"


def bare_ddit_file(tmp_path: Path) -> Path:
    torch.save(random_model().state_dict(), tmp_path / "sedd.pt")
    return tmp_path / "sedd.pt"


def radd_training_file(tmp_path: Path) -> Path:
    model = RADD(RADDConfig(**{**vars(RADD_TINY)}))
    shadows = [p.detach() + 1 for p in model.parameters()]
    state = {"model": model.state_dict(), "ema": {"decay": 0.9999, "shadow_params": shadows}, "step": 3}
    torch.save(state, tmp_path / "checkpoint.pth")
    return tmp_path / "checkpoint.pth"


# name: (writes the source under tmp_path, its family, its modality, whether its config.json alone describes it)
LAYOUTS: dict[str, tuple[Callable[[Path], Path], str, str, bool]] = {
    "dit .pt": (dit_file, "dit", "image", False),
    "dit .safetensors": (lambda p: dit_file(p, "dit.safetensors"), "dit", "image", False),
    "dit training checkpoint": (dit_training_file, "dit", "image", False),
    "dit own folder": (lambda p: save_dit(tiny_dit(), p / "own-dit"), "dit", "image", True),
    "dit diffusers pipeline root": (diffusers_dit_root, "dit", "image", True),
    "sedd folder": (lambda p: write_folder(p / "sedd", sedd_config_json(), random_model().state_dict()), "ddit",
                    "text", False),
    "sedd .bin folder": (lambda p: write_folder(p / "sedd", sedd_config_json(), random_model().state_dict(),
                                                "pytorch_model.bin"), "ddit", "text", False),
    "mdlm folder": (mdlm_folder, "ddit", "text", False),
    "mdlm lightning checkpoint": (mdlm_lightning_file, "ddit", "text", False),
    "sedd training checkpoint": (sedd_training_file, "ddit", "text", False),
    "ddit state dict": (bare_ddit_file, "ddit", "text", False),
    "ddit own folder": (lambda p: save_ddit(random_model(), p / "own-ddit"), "ddit", "text", False),
    "radd hub folder": (lambda p: save_radd(RADD(RADD_TINY), p / "radd"), "radd", "text", True),
    "radd training checkpoint": (radd_training_file, "radd", "text", False),
    "diffusion_gemma folder": (lambda p: save_tiny_gemma(p / "dg"), "diffusion_gemma", "text", True),
}  # fmt: skip


def forbid_weight_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every full read of a checkpoint fails: torch.load only onto the meta device, no safetensors load_file."""
    real_load = torch.load

    def meta_only(*args, **kwargs):
        assert kwargs.get("map_location") == "meta", "a checkpoint's tensors were read"
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", meta_only)
    monkeypatch.setattr(checkpoints, "_safetensors", lambda path: pytest.fail(f"{path}: its tensors were read"))


def parse(table) -> tuple[str, int, str, list[tuple[int, str, int]]]:
    """Family, block count, time line and (index, name, width) rows of a printed table."""
    lines = str(table).splitlines()
    family, count = re.fullmatch(r"(\w+) \((?:image|text)\), (\d+) blocks", lines[0]).groups()
    assert lines[2].split() == ["block", "name", "width"]
    rows = [(int(i), name, int(width)) for i, name, width in (line.split() for line in lines[3:])]
    return family, int(count), lines[1], rows


def assert_describes(table, backbone: Backbone) -> None:
    family, count, time_line, rows = parse(table)
    t = backbone.time
    assert family == backbone.family
    assert count == len(rows) == backbone.depth > 0
    assert rows == [(layer.index, layer.name, layer.width) for layer in backbone.layers()]
    assert time_line == f"time: {t.name} {t.low:g}..{t.high:g}, clean = {t.clean:g}: {t.doc}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_table_is_the_loaded_adapters_and_reads_no_weights(layout, tmp_path, monkeypatch):
    write, family, modality, configs_suffice = LAYOUTS[layout]
    source = write(tmp_path)
    options = {"tokenizer": tiny_tokenizer(tmp_path)} if family in ("ddit", "radd") else {}
    loaded = load_backbone(source, modality, family, **options)
    if configs_suffice:  # the weights are not even there
        for pattern in WEIGHTS:
            for weights in Path(source).rglob(pattern):
                weights.unlink()
    forbid_weight_reads(monkeypatch)
    assert sniff_source(source) == family
    assert_describes(describe_source(source), loaded)


def test_a_sit_file_is_described_with_flow_time_when_named(tmp_path, monkeypatch):
    source = dit_file(tmp_path, "model.pt")
    loaded = load_backbone(source, "image", "sit")
    forbid_weight_reads(monkeypatch)
    assert loaded.time.name == "sit-flow"
    assert_describes(describe_source(source, "sit"), loaded)


def test_gemma_table_names_decoder_layers_and_uniform_time(tmp_path):
    """Hand-written expectation, independent of the adapter: decoder layers, uniform-state noise."""
    folder = save_tiny_gemma(tmp_path / "dg")
    family, count, time_line, rows = parse(describe_source(folder))
    assert (family, count) == ("diffusion_gemma", GEMMA_DEPTH)
    assert time_line.startswith("time: uniform 0..1000, clean = 0")
    assert [name for _, name, _ in rows] == [f"model.decoder.layers.{i}" for i in range(GEMMA_DEPTH)]


def test_a_dit_hub_id_needs_only_its_transformer_config(tmp_path, monkeypatch):
    root = diffusers_dit_root(tmp_path)
    asked = []

    def download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        return str(root / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    family, count, time_line, rows = parse(describe_source("facebook/DiT-XL-2-256"))
    assert asked == [("facebook/DiT-XL-2-256", "transformer/config.json")]
    assert (family, count, rows[-1]) == ("dit", 3, (2, "blocks.2", 96))
    assert time_line.startswith("time: ddpm 0..999")


def test_every_registered_family_can_be_described():
    assert set(FAMILIES) == set(families())


@pytest.mark.parametrize(
    ("source", "family", "message"),
    [
        ("vae.pt", None, r"vae.pt: cannot tell its family \(the file looks like a VAE.*pass the backbone"),
        ("sedd", "nope", r"cannot describe it as 'nope'; families: dit, ddit, radd"),
        ("louaaron/sedd-small", None, "ddit is described from a local folder or file; download it first"),
        ("missing/", None, "no such file or folder, and not a hub id"),
    ],
)
def test_mistakes_are_one_line(tmp_path, source, family, message):
    torch.save({"encoder.down_blocks.0.weight": torch.zeros(2)}, tmp_path / "vae.pt")
    write_folder(tmp_path / "sedd", sedd_config_json(), random_model().state_dict())
    local = str(tmp_path / source) if source in ("vae.pt", "sedd", "missing/") else source
    with pytest.raises(ValueError, match=message) as err:
        describe_source(local, family)
    assert "\n" not in str(err.value)
