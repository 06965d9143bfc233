"""Dataset readers by name, so configs and the CLI can say ``kind: coco`` instead of importing a function.

Other modules add their own readers with :func:`register_dataset` (the embedded demo set registers "demo").
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from difffeat.data.cifar import load_cifar100
from difffeat.data.coco import load_coco
from difffeat.data.core import Dataset
from difffeat.data.manifest import load_manifest
from difffeat.data.nuswide import load_nuswide
from difffeat.data.vg import load_vg500
from difffeat.data.voc import load_voc2007
from difffeat.utils.options import OptionError, Options, option

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


SPLITS = ("train", "val", "test")
# the reader argument that ``root`` fills, where it is not called ``root``
ROOT_ARGUMENT = {"manifest": "path", "demo": "cache_dir"}


@dataclass
class DataOptions(Options):
    """Which samples a run reads: the reader, its folder and options, the splits and an optional cut.

    The kind and the reader options are checked against the registry by :func:`check_data_options` (a reader
    registered later, like the demo set, is known only then); everything else when the options are built.
    """

    kind: str = option("demo", numbers=True, help="dataset reader: " + ", ".join(sorted(_READERS)) + ", demo")
    root: str | None = option(None, numbers=True, help="dataset folder (or manifest file) as distributed")
    options: dict[str, Any] = option(default_factory=dict, numbers=True, help="reader keyword arguments")
    splits: list[str] = option(
        default_factory=lambda: list(SPLITS),
        choices=SPLITS,
        help="splits the extract step fills (sweep, search and fit read train and val, evaluate test)",
    )
    limit: int | None = option(None, min=1, numbers=True, help="keep only the first N samples of each split")

    def reader_arguments(self) -> dict[str, Any]:
        """Keyword arguments of the reader: ``options`` plus ``root`` under the name the reader gives it."""
        kwargs = dict(self.options)
        if self.root is not None:
            kwargs[ROOT_ARGUMENT.get(self.kind, "root")] = self.root
        return kwargs


def check_data_options(data: DataOptions, where: str = "data") -> None:
    """Fail before any file is read when the kind is unknown or a reader option is misspelt."""
    if data.kind not in _READERS:
        raise OptionError(f"{where}.kind", f"unknown dataset kind {data.kind!r}; valid kinds: {available_datasets()}")
    signature = inspect.signature(_READERS[data.kind])
    try:
        signature.bind(**data.reader_arguments())
    except TypeError as exc:
        raise OptionError(
            f"{where}.options", f"{exc} for dataset kind {data.kind!r}; its parameters are {list(signature.parameters)}"
        ) from None
