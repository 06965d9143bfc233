"""One experiment, end to end: extract, sweep or search, fuse, evaluate, report.

Every step writes its outputs into the run folder and is skipped when they exist, so ``difffeat run`` can be
killed and rerun at any point and the individual steps (``difffeat extract|sweep|search|fit|evaluate|report``)
can be run one by one. The run folder holds:

    config.yaml            the configuration as run (checked completely before anything is written)
    .lock                  held while a command writes here: a second writer is refused
    store/                 the feature store (see difffeat.features.store)
    sweep_<modality>.csv   probe validation scores per (block, t) (grid mode), with sweep_<modality>.json
    search.json            every evaluation of the local search, its path and its choice
    search_cache.json      memo of evaluations, so a resumed search costs nothing twice
    heads/                 the trained fusion, ablation and baseline heads, each with <name>.json
    results.json           test metrics of every head
    label_efficiency.json  test score of every head refitted on fewer labels (``fusion.curve_sizes``)
    metrics.json           the machine-readable summary; report.html, *.png: the report

Outputs come from the config, never from what happened to be on disk: every cached artefact (id lists, latents,
features, sweep tables, search cache, heads) carries the fingerprint of what determines its numbers, and one
whose fingerprint differs is recomputed. A folder holding another experiment's config (other data, models or
numbers-changing options) is refused unless ``recompute`` is given, so one run never silently overwrites another.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from difffeat.data import Dataset
from difffeat.data.core import load_image
from difffeat.data.registry import load_dataset
from difffeat.features.jobs import (
    Massive,
    cache_latents,
    calibrate_massive,
    effective_options,
    entry_fingerprint,
    entry_texts,
    entry_variant,
    extract_image_split,
    extract_text_split,
    fill_entries,
    model_name,
    prepare_ids,
)
from difffeat.features.options import ImageModelOptions, TextModelOptions
from difffeat.features.store import EntryKey, FeatureStore, ids_digest
from difffeat.heads.fusion import TEXT_STREAM, FusionOptions, FusionResult, fit_fusion
from difffeat.heads.probe import ProbeOptions, fit_probe, run_sweep
from difffeat.metrics import multilabel_metrics, single_label_metrics
from difffeat.models.base import TimeConvention, families, load_backbone, loader_options, resolve_family
from difffeat.models.common import resolve_indices
from difffeat.models.massive import MassiveChannels
from difffeat.models.vae import center_crop_arr
from difffeat.run.config import ConfigError, RunConfig, check_run, config_changes, register_demo, save_config
from difffeat.run.summary import CURVE_FILE, chosen_cells
from difffeat.search import SearchResult, local_search
from difffeat.utils import distributed
from difffeat.utils.identity import source_identity
from difffeat.utils.io import atomic_write_json
from difffeat.utils.lock import FolderLock
from difffeat.utils.options import digest, from_dict, numbers_fields
from difffeat.utils.progress import progress
from difffeat.utils.runtime import resolve_device
from difffeat.utils.times import as_time

Cell = tuple[int, int | float]  # (block, time in the backbone's convention)
# The sweep grid when the config gives none, per time convention (models.base.TimeConvention.name): from nearly
# clean to mostly noise. Flow grids are DDPM's spread over [0, 1]; SiT counts its time the other way (t = 1 clean).
DEFAULT_TIMES: dict[str, list[int | float]] = {
    "ddpm": [10, 50, 100, 200, 300, 400, 500, 700, 900],
    "flow": [0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9],
    "sit-flow": [0.1, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99],
    "masked": [0, 100, 250, 500, 750],
}
PIXEL_BASELINE_SIZE = 32
MASSIVE_CALIBRATION_ROWS = 16  # train rows the massive channels are measured on (they stand out on every image)
SOURCE_FIELDS = {"dit", "ddit", "backbone", "name"}  # a model section's fields that say which model, not how
PIPELINE_FIELDS = {"class_label", "massive", "tap"}  # read by the extraction jobs, not by the family's loader


def load_data(cfg: RunConfig) -> Dataset:
    """The configured dataset, each split cut to ``data.limit`` samples when set."""
    register_demo()
    ds = load_dataset(cfg.data.kind, **cfg.data.reader_arguments())
    if cfg.data.limit:
        for split in ds.splits.values():
            split.samples = split.samples[: cfg.data.limit]
    return ds


def check_splits(ds: Dataset, names: Sequence[str]) -> None:
    """Every split a step needs exists and has samples: said now, not after an hour of extracting the others."""
    for name in names:
        if name not in ds.splits:
            raise ConfigError("data.splits", f"dataset {ds.name!r} has no split {name!r}; it has {sorted(ds.splits)}")
        if not len(ds.splits[name]):
            raise ConfigError(
                "data", f"split {name!r} of dataset {ds.name!r} has no samples; check data.root and options"
            )


MASSIVE_FILES = {"image": "massive.json", TEXT_STREAM: "massive_text_stream.json"}


def branch(modality: str) -> str:
    """Which extraction branch a modality is read by: the text stream is the image backbone's."""
    return "image" if modality in ("image", TEXT_STREAM) else "text"


class Experiment:
    """Holds the configuration, the dataset, the store and (lazily) the models of one run folder."""

    def __init__(self, cfg: RunConfig, rank: int = 0, world: int = 1):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.store = FeatureStore(self.out / "store")
        self.dist = {"rank": rank, "world": world}
        self.device = resolve_device(cfg.extract.device)
        self._rows: dict[str, list[int]] = {}
        self._variants: dict[tuple[str, str], str] = {}

    # ---- data and models ---------------------------------------------------------------------------
    @cached_property
    def data(self) -> Dataset:
        return load_data(self.cfg)

    @property
    def modalities(self) -> list[str]:
        """The configured modalities that have a model."""
        sources = {"image": self.cfg.image.dit, "text": self.cfg.text.ddit}
        mods = [m for m in self.cfg.extract.modalities if sources.get(m)]
        if not mods:
            raise ValueError("no modality to run: set image.dit and/or text.ddit in the config")
        return mods

    @cached_property
    def image_extractor(self):
        from difffeat.features.extract import ImageFeatureExtractor

        return ImageFeatureExtractor(self._backbone("image"), compile=self.cfg.extract.compile)

    @cached_property
    def text_extractor(self):
        from difffeat.features.extract import TextFeatureExtractor

        return TextFeatureExtractor(self._backbone("text"), compile=self.cfg.extract.compile)

    @cached_property
    def stream_extractor(self):
        """The image backbone read at its text tokens (``fusion.ablations: [streams]``): the same loaded MMDiT,
        its VAE and prompt encoder shared, not loaded twice."""
        from difffeat.features.extract import ImageFeatureExtractor

        backbone = self.image_extractor.backbone
        if not getattr(getattr(backbone, "spec", None), "joint", False):
            raise ConfigError(
                "fusion.ablations", f"streams reads the text tokens of a joint text+image backbone (sd3, flux); "
                f"the {backbone.family} backbone has none"
            )  # fmt: skip
        return ImageFeatureExtractor(backbone.with_stream("text"), compile=self.cfg.extract.compile)

    def stream_cell(self, image_cell: Cell) -> Cell:
        """Where the text stream is read: the image cell, or the deepest earlier block whose output carries text
        tokens where the image cell's block has none (SD3's last block updates only the image tokens)."""
        block, t = image_cell
        return max(b for b in self.stream_extractor.backbone.text_blocks() if b <= block), t

    def _backbone(self, modality: str):
        """The configured model through the backbone registry: the family named in the config or read from the
        source, given the options of its section that its loader takes (:func:`family_options`)."""
        model = self.cfg.image if modality == "image" else self.cfg.text
        source = model.dit if modality == "image" else model.ddit
        family = resolve_family(source, modality, model.backbone)
        return load_backbone(source, modality, family, **family_options(model, modality, family)).to(self.device)

    def model_name(self, modality: str) -> str:
        m = self.cfg.image if branch(modality) == "image" else self.cfg.text
        name = model_name(m.dit if branch(modality) == "image" else m.ddit, m.name)
        return f"{name}-text-stream" if modality == TEXT_STREAM else name

    def model_options(self, modality: str) -> ImageModelOptions | TextModelOptions:
        """The model section a modality reads: the text stream is the image section with ``stream: text``."""
        if modality == TEXT_STREAM:
            return replace(self.cfg.image, stream="text")
        return self.cfg.image if modality == "image" else self.cfg.text

    @cached_property
    def identities(self) -> dict[str, dict[str, str | None]]:
        """What the weights (and VAE, tokenizer) are, by content (see difffeat.utils.identity), per modality. A
        default VAE or tokenizer is the source's own, identified with it."""
        out: dict[str, dict[str, str | None]] = {}
        if self.cfg.image.dit:
            out["image"] = {"dit": source_identity(self.cfg.image.dit), "vae": source_identity(self.cfg.image.vae)}
        if self.cfg.text.ddit:
            t = self.cfg.text
            out["text"] = {"ddit": source_identity(t.ddit), "tokenizer": source_identity(t.tokenizer)}
        return out

    def extractor(self, modality: str):
        if modality == TEXT_STREAM:
            return self.stream_extractor
        return self.image_extractor if modality == "image" else self.text_extractor

    def depth(self, modality: str) -> int:
        return self.extractor(modality).depth

    def time(self, modality: str) -> TimeConvention:
        """The backbone's time convention: every time of this modality in the config is one of its values."""
        return self.extractor(modality).backbone.time

    def times(self, modality: str, values: Sequence[float], where: str) -> list[int | float]:
        """``values`` (from config key ``where``) checked against the backbone's time convention, in canonical
        form; a value outside it is one line naming the key and the convention."""
        convention = self.time(modality)
        for t in values:
            try:
                convention.check(t)
            except ValueError as exc:
                raise ConfigError(where, f"{exc} (the {self.extractor(modality).backbone.family} backbone)") from None
        return [as_time(t) for t in values]

    # ---- grids -------------------------------------------------------------------------------------
    def grid(self, modality: str) -> tuple[list[int], list[int | float]]:
        """(blocks, times) of the sweep lattice; blocks default to all of the model's blocks, times to the
        default grid of the backbone's time convention."""
        s = self.cfg.search
        blocks = s.image_grid_blocks if modality == "image" else s.text_grid_blocks
        timesteps = s.image_grid_timesteps if modality == "image" else s.text_grid_timesteps
        depth = self.depth(modality)
        blocks = resolve_indices(blocks, depth) if blocks else list(range(depth))
        where = f"search.{modality}_grid_timesteps"
        if not timesteps:
            name = self.time(modality).name
            if name not in DEFAULT_TIMES:
                raise ConfigError(where, f"no default grid for {name} time: give the times to sweep")
            timesteps = DEFAULT_TIMES[name]
        return blocks, sorted(self.times(modality, timesteps, where))

    # ---- features ----------------------------------------------------------------------------------
    def ensure(self, modality: str, blocks: Sequence[int], timesteps: Sequence[float], splits: Sequence[str]) -> None:
        """Extract whatever of blocks x timesteps is missing: one truncated forward per timestep and batch."""
        for split in splits:
            if branch(modality) == "image":
                extract_image_split(
                    self.store, self.extractor(modality), self.data.split(split), self.model_name(modality),
                    self.model_options(modality), self.cfg.extract, blocks, timesteps, self.identities["image"],
                    self.massive(blocks, modality), **self.dist,
                )  # fmt: skip
            else:
                extract_text_split(
                    self.store, self.text_extractor, self.data.split(split), self.model_name("text"), self.cfg.text,
                    self.cfg.extract, blocks, timesteps, self.identities["text"], **self.dist,
                )  # fmt: skip

    # ---- massive activations -----------------------------------------------------------------------
    @cached_property
    def massive_calibration(self) -> dict | None:
        """What the massive channels are found on (``image.massive`` not none): the first
        :data:`MASSIVE_CALIBRATION_ROWS` train rows at every time of the image grid; part of every image
        entry's fingerprint."""
        mode = self.cfg.image.massive
        if mode == "none" or "image" not in self.modalities:
            return None
        samples = self.samples("train")[:MASSIVE_CALIBRATION_ROWS]
        calibration = {"mode": mode, "split": "train", "ids": ids_digest([s.id for s in samples]),
                       "times": self.grid("image")[1]}  # fmt: skip
        texts = entry_texts("image", self.cfg.image, samples)  # caption-conditioned: the captions it read
        return calibration if texts is None else {**calibration, "texts": ids_digest(texts)}

    def massive(self, blocks: Sequence[int], modality: str = "image") -> Massive | None:
        """The massive channels of ``blocks`` (and of every block measured before) of the image backbone's tokens
        (``modality`` image, or its text stream), measured on the calibration rows where ``massive.json``
        (``massive_text_stream.json``) does not hold them for the current calibration yet."""
        calibration = self.massive_calibration
        if calibration is None:
            return None
        blocks = resolve_indices(blocks, self.depth("image"))
        path = self.out / MASSIVE_FILES[modality]
        model = self.model_options(modality)
        fingerprint = digest({"identity": self.identities["image"], "model": numbers_fields(model),
                              "extract": numbers_fields(self.cfg.extract, "image"), **calibration})  # fmt: skip
        channels = _recorded_channels(path, fingerprint)
        if any(b not in channels for b in blocks):
            extractor, split, rows = self.extractor(modality), self.data.split("train"), self.rows("train")
            vae, name = self.identities["image"]["vae"], self.model_name("image")
            latents = cache_latents(self.store, extractor, split, rows, name, self.cfg.extract, vae, **self.dist)
            with distributed.rank_zero_first(**self.dist):  # rank 0 measures and writes, the others read
                channels = _recorded_channels(path, fingerprint)
                missing = [b for b in blocks if b not in channels]
                if missing:
                    channels |= calibrate_massive(
                        self.store, extractor, split, rows[:MASSIVE_CALIBRATION_ROWS], latents, model,
                        self.cfg.extract, missing, calibration["times"],
                    )  # fmt: skip
                    if self.dist["rank"] == 0:
                        by_block = {str(b): c for b, c in sorted(channels.items())}
                        record = {"fingerprint": fingerprint, "mode": calibration["mode"], "channels": by_block}
                        atomic_write_json(path, record)
        return Massive(MassiveChannels(channels, calibration["mode"]), calibration)

    def massive_record(self, modality: str = "image") -> dict | None:
        """The channels measured in this run (``massive.json``, or the text stream's), for metrics.json and the
        report."""
        path = self.out / MASSIVE_FILES[modality]
        if self.massive_calibration is None or not path.exists():
            return None
        record = json.loads(path.read_text())
        return {"mode": record["mode"], "channels": record["channels"]}

    def variant(self, modality: str, split: str) -> str:
        """The store variant of this modality's entries of ``split`` (the same for every cell), computed once per
        run: it digests every sample id and caption of the split, and every key of every cell asks for it."""
        if (modality, split) not in self._variants:
            self._variants[modality, split] = self._variant(modality, split)
        return self._variants[modality, split]

    def _variant(self, modality: str, split: str) -> str:
        samples, side = self.samples(split), branch(modality)
        model = self.model_options(modality)
        options = effective_options(model, self.extractor(modality))
        massive = self.massive_calibration if side == "image" else None
        texts = entry_texts(side, model, samples)
        ids = [s.id for s in samples]
        return entry_variant(
            entry_fingerprint(side, options, self.cfg.extract, self.identities[side], ids, massive, texts)
        )

    def key(self, modality: str, cell: Cell, split: str, model: str | None = None) -> EntryKey:
        options, side = self.cfg.extract, branch(modality)
        pool = options.pool if side == "image" else options.text_pool
        name = model or self.model_name(modality)
        return EntryKey(
            side, name, cell[0], as_time(cell[1]), pool, options.seed, split, self.variant(modality, split),
            self.time(modality).name,
        )  # fmt: skip

    def features(self, modality: str, cell: Cell, split: str) -> np.ndarray:
        key = self.key(modality, cell, split)
        if not self.store.has(key):
            self.ensure(modality, [cell[0]], [cell[1]], [split])
        return self.store.read(key)

    def rows(self, split: str) -> list[int]:
        """The split's sample indices in the store's row order (recording that order if this is the first use)."""
        if split not in self._rows:
            self._rows[split] = prepare_ids(self.store, self.data.split(split), self.cfg.extract.skip_bad)
        return self._rows[split]

    def samples(self, split: str) -> list:
        """The split's samples in the store's row order (recording that order if this is the first use)."""
        sp = self.data.split(split)
        return [sp.samples[i] for i in self.rows(split)]

    def fingerprint(self, splits: Sequence[str] = ("train", "val"), **parts: object) -> str:
        """Digest of what any artefact trained on ``splits`` depends on (each modality's features and the
        labels, in row order), plus ``parts`` (the options of that artefact)."""
        labels = {s: hashlib.sha256(np.ascontiguousarray(self.targets(s)).tobytes()).hexdigest()[:16] for s in splits}
        variants = {f"{m}/{s}": self.variant(m, s) for m in self.modalities for s in splits}
        return digest({"labels": labels, "features": variants, **parts})

    def targets(self, split: str) -> np.ndarray:
        """Targets in the store's row order: multi-hot [N, C], or int labels [N] for single-label data."""
        samples = self.samples(split)
        if self.data.single_label:
            return np.array([s.labels[0] for s in samples], dtype=np.int64)
        y = np.zeros((len(samples), self.data.num_classes), dtype=np.float32)
        for i, s in enumerate(samples):
            y[i, list(s.labels)] = 1
        return y

    def ignore(self, split: str) -> np.ndarray | None:
        """VOC-style "difficult" labels to leave out of metrics, in row order (None when there are none)."""
        samples = self.samples(split)
        if not any(s.ignore for s in samples):
            return None
        m = np.zeros((len(samples), self.data.num_classes), dtype=bool)
        for i, s in enumerate(samples):
            m[i, list(s.ignore)] = True
        return m

    # ---- heads -------------------------------------------------------------------------------------
    @property
    def loss(self) -> str:
        return "ce" if self.data.single_label else "bce"

    def probe_options(self) -> ProbeOptions:
        return replace(self.cfg.probe, loss=self.cfg.probe.loss or self.loss)

    def fusion_options(self, search: bool = False, **overrides) -> FusionOptions:
        """The fusion options as configured, or the cheaper ones the local search scores pairs with."""
        f = self.cfg.fusion
        if search:
            overrides = {"width": f.search_width, "epochs": f.search_epochs, **overrides}
        return replace(f, loss=f.loss or self.loss, **overrides)

    def probe_score(self, modality: str, cell: Cell) -> float:
        r = fit_probe(
            self.features(modality, cell, "train"),
            self.targets("train"),
            self.features(modality, cell, "val"),
            self.targets("val"),
            self.probe_options(),
        )
        return r.best_score

    def pair_score(self, image_cell: Cell, text_cell: Cell) -> float:
        feats = {
            s: [self.features("image", image_cell, s), self.features("text", text_cell, s)] for s in ("train", "val")
        }
        r = fit_fusion(
            feats["train"], self.targets("train"), feats["val"], self.targets("val"), self.fusion_options(search=True)
        )
        return r.best_score


def family_options(model: ImageModelOptions | TextModelOptions, modality: str, family: str) -> dict:
    """The options of a model section that ``family``'s loader takes (unset ones left to its defaults); an option
    set away from its default that the family does not take is a one-line error, never silently ignored."""
    accepted = loader_options(family)
    out = {}
    for f in fields(model):
        if f.name in SOURCE_FIELDS:
            continue
        value = getattr(model, f.name)
        if f.name in accepted:
            if value is not None:
                out[f.name] = value
        elif f.name not in PIPELINE_FIELDS and value != f.default:
            takers = [n for n in families(modality) if f.name in loader_options(n)]
            raise ConfigError(
                f"{modality}.{f.name}", f"the {family} backbone takes no {f.name} (it is for {', '.join(takers)})"
            )
    return out


def _recorded_channels(path: Path, fingerprint: str) -> dict[int, list[int]]:
    """The massive channels ``path`` holds for this calibration (none when it holds another)."""
    if not path.exists():
        return {}
    record = json.loads(path.read_text())
    if record.get("fingerprint") != fingerprint:
        return {}
    return {int(b): c for b, c in record["channels"].items()}


# ---- steps ---------------------------------------------------------------------------------------------
def step_extract(exp: Experiment) -> None:
    """The extract section's blocks x timesteps for every split (what ``difffeat extract`` does)."""
    options = exp.cfg.extract
    for m in exp.modalities:
        blocks, timesteps = (
            (options.image_blocks, options.image_timesteps)
            if m == "image"
            else (options.text_blocks, options.text_timesteps)
        )
        exp.ensure(m, blocks, exp.times(m, timesteps, f"extract.{m}_timesteps"), exp.cfg.data.splits)


def extract_grid(exp: Experiment) -> None:
    """Every cell of the sweep grid for train and val (what the sweep probes)."""
    for m in exp.modalities:
        exp.ensure(m, *exp.grid(m), ["train", "val"])


def step_sweep(exp: Experiment) -> dict[str, np.ndarray]:
    """The full grid per modality: extraction of every cell, then one probe per cell (CSV, resumable).

    A table whose fingerprint (features, labels, probe options) is not the current one is started afresh.
    """
    extract_grid(exp)
    tables = {}
    probe = exp.probe_options()
    for m in exp.modalities:
        blocks, timesteps = exp.grid(m)
        csv_path = exp.out / f"sweep_{m}.csv"
        _drop_if_stale(csv_path, exp.fingerprint(probe=numbers_fields(probe), modality=m))
        res = run_sweep(
            lambda b, t, split, m=m: exp.features(m, (b, t), split),
            blocks, timesteps, exp.targets("train"), exp.targets("val"), probe, csv_path=csv_path,
        )  # fmt: skip
        tables[m] = res.scores
    return tables


def _drop_if_stale(path: Path, fingerprint: str) -> None:
    """Remove ``path`` unless its sidecar ``<stem>.json`` holds ``fingerprint``; then record the fingerprint."""
    sidecar = path.with_suffix(".json")
    recorded = json.loads(sidecar.read_text()).get("fingerprint") if sidecar.exists() else None
    if recorded != fingerprint:
        path.unlink(missing_ok=True)
        atomic_write_json(sidecar, {"fingerprint": fingerprint})


def step_search(exp: Experiment, tables: dict[str, np.ndarray] | None = None) -> SearchResult:
    """Local search over (block, t) per modality, then over fused pairs; every evaluation logged and cached.

    With sweep ``tables`` (grid mode) unimodal scores are looked up in them rather than refitted, and the
    search still counts every cell it asks for, so its cost can be compared with the grid's. The cache holds the
    fingerprint of what its scores depend on; a cache with another one is not used.
    """
    grids = {m: exp.grid(m) for m in exp.modalities}
    options = _resolved_starts(exp, grids)
    fingerprint = exp.fingerprint(
        probe=numbers_fields(exp.probe_options()), fusion=numbers_fields(exp.fusion_options(search=True), "all")
    )
    cache_path = exp.out / "search_cache.json"
    stored = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    cache = dict(stored.get("scores", {})) if stored.get("fingerprint") == fingerprint else {}
    if tables is not None:  # grid mode: unimodal scores come from the tables (and are counted); pairs are fits
        cache = {k: v for k, v in cache.items() if k.startswith("pair")}

    def single(modality: str, cell: Cell) -> float:
        if tables is not None:
            blocks, timesteps = grids[modality]
            return float(tables[modality][blocks.index(cell[0]), timesteps.index(cell[1])])
        return exp.probe_score(modality, cell)

    def log(record) -> None:
        tqdm.write(f"search: {record}")
        if tables is None or record.stage == "pair":  # a killed search resumes without refitting anything
            scores = {k: v for k, v in cache.items() if tables is None or k.startswith("pair")}
            atomic_write_json(cache_path, {"fingerprint": fingerprint, "scores": scores})

    pair = exp.pair_score if len(grids) == 2 else None
    result = local_search(single, pair, grids, options, cache=cache, log=log)
    atomic_write_json(exp.out / "search.json", {**result.to_dict(), "mode": exp.cfg.search.mode})
    return result


def _resolved_starts(exp: Experiment, grids: dict[str, tuple[list[int], list[int]]]):
    """The search options with negative start blocks counted from the model's end; a block outside the model
    is an error (it used to wrap around silently)."""
    s, starts = exp.cfg.search, {}
    for m, given in (("image", s.image_start), ("text", s.text_start)):
        if m in grids and given:
            depth = exp.depth(m)
            if not -depth <= given[0] < depth:
                raise ConfigError(f"search.{m}_start", f"block {given[0]} is outside the model's {depth} blocks")
            starts[f"{m}_start"] = [given[0] % depth, exp.times(m, given[1:], f"search.{m}_start")[0]]
        else:
            starts[f"{m}_start"] = None
    return replace(s, **starts)


def step_fit(exp: Experiment) -> dict[str, FusionResult]:
    """Final heads on train (model selection on val): the fused model, its ablations and baselines.

    A head on disk is reused only when its sidecar ``<name>.json`` holds the current fingerprint (its inputs'
    cells and features, the labels, its options); otherwise it is trained again.
    """
    cells = chosen_cells(exp.out)
    heads_dir = exp.out / "heads"
    heads_dir.mkdir(exist_ok=True)
    specs = _head_specs(exp, cells)
    results = {}
    for name, (inputs, overrides) in progress(specs.items(), desc="fit heads"):
        path = heads_dir / f"{name}.safetensors"
        options = exp.fusion_options(**overrides)
        fingerprint = exp.fingerprint(head=name, cells=cells, fusion=numbers_fields(options))
        sidecar = path.with_suffix(".json")
        if path.exists() and sidecar.exists() and json.loads(sidecar.read_text()).get("fingerprint") == fingerprint:
            results[name] = FusionResult.load(path)
            continue
        tr = [get("train") for get in inputs]
        va = [get("val") for get in inputs]
        results[name] = fit_fusion(tr, exp.targets("train"), va, exp.targets("val"), options)
        results[name].save(path)
        atomic_write_json(sidecar, {"fingerprint": fingerprint})
    return results


def _head_specs(exp: Experiment, cells: dict[str, Cell]) -> dict[str, tuple[list[Callable[[str], np.ndarray]], dict]]:
    """name -> (feature getters per input, FusionOptions overrides)."""

    def feat(m: str, cell: Cell | None = None) -> Callable[[str], np.ndarray]:
        return lambda split: exp.features(m, cell or cells[m], split)

    mods = [m for m in ("image", "text") if m in cells]
    specs: dict[str, tuple[list, dict]] = {"fused" if len(mods) == 2 else mods[0]: ([feat(m) for m in mods], {})}
    f = exp.cfg.fusion
    for ab in f.ablations:
        if ab in mods and len(mods) == 2:
            specs[ab] = ([feat(ab)], {})
        elif ab == "concat" and len(mods) == 2:
            specs["concat"] = ([feat(m) for m in mods], {"mode": "concat"})
        elif ab.startswith("width"):
            specs[f"fused_{ab}"] = ([feat(m) for m in mods], {"width": int(ab[5:])})
        elif ab == "streams" and "image" in mods:  # one backbone, both modalities: the MMDiT's two token streams
            text_stream = feat(TEXT_STREAM, exp.stream_cell(cells["image"]))
            specs[TEXT_STREAM] = ([text_stream], {})
            specs["streams"] = ([feat("image"), text_stream], {})
    if "pixels" in f.baselines:
        specs["pixels"] = ([lambda split: pixel_features(exp, split)], {})
    if "random_init" in f.baselines:
        for m in mods:
            specs[f"random_init_{m}"] = ([lambda split, m=m: random_init_features(exp, m, cells[m], split)], {})
    return specs


def pixel_features(exp: Experiment, split: str) -> np.ndarray:
    """Raw pixels (centre crop at 32 px, [0, 1], flattened): the baseline any learned feature must beat."""
    samples = exp.samples(split)
    fingerprint = {"ids": ids_digest([s.id for s in samples])}
    key = EntryKey("pixels", f"crop{PIXEL_BASELINE_SIZE}", -1, -1, "flat", 0, split, entry_variant(fingerprint))
    if not exp.store.has(key):

        def compute(lo: int, hi: int) -> dict[EntryKey, np.ndarray]:
            rows = [np.asarray(center_crop_arr(load_image(s), PIXEL_BASELINE_SIZE)) for s in samples[lo:hi]]
            return {key: (np.stack(rows).reshape(hi - lo, -1) / 255.0).astype(np.float16)}

        fill_entries(
            exp.store, [key], len(samples), exp.cfg.extract.shard_size, compute, fingerprint, f"pixels {split}"
        )
    return exp.store.read(key)


def random_init_features(exp: Experiment, modality: str, cell: Cell, split: str) -> np.ndarray:
    """The same architecture with random weights (PyTorch default init everywhere, seeded), same cell.

    DiT's and DDiT's own inits zero every adaLN gate, which would make all blocks the identity; the default init
    keeps them active, so this measures what the architecture alone gives, not what training added. The twin
    is read exactly as the trained model (same VAE or tokenizer, conditioning, massive channels suppressed).
    """
    name = f"{exp.model_name(modality)}-random-init"
    key = exp.key(modality, cell, split, model=name)
    if not exp.store.has(key):
        twin = _random_twin(exp.extractor(modality), exp.cfg.extract.seed)
        if modality == "image":
            extract_image_split(
                exp.store, twin, exp.data.split(split), name, exp.cfg.image, exp.cfg.extract, [cell[0]], [cell[1]],
                exp.identities["image"], exp.massive([cell[0]]), **exp.dist,
            )  # fmt: skip
        else:
            extract_text_split(
                exp.store, twin, exp.data.split(split), name, exp.cfg.text, exp.cfg.extract, [cell[0]], [cell[1]],
                exp.identities["text"], **exp.dist,
            )  # fmt: skip
    return exp.store.read(key)


def _random_twin(trained, seed: int):
    """An extractor like ``trained`` around a copy of its backbone whose network is freshly initialised; the VAE,
    tokenizer and prompt encoder are shared, not copied (they are not what is being measured)."""
    backbone = trained.backbone
    shared = [getattr(backbone, a, None) for a in ("encoder", "tokenizer", "prompts")]
    twin = copy.deepcopy(backbone, memo={id(obj): obj for obj in shared if obj is not None})
    torch.manual_seed(seed)
    for mod in twin.module.modules():
        if hasattr(mod, "reset_parameters"):
            mod.reset_parameters()
    return type(trained)(twin)


def step_evaluate(exp: Experiment, heads: dict[str, FusionResult]) -> dict[str, dict]:
    """Test metrics of every head; the head's inputs are rebuilt from the same specs as in fitting."""
    specs = _head_specs(exp, chosen_cells(exp.out))
    y, ign = exp.targets("test"), exp.ignore("test")
    results = {}
    for name, head in heads.items():
        scores = head.predict([get("test") for get in specs[name][0]])
        if exp.data.single_label:
            results[name] = single_label_metrics(scores, y)
        else:
            results[name] = multilabel_metrics(scores, y, top_k=3, ignore=ign, class_names=exp.data.classes)
        results[name]["val_score"] = head.best_score
    atomic_write_json(exp.out / "results.json", _jsonable(results))
    return results


def step_curve(exp: Experiment, sizes: Sequence[int]) -> dict[str, dict[str, float | None]]:
    """The label-efficiency curve: ``{head: {str(n): test score}}`` of every head refitted on ``n`` train rows.

    Pretrained features earn their keep when labels are few: a curve over labeled-set sizes shows whether their
    lead over pixels and random-init features grows as labels get fewer, which one table at one size cannot. Each
    point refits the same head (same inputs, cells and recipe as :func:`step_fit`) on the first ``n`` train rows
    (scenes are independent draws, so a prefix is a random subset, and the subsets are nested) and keeps the full
    validation split for model selection. The cells stay those chosen with all train labels: the curve isolates
    how the features respond to fewer labels, not how the search does. A size above the train split's gives None.
    Points are kept per head with that head's fingerprint, so a rerun refits only what changed.
    """
    path = exp.out / CURVE_FILE
    done = json.loads(path.read_text()) if path.exists() else {}
    cells = chosen_cells(exp.out)
    y_train, y_val, y_test = exp.targets("train"), exp.targets("val"), exp.targets("test")
    specs = _head_specs(exp, cells)
    for name, (inputs, overrides) in progress(specs.items(), desc="label-efficiency curve"):
        options = exp.fusion_options(**overrides)
        fingerprint = exp.fingerprint(("train", "val", "test"), head=name, cells=cells, fusion=numbers_fields(options))
        entry = done.get(name, {})
        points = entry.get("points", {}) if entry.get("fingerprint") == fingerprint else {}
        todo = [n for n in sizes if str(n) not in points]
        if todo:
            train, val, test = ([get(s) for get in inputs] for s in ("train", "val", "test"))
        for n in todo:
            if n > len(y_train):
                points[str(n)] = None
                continue
            head = fit_fusion([x[:n] for x in train], y_train[:n], val, y_val, options)
            points[str(n)] = _test_score(exp, head.predict(test), y_test)
        done[name] = {"fingerprint": fingerprint, "points": points}
        atomic_write_json(path, done)
    return {name: {str(n): done[name]["points"][str(n)] for n in sizes} for name in specs}


def _test_score(exp: Experiment, scores: np.ndarray, y_test: np.ndarray) -> float:
    if exp.data.single_label:
        return single_label_metrics(scores, y_test)["top1"]
    return multilabel_metrics(scores, y_test, ignore=exp.ignore("test"))["mAP"]


def _jsonable(obj):
    from difffeat.run.report import to_jsonable

    return to_jsonable(obj)


STEPS = ("extract", "sweep", "search", "fit", "evaluate", "report")


def run(
    cfg: RunConfig, steps: Sequence[str] = ("sweep", "search", "fit", "evaluate", "report"), recompute: bool = False
) -> Experiment:
    """Run the experiment: each step resumes from what the run folder already holds.

    ``sweep`` runs in grid mode, or when asked for without ``search`` (``difffeat sweep``); in search mode the
    search extracts and probes the cells it visits. The config is checked completely (values, dataset, splits)
    and the folder locked before anything is written; a folder holding another experiment is refused unless
    ``recompute`` (see :func:`claim_folder`).

    Under torchrun (:mod:`difffeat.utils.distributed`) every rank takes its share of the extraction (the extract
    section, and in grid mode the sweep grid); then the other ranks return and rank 0 runs the rest alone over
    the merged store, extracting by itself whatever a later step still asks for (the cells a local search
    visits, the test split of the chosen cells).
    """
    unknown = set(steps) - set(STEPS)
    if unknown:
        raise ValueError(f"unknown step(s) {sorted(unknown)}; steps are {STEPS}")
    check_run(cfg)
    where = distributed.info()
    lock = FolderLock(cfg.out)
    if where.is_main:
        lock.acquire()
    try:
        return _run_locked(cfg, steps, recompute, where)
    finally:
        lock.release()


def _run_locked(cfg: RunConfig, steps: Sequence[str], recompute: bool, where) -> Experiment:
    if where.is_main:
        claim_folder(cfg, recompute)
    exp = Experiment(cfg, where.rank, where.world)
    with distributed.rank_zero_first(where.rank, where.world):  # a reader's cache is written by rank 0 alone
        check_splits(exp.data, _splits_needed(cfg, steps))
    if where.is_main:
        save_config(cfg, exp.out / "config.yaml")
    start = time.time()
    if "extract" in steps:
        step_extract(exp)
    sweep = ("sweep" in steps and "search" not in steps) or (
        cfg.search.mode == "grid" and {"sweep", "search"} & set(steps)
    )
    if where.world > 1:
        if sweep:
            extract_grid(exp)
        if not where.is_main:
            return exp
        exp.dist = {"rank": 0, "world": 1}
    tables = step_sweep(exp) if sweep else None
    if "search" in steps:
        step_search(exp, tables if cfg.search.mode == "grid" else None)
    if "fit" in steps or "evaluate" in steps:
        heads = step_fit(exp)
        if "evaluate" in steps:
            step_evaluate(exp, heads)
            if cfg.fusion.curve_sizes:
                step_curve(exp, cfg.fusion.curve_sizes)
    if "report" in steps:
        from difffeat.run.summary import build_report

        build_report(exp, seconds=time.time() - start)
    return exp


def _splits_needed(cfg: RunConfig, steps: Sequence[str]) -> list[str]:
    needed = list(cfg.data.splits) if "extract" in steps else []
    if {"sweep", "search", "fit", "evaluate", "report"} & set(steps):
        needed += ["train", "val"]
    if {"evaluate", "report"} & set(steps):
        needed.append("test")
    return list(dict.fromkeys(needed))


def claim_folder(cfg: RunConfig, recompute: bool) -> None:
    """Refuse to run in a folder whose ``config.yaml`` describes another experiment (other data, models or
    numbers-changing options) unless ``recompute``: its results would be overwritten. Settings that change no
    numbers (batch size, device, workers, search budget, report) may change between runs of one folder."""
    saved_path = Path(cfg.out) / "config.yaml"
    if recompute or not saved_path.exists():
        return
    try:
        saved = from_dict(RunConfig, yaml.safe_load(saved_path.read_text()) or {}, str(saved_path))
    except (yaml.YAMLError, ValueError) as exc:
        raise ConfigError(
            str(saved_path), f"cannot compare with the run already in this folder ({exc}); use a new --out, or "
            "--recompute to run here anyway"
        ) from None  # fmt: skip
    changes = config_changes(saved, cfg)
    if changes:
        shown = "; ".join(changes[:6]) + ("; ..." if len(changes) > 6 else "")
        raise ConfigError(
            "out", f"{cfg.out} holds a run with another config ({shown}); use a new --out, or --recompute to run "
            "this config here (what changed is recomputed, the rest reused, the old results replaced)"
        )  # fmt: skip
