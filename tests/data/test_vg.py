import json
from pathlib import Path

import pytest
from datafmt import VG_LABELS, write_json, write_lines

from difffeat.data import DataError, load_vg500


def test_lists_labels_ids_and_images(vg_root: Path) -> None:
    ds = load_vg500(vg_root, val_size=1, num_classes=5)
    assert ds.classes == [f"vg500_{i:03d}" for i in range(5)]
    assert ds.split("test").ids == ["5", "6"]
    assert sorted(ds.split("train").ids + ds.split("val").ids) == ["1", "2", "3", "4"]
    by_id = {s.id: s for split in ds.splits.values() for s in split}
    assert by_id["3"].labels == (1, 3, 4) and by_id["6"].labels == (2, 3)
    assert by_id["1"].image == vg_root / "VG_100K" / "1.jpg"
    assert by_id["3"].image == vg_root / "VG_100K_2" / "3.jpg"  # found in the second folder


def test_default_500_placeholder_classes(vg_root: Path) -> None:
    ds = load_vg500(vg_root, val_size=1)
    assert ds.num_classes == 500 and ds.classes[499] == "vg500_499"


def test_classes_from_text_or_json(vg_root: Path) -> None:
    names = ["man", "tree", "car", "sky", "shirt"]
    write_lines(vg_root / "names.txt", names)
    assert load_vg500(vg_root, val_size=1, num_classes=5, classes_file="names.txt").classes == names
    write_json(vg_root / "names.json", {n: i for i, n in enumerate(names)})
    assert load_vg500(vg_root, val_size=1, num_classes=5, classes_file="names.json").classes == names
    with pytest.raises(DataError, match=r"names\.txt: 5 class names, expected 500"):
        load_vg500(vg_root, classes_file="names.txt")


def test_region_descriptions_become_captions(vg_root: Path) -> None:
    ds = load_vg500(vg_root, val_size=1, num_classes=5, region_descriptions="region_descriptions.json")
    by_id = {s.id: s for split in ds.splits.values() for s in split}
    assert by_id["1"].captions == ("a red wall", "a lamp") and by_id["5"].captions == ("grass",)
    assert by_id["2"].captions == ()
    assert ds.notes["no_region_descriptions_test"] == 1
    assert ds.notes["no_region_descriptions_train"] == 3
    assert load_vg500(vg_root, val_size=1, num_classes=5).split("test")[0].captions == ()


def test_list_entry_without_labels_names_list_line_and_image(vg_root: Path) -> None:
    write_lines(vg_root / "test_list_500.txt", ["5.jpg", "7.jpg"])
    with pytest.raises(DataError, match=r"test_list_500\.txt, line 2: image '7\.jpg' has no entry in .*labels_index"):
        load_vg500(vg_root, num_classes=5)


def test_label_index_out_of_range_names_image(vg_root: Path) -> None:
    with pytest.raises(
        DataError, match=r"labels_index\.json: image '1\.jpg': expected a list of label indices in 0\.\.3"
    ):
        load_vg500(vg_root, num_classes=4)


def test_name_to_index_file_in_place_of_labels_is_explained(vg_root: Path) -> None:
    write_json(vg_root / "vg_category_500_labels_index.json", {"man": 0, "tree": 1})
    with pytest.raises(DataError, match=r"entry 'man' maps to a single int.*classes_file"):
        load_vg500(vg_root)


def test_malformed_labels_json(vg_root: Path) -> None:
    (vg_root / "vg_category_500_labels_index.json").write_text(json.dumps(VG_LABELS)[:-1])
    with pytest.raises(DataError, match=r"labels_index\.json: malformed JSON at line 1, column \d+"):
        load_vg500(vg_root)


def test_custom_file_names_and_single_image_dir(vg_root: Path) -> None:
    (vg_root / "train_list_500.txt").rename(vg_root / "train.txt")
    ds = load_vg500(vg_root, val_size=1, num_classes=5, train_list="train.txt", image_dirs=("VG_100K",))
    by_id = {s.id: s for split in ds.splits.values() for s in split}
    assert by_id["3"].image == vg_root / "VG_100K" / "3.jpg"  # one folder: no lookup, the path as configured
    with pytest.raises(DataError, match=r"train\.txt: sample '3': image file not found"):
        load_vg500(vg_root, num_classes=5, train_list="train.txt", image_dirs=("VG_100K",), check_files=True)
