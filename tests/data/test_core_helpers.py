from pathlib import Path

import pytest

from difffeat.data import DataError, Sample
from difffeat.data.core import build_splits, read_json, read_lines


def test_read_json_reports_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('{\n  "a": 1,\n  "b": ]\n}')
    with pytest.raises(DataError, match=r"x\.json: malformed JSON at line 3, column 8"):
        read_json(path)
    with pytest.raises(DataError, match=r"thing not found: .*nope\.json"):
        read_json(tmp_path / "nope.json", "thing")


def test_read_lines_keeps_inner_blank_lines_and_strips_crlf(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_bytes(b"a \r\n\r\nb\r\n")
    assert read_lines(path) == ["a", "", "b"]


def test_build_splits_rejects_ids_shared_by_train_and_test() -> None:
    train = [Sample(id=str(i), image=None) for i in range(4)]
    splits = build_splits(train, [Sample(id="9", image=None)], val_size=1)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [3, 1, 1]
    with pytest.raises(DataError, match="duplicate sample id '2'"):
        build_splits(train, [Sample(id="2", image=None)], val_size=1)
