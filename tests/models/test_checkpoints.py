"""Reading a checkpoint never runs code from it, through every entry point, and real training checkpoints that
need more than tensors (DiT's Namespace, SEDD's numpy step, MDLM's Lightning .ckpt with omegaconf and a
transformers 4.x tokenizer object) still load."""

from __future__ import annotations

import argparse
import builtins
import functools
import os
import pathlib
import subprocess
import sys
import types
import typing
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from difffeat.models.checkpoints import CheckpointError, Unloaded, read_state_dict
from difffeat.models.ddit import DDiT, DDiTConfig
from difffeat.models.ddit_load import load_ddit
from difffeat.models.dit import DiT, DiTConfig
from difffeat.models.dit_load import load_dit
from helpers import randomise

TINY_DIT = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=384, depth=1, num_heads=6, num_classes=3)
TINY_DDIT = DDiTConfig(vocab_size=40, hidden_size=32, cond_dim=16, n_heads=2, n_blocks=2, length=24)


class Reduce:
    """Pickles as ``func(*args)``: what a crafted file does to run code on load."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


# A module the test writes next to itself: importable while loading, with code on every unpickling hook.
EVIL_MODULE = """
from pathlib import Path
MARKER = None  # set by the test after pickling

def _fire():
    if MARKER is not None:
        Path(MARKER).touch()

def hit(*args):
    _fire()

class Trap:  # NEWOBJ -> __new__, BUILD -> __setstate__
    def __new__(cls, *args):
        _fire()
        return object.__new__(cls)
    def __setstate__(self, state):
        _fire()

class TrapList(list):  # APPENDS -> extend / append
    def extend(self, items):
        _fire()
    def append(self, item):
        _fire()

class TrapDict(dict):  # SETITEMS -> __setitem__
    def __setitem__(self, key, value):
        _fire()
"""


@contextmanager
def evil_module(folder: Path):
    """``evilmod`` importable from ``folder`` during the block; imported now only to pickle its objects."""
    (folder / "evilmod.py").write_text(EVIL_MODULE)
    sys.path.insert(0, str(folder))
    try:
        import evilmod

        yield evilmod
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("evilmod", None)


def payloads(marker: Path, evilmod: types.ModuleType) -> dict[str, object]:
    """Objects whose unpickling runs code that creates ``marker``: stdlib callables and every hook of a class."""
    trap = evilmod.Trap()
    trap.x = 1
    return {
        "os.system": Reduce(os.system, f"touch '{marker}'"),
        "builtins.exec": Reduce(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "builtins.eval": Reduce(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.call": Reduce(subprocess.call, ["touch", str(marker)]),
        "functools.partial": Reduce(functools.partial(os.system, f"touch '{marker}'")),
        "pathlib.Path.touch": Reduce(pathlib.Path.touch, pathlib.Path(marker)),
        "module function": Reduce(evilmod.hit, 1),
        "class __new__/__setstate__": trap,
        "list subclass extend": evilmod.TrapList([1, 2]),
        "dict subclass __setitem__": evilmod.TrapDict(a=1),
    }


PAYLOADS = [
    "os.system",
    "builtins.exec",
    "builtins.eval",
    "subprocess.call",
    "functools.partial",
    "pathlib.Path.touch",
    "module function",
    "class __new__/__setstate__",
    "list subclass extend",
    "dict subclass __setitem__",
]


def write_payload(folder: Path, name: str, wrap, legacy: bool = False) -> tuple[Path, Path]:
    """A checkpoint ``wrap(payload)`` whose payload would create a marker file; returns (file, marker)."""
    marker = folder / "marker"
    path = folder / "evil.pt"
    with evil_module(folder) as evilmod:
        torch.save(wrap(payloads(marker, evilmod)[name]), path, _use_new_zipfile_serialization=not legacy)
    return path, marker


def arm(folder: Path, marker: Path) -> None:
    """Make the evil module fire when something imports it (as an unsafe unpickler would)."""
    (folder / "evilmod.py").write_text(EVIL_MODULE.replace("MARKER = None", f"MARKER = {str(marker)!r}"))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("name", PAYLOADS)
def test_payloads_are_real_and_never_run(tmp_path, monkeypatch, name, legacy):
    path, marker = write_payload(tmp_path, name, lambda p: {"w": torch.arange(3.0), "evil": p}, legacy)
    arm(tmp_path, marker)
    monkeypatch.syspath_prepend(str(tmp_path))  # importable, so only our refusal keeps it from running

    sd = read_state_dict(path)
    assert not marker.exists()
    assert "evilmod" not in sys.modules
    assert torch.equal(sd["w"], torch.arange(3.0))
    assert isinstance(sd["evil"], Unloaded)

    torch.load(path, weights_only=False)  # the payload is real: an ordinary unpickler runs it
    monkeypatch.delitem(sys.modules, "evilmod", raising=False)
    assert marker.exists()


def test_unloaded_records_what_the_file_asked_for(tmp_path):
    path, _ = write_payload(tmp_path, "os.system", lambda p: {"evil": p})
    evil = read_state_dict(path)["evil"]
    assert evil.name == "system"
    assert evil.args == (f"touch '{tmp_path / 'marker'}'",)
    path, _ = write_payload(tmp_path, "dict subclass __setitem__", lambda p: p)
    with pytest.raises(CheckpointError, match=r"evil.pt: holds evilmod.TrapDict\(\.\.\.\), which was neither"):
        read_state_dict(path)


def dit_training_checkpoint(seed: int = 0, **extra) -> tuple[dict, DiT]:
    model, ema = randomise(DiT(TINY_DIT), seed), randomise(DiT(TINY_DIT), seed + 1)
    ckpt = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": {"state": {}, "param_groups": []}}
    return {**ckpt, "args": argparse.Namespace(model="DiT-S/2", lr=1e-4, image_size=64), **extra}, ema


def ddit_training_checkpoint(**extra) -> tuple[dict, DDiT]:
    """SEDD's ``checkpoint.pth``: model, EMA shadows in parameters() order, optimizer, step."""
    model, ema = randomise(DDiT(TINY_DDIT), 0), randomise(DDiT(TINY_DDIT), 1)
    shadows = {"decay": 0.9999, "num_updates": 10, "shadow_params": [p.clone() for p in ema.parameters()]}
    return {"model": model.state_dict(), "ema": shadows, "optimizer": {}, "step": 10, **extra}, ema


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["os.system", "class __new__/__setstate__"])
def test_loaders_take_the_weights_and_run_nothing(tmp_path, monkeypatch, name):
    monkeypatch.syspath_prepend(str(tmp_path))
    path, marker = write_payload(tmp_path, name, lambda p: dit_training_checkpoint(evil=p)[0])
    arm(tmp_path, marker)
    assert_same_weights(load_dit(path), dit_training_checkpoint()[1])
    path, marker = write_payload(tmp_path, name, lambda p: ddit_training_checkpoint(step=p)[0])
    arm(tmp_path, marker)
    assert_same_weights(load_ddit(path), ddit_training_checkpoint()[1])
    assert not marker.exists() and "evilmod" not in sys.modules


def test_loaders_refuse_a_bare_payload_without_running_it(tmp_path):
    path, marker = write_payload(tmp_path, "os.system", lambda p: p)
    for load in (load_dit, load_ddit):
        with pytest.raises(CheckpointError, match="holds posix.system.*neither imported nor run"):
            load(path)
    assert not marker.exists()


def test_dit_training_checkpoint_with_namespace(tmp_path):
    ckpt, ema = dit_training_checkpoint()
    torch.save(ckpt, tmp_path / "0400000.pt")
    with pytest.raises(Exception, match="Namespace"):  # what weights_only=True alone refuses
        torch.load(tmp_path / "0400000.pt", weights_only=True)
    read = read_state_dict(tmp_path / "0400000.pt")
    assert read["args"] == ckpt["args"] and type(read["args"]) is argparse.Namespace
    assert_same_weights(load_dit(tmp_path / "0400000.pt"), ema)


def test_a_checkpoint_that_needs_more_than_tensors_is_read_once(tmp_path, monkeypatch):
    torch.save(dit_training_checkpoint()[0], tmp_path / "0400000.pt")
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw["weights_only"]) or real_load(*a, **kw))
    read_state_dict(tmp_path / "0400000.pt")
    assert calls == [False]  # no weights_only=True attempt that would read every tensor and then fail


def test_sedd_training_checkpoint_with_numpy_step(tmp_path):
    ckpt, ema = ddit_training_checkpoint(step=np.int64(10))
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    assert isinstance(read_state_dict(tmp_path / "checkpoint.pth")["step"], Unloaded)
    assert_same_weights(load_ddit(tmp_path / "checkpoint.pth"), ema)


# --------------------------------------------------------------------------------------------------------------
# MDLM Lightning .ckpt: omegaconf and transformers 4.x classes that this environment does not have
# --------------------------------------------------------------------------------------------------------------


def standin(module: str, name: str, getstate=None) -> type:
    """A class that pickles as ``module.name`` (state = its __dict__ minus omegaconf's flags cache)."""

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_flags_cache", None)
        return state

    cls = type(name, (), {"__module__": module, "__getstate__": getstate or __getstate__})
    cls.__qualname__ = name
    return cls


STANDINS = {
    (m, n): standin(m, n)
    for m, n in [
        ("omegaconf.dictconfig", "DictConfig"),
        ("omegaconf.listconfig", "ListConfig"),
        ("omegaconf.nodes", "AnyValueNode"),
        ("omegaconf.base", "ContainerMetadata"),
        ("omegaconf.base", "Metadata"),
        ("transformers.models.gpt2.tokenization_gpt2_fast", "GPT2TokenizerFast"),
    ]
}


def omegaconf_like(value, parent=None):
    """A value as omegaconf pickles it: containers hold nodes in ``_content``, leaf nodes hold ``_val``."""
    if isinstance(value, dict | list):
        module, name = ("dictconfig", "DictConfig") if isinstance(value, dict) else ("listconfig", "ListConfig")
        node = STANDINS[f"omegaconf.{module}", name]()
        node._metadata = STANDINS["omegaconf.base", "ContainerMetadata"]()
        items = value.items() if isinstance(value, dict) else enumerate(value)
        content = {k: omegaconf_like(v, node) for k, v in items}
        node._content = content if isinstance(value, dict) else list(content.values())
    else:
        node, node._metadata = STANDINS["omegaconf.nodes", "AnyValueNode"](), STANDINS["omegaconf.base", "Metadata"]()
        node._val = value
    node._metadata.__dict__.update(ref_type=typing.Any, object_type=None, optional=True, key=None)
    node._parent, node._flags_cache = parent, {"readonly": None}
    return node


@contextmanager
def modules_that_do_not_exist_here():
    """Register the stand-ins under their real module paths while pickling; everything is restored after."""
    with pytest.MonkeyPatch.context() as mp:
        for (module, name), cls in STANDINS.items():
            parts = module.split(".")
            for i in range(1, len(parts) + 1):
                if ".".join(parts[:i]) not in sys.modules:
                    mp.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
            mp.setattr(sys.modules[module], name, cls, raising=False)
        yield


MDLM_CONFIG = {
    "backbone": "dit",
    "time_conditioning": False,
    "model": {"hidden_size": 32, "cond_dim": 16, "length": 24, "n_blocks": 2, "n_heads": 2, "dropout": 0.1},
    "noise": {"type": "loglinear", "sigma_min": 1e-4},
    "training": {"ema": 0.9999, "antithetic_sampling": True},
    "sampling": {"steps": [128, 256], "predictor": "ddpm_cache"},
    "checkpointing": {"resume_ckpt_path": "${.save_dir}/checkpoints/last.ckpt"},
}


def write_mdlm_ckpt(path: Path) -> DDiT:
    """An MDLM Lightning checkpoint of a random model; returns the model its EMA shadows hold."""
    config = replace(TINY_DDIT, kind="mdlm", scale_by_sigma=False, time_conditioning=False)
    model, ema = randomise(DDiT(config), 0), randomise(DDiT(config), 1)
    state_dict = OrderedDict((f"backbone.{k}", v) for k, v in model.state_dict().items())
    state_dict["noise.sigma_min"] = torch.tensor(1e-4)  # the noise schedule, not the network
    shadows = [p.clone() for p in ema.parameters()]
    tokenizer = STANDINS["transformers.models.gpt2.tokenization_gpt2_fast", "GPT2TokenizerFast"]()
    tokenizer.__dict__.update(name_or_path="gpt2", init_kwargs={"model_max_length": 1024}, _tokenizer=b"{...}")
    ckpt = {
        "epoch": 3,
        "global_step": 1000,
        "pytorch-lightning_version": "2.2.1",
        "state_dict": state_dict,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 3}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val/nll'}": {"best_model_score": torch.tensor(3.2)}},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 3e-4, "params": [0, 1]}]}],
        "lr_schedulers": [{"last_epoch": 1000}],
        "hparams_name": "kwargs",
        "hyper_parameters": {"config": omegaconf_like(MDLM_CONFIG), "tokenizer": tokenizer},
        "ema": {"decay": 0.9999, "num_updates": 1000, "shadow_params": [*shadows, torch.zeros(1)],
                "collected_params": None},
    }  # fmt: skip
    with modules_that_do_not_exist_here():
        torch.save(ckpt, path)
    return ema


def test_mdlm_lightning_ckpt_loads_its_ema_weights(tmp_path):
    before = set(sys.modules)
    ema = write_mdlm_ckpt(tmp_path / "last.ckpt")
    assert set(sys.modules) == before  # the stand-ins are gone: loading cannot find them
    read = read_state_dict(tmp_path / "last.ckpt")
    assert read["hyper_parameters"]["config"] == MDLM_CONFIG  # omegaconf content as plain data
    assert read["hyper_parameters"]["tokenizer"].name == "GPT2TokenizerFast"
    loaded = load_ddit(tmp_path / "last.ckpt")
    assert loaded.config.length == 24 and loaded.config.kind == "mdlm"  # length read from the saved config
    assert_same_weights(loaded, ema)
    assert not {m for m in set(sys.modules) - before if m.startswith(("omegaconf", "transformers.models.gpt2"))}


def tensors_in(obj) -> dict[str, torch.Tensor]:
    """Every tensor of a read checkpoint by its path (dicts and lists walked), for comparing two reads."""
    if isinstance(obj, torch.Tensor):
        return {"": obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    return {f"{key}/{path}": t for key, value in items for path, t in tensors_in(value).items()}


@pytest.mark.parametrize("layout", ["safetensors", "state dict", "DiT training", "MDLM Lightning"])
def test_shapes_only_reads_meta_tensors_of_the_same_shapes(tmp_path, layout):
    from safetensors.torch import save_file

    path = tmp_path / ("model.safetensors" if layout == "safetensors" else "model.pt")
    if layout == "safetensors":
        save_file({**DDiT(TINY_DDIT).state_dict(), "half": torch.zeros(3, dtype=torch.bfloat16)}, path)
    elif layout == "state dict":
        torch.save(DiT(TINY_DIT).state_dict(), path)
    elif layout == "DiT training":
        torch.save(dit_training_checkpoint()[0], path)
    else:
        write_mdlm_ckpt(path)
    full, shapes = read_state_dict(path), read_state_dict(path, shapes_only=True)
    full_tensors, meta = tensors_in(full), tensors_in(shapes)
    assert meta.keys() == full_tensors.keys() and len(meta) > 10
    for key, tensor in meta.items():
        assert tensor.is_meta, key
        assert (tensor.shape, tensor.dtype) == (full_tensors[key].shape, full_tensors[key].dtype), key
    assert shapes.keys() == full.keys()
    if layout == "DiT training":
        assert shapes["args"] == full["args"]  # what is not a tensor is read as before


# --------------------------------------------------------------------------------------------------------------
# Files that are not checkpoints say what they are
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_torchscript_is_refused(tmp_path):
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "scripted.pt")
    with pytest.raises(CheckpointError, match="scripted.pt: a TorchScript archive"):
        read_state_dict(tmp_path / "scripted.pt")


@pytest.mark.parametrize(
    "content, what",
    [
        (b"", "empty"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n", "Git LFS pointer"),
        (b"<!DOCTYPE html><html>Sign in</html>", "HTML page"),
        (b"\x80\x02}q\x00.", "pickle that is not a torch checkpoint"),
        (b"\x00\x01\x02\xff" * 8, "unrecognised binary file"),
    ],
    ids=["empty", "lfs", "html", "pickle", "binary"],
)
def test_unreadable_files_are_named_and_described(tmp_path, content, what):
    (tmp_path / "model.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match=f"model.pt: not a readable torch checkpoint: the file is .*{what}"):
        read_state_dict(tmp_path / "model.pt")


def test_non_tensor_entries_are_reported_by_the_strict_load(tmp_path):
    sd = randomise(DiT(TINY_DIT)).state_dict()
    torch.save({**sd, "blocks.0.attn.qkv.bias": Reduce(os.system, "true")}, tmp_path / "dit.pt")
    with pytest.raises(CheckpointError, match=r"not tensors \(1\): blocks.0.attn.qkv.bias"):
        load_dit(tmp_path / "dit.pt")


def crafted(name: str) -> object:
    """Files whose structure is not what a loader expects; each must end in one CheckpointError or a model."""
    sd = {f"backbone.{k}": v for k, v in randomise(DDiT(TINY_DDIT)).state_dict().items()}
    record = Reduce(os.system, "true")
    return {
        "int key": {0: torch.zeros(1)},
        "int key in model": {"model": {0: torch.zeros(1)}},
        "record as a weight": {"state_dict": {**sd, "backbone.vocab_embed.embedding": record}},
        "record as EMA list": {"model": randomise(DDiT(TINY_DDIT)).state_dict(), "ema": {"shadow_params": record}},
        "record as EMA entry": {"state_dict": sd, "ema": {"shadow_params": [record] * 40}},
        "record as hyper_parameters": {"state_dict": sd, "hyper_parameters": record},
        "records as config values": {"state_dict": sd, "hyper_parameters": {"config": {"time_conditioning": record,
                                                                                      "model": {"length": record}}}},
        "a tensor": torch.zeros(3),
        "a list": [torch.zeros(1)],
    }[name]  # fmt: skip


@pytest.mark.parametrize(
    "name",
    ["int key", "int key in model", "record as a weight", "record as EMA list", "record as EMA entry",
     "record as hyper_parameters", "records as config values", "a tensor", "a list"],
)  # fmt: skip
def test_crafted_structures_end_in_one_clear_error(tmp_path, name):
    torch.save(crafted(name), tmp_path / "odd.ckpt")
    for load in (load_dit, load_ddit):
        try:
            load(tmp_path / "odd.ckpt")
        except CheckpointError as exc:
            assert str(exc).startswith(str(tmp_path / "odd.ckpt"))


# --------------------------------------------------------------------------------------------------------------
# The command line and a run config
# --------------------------------------------------------------------------------------------------------------


def run_extract(tmp_path: Path, config: dict, *args: str) -> subprocess.CompletedProcess:
    data = {"kind": "demo", "options": {"n_train": 4, "n_val": 2, "n_test": 2}, "splits": ["train"]}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"out": str(tmp_path / "out"), "data": data, **config}))
    cmd = [sys.executable, "-m", "difffeat", "extract", str(tmp_path / "run.yaml"), *args]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("where", ["cli --dit", "config image.dit", "config text.ddit"])
def test_cli_and_config_refuse_a_payload_in_one_line(tmp_path, where):
    path, marker = write_payload(tmp_path, "os.system", lambda p: p)
    modality = "text" if "text" in where else "image"
    evil = path.rename(tmp_path / ("evil.ckpt" if modality == "text" else "evil.pt"))
    config: dict = {"extract": {"modalities": [modality]}}
    if where == "config image.dit":
        config["image"] = {"dit": str(evil)}
    elif where == "config text.ddit":
        config["text"] = {"ddit": str(evil)}
    done = run_extract(tmp_path, config, *(["--dit", str(evil)] if where == "cli --dit" else []))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert errors == [f"error: {evil}: holds posix.system(...), which was neither imported nor run; expected a state "
                      "dict (name -> tensor) or a training checkpoint"]  # fmt: skip
    assert not marker.exists()
