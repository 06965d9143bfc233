import json

import numpy as np
import pytest

from difffeat.features.store import EntryKey, FeatureStore, StoreError


def key(**kw):
    base = dict(modality="image", model="tiny", block=3, t=50, pool="mean", seed=0, split="train")
    return EntryKey(**{**base, **kw})


def test_shards_finalize_into_one_memmapped_array(tmp_path):
    st = FeatureStore(tmp_path)
    st.set_ids("train", ["a", "b", "c", "d", "e"])
    k = key()
    data = np.arange(20, dtype=np.float16).reshape(5, 4)
    st.write_shard(k, 0, data[:2])
    st.write_shard(k, 1, data[2:4])
    st.write_shard(k, 2, data[4:])
    assert not st.has(k)
    st.finalize(k, 3, 5, {"note": 1})
    arr = st.read(k)
    assert isinstance(arr, np.memmap) and arr.dtype == np.float16
    np.testing.assert_array_equal(arr, data)
    assert not list(st.entry_dir(k).glob("shard-*"))
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert man["entries"][k.name]["shape"] == [5, 4] and man["splits"] == {"train": 5}
    assert st.meta(k)["config"] == {"note": 1}


def test_finalize_refuses_missing_shards_and_wrong_row_count(tmp_path):
    st = FeatureStore(tmp_path)
    k = key()
    st.write_shard(k, 0, np.zeros((2, 3)))
    with pytest.raises(StoreError, match="shards missing"):
        st.finalize(k, 2, 4)
    st.write_shard(k, 1, np.zeros((1, 3)))
    with pytest.raises(StoreError, match="expected 4"):
        st.finalize(k, 2, 4)
    assert not st.has(k)


def test_a_different_id_list_is_refused(tmp_path):
    st = FeatureStore(tmp_path)
    st.set_ids("val", ["a", "b"])
    st.set_ids("val", ["a", "b"])  # same list again is fine
    with pytest.raises(StoreError, match="different id list"):
        st.set_ids("val", ["b", "a"])
    with pytest.raises(StoreError, match="not unique"):
        st.set_ids("test", ["a", "a"])


def test_entry_names_separate_every_key_field():
    names = {key().name}
    for change in [
        dict(modality="text"),
        dict(model="other"),
        dict(block=4),
        dict(t=51),
        dict(pool="none"),
        dict(seed=1),
        dict(split="val"),
        dict(variant="e4"),
    ]:
        names.add(key(**change).name)
    assert len(names) == 9


def test_leftover_temp_files_do_not_count_as_shards(tmp_path):
    st = FeatureStore(tmp_path)
    k = key()
    d = st.entry_dir(k)
    d.mkdir(parents=True)
    (d / ".shard-00000.npy.abc.tmp").write_bytes(b"torn")
    assert not st.has_shard(k, 0)


def test_finished_files_are_as_readable_as_ordinary_files(tmp_path):
    from difffeat.features.store import atomic_save_npy
    from difffeat.utils.io import FILE_MODE, atomic_write_json

    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_save_npy(tmp_path / "b.npy", np.zeros(3))
    ordinary = tmp_path / "c"
    ordinary.write_text("")
    for name in ("a.json", "b.npy"):
        assert (tmp_path / name).stat().st_mode & 0o777 == FILE_MODE == ordinary.stat().st_mode & 0o777
