import json
from pathlib import Path

import pytest
from datafmt import COCO_TRAIN, write_json

from difffeat.data import DataError, load_coco, load_image


def test_classes_follow_category_id_order_and_labels_map_to_indices(coco_root: Path) -> None:
    ds = load_coco(coco_root, val_size=2)
    assert ds.name == "coco2014"
    assert ds.classes == ["person", "car", "toothbrush"]  # ids 1, 3, 90 -> 0, 1, 2
    by_id = {s.id: s for split in ds.splits.values() for s in split}
    assert by_id["10"].labels == (0, 2)
    assert by_id["11"].labels == (1,)
    assert by_id["12"].labels == (0,)  # two "person" boxes are one label
    assert by_id["14"].labels == (1, 2)
    assert by_id["20"].labels == (1,)


def test_official_val_becomes_test_and_val_is_carved_from_train(coco_root: Path) -> None:
    ds = load_coco(coco_root, val_size=2)
    assert sorted(ds.split("test").ids) == ["20", "21"]
    assert len(ds.split("val")) == 2
    assert sorted(ds.split("train").ids + ds.split("val").ids) == sorted(str(i) for i in COCO_TRAIN)
    again = load_coco(coco_root, val_size=2)
    assert again.split("val").ids == ds.split("val").ids


def test_val_carving_depends_on_seed(coco_root: Path) -> None:
    vals = {tuple(load_coco(coco_root, val_size=3, seed=s, captions=False).split("val").ids) for s in range(6)}
    assert len(vals) > 1


def test_images_are_lazy_paths_from_file_name(coco_root: Path) -> None:
    ds = load_coco(coco_root, val_size=1)
    s = ds.split("test")[0]
    assert s.image == coco_root / "val2014" / f"COCO_val2014_{int(s.id):012d}.jpg"
    assert load_image(s).size == (8, 6)


def test_five_captions_per_image_stripped(coco_root: Path) -> None:
    ds = load_coco(coco_root, val_size=1)
    s = next(s for s in ds.split("test") if s.id == "20")
    assert s.captions == tuple(f"image 20 caption {k}" for k in range(5))
    assert load_coco(coco_root, val_size=1, captions=False).split("test")[0].captions == ()


def test_unannotated_images_kept_as_negatives_and_counted(coco_root: Path) -> None:
    ds = load_coco(coco_root, val_size=1)
    by_id = {s.id: s for split in ds.splits.values() for s in split}
    assert by_id["13"].labels == () and by_id["21"].labels == ()
    assert ds.notes["unannotated_train"] == 1 and ds.notes["unannotated_test"] == 1
    assert ds.skipped == []


def test_drop_unannotated_records_what_was_dropped(coco_root: Path) -> None:
    ds = load_coco(coco_root, val_size=1, drop_unannotated=True)
    ids = {s.id for split in ds.splits.values() for s in split}
    assert "13" not in ids and "21" not in ids and "10" in ids
    assert sorted(r for r, _ in ds.skipped) == ["test/21", "train/13"]
    assert ds.notes["dropped_unannotated_train"] == 1


def test_year_2017_file_names(coco_root: Path) -> None:
    for p in (coco_root / "annotations").iterdir():
        p.rename(p.with_name(p.name.replace("2014", "2017")))
    ds = load_coco(coco_root, year=2017, val_size=1)
    assert ds.name == "coco2017"
    assert ds.split("test")[0].image.parent == coco_root / "val2017"


def test_unknown_category_id_names_file_and_annotation(coco_root: Path) -> None:
    path = coco_root / "annotations" / "instances_train2014.json"
    data = json.loads(path.read_text())
    data["annotations"][2]["category_id"] = 2
    bad_id = data["annotations"][2]["id"]
    write_json(path, data)
    with pytest.raises(DataError, match=rf"instances_train2014\.json: annotation {bad_id} has unknown category_id 2"):
        load_coco(coco_root, val_size=1)


def test_malformed_json_names_file_line_and_column(coco_root: Path) -> None:
    path = coco_root / "annotations" / "instances_val2014.json"
    lines = path.read_text().splitlines()
    lines[3] = lines[3] + ","  # a trailing comma inside the first image record
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"instances_val2014\.json: malformed JSON at line \d+, column \d+"):
        load_coco(coco_root, val_size=1)


def test_missing_caption_file_is_a_clear_error(coco_root: Path) -> None:
    (coco_root / "annotations" / "captions_val2014.json").unlink()
    with pytest.raises(DataError, match=r"captions file not found: .*captions_val2014\.json.*captions=False"):
        load_coco(coco_root, val_size=1)
    assert len(load_coco(coco_root, val_size=1, captions=False).split("test")) == 2


def test_image_without_caption_names_file_and_image(coco_root: Path) -> None:
    path = coco_root / "annotations" / "captions_train2014.json"
    data = json.loads(path.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 12]
    write_json(path, data)
    with pytest.raises(DataError, match=r"captions_train2014\.json: image 12 has no caption"):
        load_coco(coco_root, val_size=1)


def test_missing_instances_file_is_named(coco_root: Path) -> None:
    (coco_root / "annotations" / "instances_train2014.json").unlink()
    with pytest.raises(DataError, match=r"COCO instances file not found: .*instances_train2014\.json"):
        load_coco(coco_root)


def test_check_files_names_the_missing_image(coco_root: Path) -> None:
    load_coco(coco_root, val_size=1, check_files=True)
    (coco_root / "train2014" / "COCO_train2014_000000000011.jpg").unlink()
    assert len(load_coco(coco_root, val_size=1).split("train")) == 5  # off by default: nothing is touched
    with pytest.raises(DataError, match=r"sample '11': image file not found: .*COCO_train2014_000000000011\.jpg"):
        load_coco(coco_root, val_size=1, check_files=True)
