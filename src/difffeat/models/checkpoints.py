"""Reading checkpoint files without running code from them, and loading their tensors strictly.

Why our own unpickler: a torch pickle is a small program that may call any importable function, so
``torch.load(weights_only=False)`` on a crafted ``.pt`` runs whatever it names. ``weights_only=True`` is safe but
refuses real training checkpoints: DiT's ``train.py`` pickles an ``argparse.Namespace``, MDLM's Lightning
``.ckpt`` an omegaconf ``DictConfig`` and a GPT-2 tokenizer object (under transformers 4.x module paths that
5.x no longer has). :func:`read_state_dict` tries ``weights_only=True`` and then :class:`RestrictedUnpickler`:
torch's own tensor-rebuild allowlist plus plain containers load; every other global the file names becomes an
:class:`Unloaded` record of what the file asked for. Nothing is imported, nothing from the file is called, and
only the tensors are taken.

Why our own strict loader: ``load_state_dict(strict=True)`` stops at the first kind of problem and says
nothing about what the file *is*. Users point us at a wrong file often (a VAE, a diffusers folder given as an
official checkpoint, a SEDD file given to the DiT loader); the message must say so in one go.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import json
import pickle
import types
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch._weights_only_unpickler
import torch.serialization
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not match the model it is loaded into."""


# ----------------------------------------------------------------------------------------------------------------
# The restricted unpickler
# ----------------------------------------------------------------------------------------------------------------


class Unloaded:
    """What the file asked for instead of a global we do not load: module, name, call arguments and state.

    Every pickle opcode that could run code on an object (REDUCE, NEWOBJ, BUILD, APPENDS, SETITEMS, ADDITEMS)
    lands in one of the methods below, which only record. Calling a record (REDUCE with a record as the
    callable, e.g. a pickled ``functools.partial``) gives another record, so such files still load.
    """

    module = ""
    name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Unloaded:
        self = object.__new__(cls)
        self.args, self.kwargs, self.state, self.items = args, kwargs, None, []
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Arguments were recorded by ``__new__`` (NEWOBJ calls only that)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Unloaded:
        call = _unloaded_class(self.module, f"{self.name}(...)")
        return call(*args, **kwargs)

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))

    def append(self, item: Any) -> None:
        self.items.append(item)

    def extend(self, items: Any) -> None:
        self.items.extend(items)

    def add(self, item: Any) -> None:
        self.items.append(item)

    def __repr__(self) -> str:
        return f"<not loaded: {self.module}.{self.name}>"


def _unloaded_class(module: str, name: str) -> type[Unloaded]:
    # A fixed class name: the file's strings only ever become attribute values, never identifiers.
    return type("Unloaded", (Unloaded,), {"module": str(module), "name": str(name)})


def _allowed_globals() -> dict[str, Any]:
    """torch's ``weights_only`` allowlist (tensors, storages, dtypes, rebuild functions) plus plain data types.

    ``argparse.Namespace`` only sets attributes; omegaconf containers stay :class:`Unloaded` and become plain
    dicts and lists afterwards (:func:`_plain`).
    """
    allowed = dict(torch._weights_only_unpickler._get_allowed_globals())
    allowed.update({"argparse.Namespace": argparse.Namespace, "builtins.frozenset": frozenset})
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """``find_class`` returns a real object only from the allowlist; any other name becomes an Unloaded class.

    torch subclasses this (as ``pickle_module.Unpickler``) for both the zip and the legacy format and handles
    storage types itself before asking us; the legacy format's header records go through :func:`_load`.
    """

    _allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (torch.save writes protocol 2, so ``builtins.set`` arrives as ``__builtin__.set``).
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = self._allowed.get(f"{module}.{name}")
        return found if found is not None else _unloaded_class(module, name)


def _load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


# What torch.load calls ``pickle_module``: it uses ``.Unpickler``, ``.load`` and ``.__name__``.
_RESTRICTED_PICKLE = types.SimpleNamespace(__name__=f"{__name__}.restricted", Unpickler=RestrictedUnpickler, load=_load)

_OMEGACONF_CONTAINERS = {("omegaconf.dictconfig", "DictConfig"), ("omegaconf.listconfig", "ListConfig")}


def _plain(obj: Any, _active: frozenset[int] = frozenset()) -> Any:
    """omegaconf containers (kept as Unloaded records) as plain dicts/lists, through dicts, lists and tuples.

    A DictConfig's pickled state holds ``_content`` (key -> node, or None / a "???" or interpolation string) and
    each value node holds ``_val``; ``_parent`` back-references are not followed. Cycles are left as they are.
    """
    if id(obj) in _active:
        return obj
    active = _active | {id(obj)}
    if type(obj) in (dict, OrderedDict):  # torch state dicts are OrderedDicts
        return type(obj)((key, _plain(value, active)) for key, value in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(_plain(item, active) for item in obj)
    if isinstance(obj, Unloaded) and obj.module.split(".")[0] == "omegaconf" and isinstance(obj.state, dict):
        if (obj.module, obj.name) in _OMEGACONF_CONTAINERS and "_content" in obj.state:
            return _plain(obj.state["_content"], active)
        if obj.module == "omegaconf.nodes" and "_val" in obj.state:
            return _plain(obj.state["_val"], active)
    return obj


# ----------------------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------------------


def read_state_dict(path: str | Path, *, shapes_only: bool = False) -> dict[str, Any]:
    """Read a ``.safetensors`` file or a torch pickle (``.pt/.pth/.bin/.ckpt``) into a dict.

    A plain state dict comes back as name -> tensor; a training checkpoint as its top-level dict (``model``,
    ``ema``, ``state_dict``, ...), with omegaconf configs as plain data and anything else that is not a tensor
    or plain data as :class:`Unloaded` records. No code from the file runs.

    ``shapes_only``: every tensor is on the meta device (shape and dtype, no data), so a 24 GB file is described
    without reading its weights: safetensors from the header alone, torch zip archives through
    ``map_location="meta"``, which creates meta storages instead of reading the records.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return _safetensors_shapes(path) if shapes_only else _safetensors(path)
        except Exception as exc:  # safetensors raises its own error types
            what = describe_file(path)
            raise CheckpointError(f"{path}: not a readable safetensors file: the file is {what}") from exc
    try:
        obj = _plain(_load_torch_pickle(path, "meta" if shapes_only else "cpu"))
    except RecursionError as exc:
        raise CheckpointError(f"{path}: nested too deeply to be a checkpoint") from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: holds {_describe_object(obj)}; expected a state dict (name -> tensor) or a training checkpoint"
        )
    odd = [key for key in obj if not isinstance(key, str)]
    if odd:
        raise CheckpointError(f"{path}: its keys should be names, found {odd[0]!r} ({type(odd[0]).__name__})")
    return dict(obj)


def tensors_by_name(obj: Mapping[str, Any], source: str) -> dict[str, torch.Tensor]:
    """``obj`` as the state dict a loader settles on, or one error naming the entries that are not name -> tensor.

    Checked before any config is inferred from shapes, so a foreign or crafted file gets a message, not a crash.
    """
    odd_keys = [key for key in obj if not isinstance(key, str)]
    not_tensors = sorted(str(key) for key, value in obj.items() if not isinstance(value, torch.Tensor))
    if odd_keys or not_tensors:
        found = f"keys that are not names: {odd_keys[0]!r}" if odd_keys else ""
        found = found or f"entries that are not tensors ({len(not_tensors)}): {_preview(not_tensors)}"
        raise CheckpointError(f"{source}: not a state dict (name -> tensor), {found}; the file looks like "
                              f"{sniff_format(obj)}")  # fmt: skip
    return dict(obj)


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# safetensors' header dtype names (the format's specification)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def _safetensors_shapes(path: Path) -> dict[str, torch.Tensor]:
    """Meta tensors of the shapes and dtypes the header lists; no tensor data is read (a dtype newer than the
    table reads as uint8: what this path is for is the shapes)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        slices = {name: file.get_slice(name) for name in file.keys()}  # noqa: SIM118 (safe_open is not iterable)
        return {
            name: torch.empty(s.get_shape(), dtype=_SAFETENSORS_DTYPES.get(s.get_dtype(), torch.uint8), device="meta")
            for name, s in slices.items()
        }


def _load_torch_pickle(path: Path, map_location: str = "cpu") -> Any:
    if _is_torchscript(path):
        raise CheckpointError(
            f"{path}: a TorchScript archive (torch.jit.save), not a checkpoint; TorchScript can run code on "
            "loading, so it is not opened. Save the model's state_dict() with torch.save instead."
        )
    if not _names_more_than_tensors(path):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception:  # needs more than tensors after all: the restricted unpickler decides
            pass
    try:
        return torch.load(path, map_location=map_location, weights_only=False, pickle_module=_RESTRICTED_PICKLE)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint: the file is {describe_file(path)} "
            f"({type(exc).__name__}: {reason})"
        ) from exc


def _names_more_than_tensors(path: Path) -> bool:
    """Whether the pickle names globals ``weights_only`` refuses, read from the pickle alone (no tensor data).

    A training checkpoint that fails the fast path would otherwise have all its tensors read twice.
    """
    try:
        return bool(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # legacy (non-zip) format or unreadable: let the loads decide
        return False


def _is_torchscript(path: Path) -> bool:
    """torch.load hands TorchScript archives to ``torch.jit.load``; the same test, made before calling it."""
    with open(path, "rb") as file:
        if not torch.serialization._is_zipfile(file):
            return False
        try:
            with torch.serialization._open_zipfile_reader(file) as archive:
                return torch.serialization._is_torchscript_zip(archive)
        except RuntimeError:  # not a readable archive: torch.load will fail on it too
            return False


def describe_file(path: Path) -> str:
    """What a file looks like from its first bytes, for error messages about files that are not checkpoints."""
    with open(path, "rb") as file:
        head = file.read(64)
    if not head:
        return "empty"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the weights (fetch them with `git lfs pull`)"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive that is not a readable torch checkpoint"
    if head.startswith(b"\x1f\x8b"):
        return "gzip-compressed (unpack it first)"
    if head[:1] == b"\x80":
        return "a pickle that is not a torch checkpoint (or a truncated one)"
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return "a safetensors file (give it the .safetensors suffix)"
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html")):
        return "an HTML page (a download that returned a web page?)"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "an unrecognised binary file"
    return "a JSON file" if text.startswith((b"{", b"[")) else "a text file"


def _describe_object(obj: Any) -> str:
    if isinstance(obj, Unloaded):
        return f"{obj.module}.{obj.name}(...), which was neither imported nor run"
    if isinstance(obj, torch.Tensor):
        return f"a single tensor of shape {list(obj.shape)}"
    return f"a {type(obj).__name__}"


def read_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"config file not found: {path}") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: malformed JSON ({exc})") from exc


def save_own_folder(model: nn.Module, config: dict, architecture: str, folder: str | Path) -> Path:
    """Write our own format, the one every loader recognises first: ``config.json`` (``architecture`` plus the
    model's config fields) and ``model.safetensors`` (the state dict, contiguous on the CPU)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architecture": architecture, **config}, indent=2) + "\n")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    return folder


# ----------------------------------------------------------------------------------------------------------------
# What a state dict is, and loading it strictly
# ----------------------------------------------------------------------------------------------------------------


def sniff_format(keys: set[str] | Mapping[str, object]) -> str:
    """Best guess of what a state dict is, from its key names alone (for error messages and dispatch)."""
    keys = set(keys)

    def has(prefix: str) -> bool:
        return any(isinstance(k, str) and k.startswith(prefix) for k in keys)

    if has("backbone.vocab_embed") or has("backbone.blocks."):
        return "an MDLM checkpoint (text DDiT with 'backbone.' prefix)"
    if has("vocab_embed") and has("sigma_map"):
        return "a SEDD / DDiT text checkpoint"
    if has("vocab_embed") and has("blocks.0.norm1.bias"):
        return "a RADD text checkpoint (a DDiT without time conditioning: backbone radd)"
    if has("transformer_blocks.") and has("pos_embed.proj"):
        return "a diffusers DiTTransformer2DModel state dict"
    if has("x_embedder.proj") and has("blocks."):
        return "an official DiT state dict"
    if {"state_dict", "pytorch-lightning_version"} <= keys:
        return "a PyTorch Lightning checkpoint (an MDLM .ckpt holds a text model)"
    if {"ema", "model"} & keys:
        return "a DiT training checkpoint (dict with 'model'/'ema'; pass it whole, the loader unwraps it)"
    if has("encoder.down_blocks") or has("decoder.up_blocks") or has("quant_conv"):
        return "a VAE (AutoencoderKL) state dict, not a transformer"
    if has("text_model.") or has("transformer.h."):
        return "a Hugging Face language model state dict"
    return "an unrecognised state dict"


def _preview(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def strict_load(module: nn.Module, state_dict: Mapping[str, Any], source: str, expected: str) -> None:
    """Load ``state_dict`` into ``module`` requiring exactly the same keys and shapes.

    On any mismatch raise one :class:`CheckpointError` listing missing keys, unexpected keys, shape
    mismatches and entries that are not tensors, and what the file looks like instead of ``expected``.
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(map(str, set(state_dict) - set(own)))
    common = set(own) & set(state_dict)
    not_tensors = sorted(k for k in common if not isinstance(state_dict[k], torch.Tensor))
    shapes = sorted(
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in common - set(not_tensors)
        if tuple(state_dict[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes or not_tensors:
        lines = [f"{source}: does not match {expected}."]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_preview(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_preview(unexpected)}")
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): {_preview(shapes, 4)}")
        if not_tensors:
            lines.append(f"  not tensors ({len(not_tensors)}): {_preview(not_tensors)}")
        lines.append(f"  the file looks like {sniff_format(state_dict)}.")
        raise CheckpointError("\n".join(lines))
    module.load_state_dict(state_dict, strict=True)
