"""MS-COCO 2014/2017 read from the official ``instances_*`` and ``captions_*`` JSON files.

Multi-label papers (ML-GCN, Q2L, Diff-Feat) train on train2014 and report on val2014, because COCO's test labels
are not public. We follow them: official train → our ``train`` (minus a deterministically carved ``val``),
official val → our ``test``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from difffeat.data.core import DataError, Dataset, Sample, build_splits, check_image_files, read_json

_OFFICIAL_SPLITS = {"train": "train", "test": "val"}  # our split -> official split name


def load_coco(
    root: str | Path,
    year: int = 2014,
    val_size: int | float = 5000,
    drop_unannotated: bool = False,
    captions: bool = True,
    drop_uncaptioned: bool = False,
    check_files: bool = False,
    seed: int = 0,
) -> Dataset:
    """Read COCO ``year`` under ``root`` (``annotations/``, ``train{year}/``, ``val{year}/``).

    Classes are the 80 categories sorted by category id (the official order), mapped to 0..79; the ids
    themselves are not contiguous (1..90). Images with no instance annotation are real COCO images with no
    object of the 80 classes: they are kept as all-negative, or dropped with ``drop_unannotated=True``; either
    way they are counted in ``Dataset.notes`` (dropped ones are also listed in ``Dataset.skipped``).
    Null or blank captions are dropped and counted; an image left without any caption is an error, or with
    ``drop_uncaptioned=True`` is dropped and listed in ``Dataset.skipped``.
    Sample ids are COCO image ids as strings. ``val_size`` is a count, or a fraction of train if < 1.
    """
    root = Path(root)
    ann_dir = root / "annotations"
    instances = {
        ours: read_json(ann_dir / f"instances_{off}{year}.json", "COCO instances file")
        for ours, off in _OFFICIAL_SPLITS.items()
    }
    classes, cat_index = _categories(instances, ann_dir, year)
    dataset = Dataset(name=f"coco{year}", classes=classes, splits={})
    samples: dict[str, list[Sample]] = {}
    for ours, official in _OFFICIAL_SPLITS.items():
        path = ann_dir / f"instances_{official}{year}.json"
        samples[ours] = _split_samples(instances[ours], path, root / f"{official}{year}", cat_index)
        if captions:
            captions_file = ann_dir / f"captions_{official}{year}.json"
            samples[ours] = _attach_captions(samples[ours], captions_file, ours, drop_uncaptioned, dataset)
        samples[ours] = _handle_unannotated(samples[ours], ours, drop_unannotated, dataset)
        if check_files:
            check_image_files(samples[ours], path)
    dataset.splits = build_splits(samples["train"], samples["test"], val_size, seed)
    return dataset


def _field(record: dict[str, Any], key: str, path: Path, where: str) -> Any:
    if not isinstance(record, dict) or key not in record:
        raise DataError(f"{path}: {where} has no {key!r} field")
    return record[key]


def _categories(instances: dict[str, Any], ann_dir: Path, year: int) -> tuple[list[str], dict[int, int]]:
    """Class names in category-id order and the id → index map; train and val must agree on them."""
    per_split = {}
    for ours, official in _OFFICIAL_SPLITS.items():
        path = ann_dir / f"instances_{official}{year}.json"
        cats = _field(instances[ours], "categories", path, "the file")
        per_split[ours] = sorted(
            (_field(c, "id", path, "a category"), _field(c, "name", path, "a category")) for c in cats
        )
    if per_split["train"] != per_split["test"]:
        raise DataError(f"{ann_dir}: the train and val instances files list different categories")
    cats = per_split["train"]
    return [name for _, name in cats], {cid: i for i, (cid, _) in enumerate(cats)}


def _read_captions(path: Path) -> tuple[dict[str, list[str]], int]:
    """Caption texts per image id, and how many null or blank captions were dropped: as text they would be
    encoded as if they described the image ("None", or an empty caption averaged in as a zero vector)."""
    if not path.is_file():
        raise DataError(f"COCO captions file not found: {path} (pass captions=False to read labels only)")
    by_image: dict[str, list[str]] = {}
    dropped = 0
    for ann in _field(read_json(path), "annotations", path, "the file"):
        where = f"caption annotation {ann.get('id')!r}" if isinstance(ann, dict) else "a caption annotation"
        text = _field(ann, "caption", path, where)
        if text is not None and not isinstance(text, str):
            raise DataError(f"{path}: {where} has a {type(text).__name__} caption, expected a string")
        texts = by_image.setdefault(str(_field(ann, "image_id", path, where)), [])
        if text and text.strip():
            texts.append(text.strip())
        else:
            dropped += 1
    return by_image, dropped


def _split_samples(data: dict[str, Any], path: Path, image_dir: Path, cat_index: dict[int, int]) -> list[Sample]:
    images = _field(data, "images", path, "the file")
    labels: dict[int, set[int]] = {_field(im, "id", path, "an image"): set() for im in images}
    for ann in _field(data, "annotations", path, "the file"):
        where = f"annotation {ann.get('id')!r}" if isinstance(ann, dict) else "an annotation"
        cid, image_id = _field(ann, "category_id", path, where), _field(ann, "image_id", path, where)
        if cid not in cat_index:
            raise DataError(f"{path}: {where} has unknown category_id {cid!r} (known: {sorted(cat_index)})")
        if image_id not in labels:
            raise DataError(f"{path}: {where} refers to image_id {image_id!r}, which is not in 'images'")
        labels[image_id].add(cat_index[cid])
    return [
        Sample(
            id=str(im["id"]),
            image=image_dir / _field(im, "file_name", path, f"image {im['id']!r}"),
            labels=tuple(sorted(labels[im["id"]])),
        )
        for im in images
    ]


def _attach_captions(samples: list[Sample], path: Path, split: str, drop: bool, dataset: Dataset) -> list[Sample]:
    """Captions were asked for, so every image needs at least one (or is dropped and listed, with ``drop``), and
    none may point at an unknown image. Null or blank captions are dropped and counted in ``Dataset.notes``."""
    texts, blank = _read_captions(path)
    dataset.notes[f"blank_captions_{split}"] = blank
    known = {s.id for s in samples}
    for image_id in texts:
        if image_id not in known:
            raise DataError(f"{path}: captions refer to image_id {image_id}, which the instances file does not list")
    bare = [s for s in samples if not texts.get(s.id)]
    if bare and not drop:
        only_blank = " (only null or blank ones)" if bare[0].id in texts else ""
        raise DataError(
            f"{path}: image {bare[0].id} has no caption{only_blank}; expected five per image "
            "(data option drop_uncaptioned=True leaves such images out)"
        )
    if drop:
        dataset.skipped.extend((f"{split}/{s.id}", "no caption (drop_uncaptioned=True)") for s in bare)
        dataset.notes[f"dropped_uncaptioned_{split}"] = len(bare)
    return [replace(s, captions=tuple(texts[s.id])) for s in samples if texts.get(s.id)]


def _handle_unannotated(samples: list[Sample], split: str, drop: bool, dataset: Dataset) -> list[Sample]:
    empty = [s for s in samples if not s.labels]
    dataset.notes[f"unannotated_{split}"] = len(empty)
    if not drop:
        return samples
    dataset.skipped.extend((f"{split}/{s.id}", "no instance annotation (drop_unannotated=True)") for s in empty)
    dataset.notes[f"dropped_unannotated_{split}"] = len(empty)
    return [s for s in samples if s.labels]
