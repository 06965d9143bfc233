import json
from pathlib import Path

import pytest
from datafmt import write_image, write_lines

from difffeat.data import DataError, load_image, load_manifest


def _jsonl(path: Path, records: list[dict]) -> Path:
    return write_lines(path, [json.dumps(r) for r in records])


RECORDS = [
    {"id": "a", "image": "img/a.png", "captions": ["a cat", "a small cat"], "labels": ["cat"], "split": "train"},
    {"id": "b", "image": "img/b.png", "caption": "a dog and a cat", "labels": ["dog", "cat"], "split": "train"},
    {"id": "c", "image": "img/c.png", "caption": "nothing", "labels": [], "split": "val"},
    {"image": "img/d.png", "labels": ["bird"], "split": "test"},
]


@pytest.fixture
def jsonl(tmp_path: Path) -> Path:
    for name in "abcd":
        write_image(tmp_path / "img" / f"{name}.png")
    return _jsonl(tmp_path / "data.jsonl", RECORDS)


def test_jsonl_records_classes_and_splits(jsonl: Path) -> None:
    ds = load_manifest(jsonl)
    assert ds.name == "data" and ds.classes == ["bird", "cat", "dog"]  # inferred: sorted unique
    assert ds.split("train").ids == ["a", "b"] and ds.split("val").ids == ["c"]
    assert ds.split("test").ids == ["img/d.png"]  # no id: the image path as written
    a, b = ds.split("train")
    assert a.captions == ("a cat", "a small cat") and b.captions == ("a dog and a cat",)
    assert b.labels == (1, 2) and ds.split("val")[0].labels == ()
    assert a.image == jsonl.parent / "img" / "a.png" and load_image(a).size == (8, 6)


def test_given_class_list_sets_the_order(jsonl: Path, tmp_path: Path) -> None:
    ds = load_manifest(jsonl, classes=["dog", "cat", "bird", "fish"])
    assert ds.classes == ["dog", "cat", "bird", "fish"] and ds.split("train")[1].labels == (0, 1)
    write_lines(tmp_path / "classes.txt", ["cat", "dog", "bird"])
    assert load_manifest(jsonl, classes=tmp_path / "classes.txt").split("train")[1].labels == (0, 1)


def test_label_outside_class_list_names_file_line_and_label(jsonl: Path) -> None:
    with pytest.raises(DataError, match=r"data\.jsonl, line 4: label 'bird' is not in the class list"):
        load_manifest(jsonl, classes=["cat", "dog"])


def test_image_root(jsonl: Path, tmp_path: Path) -> None:
    ds = load_manifest(jsonl, image_root=tmp_path / "elsewhere")
    assert ds.split("train")[0].image == tmp_path / "elsewhere" / "img" / "a.png"


def test_val_carved_when_splits_have_no_val(tmp_path: Path) -> None:
    records = [{"id": str(i), "image": f"{i}.png", "labels": ["x"], "split": "train"} for i in range(10)]
    path = _jsonl(tmp_path / "m.jsonl", [*records, {"id": "t", "image": "t.png", "labels": [], "split": "test"}])
    ds = load_manifest(path, val_size=3)
    assert len(ds.split("train")) == 7 and len(ds.split("val")) == 3 and ds.split("test").ids == ["t"]
    assert load_manifest(path, val_size=3).split("val").ids == ds.split("val").ids


def test_hash_split_is_deterministic_and_order_independent(tmp_path: Path) -> None:
    records = [{"id": f"s{i}", "image": f"{i}.png", "labels": ["x"]} for i in range(200)]
    ds = load_manifest(_jsonl(tmp_path / "m.jsonl", records))
    sizes = {name: len(split) for name, split in ds.splits.items()}
    assert sum(sizes.values()) == 200 and 130 < sizes["train"] < 190 and sizes["val"] > 5 and sizes["test"] > 5
    shuffled = load_manifest(_jsonl(tmp_path / "r.jsonl", records[::-1]))
    assert {n: set(s.ids) for n, s in shuffled.splits.items()} == {n: set(s.ids) for n, s in ds.splits.items()}
    other = load_manifest(tmp_path / "m.jsonl", fractions=(0.5, 0.0, 0.5))
    assert len(other.split("val")) == 0 and 60 < len(other.split("train")) < 140


def test_csv_manifest(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "m.csv",
        ["id,image,captions,labels,split", "1,a.png,a cat|a kitten,cat,train", '2,b.png,"dogs, two",dog;cat,test'],
    )
    ds = load_manifest(path, val_size=0)
    assert ds.classes == ["cat", "dog"]
    a, b = ds.split("train")[0], ds.split("test")[0]
    assert a.captions == ("a cat", "a kitten") and a.labels == (0,)
    assert b.captions == ("dogs, two",) and b.labels == (0, 1) and b.image == tmp_path / "b.png"


def test_csv_wrong_columns_names_file_and_expected(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "m.csv", ["image,label", "a.png,cat"])
    with pytest.raises(DataError, match=r"m\.csv: CSV columns \['image', 'label'\]; expected 'labels'"):
        load_manifest(path)


def test_csv_row_with_extra_cells(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "m.csv", ["image,labels", "a.png,cat", "b.png,cat,oops"])
    with pytest.raises(DataError, match=r"m\.csv, line 3: more cells than columns"):
        load_manifest(path)


def test_malformed_jsonl_names_file_line_and_column(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "m.jsonl", [json.dumps(RECORDS[0]), '{"image": "b.png", "labels": [}'])
    with pytest.raises(DataError, match=r"m\.jsonl, line 2, column 31: malformed JSON"):
        load_manifest(path)


def test_unknown_field_is_an_error(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "m.jsonl", [{"image": "a.png", "label": ["cat"]}])
    with pytest.raises(DataError, match=r"m\.jsonl, line 1: unknown field\(s\) \['label'\]"):
        load_manifest(path)


def test_bad_split_value_and_mixed_splits(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "m.jsonl", [{"image": "a.png", "labels": [], "split": "training"}])
    with pytest.raises(DataError, match=r"m\.jsonl, line 1: 'split' is 'training'"):
        load_manifest(path)
    path = _jsonl(tmp_path / "m.jsonl", [{"image": "a.png", "labels": [], "split": "train"}, {"image": "b.png"}])
    with pytest.raises(DataError, match=r"m\.jsonl, line 2: no 'split' while other records have one"):
        load_manifest(path)


def test_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "m.jsonl", [{"id": "x", "image": "a.png"}, {"id": "y"}, {"id": "x", "image": "b.png"}])
    with pytest.raises(DataError, match=r"m\.jsonl, line 3: duplicate id 'x' \(first on line 1\)"):
        load_manifest(path)


def test_required_captions(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "m.jsonl", [{"image": "a.png", "caption": "hi"}, {"image": "b.png", "captions": []}])
    assert load_manifest(path).num_classes == 0
    with pytest.raises(DataError, match=r"m\.jsonl, line 2: no caption"):
        load_manifest(path, require_captions=True)


def test_check_files_names_the_missing_image(jsonl: Path) -> None:
    load_manifest(jsonl, check_files=True)
    (jsonl.parent / "img" / "c.png").unlink()
    with pytest.raises(DataError, match=r"data\.jsonl: sample 'c': image file not found: .*c\.png"):
        load_manifest(jsonl, check_files=True)


def test_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"m\.txt: unknown manifest format"):
        load_manifest(write_lines(tmp_path / "m.txt", ["a.png"]))
