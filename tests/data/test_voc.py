import shutil
from pathlib import Path

import pytest

from difffeat.data import VOC_CLASSES, DataError, load_voc2007

C = VOC_CLASSES.index


def test_standard_class_order() -> None:
    assert VOC_CLASSES[:3] == ("aeroplane", "bicycle", "bird") and VOC_CLASSES[-1] == "tvmonitor"
    assert len(VOC_CLASSES) == 20 and C("diningtable") == 10 and C("person") == 14


def _by_id(ds):
    return {s.id: s for split in ds.splits.values() for s in split}


def test_xml_labels_and_difficult_only_classes_go_to_ignore(voc_root: Path) -> None:
    ds = load_voc2007(voc_root, val_size=1)
    s = _by_id(ds)
    assert s["000007"].labels == (C("person"),) and s["000007"].ignore == (C("dog"),)
    assert s["000005"].labels == (C("chair"),) and s["000005"].ignore == ()  # one easy chair: a label
    assert s["000009"].labels == (C("horse"), C("person"))
    assert s["000002"].labels == () and s["000002"].ignore == (C("train"),)
    assert s["000001"].image == voc_root / "VOC2007" / "JPEGImages" / "000001.jpg"


def test_trainval_to_train_plus_val_and_test_to_test(voc_root: Path) -> None:
    ds = load_voc2007(voc_root, val_size=1)
    assert ds.split("test").ids == ["000001", "000002"]
    assert len(ds.split("val")) == 1
    assert sorted(ds.split("train").ids + ds.split("val").ids) == ["000005", "000007", "000009", "000012"]
    assert load_voc2007(voc_root, val_size=1).split("val").ids == ds.split("val").ids
    assert ds.classes == list(VOC_CLASSES)


def test_ignore_matrix_reaches_the_split(voc_root: Path) -> None:
    test = load_voc2007(voc_root, val_size=0).split("test")
    m = test.ignore_matrix(20)
    assert m is not None and m[1, C("train")] and m.sum() == 1


def test_imageset_files_give_the_same_labels_as_xml(voc_root: Path) -> None:
    from_xml = _by_id(load_voc2007(voc_root, val_size=1))
    from_sets = _by_id(load_voc2007(voc_root, val_size=1, labels_from="imagesets"))
    assert from_sets == from_xml


def test_auto_falls_back_to_imagesets_without_annotations(voc_root: Path) -> None:
    shutil.rmtree(voc_root / "VOC2007" / "Annotations")
    s = _by_id(load_voc2007(voc_root / "VOC2007", val_size=1))  # the VOC2007 folder itself also works
    assert s["000007"].labels == (C("person"),) and s["000007"].ignore == (C("dog"),)
    with pytest.raises(DataError, match=r"VOC annotation not found: .*000005\.xml"):
        load_voc2007(voc_root, labels_from="xml")


def test_unknown_object_class_names_file_and_object(voc_root: Path) -> None:
    path = voc_root / "VOC2007" / "Annotations" / "000009.xml"
    path.write_text(path.read_text().replace("<name>horse</name>", "<name>unicorn</name>"))
    with pytest.raises(DataError, match=r"000009\.xml: object 0 has class 'unicorn'"):
        load_voc2007(voc_root, val_size=1)


def test_malformed_xml_names_file(voc_root: Path) -> None:
    path = voc_root / "VOC2007" / "Annotations" / "000012.xml"
    path.write_text(path.read_text()[:-5])
    with pytest.raises(DataError, match=r"000012\.xml: malformed XML"):
        load_voc2007(voc_root, val_size=1)


def test_bad_imageset_line_names_file_and_line(voc_root: Path) -> None:
    path = voc_root / "VOC2007" / "ImageSets" / "Main" / "dog_test.txt"
    path.write_text("000001  1\n000002  2\n")
    with pytest.raises(DataError, match=r"dog_test\.txt, line 2: expected"):
        load_voc2007(voc_root, val_size=1, labels_from="imagesets")


def test_imageset_file_missing_an_image_is_named(voc_root: Path) -> None:
    path = voc_root / "VOC2007" / "ImageSets" / "Main" / "cat_test.txt"
    path.write_text("000001 -1\n")
    with pytest.raises(DataError, match=r"cat_test\.txt: no line for image '000002'"):
        load_voc2007(voc_root, val_size=1, labels_from="imagesets")


def test_not_a_voc_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no VOC2007/ImageSets/Main"):
        load_voc2007(tmp_path)


def test_check_files(voc_root: Path) -> None:
    (voc_root / "VOC2007" / "JPEGImages" / "000002.jpg").unlink()
    with pytest.raises(DataError, match=r"test\.txt: sample '000002': image file not found"):
        load_voc2007(voc_root, val_size=1, check_files=True)
