"""Resumable jobs that fill the feature store: cache latents, extract image and text features.

All three run the same shard loop (:func:`fill_entries`): rows are processed in fixed shards, a shard is
skipped when every entry already has it, and entries are finalized once all shards exist. Shard boundaries
and batch boundaries depend only on the configuration, never on where a previous run stopped, so a resumed
run writes the same bytes as an uninterrupted one. ``rank``/``world`` split the shards between processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from difffeat.backbones.common import resolve_indices
from difffeat.config import ExtractConfig, ImageModelConfig, TextModelConfig
from difffeat.data.core import DataError, Split, load_image
from difffeat.store import EntryKey, FeatureStore

ComputeShard = Callable[[int, int], dict[EntryKey, np.ndarray]]


def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def model_name(source: str | None, name: str | None) -> str:
    """Short model name for store keys: the configured name, else the last part of the path or hub id."""
    if name:
        return name
    if not source:
        raise ValueError("no model source given")
    p = Path(source)
    return (p.stem if p.suffix in {".pt", ".pth", ".bin", ".safetensors", ".ckpt"} else p.name) or str(source)


def fill_entries(
    store: FeatureStore,
    keys: Sequence[EntryKey],
    num_rows: int,
    shard_size: int,
    compute: ComputeShard,
    config: dict,
    desc: str,
    rank: int = 0,
    world: int = 1,
    finalize: bool = True,
) -> None:
    """Compute every missing shard of ``keys`` (this rank's share) and finalize the entries."""
    todo = [k for k in keys if not store.has(k)]
    if not todo or num_rows == 0:
        return
    num_shards = math.ceil(num_rows / shard_size)
    mine = [s for s in range(num_shards) if s % world == rank]
    pending = [s for s in mine if not all(store.has_shard(k, s) for k in todo)]
    with tqdm(total=len(mine), initial=len(mine) - len(pending), desc=desc, unit="shard", disable=None) as bar:
        for s in pending:
            lo, hi = s * shard_size, min(num_rows, (s + 1) * shard_size)
            arrays = compute(lo, hi)
            for k in todo:
                if not store.has_shard(k, s):
                    store.write_shard(k, s, arrays[k])
            bar.update(1)
    if finalize:
        for k in todo:
            store.finalize(k, num_shards, num_rows, config)


def prepare_ids(store: FeatureStore, split: Split, skip_bad: bool) -> list[int]:
    """Record the split's row order in the store; with ``skip_bad`` leave out samples whose image can't be read.

    Returns the sample indices (into ``split``) that are the store's rows. The scan for bad images runs once:
    a store that already has the id list reuses it.
    """
    by_id = {s.id: i for i, s in enumerate(split.samples)}
    try:
        return [by_id[i] for i in store.ids(split.name)]
    except Exception:
        pass
    skipped: list[tuple[str, str]] = []
    rows = list(range(len(split)))
    if skip_bad:
        rows = []
        for i, s in enumerate(tqdm(split.samples, desc=f"check images {split.name}", disable=None)):
            try:
                load_image(s)
                rows.append(i)
            except DataError as exc:
                skipped.append((s.id, str(exc)))
    store.set_ids(split.name, [split.samples[i].id for i in rows], skipped)
    return rows


def image_variant(model: ImageModelConfig, ex: ExtractConfig) -> str:
    parts = [f"e{ex.ensemble}" if ex.ensemble > 1 else "", "ln" if ex.token_norm else ""]
    parts += [f"y{model.class_label}" if model.class_label is not None else ""]
    parts += ["dnum" if model.numerics == "diffusers" else ""]
    return "-".join(p for p in parts if p)


def text_variant(ex: ExtractConfig) -> str:
    parts = [f"c{ex.caption_reduce}", f"e{ex.ensemble}" if ex.ensemble > 1 else "", "ln" if ex.token_norm else ""]
    return "-".join(p for p in parts if p)


def cache_latents(
    store: FeatureStore, extractor, split: Split, rows: list[int], name: str, ex: ExtractConfig, **dist
) -> EntryKey:
    """VAE latents (or preprocessed pixels) of the split, once: they do not depend on the timestep."""
    posterior = "sample" if getattr(extractor.encoder, "sample", False) else "mean"
    key = EntryKey("latent", name, -1, -1, "none", ex.seed, split.name, variant=posterior)
    ids = [split.samples[i].id for i in rows]

    def compute(lo: int, hi: int) -> dict[EntryKey, np.ndarray]:
        parts = []
        for b in range(lo, hi, ex.batch_size):
            idx = rows[b : min(hi, b + ex.batch_size)]
            images = [_load(split, i) for i in idx]
            parts.append(extractor.encode(images, ids=ids[b : b + len(idx)], seed=ex.seed).numpy())
        return {key: np.concatenate(parts).astype(np.float32)}

    fill_entries(
        store, [key], len(rows), ex.shard_size, compute, {"posterior": posterior}, f"latents {split.name}", **dist
    )
    return key


def _load(split: Split, i: int):
    try:
        return load_image(split.samples[i])
    except DataError as exc:
        raise DataError(f"split {split.name!r}, row {i}: {exc} (use --skip-bad to record and skip it)") from exc


def extract_image_split(
    store: FeatureStore,
    extractor,
    split: Split,
    name: str,
    model: ImageModelConfig,
    ex: ExtractConfig,
    blocks: Sequence[int],
    timesteps: Sequence[int],
    **dist,
) -> dict[tuple[int, int], EntryKey]:
    """Image features for every (block, t) of the grid, one truncated forward per timestep and batch."""
    rows = prepare_ids(store, split, ex.skip_bad)
    latent_key = cache_latents(store, extractor, split, rows, name, ex, **dist)
    blocks = resolve_indices(blocks, extractor.dit.depth)
    variant = image_variant(model, ex)
    keys = {
        (b, t): EntryKey("image", name, b, t, ex.pool, ex.seed, split.name, variant) for b in blocks for t in timesteps
    }
    ids = [split.samples[i].id for i in rows]
    dtype = np.dtype(ex.store_dtype)

    def compute(lo: int, hi: int) -> dict[EntryKey, np.ndarray]:
        lat = store.read(latent_key)
        need = sorted({t for (b, t), k in keys.items() if not store.has(k)})
        outs: dict[tuple[int, int], list[np.ndarray]] = {bt: [] for bt in keys}
        for b0 in range(lo, hi, ex.batch_size):
            b1 = min(hi, b0 + ex.batch_size)
            feats = extractor(
                latents=torch.from_numpy(np.array(lat[b0:b1])),
                blocks=blocks,
                timesteps=need,
                pool=ex.pool,
                token_norm=ex.token_norm,
                seed=ex.seed,
                ids=ids[b0:b1],
                ensemble=ex.ensemble,
                class_label=model.class_label,
                bf16=ex.bf16,
            )
            for bt, f in feats.items():
                outs[bt].append(f.numpy().astype(dtype))
        return {k: np.concatenate(outs[bt]) for bt, k in keys.items() if outs[bt]}

    config = {"model": asdict(model), "extract": asdict(ex)}
    fill_entries(store, list(keys.values()), len(rows), ex.shard_size, compute, config, f"image {split.name}", **dist)
    return keys


def extract_text_split(
    store: FeatureStore,
    extractor,
    split: Split,
    name: str,
    model: TextModelConfig,
    ex: ExtractConfig,
    blocks: Sequence[int],
    timesteps: Sequence[int],
    **dist,
) -> dict[tuple[int, int], EntryKey]:
    """Caption features for every (block, step) of the grid, over the same rows as the image branch."""
    rows = prepare_ids(store, split, ex.skip_bad)
    blocks = resolve_indices(blocks, extractor.ddit.depth)
    variant = text_variant(ex)
    keys = {
        (b, t): EntryKey("text", name, b, t, ex.text_pool, ex.seed, split.name, variant)
        for b in blocks
        for t in timesteps
    }
    samples = [split.samples[i] for i in rows]
    for s in samples:
        if not s.captions:
            raise DataError(f"split {split.name!r}: sample {s.id!r} has no caption (the text branch needs one)")
    dtype = np.dtype(ex.store_dtype)

    def compute(lo: int, hi: int) -> dict[EntryKey, np.ndarray]:
        need = sorted({t for (b, t), k in keys.items() if not store.has(k)})
        outs: dict[tuple[int, int], list[np.ndarray]] = {bt: [] for bt in keys}
        for b0 in range(lo, hi, ex.batch_size):
            batch = samples[b0 : min(hi, b0 + ex.batch_size)]
            feats = extractor(
                [s.captions for s in batch],
                blocks=blocks,
                timesteps=need,
                pool=ex.text_pool,
                token_norm=ex.token_norm,
                seed=ex.seed,
                ids=[s.id for s in batch],
                ensemble=ex.ensemble,
                caption_reduce=ex.caption_reduce,
                bf16=ex.bf16,
            )
            for bt, f in feats.items():
                outs[bt].append(f.numpy().astype(dtype))
        return {k: np.concatenate(outs[bt]) for bt, k in keys.items() if outs[bt]}

    config = {"model": asdict(model), "extract": asdict(ex)}
    fill_entries(store, list(keys.values()), len(rows), ex.shard_size, compute, config, f"text {split.name}", **dist)
    return keys
