"""Builders of small copies of each dataset in its real distributed format (the fixtures in conftest call them).

The contents are chosen to exercise what the readers must get right: COCO's non-contiguous category ids (listed
out of order) and an unannotated image; a VOC class present only as difficult objects; NUS-WIDE's backslash
paths; CIFAR's Python-2 style pickles with bytes keys.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), color).save(path)
    return path


def write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))  # indented, so a syntax error has a meaningful line number
    return path


def write_lines(path: Path, lines: list[str], newline: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}{newline}" for line in lines))
    return path


# ---------------------------------------------------------------- COCO

COCO_CATEGORIES = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
COCO_TRAIN = {10: [90, 1], 11: [3], 12: [1, 1], 13: [], 14: [3, 90], 15: [1]}  # image id -> annotation categories
COCO_VAL = {20: [3], 21: []}


def _coco_instances(images: dict[int, list[int]], split: str, first_ann_id: int) -> dict:
    anns, ann_id = [], first_ann_id
    for image_id, cats in images.items():
        for cid in cats:
            anns.append({"id": ann_id, "image_id": image_id, "category_id": cid, "iscrowd": 0, "bbox": [0, 0, 1, 1]})
            ann_id += 1
    return {
        "images": [{"id": i, "file_name": f"COCO_{split}_{i:012d}.jpg", "width": 8, "height": 6} for i in images],
        "annotations": anns,
        "categories": COCO_CATEGORIES,
    }


def _coco_captions(images: dict[int, list[int]]) -> dict:
    anns = [
        {"id": 1000 * i + k, "image_id": i, "caption": f" image {i} caption {k} "} for i in images for k in range(5)
    ]
    return {"images": [{"id": i} for i in images], "annotations": anns}


def build_coco(tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    for split, images, first in (("train2014", COCO_TRAIN, 1), ("val2014", COCO_VAL, 500)):
        write_json(root / "annotations" / f"instances_{split}.json", _coco_instances(images, split, first))
        write_json(root / "annotations" / f"captions_{split}.json", _coco_captions(images))
        for i in images:
            write_image(root / split / f"COCO_{split}_{i:012d}.jpg")
    return root


# ---------------------------------------------------------------- Pascal VOC 2007

# image id -> [(class, difficult)]
VOC_TRAINVAL = {
    "000005": [("chair", 0), ("chair", 1)],  # chair present (one easy object) -> label, not ignore
    "000007": [("person", 0), ("dog", 1)],  # dog only difficult -> ignore
    "000009": [("horse", 0), ("person", 0)],
    "000012": [("car", 0)],
}
VOC_TEST = {"000001": [("dog", 0), ("person", 0)], "000002": [("train", 1)]}


def _voc_xml(objects: list[tuple[str, int]]) -> str:
    body = "".join(
        f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated><difficult>{d}</difficult>"
        "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>4</ymax></bndbox></object>"
        for name, d in objects
    )
    return f"<annotation><folder>VOC2007</folder><size><width>8</width><height>6</height></size>{body}</annotation>"


def build_voc(tmp_path: Path) -> Path:
    """A ``VOCdevkit`` folder with XMLs and the per-class image-set files, both telling the same truth."""
    from difffeat.data.voc import VOC_CLASSES

    base = tmp_path / "VOCdevkit" / "VOC2007"
    for split, images in (("trainval", VOC_TRAINVAL), ("test", VOC_TEST)):
        write_lines(base / "ImageSets" / "Main" / f"{split}.txt", list(images))
        for i, objects in images.items():
            (base / "Annotations").mkdir(parents=True, exist_ok=True)
            (base / "Annotations" / f"{i}.xml").write_text(_voc_xml(objects))
            write_image(base / "JPEGImages" / f"{i}.jpg")
        for cls in VOC_CLASSES:
            lines = []
            for i, objects in images.items():
                flags = [d for name, d in objects if name == cls]
                flag = "-1" if not flags else "1" if 0 in flags else "0"
                lines.append(f"{i} {flag:>2}")
            write_lines(base / "ImageSets" / "Main" / f"{cls}_{split}.txt", lines)
    return tmp_path / "VOCdevkit"


# ---------------------------------------------------------------- NUS-WIDE

NUS_CONCEPTS = ["animal", "sky", "water"]
NUS_TRAIN = ["actor\\0001_2124494179.jpg", "sky\\0002_100.jpg", "water\\0003_200.jpg", "zoo\\0004_300.jpg"]
NUS_TRAIN_Y = [[1, 0, 0], [0, 1, 1], [0, 0, 1], [0, 0, 0]]  # the last image has no concept
NUS_TEST = ["animal\\0005_400.jpg", "sky\\0006_500.jpg"]
NUS_TEST_Y = [[1, 1, 0], [0, 1, 0]]
NUS_TAGS1K = ["beach", "cat", "cloud", "sunset"]
NUS_TRAIN_TAGS = [["cat"], ["cloud", "sunset"], ["beach"], []]
NUS_TEST_TAGS = [["cat", "cloud"], ["sunset"]]


def build_nuswide(tmp_path: Path) -> Path:
    root = tmp_path / "NUS-WIDE"
    write_lines(root / "Concepts81.txt", NUS_CONCEPTS, newline="\r\n")  # written on Windows, like the original
    all_tags = []
    for split, rel, y, tags in (
        ("Train", NUS_TRAIN, NUS_TRAIN_Y, NUS_TRAIN_TAGS),
        ("Test", NUS_TEST, NUS_TEST_Y, NUS_TEST_TAGS),
    ):
        write_lines(root / "ImageList" / f"{split}Imagelist.txt", rel, newline="\r\n")
        for c, concept in enumerate(NUS_CONCEPTS):
            write_lines(
                root / "Groundtruth" / "TrainTestLabels" / f"Labels_{concept}_{split}.txt", [f"{row[c]} " for row in y]
            )
        rows = ["".join(f"{int(t in image_tags)}\t" for t in NUS_TAGS1K) for image_tags in tags]
        write_lines(root / "NUS_WID_Tags" / f"{split}_Tags1k.dat", rows)
        write_lines(root / "tags" / f"{split.lower()}_tags.txt", [" ".join(t) for t in tags])
        for r, image_tags in zip(rel, tags, strict=True):
            write_image(root / "Flickr" / r.replace("\\", "/"))
            all_tags.append(f"{Path(r.replace(chr(92), '/')).stem.split('_')[1]}      {' '.join(image_tags)}")
    write_lines(root / "NUS_WID_Tags" / "TagList1k.txt", NUS_TAGS1K)
    write_lines(root / "NUS_WID_Tags" / "All_Tags.txt", all_tags)
    return root


# ---------------------------------------------------------------- CIFAR-100

CIFAR_TRAIN_FINE = [3, 0, 99, 3, 7, 12]
CIFAR_TRAIN_COARSE = [1, 0, 19, 1, 2, 5]
CIFAR_TEST_FINE = [5, 99, 0]
CIFAR_TEST_COARSE = [4, 19, 0]


def cifar_pixels(n: int, offset: int) -> np.ndarray:
    """Rows whose red, green and blue planes are constant (offset+i, 100+i, 200+i), easy to check after reshape."""
    rows = np.zeros((n, 3072), dtype=np.uint8)
    for i in range(n):
        rows[i, :1024], rows[i, 1024:2048], rows[i, 2048:] = offset + i, 100 + i, 200 + i
    return rows


def _dump(path: Path, data: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=2)  # the original batches were written by Python 2's cPickle, protocol 2


def build_cifar(tmp_path: Path) -> Path:
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    for split, fine, coarse, offset in (
        ("train", CIFAR_TRAIN_FINE, CIFAR_TRAIN_COARSE, 0),
        ("test", CIFAR_TEST_FINE, CIFAR_TEST_COARSE, 50),
    ):
        n = len(fine)
        _dump(
            base / split,
            {
                b"filenames": [f"img_{split}_{i}.png".encode() for i in range(n)],
                b"batch_label": f"{split} batch".encode(),
                b"fine_labels": fine,
                b"coarse_labels": coarse,
                b"data": cifar_pixels(n, offset),
            },
        )
    _dump(
        base / "meta",
        {
            b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
        },
    )
    return tmp_path


# ---------------------------------------------------------------- Visual Genome 500 (SSGRL / C-Tran files)

VG_LABELS = {"1.jpg": [0, 4], "2.jpg": [2], "3.jpg": [1, 3, 4], "4.jpg": [4], "5.jpg": [0], "6.jpg": [2, 3]}
VG_TRAIN = ["1.jpg", "2.jpg", "3.jpg", "4.jpg"]
VG_TEST = ["5.jpg", "6.jpg"]


def build_vg(tmp_path: Path) -> Path:
    root = tmp_path / "VG"
    write_json(root / "vg_category_500_labels_index.json", VG_LABELS)
    write_lines(root / "train_list_500.txt", VG_TRAIN)
    write_lines(root / "test_list_500.txt", VG_TEST)
    for name in VG_TRAIN + VG_TEST:
        folder = "VG_100K_2" if name == "3.jpg" else "VG_100K"  # one image in the second folder, as VG ships
        write_image(root / folder / name)
    regions = [
        {"id": 1, "regions": [{"region_id": 11, "image_id": 1, "phrase": "a red wall "}, {"phrase": "a lamp"}]},
        {"id": 5, "regions": [{"region_id": 51, "image_id": 5, "phrase": "grass"}]},
    ]
    write_json(root / "region_descriptions.json", regions)
    return root
