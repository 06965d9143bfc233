"""The feature store: extracted features on disk, keyed, written atomically, resumable, memory-mapped.

Layout of a store folder::

    store.json                            the store format (a store without it predates fingerprints)
    ids/<split>.json                      the row order of every entry of that split (+ skipped ids, and what
                                          produced the list: a digest of the split's candidate ids, skip_bad)
    entries/<name>/shard-00000.npy ...    rows [k*S, (k+1)*S) while an entry is being filled
    entries/<name>/features.npy           the finished array (shards concatenated, then removed)
    entries/<name>/meta.json              key, shape, dtype, fingerprint inputs, library version; written last
    manifest.json                         summary of finished entries (rebuilt from the meta files)

Every file is written to a temporary name and renamed into place, so a process killed at any moment leaves
either the old state or the new one, never a torn file. Work is done in shards of rows: a restarted job skips
the shards that exist, recomputes the rest with the same batch boundaries, and so produces the same bytes as
an uninterrupted run. Shards are independent files, which is also what lets several ranks fill one entry.

An entry's ``variant`` is a fingerprint of everything that determines its numbers besides the other key fields
(model identity, numbers-changing options, the id list it is in the row order of; see
:mod:`difffeat.features.jobs`), so a changed setting finds no entry and computes a new one: nothing stale is read.
Stores written before fingerprints (format 1) are refused with a message saying to re-extract.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import difffeat
from difffeat.utils.io import atomic_write, atomic_write_json

STORE_FORMAT = 2


class StoreError(RuntimeError):
    """The store on disk does not agree with what is asked of it (different ids, shapes, dtypes...)."""


@dataclass(frozen=True)
class EntryKey:
    """Identifies one feature array. ``t`` is a time in the backbone's own convention, named by ``time``
    (``models.base.TimeConvention.name``: "ddpm", "flow", "sit-flow", "masked"), -1 if none; the name shows
    both (``t0.25-flow``), so a DDPM index and a flow time are never read as one another.

    ``variant`` is the fingerprint of everything else that determines the numbers (model identity, options,
    id list), so two settings never collide.
    """

    modality: str
    model: str
    block: int
    t: int | float
    pool: str
    seed: int
    split: str
    variant: str = ""
    time: str = ""

    @property
    def name(self) -> str:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "-", self.model).strip("-") or "model"
        var = f"_{self.variant}" if self.variant else ""
        t = f"t{self.t}-{self.time}" if self.time else f"t{self.t}"
        return f"{self.modality}__{safe}__{self.split}__b{self.block}_{t}_{self.pool}_s{self.seed}{var}"


def ids_digest(ids: Sequence[str]) -> str:
    """A short digest of a row order: part of the fingerprint of every entry stored in that order."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False))


class FeatureStore:
    """A folder of feature entries. Cheap to open; reads are memory-mapped."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._check_format()
        (self.root / "entries").mkdir(parents=True, exist_ok=True)
        (self.root / "ids").mkdir(parents=True, exist_ok=True)

    def _check_format(self) -> None:
        """Refuse a store from before fingerprints: its entries' keys do not say what produced them."""
        marker = self.root / "store.json"
        if marker.exists():
            found = json.loads(marker.read_text()).get("store_format")
            if found != STORE_FORMAT:
                raise StoreError(
                    f"{self.root}: store format {found}, this difffeat reads format {STORE_FORMAT}; "
                    "re-extract into a new --out (or delete this store folder)"
                )
            return
        if any(self.root.glob("entries/*/meta.json")) or any(self.root.glob("ids/*.json")):
            raise StoreError(
                f"{self.root} was written by a difffeat before store format {STORE_FORMAT}, whose entries carry no "
                "fingerprint of what produced them; re-extract into a new --out (or delete this store folder)"
            )
        atomic_write_json(marker, {"store_format": STORE_FORMAT, "difffeat_version": difffeat.__version__})

    # ---- id lists -------------------------------------------------------------------------------------
    def _ids_path(self, split: str) -> Path:
        return self.root / "ids" / f"{split}.json"

    def set_ids(
        self,
        split: str,
        ids: Sequence[str],
        skipped: Sequence[tuple[str, str]] = (),
        source: dict | None = None,
        replace: bool = False,
    ) -> None:
        """Record the row order of ``split`` and what produced it (``source``); a different list than the one
        recorded is refused unless ``replace`` (entries are keyed by the list's digest, so old ones stay unread)."""
        ids = [str(i) for i in ids]
        if len(set(ids)) != len(ids):
            raise StoreError(f"split {split!r}: sample ids are not unique")
        path = self._ids_path(split)
        record = {"ids": ids, "skipped": [list(s) for s in skipped], "source": source or {}}
        if path.exists():
            old = json.loads(path.read_text())
            if old["ids"] != ids and not replace:
                raise StoreError(
                    f"{path}: this store was written for a different id list of split {split!r} "
                    f"({len(old['ids'])} ids recorded, {len(ids)} given); use a new store folder"
                )
            if old == record:
                return
        atomic_write_json(path, record)

    def id_record(self, split: str) -> dict | None:
        """The recorded id list of ``split`` with its skipped ids and source, or None."""
        path = self._ids_path(split)
        return json.loads(path.read_text()) if path.exists() else None

    def ids_digest(self, split: str) -> str:
        return ids_digest(self.ids(split))

    def ids(self, split: str) -> list[str]:
        path = self._ids_path(split)
        if not path.exists():
            raise StoreError(f"{path}: no id list recorded for split {split!r}")
        return json.loads(path.read_text())["ids"]

    def skipped(self, split: str) -> list[tuple[str, str]]:
        path = self._ids_path(split)
        return [tuple(s) for s in json.loads(path.read_text()).get("skipped", [])] if path.exists() else []

    # ---- entries --------------------------------------------------------------------------------------
    def entry_dir(self, key: EntryKey) -> Path:
        return self.root / "entries" / key.name

    def has(self, key: EntryKey) -> bool:
        return (self.entry_dir(key) / "meta.json").exists()

    def read(self, key: EntryKey, mmap: bool = True) -> np.ndarray:
        """The finished array of ``key``, memory-mapped by default (nothing forces it into RAM)."""
        if not self.has(key):
            raise StoreError(f"no finished entry {key.name} in {self.root}")
        return np.load(self.entry_dir(key) / "features.npy", mmap_mode="r" if mmap else None)

    def meta(self, key: EntryKey) -> dict:
        return json.loads((self.entry_dir(key) / "meta.json").read_text())

    def entries(self) -> Iterator[dict]:
        for meta_path in sorted((self.root / "entries").glob("*/meta.json")):
            yield json.loads(meta_path.read_text())

    @staticmethod
    def shard_path(entry_dir: Path, index: int) -> Path:
        return entry_dir / f"shard-{index:05d}.npy"

    def has_shard(self, key: EntryKey, index: int) -> bool:
        return self.shard_path(self.entry_dir(key), index).exists()

    def write_shard(self, key: EntryKey, index: int, array: np.ndarray) -> None:
        atomic_save_npy(self.shard_path(self.entry_dir(key), index), array)

    def finalize(self, key: EntryKey, num_shards: int, num_rows: int, config: dict | None = None) -> None:
        """Concatenate an entry's shards into ``features.npy``, write its meta, remove the shards.

        Idempotent and crash-safe: the meta file is the commit point, written only after the array.
        """
        if self.has(key):
            return
        d = self.entry_dir(key)
        shards = [self.shard_path(d, i) for i in range(num_shards)]
        missing = [p.name for p in shards if not p.exists()]
        if missing:
            raise StoreError(f"entry {key.name}: cannot finalize, shards missing: {missing[:5]}")
        first = np.load(shards[0], mmap_mode="r")
        shape = (num_rows, *first.shape[1:])

        def write(f) -> None:  # plain writes, not a memory map: a full disk is an OSError, never a SIGBUS
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(first.dtype),
                                                    "fortran_order": False, "shape": shape})  # fmt: skip
            rows = 0
            for p in shards:
                part = np.load(p, mmap_mode="r")
                if part.dtype != first.dtype or part.shape[1:] != first.shape[1:]:
                    raise StoreError(f"{p}: shape {part.shape}/{part.dtype} differs from shard 0 {first.shape}")
                f.write(np.ascontiguousarray(part).tobytes())
                rows += len(part)
            if rows != num_rows:
                raise StoreError(f"entry {key.name}: shards hold {rows} rows, expected {num_rows}")

        atomic_write(d / "features.npy", write)
        meta = {
            "key": asdict(key),
            "name": key.name,
            "shape": list(shape),
            "dtype": str(first.dtype),
            "config": config or {},
            "difffeat_version": difffeat.__version__,
            "store_format": STORE_FORMAT,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        atomic_write_json(d / "meta.json", meta)
        for p in shards:
            p.unlink(missing_ok=True)
        self.write_manifest()

    def write_manifest(self) -> None:
        entries = {m["name"]: {k: m[k] for k in ("key", "shape", "dtype", "config")} for m in self.entries()}
        splits = {p.stem: len(json.loads(p.read_text())["ids"]) for p in sorted((self.root / "ids").glob("*.json"))}
        atomic_write_json(
            self.root / "manifest.json",
            {
                "store_format": STORE_FORMAT,
                "difffeat_version": difffeat.__version__,
                "splits": splits,
                "entries": entries,
            },
        )
