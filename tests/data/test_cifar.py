import pickle
from pathlib import Path

import numpy as np
import pytest
from datafmt import CIFAR_TEST_FINE, CIFAR_TRAIN_COARSE, CIFAR_TRAIN_FINE

from difffeat.data import DataError, load_cifar100, load_image


def test_fine_labels_classes_ids_and_single_label(cifar_root: Path) -> None:
    ds = load_cifar100(cifar_root, val_size=2)
    assert ds.single_label and ds.name == "cifar100-fine"
    assert ds.classes == [f"fine{i}" for i in range(100)]
    assert ds.split("test").ids == ["test/0", "test/1", "test/2"]
    assert [s.labels for s in ds.split("test")] == [(y,) for y in CIFAR_TEST_FINE]
    train = {s.id: s for s in ds.split("train").samples + ds.split("val").samples}
    assert sorted(train) == sorted(f"train/{i}" for i in range(6))
    assert [train[f"train/{i}"].labels for i in range(6)] == [(y,) for y in CIFAR_TRAIN_FINE]
    assert len(ds.split("val")) == 2 and load_cifar100(cifar_root, val_size=2).split("val").ids == ds.split("val").ids


def test_coarse_labels(cifar_root: Path) -> None:
    ds = load_cifar100(cifar_root / "cifar-100-python", label="coarse", val_size=0)
    assert ds.classes == [f"coarse{i}" for i in range(20)]
    assert [s.labels for s in ds.split("train")] == [(y,) for y in CIFAR_TRAIN_COARSE]
    with pytest.raises(ValueError, match="'fine' or 'coarse'"):
        load_cifar100(cifar_root, label="super")


def test_images_are_hwc_arrays_from_planar_rows(cifar_root: Path) -> None:
    s = load_cifar100(cifar_root, val_size=0).split("test")[1]
    assert isinstance(s.image, np.ndarray) and s.image.shape == (32, 32, 3) and s.image.dtype == np.uint8
    assert s.image[0, 0].tolist() == [51, 101, 201] and s.image[31, 31].tolist() == [51, 101, 201]
    assert load_image(s).getpixel((5, 7)) == (51, 101, 201)


def test_missing_key_names_file_and_key(cifar_root: Path) -> None:
    path = cifar_root / "cifar-100-python" / "test"
    with open(path, "rb") as f:
        data = pickle.load(f, encoding="bytes")
    del data[b"fine_labels"]
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=2)
    with pytest.raises(DataError, match=r"cifar-100-python/test: no b'fine_labels' entry"):
        load_cifar100(cifar_root, val_size=1)


def test_label_out_of_range_names_file_and_row(cifar_root: Path) -> None:
    path = cifar_root / "cifar-100-python" / "train"
    with open(path, "rb") as f:
        data = pickle.load(f, encoding="bytes")
    data[b"coarse_labels"][4] = 20
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=2)
    with pytest.raises(DataError, match=r"cifar-100-python/train: row 4 has label 20, expected 0\.\.19"):
        load_cifar100(cifar_root, label="coarse", val_size=1)


def test_corrupt_pickle_and_missing_batch(cifar_root: Path) -> None:
    (cifar_root / "cifar-100-python" / "meta").write_bytes(b"\x80\x02}q\x00(")
    with pytest.raises(DataError, match=r"cifar-100-python/meta: not a readable CIFAR-100 pickle"):
        load_cifar100(cifar_root)
    (cifar_root / "cifar-100-python" / "meta").unlink()
    with pytest.raises(DataError, match=r"CIFAR-100 batch not found: .*meta"):
        load_cifar100(cifar_root)


class _Payload:
    """Unpickling this calls os.system: what a crafted "dataset" file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_crafted_pickle_runs_no_code(cifar_root: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = cifar_root / "cifar-100-python" / "meta"
    path.write_bytes(pickle.dumps({b"fine_label_names": [_Payload(marker)]}, protocol=2))
    with pytest.raises(DataError, match=r"meta: not a readable CIFAR-100 pickle .*posix.system|os.system"):
        load_cifar100(cifar_root, val_size=0)
    assert not marker.exists()
