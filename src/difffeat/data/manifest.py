"""Users' own data as a JSONL or CSV manifest: one record per image.

JSONL: one object per line, ``{"id"?, "image", "captions": [...] | "caption": "...", "labels": [...], "split"?}``.
CSV: columns ``image``, ``labels`` (``|``- or ``;``-separated), optional ``id``, ``caption``/``captions``
(``|``-separated) and ``split``. Unknown keys or columns are errors, because a misspelt ``label`` column would
otherwise yield a dataset with no labels at all.

Splits: the ``split`` field (``train``/``val``/``test``) when records have one, with a ``val`` carved from train
when none is marked val; without the field, each record goes to a split by a hash of its id, so the assignment
is stable across machines, record order, and records added later.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from difffeat.data.core import (
    DataError,
    Dataset,
    Sample,
    Split,
    carve_val,
    check_image_files,
    read_lines,
    read_text,
    require_file,
    stable_hash,
)

SPLITS = ("train", "val", "test")


def load_manifest(
    path: str | Path,
    classes: Sequence[str] | str | Path | None = None,
    image_root: str | Path | None = None,
    split_field: str = "split",
    val_size: int | float = 0.1,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    require_captions: bool = False,
    check_files: bool = False,
    seed: int = 0,
) -> Dataset:
    """Read a ``.jsonl`` or ``.csv`` manifest.

    ``classes``: None (sorted unique labels of the file), a list, or a text file with one class per line; with a
    given list, a label outside it is an error naming file, line and label. Relative image paths are resolved
    against ``image_root`` (default: the manifest's folder). ``id`` defaults to the image path as written.
    ``fractions`` (train, val, test) apply when no record has a ``split_field``; ``val_size`` (count, or fraction
    if < 1) when records have splits but none is ``val``. ``require_captions``: a record without caption is an
    error.
    """
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    path = require_file(path, "manifest")
    records = _read_records(path, split_field)
    names = _class_list(classes, records)
    index = {c: i for i, c in enumerate(names)}
    root = Path(image_root) if image_root is not None else path.parent
    rows: list[tuple[Sample, str | None]] = []
    first_line: dict[str, int] = {}
    for line, rec in records:
        sample = _to_sample(rec, line, path, index, root, require_captions)
        if sample.id in first_line:
            raise DataError(f"{path}, line {line}: duplicate id {sample.id!r} (first on line {first_line[sample.id]})")
        first_line[sample.id] = line
        rows.append((sample, _split_name(rec.get(split_field), line, path, split_field)))
    unsplit = [s.id for s, split in rows if split is None]
    if unsplit and len(unsplit) != len(rows):
        raise DataError(
            f"{path}, line {first_line[unsplit[0]]}: no {split_field!r} while other records have one "
            "(give every record a split, or none)"
        )
    if check_files:
        check_image_files((s for s, _ in rows), path)
    splits = _make_splits(rows, val_size, fractions, seed)
    return Dataset(name=path.stem, classes=names, splits=splits)


def _read_records(path: Path, split_field: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` pairs with keys checked against what the format allows."""
    allowed = {"id", "image", "caption", "captions", "labels", split_field}
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        records = _read_jsonl(path)
    elif path.suffix.lower() == ".csv":
        records = _read_csv(path, allowed)
    else:
        raise DataError(f"{path}: unknown manifest format (expected a .jsonl file, one JSON object per line, or .csv)")
    for line, rec in records:
        unknown = set(rec) - allowed
        if unknown:
            raise DataError(f"{path}, line {line}: unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    return records


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    records = []
    for n, text in enumerate(read_lines(path, "manifest"), 1):
        if not text.strip():
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {n}, column {exc.colno}: malformed JSON: {exc.msg}") from exc
        if not isinstance(rec, dict):
            raise DataError(f"{path}, line {n}: expected a JSON object, got {type(rec).__name__}")
        records.append((n, rec))
    return records


def _read_csv(path: Path, allowed: set[str]) -> list[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(read_text(path, "manifest"), newline=""))
    header = [h.strip() for h in reader.fieldnames or []]
    if "labels" not in header or not {"image", "id"} & set(header) or set(header) - allowed:
        raise DataError(
            f"{path}: CSV columns {header}; expected 'labels', 'image' (or 'id'), optionally "
            f"{sorted(allowed - {'image', 'labels'})}"
        )
    reader.fieldnames = header
    rows = [(reader.line_num, row) for row in reader]
    return [(line, _csv_record(row, line, path)) for line, row in rows]


def _csv_record(row: dict[str, Any], line: int, path: Path) -> dict[str, Any]:
    """CSV cells as the JSONL record they stand for: lists split on ``|`` (labels also on ``;``), blanks dropped."""
    if None in row:
        raise DataError(f"{path}, line {line}: more cells than columns")
    rec: dict[str, Any] = {k: (v or "").strip() for k, v in row.items() if (v or "").strip()}
    if "labels" in rec:
        rec["labels"] = [x.strip() for x in rec["labels"].replace(";", "|").split("|") if x.strip()]
    for key in ("caption", "captions"):
        if key in rec:
            rec["captions"] = [x.strip() for x in rec.pop(key).split("|") if x.strip()]
    return rec


def _class_list(classes: Sequence[str] | str | Path | None, records: list[tuple[int, dict[str, Any]]]) -> list[str]:
    if classes is None:
        return sorted({str(label) for _, rec in records for label in rec.get("labels") or []})
    source = classes if isinstance(classes, (str, Path)) else "classes argument"
    if isinstance(classes, (str, Path)):
        classes = [c.strip() for c in read_lines(classes, "class list") if c.strip()]
    names = [str(c) for c in classes]
    if len(set(names)) != len(names):
        raise DataError(f"{source}: duplicate class names {sorted({c for c in names if names.count(c) > 1})}")
    return names


def _to_sample(
    rec: dict[str, Any], line: int, path: Path, index: dict[str, int], root: Path, require_captions: bool
) -> Sample:
    image = rec.get("image")
    if not image and "id" not in rec:
        raise DataError(f"{path}, line {line}: record has neither 'image' nor 'id'")
    captions = _captions(rec, line, path)
    if require_captions and not captions:
        raise DataError(f"{path}, line {line}: no caption (require_captions=True)")
    labels = rec.get("labels") or []
    if not isinstance(labels, list):
        raise DataError(f"{path}, line {line}: 'labels' must be a list, got {type(labels).__name__}")
    unknown = [str(x) for x in labels if str(x) not in index]
    if unknown:
        raise DataError(f"{path}, line {line}: label {unknown[0]!r} is not in the class list")
    return Sample(
        id=str(rec.get("id", image)),
        image=root / image if image else None,
        captions=captions,
        labels=tuple(sorted({index[str(x)] for x in labels})),
    )


def _captions(rec: dict[str, Any], line: int, path: Path) -> tuple[str, ...]:
    if "caption" in rec and "captions" in rec:
        raise DataError(f"{path}, line {line}: give 'caption' or 'captions', not both")
    raw = rec.get("captions", rec.get("caption", []))
    raw = [raw] if isinstance(raw, str) else raw
    if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
        raise DataError(f"{path}, line {line}: captions must be a string or a list of strings")
    return tuple(c.strip() for c in raw if c.strip())


def _split_name(value: Any, line: int, path: Path, split_field: str) -> str | None:
    if value is None or value == "":
        return None
    if value not in SPLITS:
        raise DataError(f"{path}, line {line}: {split_field!r} is {value!r}, expected one of {SPLITS}")
    return value


def _make_splits(
    rows: list[tuple[Sample, str | None]], val_size: int | float, fractions: tuple[float, float, float], seed: int
) -> dict[str, Split]:
    """Splits as marked (val carved from train if none is marked val), or by id hash when nothing is marked."""
    marked = any(split is not None for _, split in rows)
    if not marked:
        rows = [(s, _hash_split(s.id, fractions, seed)) for s, _ in rows]
    parts = {name: [s for s, split in rows if split == name] for name in SPLITS}
    if marked and not parts["val"] and val_size:
        parts["train"], parts["val"] = carve_val(parts["train"], val_size, seed)
    return {name: Split(name, parts[name]) for name in SPLITS}


def _hash_split(sample_id: str, fractions: tuple[float, float, float], seed: int) -> str:
    """Position of the id's hash in [0, 1) against the cumulative fractions: stable per id."""
    u = stable_hash(f"split|{seed}|{sample_id}") / 2**64
    return "train" if u < fractions[0] else "val" if u < fractions[0] + fractions[1] else "test"
