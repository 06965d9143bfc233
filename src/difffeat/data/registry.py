"""Dataset readers by name, so configs and the CLI can say ``kind: coco`` instead of importing a function.

Other modules add their own readers with :func:`register_dataset` (the embedded demo set registers "demo").
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from difffeat.data.cifar import load_cifar100
from difffeat.data.coco import load_coco
from difffeat.data.core import Dataset
from difffeat.data.manifest import load_manifest
from difffeat.data.nuswide import load_nuswide
from difffeat.data.vg import load_vg500
from difffeat.data.voc import load_voc2007

Reader = Callable[..., Dataset]

_READERS: dict[str, Reader] = {
    "coco": load_coco,
    "vg500": load_vg500,
    "voc2007": load_voc2007,
    "nuswide": load_nuswide,
    "cifar100": load_cifar100,
    "manifest": load_manifest,
}


def register_dataset(name: str, reader: Reader, overwrite: bool = False) -> None:
    """Make ``reader`` available as ``load_dataset(name, ...)``; re-registering a name needs ``overwrite=True``
    so two modules cannot silently shadow each other."""
    if name in _READERS and _READERS[name] is not reader and not overwrite:
        raise ValueError(f"dataset kind {name!r} is already registered to {_READERS[name].__qualname__}")
    _READERS[name] = reader


def available_datasets() -> list[str]:
    return sorted(_READERS)


def load_dataset(kind: str, **kwargs: object) -> Dataset:
    """Call the reader registered as ``kind``; unknown kinds and arguments fail before any file is read."""
    if kind not in _READERS:
        raise ValueError(f"unknown dataset kind {kind!r}; valid kinds: {', '.join(available_datasets())}")
    reader = _READERS[kind]
    signature = inspect.signature(reader)
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        raise TypeError(f"dataset kind {kind!r}: {exc}; its parameters are {list(signature.parameters)}") from exc
    return reader(**kwargs)
