"""NUS-WIDE (81 concepts) read from the files the NUS-WIDE site distributes.

- ``Concepts81.txt``: the 81 concept names, one per line (their order is the class order);
- ``ImageList/{Train,Test}Imagelist.txt``: Windows-style relative paths, ``actor\\0001_2124494179.jpg``;
- ``Groundtruth/TrainTestLabels/Labels_{concept}_{Train,Test}.txt``: one 0/1 per line, aligned with the list;
- tags (optional, they become the captions), in one of three forms:
  ``"tags1k"``: ``NUS_WID_Tags/TagList1k.txt`` plus ``{Train,Test}_Tags1k.dat`` (a tab-separated 0/1 row of
  1000 per image, aligned with the list); ``"all_tags"``: ``NUS_WID_Tags/All_Tags.txt`` (``photo_id tag tag ...``,
  matched by the Flickr photo id at the end of the file name); ``"lines"``: files given in ``tag_files`` with
  one line of space-separated tags per image, aligned with the list.

Many NUS-WIDE images are no longer on Flickr, so copies of the set miss some. Missing images are therefore
checked up front (``check_files=True`` by default, unlike the other readers): the load fails naming the file, or
with ``skip_missing=True`` they are left out and listed in ``Dataset.skipped``. Official Train → our ``train``
(minus a carved ``val``); Test → ``test``. Sample ids are the list paths with ``/`` (``actor/0001_2124494179.jpg``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from difffeat.data.core import DataError, Dataset, Sample, build_splits, read_lines

_OFFICIAL = {"train": "Train", "test": "Test"}
TAG_FORMS = ("tags1k", "all_tags", "lines")


def load_nuswide(
    root: str | Path,
    val_size: int | float = 5000,
    image_dir: str = "Flickr",
    tags: str | None = None,
    tag_files: Mapping[str, str | Path] | None = None,
    skip_missing: bool = False,
    check_files: bool = True,
    drop_unlabeled: bool = False,
    seed: int = 0,
) -> Dataset:
    """Read NUS-WIDE under ``root``; images are ``root/image_dir/<list path>``.

    ``tags``: None, or one of ``TAG_FORMS`` (see the module docstring); ``"lines"`` needs ``tag_files`` with
    ``"train"`` and ``"test"`` paths (relative to ``root``). Images with none of the 81 concepts are kept as
    all-negative and counted in ``Dataset.notes``, or left out (and listed in ``skipped``) with
    ``drop_unlabeled=True``.
    """
    root = Path(root)
    if tags is not None and tags not in TAG_FORMS:
        raise ValueError(f"tags must be None or one of {TAG_FORMS}, not {tags!r}")
    concepts = [c.strip() for c in read_lines(root / "Concepts81.txt", "NUS-WIDE concept list") if c.strip()]
    all_tags = _read_all_tags(root / "NUS_WID_Tags" / "All_Tags.txt") if tags == "all_tags" else None
    dataset = Dataset(name="nuswide", classes=concepts, splits={})
    samples = {}
    for ours, official in _OFFICIAL.items():
        list_path = root / "ImageList" / f"{official}Imagelist.txt"
        rel = _image_list(list_path)
        labels = _read_labels(root, concepts, official, len(rel), list_path)
        captions = _read_tags(root, tags, tag_files, ours, official, rel, list_path, all_tags)
        if tags is not None:
            dataset.notes[f"no_tags_{ours}"] = sum(not c for c in captions)
        built = [
            Sample(id=r, image=root / image_dir / r, captions=c, labels=tuple(np.flatnonzero(y).tolist()))
            for r, c, y in zip(rel, captions, labels, strict=True)
        ]
        samples[ours] = _filter(built, ours, list_path, dataset, skip_missing, check_files, drop_unlabeled)
    dataset.splits = build_splits(samples["train"], samples["test"], val_size, seed)
    return dataset


def _rows(path: Path, what: str) -> list[str]:
    """Lines of a file aligned with an image list, where a row is never blank: blank lines at the end are not
    rows (an extra newline), blank lines inside are (and fail the row's check)."""
    lines = read_lines(path, what)
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _image_list(path: Path) -> list[str]:
    rel = [line.strip().replace("\\", "/") for line in _rows(path, "NUS-WIDE image list")]
    if "" in rel:
        raise DataError(f"{path}, line {rel.index('') + 1}: empty line, expected an image path")
    return rel


def _read_labels(root: Path, concepts: list[str], official: str, n: int, list_path: Path) -> np.ndarray:
    """``[n, 81]`` 0/1 matrix from one file per concept; each must have exactly one 0/1 line per image."""
    y = np.zeros((n, len(concepts)), dtype=bool)
    for c, concept in enumerate(concepts):
        path = root / "Groundtruth" / "TrainTestLabels" / f"Labels_{concept}_{official}.txt"
        values = _rows(path, "NUS-WIDE label file")
        if len(values) != n:
            raise DataError(f"{path}: {len(values)} lines, expected {n} (one per image of {list_path})")
        bad = next((k for k, v in enumerate(values) if v.strip() not in ("0", "1")), None)
        if bad is not None:
            raise DataError(f"{path}, line {bad + 1}: expected 0 or 1, got {values[bad]!r}")
        y[:, c] = [v.strip() == "1" for v in values]
    return y


def _read_tags(
    root: Path,
    form: str | None,
    tag_files: Mapping[str, str | Path] | None,
    ours: str,
    official: str,
    rel: list[str],
    list_path: Path,
    all_tags: dict[str, list[str]] | None,
) -> list[tuple[str, ...]]:
    """One caption per image: its tags joined by spaces (no caption when the image has no tag)."""
    if form is None:
        return [()] * len(rel)
    if form == "all_tags":
        per_image = [all_tags.get(_photo_id(r), []) for r in rel]
    elif form == "tags1k":
        per_image = _read_tags1k(root / "NUS_WID_Tags", official, len(rel), list_path)
    else:
        if not tag_files or ours not in tag_files:
            raise ValueError(f"tags='lines' needs tag_files with a {ours!r} path")
        path = root / tag_files[ours]
        lines = read_lines(path, "NUS-WIDE tag file")  # a blank line, even the last, is an image without tags
        if len(lines) != len(rel):
            raise DataError(f"{path}: {len(lines)} lines, expected {len(rel)} (one per image of {list_path})")
        per_image = [line.split() for line in lines]
    return [(" ".join(t),) if t else () for t in per_image]


def _read_tags1k(tag_dir: Path, official: str, n: int, list_path: Path) -> list[list[str]]:
    vocab = [t.strip() for t in read_lines(tag_dir / "TagList1k.txt", "NUS-WIDE tag list") if t.strip()]
    path = tag_dir / f"{official}_Tags1k.dat"
    rows = _rows(path, "NUS-WIDE tag matrix")
    if len(rows) != n:
        raise DataError(f"{path}: {len(rows)} rows, expected {n} (one per image of {list_path})")
    out = []
    for k, row in enumerate(rows):
        flags = row.split()
        if len(flags) != len(vocab) or not set(flags) <= {"0", "1"}:
            raise DataError(f"{path}, line {k + 1}: expected {len(vocab)} values of 0/1 (one per tag of TagList1k)")
        out.append([t for t, f in zip(vocab, flags, strict=True) if f == "1"])
    return out


def _photo_id(rel: str) -> str:
    """``actor/0001_2124494179.jpg`` → ``2124494179``, the Flickr id that ``All_Tags.txt`` lines start with."""
    return Path(rel).stem.rsplit("_", 1)[-1]


def _read_all_tags(path: Path) -> dict[str, list[str]]:
    out = {}
    for line in read_lines(path, "NUS-WIDE All_Tags file"):
        parts = line.split()
        if parts:
            out[parts[0]] = parts[1:]
    return out


def _filter(
    samples: list[Sample],
    split: str,
    list_path: Path,
    dataset: Dataset,
    skip_missing: bool,
    check_files: bool,
    drop_unlabeled: bool,
) -> list[Sample]:
    """Apply the missing-image and unlabeled-image policies; everything left out is listed and counted."""
    kept = []
    missing = unlabeled = 0
    for s in samples:
        if (skip_missing or check_files) and not Path(s.image).is_file():
            if not skip_missing:
                raise DataError(f"{list_path}: image {s.id!r} not found at {s.image} (skip_missing=True skips it)")
            dataset.skipped.append((f"{split}/{s.id}", f"image file not found: {s.image}"))
            missing += 1
            continue
        unlabeled += not s.labels
        if drop_unlabeled and not s.labels:
            dataset.skipped.append((f"{split}/{s.id}", "none of the 81 concepts (drop_unlabeled=True)"))
            continue
        kept.append(s)
    dataset.notes[f"missing_images_{split}"] = missing
    dataset.notes[f"unlabeled_{split}"] = unlabeled
    return kept
