"""Records and datasets: what every reader returns and every later step consumes.

A :class:`Sample` carries a stable id, a lazily decoded image, its captions and its label indices. A
:class:`Dataset` knows its class names and holds named splits. Nothing here knows about models.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

ImageSource = str | Path | np.ndarray | Callable[[], Image.Image] | Image.Image | None


class DataError(ValueError):
    """Bad dataset input: the message names the file, line or record and what was expected."""


@dataclass(frozen=True)
class Sample:
    """One record. ``labels`` index into the dataset's ``classes``; ``ignore`` marks labels a metric should skip
    (VOC "difficult"). ``image`` is decoded only when :func:`load_image` is called."""

    id: str
    image: ImageSource
    captions: tuple[str, ...] = ()
    labels: tuple[int, ...] = ()
    ignore: tuple[int, ...] = ()


def load_image(sample: Sample) -> Image.Image:
    """Decode a sample's image as RGB, with an error naming the sample and file when it cannot be read."""
    src = sample.image
    if src is None:
        raise DataError(f"sample {sample.id!r} has no image")
    if isinstance(src, Image.Image):
        return src.convert("RGB")
    if isinstance(src, np.ndarray):
        arr = src if src.ndim == 3 else np.stack([src] * 3, axis=-1)
        return Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8))).convert("RGB")
    if callable(src):
        return src().convert("RGB")
    path = Path(src)
    if not path.is_file():
        raise DataError(f"sample {sample.id!r}: image file not found: {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"sample {sample.id!r}: cannot decode image {path} ({exc})") from exc


@dataclass
class Split:
    """An ordered list of samples; row i of every feature array of this split is ``samples[i]``."""

    name: str
    samples: list[Sample]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.samples]

    def label_matrix(self, num_classes: int) -> np.ndarray:
        """Binary targets ``[N, C]`` (uint8)."""
        y = np.zeros((len(self.samples), num_classes), dtype=np.uint8)
        for i, s in enumerate(self.samples):
            y[i, list(s.labels)] = 1
        return y

    def ignore_matrix(self, num_classes: int) -> np.ndarray | None:
        """Boolean ``[N, C]`` of labels to leave out of metrics, or None when the split has none."""
        if not any(s.ignore for s in self.samples):
            return None
        m = np.zeros((len(self.samples), num_classes), dtype=bool)
        for i, s in enumerate(self.samples):
            m[i, list(s.ignore)] = True
        return m


@dataclass
class Dataset:
    """Class names, named splits, and an honest account of anything a reader skipped."""

    name: str
    classes: list[str]
    splits: dict[str, Split]
    single_label: bool = False
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (record, reason)
    notes: dict[str, int] = field(default_factory=dict)  # counts worth reporting (e.g. unannotated images)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise KeyError(f"dataset {self.name!r} has no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]


def stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def carve_val(train: Sequence[Sample], size: int | float, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Deterministically move ``size`` samples (a count, or a fraction if < 1) from train into val.

    The choice depends only on the sample ids and the seed (not on file order), so it is the same on every
    machine and for every reader of the same data.
    """
    n = round(size * len(train)) if isinstance(size, float) and size < 1 else int(size)
    if not 0 <= n < len(train):
        raise DataError(f"val size {size!r} is not possible with {len(train)} train samples")
    order = sorted(train, key=lambda s: stable_hash(f"{seed}|{s.id}"))
    val_ids = {s.id for s in order[:n]}
    return [s for s in train if s.id not in val_ids], [s for s in train if s.id in val_ids]


# Helpers shared by the readers: every failure names the file (and line or record) and what was expected.


def require_file(path: str | Path, what: str) -> Path:
    """Return ``path`` if it is a file, else fail saying which file of which dataset layout was expected."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    return path


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """Parse a JSON file; a syntax error reports the file, line and column instead of a bare decoder message."""
    path = require_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc


def read_lines(path: str | Path, what: str = "text file") -> list[str]:
    """Lines with trailing whitespace and CR removed. Blank lines are kept because several formats align files
    line by line (label files with image lists), and dropping one would silently shift every later record."""
    path = require_file(path, what)
    with open(path, encoding="utf-8") as f:
        return [line.rstrip() for line in f.read().splitlines()]


def check_image_files(samples: Iterable[Sample], source: str | Path) -> None:
    """Fail on the first sample whose image path does not exist (readers' ``check_files=True``)."""
    for s in samples:
        if isinstance(s.image, (str, Path)) and not Path(s.image).is_file():
            raise DataError(f"{source}: sample {s.id!r}: image file not found: {s.image}")


def build_splits(train: list[Sample], test: list[Sample], val_size: int | float, seed: int = 0) -> dict[str, Split]:
    """``train``/``val``/``test`` splits from an official train/test pair, val carved from train.

    Sample ids must be unique across all splits: feature rows and noise seeds are keyed by them.
    """
    seen: set[str] = set()
    for s in (*train, *test):
        if s.id in seen:
            raise DataError(f"duplicate sample id {s.id!r}: ids must be unique across train and test")
        seen.add(s.id)
    train, val = carve_val(train, val_size, seed)
    return {"train": Split("train", train), "val": Split("val", val), "test": Split("test", test)}
