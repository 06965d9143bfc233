from pathlib import Path

import pytest
from datafmt import NUS_CONCEPTS, write_lines

from difffeat.data import DataError, load_image, load_nuswide


def _by_id(ds):
    return {s.id: s for split in ds.splits.values() for s in split}


def test_concepts_ids_labels_and_backslash_paths(nuswide_root: Path) -> None:
    ds = load_nuswide(nuswide_root, val_size=1)
    assert ds.classes == NUS_CONCEPTS  # CRLF line ends stripped
    assert ds.split("test").ids == ["animal/0005_400.jpg", "sky/0006_500.jpg"]
    s = _by_id(ds)
    assert s["actor/0001_2124494179.jpg"].labels == (0,)
    assert s["sky/0002_100.jpg"].labels == (1, 2)
    assert s["animal/0005_400.jpg"].labels == (0, 1)
    assert s["sky/0002_100.jpg"].image == nuswide_root / "Flickr" / "sky" / "0002_100.jpg"
    assert load_image(s["sky/0002_100.jpg"]).size == (8, 6)


def test_split_sizes_and_deterministic_val(nuswide_root: Path) -> None:
    ds = load_nuswide(nuswide_root, val_size=2)
    assert len(ds.split("train")) == 2 and len(ds.split("val")) == 2 and len(ds.split("test")) == 2
    assert load_nuswide(nuswide_root, val_size=2).split("val").ids == ds.split("val").ids


def test_unlabeled_images_counted_or_dropped(nuswide_root: Path) -> None:
    ds = load_nuswide(nuswide_root, val_size=1)
    assert _by_id(ds)["zoo/0004_300.jpg"].labels == ()
    assert ds.notes["unlabeled_train"] == 1 and ds.notes["unlabeled_test"] == 0
    dropped = load_nuswide(nuswide_root, val_size=1, drop_unlabeled=True)
    assert "zoo/0004_300.jpg" not in _by_id(dropped)
    assert dropped.skipped == [("train/zoo/0004_300.jpg", "none of the 81 concepts (drop_unlabeled=True)")]


def test_no_tags_by_default(nuswide_root: Path) -> None:
    assert all(not s.captions for s in load_nuswide(nuswide_root, val_size=1).split("train"))


@pytest.mark.parametrize("form", ["tags1k", "all_tags", "lines"])
def test_tag_forms_give_the_same_captions(nuswide_root: Path, form: str) -> None:
    files = {"train": "tags/train_tags.txt", "test": "tags/test_tags.txt"}
    ds = load_nuswide(nuswide_root, val_size=1, tags=form, tag_files=files)
    s = _by_id(ds)
    assert s["actor/0001_2124494179.jpg"].captions == ("cat",)
    assert s["sky/0002_100.jpg"].captions == ("cloud sunset",)
    assert s["animal/0005_400.jpg"].captions == ("cat cloud",)
    assert s["zoo/0004_300.jpg"].captions == ()
    assert ds.notes["no_tags_train"] == 1


def test_missing_image_raises_naming_the_file_by_default(nuswide_root: Path) -> None:
    (nuswide_root / "Flickr" / "sky" / "0002_100.jpg").unlink()
    with pytest.raises(DataError, match=r"TrainImagelist\.txt: image 'sky/0002_100\.jpg' not found at .*0002_100"):
        load_nuswide(nuswide_root, val_size=1)


def test_skip_missing_records_skipped_images(nuswide_root: Path) -> None:
    (nuswide_root / "Flickr" / "sky" / "0002_100.jpg").unlink()
    ds = load_nuswide(nuswide_root, val_size=1, skip_missing=True)
    assert "sky/0002_100.jpg" not in _by_id(ds) and len(_by_id(ds)) == 5
    assert [r for r, _ in ds.skipped] == ["train/sky/0002_100.jpg"]
    assert "image file not found" in ds.skipped[0][1]
    assert ds.notes["missing_images_train"] == 1
    assert len(load_nuswide(nuswide_root, val_size=1, check_files=False).split("test")) == 2


def test_label_file_with_wrong_length_names_both_files(nuswide_root: Path) -> None:
    write_lines(nuswide_root / "Groundtruth" / "TrainTestLabels" / "Labels_sky_Test.txt", ["1"])
    with pytest.raises(DataError, match=r"Labels_sky_Test\.txt: 1 lines, expected 2 .*TestImagelist\.txt"):
        load_nuswide(nuswide_root, val_size=1)


def test_label_value_other_than_0_1_names_file_and_line(nuswide_root: Path) -> None:
    write_lines(nuswide_root / "Groundtruth" / "TrainTestLabels" / "Labels_water_Train.txt", ["0", "1", "2", "0"])
    with pytest.raises(DataError, match=r"Labels_water_Train\.txt, line 3: expected 0 or 1, got '2'"):
        load_nuswide(nuswide_root, val_size=1)


def test_missing_label_file_is_named(nuswide_root: Path) -> None:
    (nuswide_root / "Groundtruth" / "TrainTestLabels" / "Labels_animal_Test.txt").unlink()
    with pytest.raises(DataError, match=r"label file not found: .*Labels_animal_Test\.txt"):
        load_nuswide(nuswide_root, val_size=1)


def test_bad_tag_matrix_row_names_file_and_line(nuswide_root: Path) -> None:
    write_lines(nuswide_root / "NUS_WID_Tags" / "Test_Tags1k.dat", ["0\t1\t0\t0\t", "0\t1\t"])
    with pytest.raises(DataError, match=r"Test_Tags1k\.dat, line 2: expected 4 values of 0/1"):
        load_nuswide(nuswide_root, val_size=1, tags="tags1k")


def test_tag_lines_file_with_wrong_length(nuswide_root: Path) -> None:
    write_lines(nuswide_root / "tags" / "test_tags.txt", ["cat"])
    files = {"train": "tags/train_tags.txt", "test": "tags/test_tags.txt"}
    with pytest.raises(DataError, match=r"test_tags\.txt: 1 lines, expected 2"):
        load_nuswide(nuswide_root, val_size=1, tags="lines", tag_files=files)
    with pytest.raises(ValueError, match="tag_files"):
        load_nuswide(nuswide_root, val_size=1, tags="lines")


def test_empty_line_inside_image_list(nuswide_root: Path) -> None:
    write_lines(nuswide_root / "ImageList" / "TestImagelist.txt", ["animal\\0005_400.jpg", "", "sky\\0006_500.jpg"])
    with pytest.raises(DataError, match=r"TestImagelist\.txt, line 2: empty line"):
        load_nuswide(nuswide_root, val_size=1)
