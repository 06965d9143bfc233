"""Data that real users have and the happy-path formats do not show: 16-bit images, decompression bombs, files
that are not UTF-8 or carry Excel's byte-order mark, null or blank captions, failures inside DataLoader workers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from datafmt import write_image, write_json
from PIL import Image

from difffeat.data import DataError, Sample, load_coco, load_image, load_manifest, load_vg500
from difffeat.data.core import read_json, read_lines

GREY = np.array([[0, 257, 32896], [65535, 12850, 1000]], dtype=np.uint16)  # exact 8-bit values 0, 1, 128, 255, 50


def test_16_bit_png_is_scaled_not_clipped_to_white(tmp_path: Path) -> None:
    path = tmp_path / "grey16.png"
    Image.fromarray(GREY).save(path)
    assert Image.open(path).mode.startswith("I")  # Pillow reads it as 16-bit, which convert("RGB") clips
    expected = np.rint(GREY / 257).astype(np.uint8)  # 1000 / 257 = 3.9 -> 4
    for source in (path, Image.open(path), GREY):
        rgb = np.asarray(load_image(Sample("s", source)))
        assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
        np.testing.assert_array_equal(rgb[..., 0], expected)
        np.testing.assert_array_equal(rgb[..., 1], rgb[..., 2])


def test_8_bit_images_are_unchanged(tmp_path: Path) -> None:
    path = write_image(tmp_path / "rgb.png", (200, 30, 7))
    assert np.asarray(load_image(Sample("s", path)))[0, 0].tolist() == [200, 30, 7]
    ints = np.full((2, 2, 3), 200, dtype=np.int64)  # plain integer arrays keep their 0..255 values
    assert np.asarray(load_image(Sample("s", ints)))[0, 0].tolist() == [200, 200, 200]


def test_decompression_bomb_is_a_one_line_data_error(tmp_path: Path, monkeypatch) -> None:
    path = write_image(tmp_path / "bomb.png")  # 8 x 6 = 48 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # Pillow refuses images over twice this
    with pytest.raises(DataError, match=r"sample 'b': refusing to decode image .*bomb\.png: .*decompression bomb") as e:
        load_image(Sample("b", path))
    assert "\n" not in str(e.value)


class Decode(torch.utils.data.Dataset):
    """What a feature job's loader does: decode in a worker, add the row to the message of a failure."""

    def __init__(self, samples: list[Sample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> np.ndarray:
        try:
            return np.asarray(load_image(self.samples[i]))
        except DataError as exc:
            raise DataError(f"row {i}: {exc} (use --skip-bad)") from exc


def test_a_failure_in_a_dataloader_worker_is_one_line_naming_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    loader = torch.utils.data.DataLoader(Decode([Sample("x", broken)]), num_workers=1)
    with pytest.raises(DataError) as e:
        next(iter(loader))
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith("row 0: sample 'x': cannot decode image") and "broken.png" in message
    assert message.endswith("(use --skip-bad)")


@pytest.mark.parametrize("name", ["x.json", "x.jsonl", "x.csv"])
def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    text = {"x.json": '{"a":\n "caf\xe9"}', "x.jsonl": '{"image": "a.png"}\n{"image": "caf\xe9.png"}'}
    path.write_bytes(text.get(name, "image,labels\ncaf\xe9.png,cat\n").encode("latin-1"))
    reader = read_json if name == "x.json" else load_manifest
    with pytest.raises(DataError, match=rf"{name}, line 2: not UTF-8 text \(byte 0xe9 at offset \d+\); save"):
        reader(path)


def test_excel_csv_with_byte_order_mark_is_read(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes("id,image,labels\r\na,a.png,cat|dog\r\nb,b.png,dog\r\n".encode("utf-8-sig"))
    ds = load_manifest(path, fractions=(1.0, 0.0, 0.0))
    assert ds.classes == ["cat", "dog"] and ds.split("train").ids == ["a", "b"]
    (tmp_path / "x.json").write_bytes('{"a": 1}'.encode("utf-8-sig"))
    (tmp_path / "x.txt").write_bytes("one\ntwo\n".encode("utf-8-sig"))
    assert read_json(tmp_path / "x.json") == {"a": 1} and read_lines(tmp_path / "x.txt") == ["one", "two"]


def _set_captions(coco_root: Path, image_id: int, texts: list) -> None:
    path = coco_root / "annotations" / "captions_train2014.json"
    data = json.loads(path.read_text())
    others = [a for a in data["annotations"] if a["image_id"] != image_id]
    data["annotations"] = others + [{"id": 9000 + k, "image_id": image_id, "caption": t} for k, t in enumerate(texts)]
    write_json(path, data)


def test_null_and_blank_coco_captions_are_dropped_and_counted(coco_root: Path) -> None:
    _set_captions(coco_root, 10, ["a person", None, "  ", "", "a toothbrush "])
    ds = load_coco(coco_root, val_size=1)
    by_id = {s.id: s for split in ds.splits.values() for s in split}
    assert by_id["10"].captions == ("a person", "a toothbrush")  # not "None", not ""
    assert ds.notes["blank_captions_train"] == 3 and ds.notes["blank_captions_test"] == 0


def test_coco_image_left_without_captions_is_an_error_or_dropped_by_option(coco_root: Path) -> None:
    _set_captions(coco_root, 11, [None, " "])
    with pytest.raises(DataError, match=r"captions_train2014\.json: image 11 has no caption \(only null or blank"):
        load_coco(coco_root, val_size=1)
    ds = load_coco(coco_root, val_size=1, drop_uncaptioned=True)
    assert "11" not in {s.id for split in ds.splits.values() for s in split}
    assert ds.skipped == [("train/11", "no caption (drop_uncaptioned=True)")]
    assert ds.notes["dropped_uncaptioned_train"] == 1


def test_null_visual_genome_phrases_are_not_captions(vg_root: Path) -> None:
    regions = [{"id": 1, "regions": [{"phrase": None}, {"phrase": " a lamp "}, {}]}]
    write_json(vg_root / "region_descriptions.json", regions)
    ds = load_vg500(vg_root, val_size=1, num_classes=5, region_descriptions="region_descriptions.json")
    assert {s.id: s for split in ds.splits.values() for s in split}["1"].captions == ("a lamp",)
