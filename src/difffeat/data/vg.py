"""Visual Genome 500 with the split files of SSGRL that C-Tran and later multi-label papers reuse.

The files (as in SSGRL's ``data/VG`` and read by C-Tran's ``dataloaders/vg500_dataset.py``):

- ``train_list_500.txt`` / ``test_list_500.txt``: one image file name per line (``2328403.jpg``);
- ``vg_category_500_labels_index.json``: despite its name, a map from image file name to the list of its
  label indices (0..499), e.g. ``{"2328403.jpg": [3, 17, 250]}``. C-Tran passes this file as ``label_path``
  and indexes it with the image name.

The public files carry no class names; give them with ``classes_file`` or get placeholders ``vg500_000``..
Official train → our ``train`` (minus a carved ``val``); official test → ``test``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from difffeat.data.core import DataError, Dataset, Sample, build_splits, check_image_files, read_json, read_lines

_OFFICIAL_LISTS = {"train": "train_list", "test": "test_list"}


def load_vg500(
    root: str | Path,
    val_size: int | float = 5000,
    image_dirs: Sequence[str] = ("VG_100K", "VG_100K_2"),
    labels_file: str = "vg_category_500_labels_index.json",
    train_list: str = "train_list_500.txt",
    test_list: str = "test_list_500.txt",
    classes_file: str | Path | None = None,
    num_classes: int = 500,
    region_descriptions: str | Path | None = None,
    check_files: bool = False,
    seed: int = 0,
) -> Dataset:
    """Read VG500 under ``root``; file names are relative to ``root`` and default to the SSGRL/C-Tran names.

    Images are looked up in ``image_dirs`` in order (Visual Genome ships them in two folders, ``VG_100K`` and
    ``VG_100K_2``; C-Tran merges them into one). ``classes_file``: a text file with one name per line, or a JSON
    list of names, or a JSON map name → index. ``region_descriptions``: Visual Genome's
    ``region_descriptions.json`` (a list of ``{"id": image id, "regions": [{"phrase": ...}]}``); its phrases
    become the captions, and images without any are counted in ``Dataset.notes``. Sample ids are VG image ids
    (the file name without extension).
    """
    root = Path(root)
    labels_path = root / labels_file
    labels = _read_label_map(labels_path, num_classes)
    dirs = [root / d for d in image_dirs]
    samples = {}
    for ours, name in (("train", train_list), ("test", test_list)):
        samples[ours] = _list_samples(root / name, labels, labels_path, dirs)
        if check_files:
            check_image_files(samples[ours], root / name)
    classes = _read_classes(None if classes_file is None else root / classes_file, num_classes)
    dataset = Dataset(name="vg500", classes=classes, splits={})
    if region_descriptions is not None:
        phrases = _read_regions(root / region_descriptions)
        for ours in samples:
            samples[ours] = [replace(s, captions=tuple(phrases.get(s.id, ()))) for s in samples[ours]]
            dataset.notes[f"no_region_descriptions_{ours}"] = sum(not s.captions for s in samples[ours])
    dataset.splits = build_splits(samples["train"], samples["test"], val_size, seed)
    return dataset


def _read_label_map(path: Path, num_classes: int) -> dict[str, tuple[int, ...]]:
    data = read_json(path, "VG500 labels file")
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object mapping image file name to a list of label indices")
    out = {}
    for name, idx in data.items():
        if isinstance(idx, int):
            raise DataError(
                f"{path}: entry {name!r} maps to a single int; expected image file name → list of label indices "
                "(a category name → index map belongs in classes_file)"
            )
        if not isinstance(idx, list) or not all(isinstance(i, int) and 0 <= i < num_classes for i in idx):
            raise DataError(f"{path}: image {name!r}: expected a list of label indices in 0..{num_classes - 1}")
        out[name] = tuple(sorted(set(idx)))
    return out


def _list_samples(path: Path, labels: dict[str, tuple[int, ...]], labels_path: Path, dirs: list[Path]) -> list[Sample]:
    samples = []
    for n, line in enumerate(read_lines(path, "VG500 image list"), 1):
        name = line.strip()
        if not name:
            continue
        if name not in labels:
            raise DataError(f"{path}, line {n}: image {name!r} has no entry in {labels_path}")
        samples.append(Sample(id=Path(name).stem, image=_locate(name, dirs), labels=labels[name]))
    return samples


def _locate(name: str, dirs: list[Path]) -> Path:
    """The first folder holding the image; when none does, the first folder (load_image then names the path)."""
    if len(dirs) > 1:
        for d in dirs:
            if (d / name).is_file():
                return d / name
    return dirs[0] / name


def _read_classes(path: Path | None, num_classes: int) -> list[str]:
    if path is None:
        return [f"vg500_{i:03d}" for i in range(num_classes)]
    if path.suffix == ".json":
        names = _names_from_json(read_json(path, "VG500 classes file"), path)
    else:
        names = [line.strip() for line in read_lines(path, "VG500 classes file") if line.strip()]
    if len(names) != num_classes:
        raise DataError(f"{path}: {len(names)} class names, expected {num_classes}")
    return names


def _names_from_json(data: Any, path: Path) -> list[str]:
    if isinstance(data, list):
        return [str(x) for x in data]
    if isinstance(data, dict) and all(isinstance(v, int) for v in data.values()):
        if sorted(data.values()) != list(range(len(data))):
            raise DataError(f"{path}: class indices must be exactly 0..{len(data) - 1}")
        return sorted(data, key=data.__getitem__)
    raise DataError(f"{path}: expected a JSON list of class names or a map class name → index")


def _read_regions(path: Path) -> dict[str, list[str]]:
    data = read_json(path, "Visual Genome region descriptions")
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of {{'id', 'regions'}} records")
    out: dict[str, list[str]] = {}
    for k, rec in enumerate(data):
        image_id = rec.get("id", rec.get("image_id")) if isinstance(rec, dict) else None
        if image_id is None or not isinstance(rec.get("regions"), list):
            raise DataError(f"{path}: record {k} needs an 'id' (or 'image_id') and a 'regions' list")
        phrases = (r.get("phrase") if isinstance(r, dict) else None for r in rec["regions"])
        out.setdefault(str(image_id), []).extend(p.strip() for p in phrases if isinstance(p, str) and p.strip())
    return out
