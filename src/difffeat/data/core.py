"""Records and datasets: what every reader returns and every later step consumes.

A :class:`Sample` carries a stable id, a lazily decoded image, its captions and its label indices. A
:class:`Dataset` knows its class names and holds named splits. Nothing here knows about models.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ImageSource = str | Path | np.ndarray | Callable[[], Image.Image] | Image.Image | None


class DataError(ValueError):
    """Bad dataset input: the message names the file, line or record and what was expected.

    One line, also when raised in a DataLoader worker: torch re-raises a worker's exception as
    ``type(exc)(text of the worker's whole traceback)``, every chained cause included, which would bury the one
    line that matters under several tracebacks; that text is cut back to the original message here.
    """

    def __init__(self, message: str = "") -> None:
        super().__init__(_original_message(message))


def _original_message(message: str) -> str:
    """The last line of a DataLoader worker's re-raised traceback without its ``module.DataError: `` prefix."""
    if not (message.startswith("Caught DataError in DataLoader worker") and "\nOriginal Traceback" in message):
        return message
    return message.rstrip().splitlines()[-1].partition(": ")[2]


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
    """Decode a sample's image as 8-bit RGB, with a one-line error naming the sample and file when it cannot be."""
    src = sample.image
    if src is None:
        raise DataError(f"sample {sample.id!r} has no image")
    if isinstance(src, Image.Image):
        return to_rgb(src)
    if isinstance(src, np.ndarray):
        return to_rgb(Image.fromarray(_to_uint8(src if src.ndim == 3 else np.stack([src] * 3, axis=-1))))
    if callable(src):
        return to_rgb(src())
    path = Path(src)
    if not path.is_file():
        raise DataError(f"sample {sample.id!r}: image file not found: {path}")
    try:
        with Image.open(path) as im:
            return to_rgb(im)
    except Image.DecompressionBombError as exc:
        raise DataError(f"sample {sample.id!r}: refusing to decode image {path}: {exc}") from None
    except _DECODE_ERRORS as exc:
        raise DataError(f"sample {sample.id!r}: cannot decode image {path} ({exc})") from None


# What Pillow's decoders raise on a broken or unsupported file (PIL's own UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit PNG/TIFF greyscale ("I" in older Pillow)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit greyscale is scaled to 8 bits first: ``convert("RGB")`` clips it, so every value above
    255 (nearly the whole image) would turn white."""
    if image.mode in _SIXTEEN_BIT_MODES:
        image = Image.fromarray(_scale_16bit(np.asarray(image)))
    return image.convert("RGB")


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """uint16 arrays scaled to 8 bits like 16-bit image files; any other array cast as it is."""
    return _scale_16bit(array) if array.dtype == np.uint16 else np.ascontiguousarray(array.astype(np.uint8))


def _scale_16bit(array: np.ndarray) -> np.ndarray:
    """0..65535 onto 0..255 (65535 / 257 = 255), rounded."""
    return np.clip(np.rint(array.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)


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


def read_text(path: str | Path, what: str = "text file") -> str:
    """A file's text: UTF-8, with or without the byte-order mark Excel and Notepad write; any other encoding
    fails naming the file, line and byte, not with a bare codec message."""
    path = require_file(path, what)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path}, line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "save the file as UTF-8"
        ) from None


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """Parse a JSON file; a syntax error reports the file, line and column instead of a bare decoder message."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None


def read_lines(path: str | Path, what: str = "text file") -> list[str]:
    """Lines with trailing whitespace and CR removed. Blank lines are kept because several formats align files
    line by line (label files with image lists), and dropping one would silently shift every later record."""
    return [line.rstrip() for line in read_text(path, what).splitlines()]


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
