"""Resumable jobs that fill the feature store: cache latents, extract image and text features.

All three run the same shard loop (:func:`fill_entries`): rows are processed in fixed shards, a shard is
skipped when every entry already has it, and entries are finalized once all shards exist. Shard boundaries
and batch boundaries depend only on the configuration, never on where a previous run stopped, so a resumed
run writes the same bytes as an uninterrupted one. ``rank``/``world`` split the shards between processes
(shard s is rank s % world's); with world > 1 the ranks meet at barriers (:mod:`difffeat.utils.distributed`) and rank
0 alone writes what exists once.

The device is kept busy: a shard's inputs go to it in one copy, its features stay there until the shard is
done, come back in one (non-blocking, pinned) copy, and a background thread writes them to disk while the
next shard computes. Images are decoded in DataLoader worker processes when ``extract.num_workers`` > 0.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from difffeat.data.core import DataError, Split, load_image
from difffeat.features.options import ExtractOptions, ImageModelOptions, TextModelOptions
from difffeat.features.store import EntryKey, FeatureStore, ids_digest
from difffeat.models.common import resolve_indices
from difffeat.models.massive import MassiveChannels, calibration_tap, find_massive_channels
from difffeat.models.vae import images_to_tensor
from difffeat.utils.distributed import barrier, rank_zero_first
from difffeat.utils.options import digest, numbers_fields
from difffeat.utils.progress import progress
from difffeat.utils.runtime import to_device
from difffeat.utils.times import as_time


@dataclass
class HostCopy:
    """A device-to-host copy that may still be in flight (CUDA: non-blocking into pinned memory)."""

    tensor: torch.Tensor
    done: torch.cuda.Event | None = None

    def numpy(self) -> np.ndarray:
        if self.done is not None:
            self.done.synchronize()
        return self.tensor.numpy()


ShardArrays = Mapping[EntryKey, "np.ndarray | HostCopy"]
ComputeShard = Callable[[int, int], ShardArrays]


def to_host(tensors: Mapping[EntryKey, torch.Tensor]) -> dict[EntryKey, HostCopy]:
    """Start copying a shard's tensors to the host; on CUDA the host does not wait (the writer thread does)."""
    if not any(t.is_cuda for t in tensors.values()):
        return {k: HostCopy(t) for k, t in tensors.items()}
    out = {}
    for k, t in tensors.items():
        out[k] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        out[k].copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return {k: HostCopy(t, done) for k, t in out.items()}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a numpy dtype name (``extract.store_dtype``)."""
    return torch.from_numpy(np.empty(0, dtype=np.dtype(name))).dtype


class ShardWriter:
    """Writes finished shards from one background thread, so the device never waits on the disk.

    At most ``max_pending`` shards are queued (that bounds host memory). A failed write is raised in the main
    thread by the next :meth:`submit` or by :meth:`close`. Files still appear atomically
    (:meth:`FeatureStore.write_shard` renames a complete file into place), and :meth:`close` returns only once
    every write is on disk, which is what finalizing relies on.
    """

    def __init__(self, store: FeatureStore, max_pending: int = 2):
        self.store = store
        self.max_pending = max_pending
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="difffeat-writer")
        self._queued: deque[Future] = deque()

    def submit(self, shard: int, arrays: ShardArrays) -> None:
        while self._queued and (len(self._queued) >= self.max_pending or self._queued[0].done()):
            self._queued.popleft().result()
        self._queued.append(self._pool.submit(self._write, shard, dict(arrays)))

    def _write(self, shard: int, arrays: dict[EntryKey, np.ndarray | HostCopy]) -> None:
        for key, value in arrays.items():
            self.store.write_shard(key, shard, value.numpy() if isinstance(value, HostCopy) else value)

    def close(self) -> None:
        try:
            while self._queued:
                self._queued.popleft().result()
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # let the queued (complete) shards land, but report the error that stopped the loop
            self._pool.shutdown(wait=True)


def model_name(source: str | None, name: str | None) -> str:
    """Short model name for store keys: the configured name, else the last part of the path or hub id."""
    if name:
        return name
    if not source:
        raise ValueError("no model source given")
    p = Path(source)
    return (p.stem if p.suffix in {".pt", ".pth", ".bin", ".safetensors", ".ckpt"} else p.name) or str(source)


def pending_shards(
    store: FeatureStore, keys: Sequence[EntryKey], num_rows: int, shard_size: int, rank: int = 0, world: int = 1
) -> list[int]:
    """This rank's shards that some unfinished entry of ``keys`` still lacks, in the order they are computed."""
    todo = [k for k in keys if not store.has(k)]
    if not todo or num_rows == 0:
        return []
    mine = range(rank, math.ceil(num_rows / shard_size), world)
    return [s for s in mine if not all(store.has_shard(k, s) for k in todo)]


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
    """Compute every missing shard of ``keys`` (this rank's share) and finalize the entries.

    ``compute(lo, hi)`` returns the rows [lo, hi) of every key (numpy arrays or :class:`HostCopy`); they are
    written by a background thread while the next shard computes. With ``world`` > 1 and ``finalize`` every
    rank must call this (it holds two barriers): rank 0 finalizes once all ranks' shards are on disk, and no rank
    goes on before the entries are finished.
    """
    todo = [k for k in keys if not store.has(k)]
    if not todo or num_rows == 0:
        return
    num_shards = math.ceil(num_rows / shard_size)
    pending = pending_shards(store, todo, num_rows, shard_size, rank, world)
    mine = len(range(rank, num_shards, world))
    desc = f"{desc} [rank {rank}]" if world > 1 else desc
    with (
        ShardWriter(store) as writer,
        progress(total=mine, initial=mine - len(pending), desc=desc, unit="shard") as bar,
    ):
        for s in pending:
            arrays = compute(s * shard_size, min(num_rows, (s + 1) * shard_size))
            writer.submit(s, {k: arrays[k] for k in todo if not store.has_shard(k, s)})
            bar.update(1)
    if not finalize:
        return
    barrier(world)
    if rank == 0:
        for k in todo:
            store.finalize(k, num_shards, num_rows, config)
            _drop_stale_temps(store, k)
    barrier(world)


def _drop_stale_temps(store: FeatureStore, key: EntryKey) -> None:
    """A shard write killed mid-way leaves its temporary file behind; once the entry is final (every rank's
    writes done) nothing can still be writing one."""
    for p in store.entry_dir(key).glob(".shard-*.tmp"):
        p.unlink(missing_ok=True)


def prepare_ids(store: FeatureStore, split: Split, skip_bad: bool) -> list[int]:
    """Record the split's row order in the store; with ``skip_bad`` leave out samples whose image can't be read.

    Returns the sample indices (into ``split``) that are the store's rows. The scan for bad images runs once:
    the recorded list is reused while the split's candidate ids and ``skip_bad`` are those that produced it, and
    replaced otherwise (a new ``data.limit``, a changed dataset, ``--skip-bad`` after a failed run). Replacing it
    is safe because every entry's key holds the digest of the list it is in the row order of.
    """
    by_id = {s.id: i for i, s in enumerate(split.samples)}
    source = {"candidates": ids_digest(split.ids), "skip_bad": skip_bad}
    record = store.id_record(split.name)
    if record is not None and record.get("source") == source:
        return [by_id[i] for i in record["ids"]]
    skipped: list[tuple[str, str]] = []
    rows = list(range(len(split)))
    if skip_bad:
        rows = []
        for i, s in enumerate(progress(split.samples, desc=f"check images {split.name}")):
            try:
                load_image(s)
                rows.append(i)
            except DataError as exc:
                skipped.append((s.id, str(exc)))
    store.set_ids(split.name, [split.samples[i].id for i in rows], skipped, source, replace=True)
    return rows


@dataclass(frozen=True)
class Massive:
    """A run's massive-activation suppression: the channels of each block (``models.massive``) and what found
    them (``calibration``: mode, calibration rows and times), which the entries' fingerprints hold, so the key is
    known before the channels are measured and changes whenever they could."""

    channels: MassiveChannels
    calibration: dict


def entry_fingerprint(
    modality: str,
    model: ImageModelOptions | TextModelOptions,
    extract_options: ExtractOptions,
    identity: Mapping[str, str | None],
    ids: Sequence[str],
    massive: dict | None = None,
    texts: Sequence[str] | None = None,
) -> dict:
    """Everything that determines the numbers of a feature entry besides its cell: the model's identity (see
    :mod:`difffeat.utils.identity`), the numbers-changing options of the model and of the extraction for this
    modality (declared with ``numbers=`` in :mod:`difffeat.features.options`), the rows it holds, the texts it
    read (:func:`entry_texts`: a caption edited under the same sample id is a new entry, not a stale one) and the
    calibration of the massive channels it suppresses (:attr:`Massive.calibration`)."""
    out = {
        "modality": modality,
        "identity": dict(identity),
        "model": numbers_fields(model, modality),
        "extract": numbers_fields(extract_options, modality),
        "ids": ids_digest(ids),
    }
    if texts is not None:
        out["texts"] = ids_digest(texts)
    if massive is not None:
        out["massive"] = massive
    return out


def entry_texts(modality: str, model: ImageModelOptions | TextModelOptions, samples: Sequence) -> list[str] | None:
    """The texts an entry's numbers depend on besides its rows: every caption the text branch reads, or the
    caption each image forward is conditioned on (``condition: caption``); None for an image branch that reads
    no text (its keys stay what they were)."""
    if modality == "text":
        return ["\x1f".join(s.captions) for s in samples]
    if getattr(model, "condition", "null") == "caption":
        return [s.captions[0] if s.captions else "" for s in samples]
    return None


def effective_options(model: ImageModelOptions | TextModelOptions, extractor) -> ImageModelOptions | TextModelOptions:
    """The model options with their defaults replaced by what ``extractor`` actually uses (the family, image size,
    posterior sampling, SiT path, max length, special tokens), so leaving an option at its default and spelling
    the default out share one entry, and an option that has no effect on this model (posterior sampling or the
    VAE's dtype without a VAE) changes nothing."""
    backbone = extractor.backbone
    if isinstance(model, ImageModelOptions):
        sample = bool(getattr(extractor.encoder, "sample", False))
        path = getattr(backbone, "path", None)  # SiT's interpolant
        return replace(
            model, backbone=backbone.family, image_size=extractor.image_size, sample_posterior=sample,
            path=path.name if path is not None else None,
            vae_dtype=model.vae_dtype if extractor.encoder is not None else "float32",
        )  # fmt: skip
    return replace(
        model, backbone=backbone.family, max_length=extractor.max_length, add_special=extractor.tokenizer.add_special
    )


def entry_variant(fingerprint: dict) -> str:
    """The store key's variant: a short hash of the fingerprint (which the entry's meta.json holds in full)."""
    return digest(fingerprint, 12)


class _Pixels(torch.utils.data.Dataset):
    """Row position -> (position, preprocessed image [3, S, S] in [-1, 1]): the CPU half of the latent cache
    (decode, centre crop, scale), which DataLoader workers do while the main process runs the VAE."""

    def __init__(self, split: Split, rows: list[int], size: int):
        self.split, self.rows, self.size = split, rows, size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, pos: int) -> tuple[int, torch.Tensor]:
        return pos, images_to_tensor([_load(self.split, self.rows[pos])], self.size)[0]


def _shard_batches(shards: Sequence[int], num_rows: int, shard_size: int, batch_size: int) -> list[list[int]]:
    """Row positions of every batch of ``shards``, in order: the same batch boundaries as an unresumed run."""
    out = []
    for s in shards:
        lo, hi = s * shard_size, min(num_rows, (s + 1) * shard_size)
        out += [list(range(b, min(hi, b + batch_size))) for b in range(lo, hi, batch_size)]
    return out


def cache_latents(
    store: FeatureStore,
    extractor,
    split: Split,
    rows: list[int],
    name: str,
    extract_options: ExtractOptions,
    vae: str | None = None,
    **dist,
) -> EntryKey:
    """VAE latents (or preprocessed pixels) of the split, once: they do not depend on the timestep.

    Their key's variant fingerprints what they depend on: the VAE's identity ``vae`` and dtype (a bf16 pipeline
    encodes in bf16), the image size, posterior sample or mean, the seed (in the key) and the rows.

    Images are decoded by a DataLoader (``extract.num_workers`` processes, pinned memory on CUDA) that walks this
    rank's pending shards batch by batch in the order the shard loop asks for them.
    """
    posterior = "sample" if getattr(extractor.encoder, "sample", False) else "mean"
    ids = [split.samples[i].id for i in rows]
    fingerprint = {"vae": vae, "image_size": extractor.image_size, "posterior": posterior, "ids": ids_digest(ids)}
    if extractor.encoder is not None:
        fingerprint["dtype"] = str(next(extractor.encoder.vae.parameters()).dtype)
    key = EntryKey("latent", name, -1, -1, "none", extract_options.seed, split.name, entry_variant(fingerprint))
    dev = extractor.device
    pending = pending_shards(store, [key], len(rows), extract_options.shard_size, **dist)
    batches = _shard_batches(pending, len(rows), extract_options.shard_size, extract_options.batch_size)
    loader: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None

    def compute(lo: int, hi: int) -> dict[EntryKey, HostCopy]:
        nonlocal loader
        if loader is None:  # workers start only if there is work
            data = _Pixels(split, rows, extractor.image_size)
            pin = dev.type == "cuda"
            loader = iter(
                DataLoader(data, batch_sampler=batches, num_workers=extract_options.num_workers, pin_memory=pin)
            )
        parts = []
        for b in range(lo, hi, extract_options.batch_size):
            pos, pixels = next(loader)
            if int(pos[0]) != b:
                raise RuntimeError(f"latent cache: loader at row {int(pos[0])}, shard loop at row {b}")
            pixels = to_device(pixels, dev)
            parts.append(
                extractor.encode(pixels, ids=ids[b : b + len(pos)], seed=extract_options.seed, keep_on_device=True)
            )
        return to_host({key: torch.cat(parts).float()})

    fill_entries(
        store, [key], len(rows), extract_options.shard_size, compute, fingerprint, f"latents {split.name}", **dist
    )
    return key


def condition_captions(split: Split, rows: list[int], model: ImageModelOptions) -> list[str] | None:
    """Each row's first caption when the image backbone is conditioned on captions (``condition: caption``),
    else None (the cached empty prompt); a sample without a caption is a one-line error."""
    if model.condition != "caption":
        return None
    samples = [split.samples[i] for i in rows]
    missing = [s.id for s in samples if not s.captions]
    if missing:
        raise DataError(
            f"split {split.name!r}: sample {missing[0]!r} has no caption, which image.condition: caption needs "
            f"({len(missing)} such samples; use condition: null)"
        )
    return [s.captions[0] for s in samples]


def calibrate_massive(
    store: FeatureStore,
    extractor,
    split: Split,
    rows: list[int],
    latent_key: EntryKey,
    model: ImageModelOptions,
    extract_options: ExtractOptions,
    blocks: Sequence[int],
    times: Sequence[float],
) -> dict[int, list[int]]:
    """Each block's massive channels on the (cached) latents of ``rows``: those that stand out at any of
    ``times`` (:func:`~difffeat.models.massive.find_massive_channels`). One block at a time, so only one block's
    tokens are held; each forward stops at its block."""
    latents = torch.from_numpy(np.array(store.read(latent_key)[: len(rows)]))
    captions = condition_captions(split, rows, model)
    ids = [split.samples[i].id for i in rows]
    found: dict[int, list[int]] = {}
    for block in blocks:
        tokens = extractor(
            latents=latents, blocks=[block], timesteps=list(times), pool="none", seed=extract_options.seed, ids=ids,
            class_label=model.class_label, captions=captions, bf16=extract_options.bf16,
            tap=calibration_tap(model.tap),
        )  # fmt: skip
        found[block] = sorted({c for x in tokens.values() for c in find_massive_channels(x)})
    return found


CellFeatures = Mapping[tuple[int, float], torch.Tensor]
BatchForward = Callable[[int, int, list[float]], CellFeatures]


def _grid_shard(
    store: FeatureStore,
    keys: Mapping[tuple[int, float], EntryKey],
    lo: int,
    hi: int,
    batch_size: int,
    dtype: torch.dtype,
    forward: BatchForward,
) -> dict[EntryKey, HostCopy]:
    """Rows [lo, hi) of every (block, t) entry of ``keys``, batch by batch; the shard loop of both the image and
    the text grid. ``forward(b0, b1, timesteps_left)`` is the modality's features of rows [b0, b1) at the
    timesteps of the unfinished entries only, so a resumed run does not recompute the finished ones."""
    timesteps_left = sorted({t for (_, t), k in keys.items() if not store.has(k)})
    parts: dict[tuple[int, float], list[torch.Tensor]] = {cell: [] for cell in keys}
    for b0 in range(lo, hi, batch_size):
        for cell, features in forward(b0, min(hi, b0 + batch_size), timesteps_left).items():
            parts[cell].append(features.to(dtype))
    return to_host({k: torch.cat(parts[cell]) for cell, k in keys.items() if parts[cell]})


def _grid_keys(
    modality: str,
    name: str,
    pool: str,
    split: Split,
    extract_options: ExtractOptions,
    fingerprint: dict,
    extractor,
    blocks: Sequence[int],
    timesteps: Sequence[float],
) -> dict[tuple[int, float], EntryKey]:
    """The store key of every (block, t) cell of one split's grid; ``fingerprint`` becomes the keys' variant."""
    variant, time = entry_variant(fingerprint), extractor.backbone.time.name
    return {
        (b, as_time(t)): EntryKey(modality, name, b, as_time(t), pool, extract_options.seed, split.name, variant, time)
        for b in blocks
        for t in timesteps
    }


def _run_options(extract_options: ExtractOptions, pool: str) -> dict:
    """The extractor's per-call ``run`` options (``features.extract._Run``) that both grids take from the config."""
    return {
        "pool": pool,
        "token_norm": extract_options.token_norm,
        "seed": extract_options.seed,
        "ensemble": extract_options.ensemble,
        "bf16": extract_options.bf16,
        "fuse_timesteps": extract_options.fuse_timesteps,
    }


def _fill_grid(
    store: FeatureStore,
    keys: Mapping[tuple[int, float], EntryKey],
    num_rows: int,
    extract_options: ExtractOptions,
    fingerprint: dict,
    desc: str,
    shard_forward: Callable[[int, int], BatchForward],
    **dist,
) -> None:
    """Fill the (block, t) entries of ``keys`` (:func:`fill_entries`); ``shard_forward(lo, hi)`` prepares shard
    [lo, hi) (the image branch moves its latents to the device once) and returns its batch forward."""
    dtype = torch_dtype(extract_options.store_dtype)

    def compute(lo: int, hi: int) -> dict[EntryKey, HostCopy]:
        return _grid_shard(store, keys, lo, hi, extract_options.batch_size, dtype, shard_forward(lo, hi))

    shard_size = extract_options.shard_size
    fill_entries(store, list(keys.values()), num_rows, shard_size, compute, fingerprint, desc, **dist)


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
    model: ImageModelOptions,
    extract_options: ExtractOptions,
    blocks: Sequence[int],
    timesteps: Sequence[float],
    identity: Mapping[str, str | None] | None = None,
    massive: Massive | None = None,
    **dist,
) -> dict[tuple[int, float], EntryKey]:
    """Image features for every (block, t) of the grid, one truncated forward per timestep and batch.

    ``identity`` names the weights (``{"dit": ..., "vae": ...}``, see :mod:`difffeat.utils.identity`); the
    entries' keys fingerprint it with the options and rows (:func:`entry_fingerprint`). Times are in the
    backbone's convention, which the keys name. With ``model.condition == "caption"`` each sample's first
    caption conditions its forward; ``massive`` (channels of every asked block) suppresses them before pooling.
    """
    identity = dict(identity or {})
    with rank_zero_first(**dist):
        rows = prepare_ids(store, split, extract_options.skip_bad)
    latent_key = cache_latents(store, extractor, split, rows, name, extract_options, identity.get("vae"), **dist)
    blocks = resolve_indices(blocks, extractor.depth)
    ids = [split.samples[i].id for i in rows]
    captions = condition_captions(split, rows, model)
    calibration = None if massive is None else massive.calibration
    texts = entry_texts("image", model, [split.samples[i] for i in rows])
    fingerprint = entry_fingerprint(
        "image", effective_options(model, extractor), extract_options, identity, ids, calibration, texts
    )
    keys = _grid_keys(
        "image", name, extract_options.pool, split, extract_options, fingerprint, extractor, blocks, timesteps
    )
    dev = extractor.device

    def shard_forward(lo: int, hi: int) -> BatchForward:
        latents = to_device(torch.from_numpy(np.array(store.read(latent_key)[lo:hi])), dev)

        def forward(b0: int, b1: int, timesteps_left: list[float]) -> CellFeatures:
            return extractor(
                latents=latents[b0 - lo : b1 - lo],
                blocks=blocks,
                timesteps=timesteps_left,
                ids=ids[b0:b1],
                class_label=model.class_label,
                captions=None if captions is None else captions[b0:b1],
                massive=None if massive is None else massive.channels,
                tap=model.tap,
                keep_on_device=True,
                **_run_options(extract_options, extract_options.pool),
            )

        return forward

    _fill_grid(store, keys, len(rows), extract_options, fingerprint, f"image {split.name}", shard_forward, **dist)
    return keys


def extract_text_split(
    store: FeatureStore,
    extractor,
    split: Split,
    name: str,
    model: TextModelOptions,
    extract_options: ExtractOptions,
    blocks: Sequence[int],
    timesteps: Sequence[float],
    identity: Mapping[str, str | None] | None = None,
    **dist,
) -> dict[tuple[int, float], EntryKey]:
    """Caption features for every (block, timestep) of the grid, over the same rows as the image branch.

    ``identity`` names the weights and tokenizer (``{"ddit": ..., "tokenizer": ...}``), fingerprinted as for images.
    """
    with rank_zero_first(**dist):
        rows = prepare_ids(store, split, extract_options.skip_bad)
    blocks = resolve_indices(blocks, extractor.depth)
    ids = [split.samples[i].id for i in rows]
    samples = [split.samples[i] for i in rows]
    fingerprint = entry_fingerprint(
        "text", effective_options(model, extractor), extract_options, identity or {}, ids,
        texts=entry_texts("text", model, samples),
    )  # fmt: skip
    pool = extract_options.text_pool
    keys = _grid_keys("text", name, pool, split, extract_options, fingerprint, extractor, blocks, timesteps)
    for s in samples:
        if not s.captions:
            raise DataError(f"split {split.name!r}: sample {s.id!r} has no caption (the text branch needs one)")

    def forward(b0: int, b1: int, timesteps_left: list[float]) -> CellFeatures:
        batch = samples[b0:b1]
        return extractor(
            [s.captions for s in batch],
            blocks=blocks,
            timesteps=timesteps_left,
            ids=[s.id for s in batch],
            caption_reduce=extract_options.caption_reduce,
            keep_on_device=True,
            **_run_options(extract_options, pool),
        )

    _fill_grid(
        store, keys, len(rows), extract_options, fingerprint, f"text {split.name}", lambda lo, hi: forward, **dist
    )
    return keys
