"""Pascal VOC 2007 read from the devkit layout (``ImageSets/Main``, ``Annotations``, ``JPEGImages``).

The VOC protocol leaves "difficult" objects out of evaluation. An image whose only objects of a class are
difficult therefore gets that class in ``Sample.ignore`` (not in ``labels``), so metrics can skip the pair
instead of counting it as a negative. Official trainval → our ``train`` (minus a carved ``val``); test → ``test``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from difffeat.data.core import DataError, Dataset, Sample, build_splits, check_image_files, read_lines

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
_OFFICIAL_SPLITS = {"train": "trainval", "test": "test"}  # our split -> ImageSets/Main list


def load_voc2007(
    root: str | Path,
    val_size: int | float = 0.1,
    labels_from: str = "auto",
    check_files: bool = False,
    seed: int = 0,
) -> Dataset:
    """Read VOC 2007 under ``root`` (the ``VOCdevkit`` folder holding ``VOC2007/``, or ``VOC2007/`` itself).

    ``labels_from``: ``"xml"`` reads ``Annotations/{id}.xml`` (objects' ``name`` and ``difficult``),
    ``"imagesets"`` reads ``ImageSets/Main/{cls}_{split}.txt`` (1 present, -1 absent, 0 difficult only), and
    ``"auto"`` uses the XMLs when the ``Annotations`` folder exists. Sample ids are VOC file ids ("000005").
    """
    base = _voc_dir(Path(root))
    use_xml = {"auto": (base / "Annotations").is_dir(), "xml": True, "imagesets": False}.get(labels_from)
    if use_xml is None:
        raise ValueError(f"labels_from must be 'auto', 'xml' or 'imagesets', not {labels_from!r}")
    samples = {}
    for ours, official in _OFFICIAL_SPLITS.items():
        ids = _image_ids(base / "ImageSets" / "Main" / f"{official}.txt")
        labels = _xml_labels(base / "Annotations", ids) if use_xml else _imageset_labels(base, official, ids)
        samples[ours] = [
            Sample(id=i, image=base / "JPEGImages" / f"{i}.jpg", labels=labels[i][0], ignore=labels[i][1]) for i in ids
        ]
        if check_files:
            check_image_files(samples[ours], base / "ImageSets" / "Main" / f"{official}.txt")
    splits = build_splits(samples["train"], samples["test"], val_size, seed)
    return Dataset(name="voc2007", classes=list(VOC_CLASSES), splits=splits)


def _voc_dir(root: Path) -> Path:
    for cand in (root / "VOC2007", root):
        if (cand / "ImageSets" / "Main").is_dir():
            return cand
    raise DataError(f"{root}: no VOC2007/ImageSets/Main folder (expected the VOCdevkit or VOC2007 folder)")


def _image_ids(path: Path) -> list[str]:
    return [line.split()[0] for line in read_lines(path, "VOC image set list") if line.strip()]


Labels = dict[str, tuple[tuple[int, ...], tuple[int, ...]]]  # id -> (labels, ignore)


def _xml_labels(ann_dir: Path, ids: list[str]) -> Labels:
    return {i: _parse_xml(ann_dir / f"{i}.xml") for i in ids}


def _parse_xml(path: Path) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A class is a label if any of its objects is not difficult, else (only difficult objects) it is ignored."""
    if not path.is_file():
        raise DataError(f"VOC annotation not found: {path}")
    try:
        objects = ET.parse(path).getroot().findall("object")
    except ET.ParseError as exc:
        raise DataError(f"{path}: malformed XML ({exc})") from exc
    easy, hard = set(), set()
    for k, obj in enumerate(objects):
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise DataError(f"{path}: object {k} has class {name!r}, expected one of the 20 VOC classes")
        (hard if (obj.findtext("difficult") or "0").strip() == "1" else easy).add(VOC_CLASSES.index(name))
    return tuple(sorted(easy)), tuple(sorted(hard - easy))


def _imageset_labels(base: Path, split: str, ids: list[str]) -> Labels:
    """Per-class lists ``{cls}_{split}.txt``: one ``id flag`` line per image of the split."""
    easy: dict[str, list[int]] = {i: [] for i in ids}
    hard: dict[str, list[int]] = {i: [] for i in ids}
    for c, cls in enumerate(VOC_CLASSES):
        path = base / "ImageSets" / "Main" / f"{cls}_{split}.txt"
        seen = set()
        for n, line in enumerate(read_lines(path, "VOC per-class image set"), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in ("1", "-1", "0") or parts[0] not in easy:
                raise DataError(f"{path}, line {n}: expected '<image id of {split}.txt> 1|-1|0', got {line!r}")
            seen.add(parts[0])
            if parts[1] != "-1":
                (easy if parts[1] == "1" else hard)[parts[0]].append(c)
        if len(seen) != len(ids):
            missing = next(i for i in ids if i not in seen)
            raise DataError(f"{path}: no line for image {missing!r} of {split}.txt (expected one line per image)")
    return {i: (tuple(easy[i]), tuple(hard[i])) for i in ids}
