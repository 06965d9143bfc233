"""CIFAR-100 read from the "python version" pickles (``cifar-100-python/{train,test,meta}``).

The pickles were written by Python 2, so they are read with ``encoding="bytes"`` and their keys are bytes.
Each row of ``b"data"`` is 3072 uint8 values, the red, green and blue 32×32 planes in turn. Images become
``32×32×3`` uint8 views into the loaded array: cheap to hold, decoded by nothing. Official train → our ``train``
(minus a carved ``val``); test → ``test``. Sample ids are ``"train/123"`` / ``"test/45"`` (row in the batch).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from difffeat.data.core import DataError, Dataset, Sample, build_splits, require_file


def load_cifar100(root: str | Path, label: str = "fine", val_size: int | float = 5000, seed: int = 0) -> Dataset:
    """Read CIFAR-100 under ``root`` (the folder holding ``cifar-100-python/``, or that folder itself).

    ``label``: ``"fine"`` (100 classes) or ``"coarse"`` (20 superclasses). The dataset is single-label.
    """
    if label not in ("fine", "coarse"):
        raise ValueError(f"label must be 'fine' or 'coarse', not {label!r}")
    root = Path(root)
    base = root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root
    key = f"{label}_labels".encode()
    meta_path = base / "meta"
    names = _field(_unpickle(meta_path), f"{label}_label_names".encode(), meta_path)
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    samples = {split: _batch_samples(base / split, split, key, len(classes)) for split in ("train", "test")}
    splits = build_splits(samples["train"], samples["test"], val_size, seed)
    return Dataset(name=f"cifar100-{label}", classes=classes, splits=splits, single_label=True)


# What a CIFAR-100 pickle may name: numpy's array reconstruction and ``_codecs.encode`` (how protocol 2 spells a
# bytes object when Python 3 writes it; it only encodes a string), nothing else. A pickle can call any global it
# names, so a crafted "dataset" file would otherwise run code on the machine that reads it.
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _DataOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR-100 file never holds")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[bytes, Any]:
    with open(require_file(path, "CIFAR-100 batch"), "rb") as f:
        try:
            data = _DataOnlyUnpickler(f, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as exc:
            raise DataError(f"{path}: not a readable CIFAR-100 pickle ({exc})") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(data).__name__}")
    return data


def _field(data: dict[bytes, Any], key: bytes, path: Path) -> Any:
    if key not in data:
        raise DataError(f"{path}: no {key!r} entry (found {sorted(data)})")
    return data[key]


def _batch_samples(path: Path, split: str, key: bytes, num_classes: int) -> list[Sample]:
    data = _unpickle(path)
    pixels = np.asarray(_field(data, b"data", path))
    labels = np.asarray(_field(data, key, path))
    if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3072:
        raise DataError(f"{path}: b'data' is {pixels.dtype} {pixels.shape}, expected uint8 [N, 3072]")
    if labels.shape != (len(pixels),):
        raise DataError(f"{path}: {len(labels)} labels for {len(pixels)} images")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DataError(f"{path}: row {bad[0]} has label {labels[bad[0]]}, expected 0..{num_classes - 1}")
    images = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # planar RGB rows -> HxWx3 views, no copy
    return [Sample(id=f"{split}/{i}", image=images[i], labels=(int(y),)) for i, y in enumerate(labels)]
