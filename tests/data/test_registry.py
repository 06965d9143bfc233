from pathlib import Path

import pytest

from difffeat.data import Dataset, available_datasets, load_dataset, load_voc2007, register_dataset, registry


def test_builtin_kinds() -> None:
    assert {"coco", "vg500", "voc2007", "nuswide", "cifar100", "manifest"} <= set(available_datasets())


def test_load_dataset_calls_the_reader(voc_root: Path) -> None:
    ds = load_dataset("voc2007", root=voc_root, val_size=1)
    assert ds.split("test").ids == load_voc2007(voc_root, val_size=1).split("test").ids


def test_unknown_kind_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown dataset kind 'imagenet'; valid kinds: cifar100, coco, manifest"):
        load_dataset("imagenet")


def test_bad_argument_names_kind_and_parameters(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"dataset kind 'coco': .*'yaer'.*'year'"):
        load_dataset("coco", root=tmp_path, yaer=2017)


def test_register_and_no_silent_shadowing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_READERS", dict(registry._READERS))

    def demo(size: int = 2) -> Dataset:
        return Dataset(name="demo", classes=["a"] * size, splits={})

    register_dataset("demo", demo)
    register_dataset("demo", demo)  # the same reader again is harmless
    assert load_dataset("demo", size=3).classes == ["a", "a", "a"]
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("demo", lambda: demo())
    register_dataset("demo", lambda: demo(1), overwrite=True)
    assert load_dataset("demo").num_classes == 1
