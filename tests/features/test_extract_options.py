"""Every extraction option is settable from the CLI and changes the store key exactly when it changes the numbers.

The options every family reads are walked on a tiny DiT and DDiT; the family options on the family that takes
them: a tiny SD3 pipeline (with a planted massive-activation channel), a tiny FLUX.1-dev pipeline (guidance) and the
tiny DiT read as a SiT.
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from tests.models.tiny_pipelines import TEXT_LEN, plant_massive_channel, save_flux, save_sd3

from difffeat.run.config import RunConfig, apply_overrides
from difffeat.run.pipeline import Experiment
from difffeat.utils.options import option_paths
from helpers import save_tiny_models

# one value other than the base config's for every option the walk sets through ``--set``
ALTERNATIVES = {
    "extract.image_blocks": [0],
    "extract.image_timesteps": [50],
    "extract.text_blocks": [0],
    "extract.text_timesteps": [250],
    "extract.pool": "none",
    "extract.text_pool": "last",
    "extract.token_norm": True,
    "extract.seed": 1,
    "extract.ensemble": 2,
    "extract.caption_reduce": "first",
    "extract.batch_size": 3,
    "extract.shard_size": 5,
    "extract.store_dtype": "float16",
    "extract.bf16": True,
    "extract.fuse_timesteps": True,
    "extract.num_workers": 1,
    "extract.device": "cpu",
    "extract.skip_bad": True,
    "image.numerics": "diffusers",
    "image.class_label": 0,
    "image.image_size": 32,  # the tiny pixel DiT's own size: spelling out the default changes nothing
    "image.sample_posterior": False,  # no VAE, so no posterior: changes nothing
    "image.tap": "modulated",
    "image.vae_dtype": "bfloat16",  # no VAE: changes nothing (tests/models/test_vae.py walks it with one)
    "text.max_length": 4,
    "text.add_special": "eos",
    "text.dtype": "bfloat16",
    "image.backbone": "dit",  # what the folder says: spelling it out changes nothing
    "text.backbone": "ddit",
}
# walked on one family that takes them (base settings, alternatives, the cell)
FAMILIES = {
    "sd3": (
        ["extract.modalities=[image]", f"image.max_sequence_length={TEXT_LEN}"],
        {
            "image.condition": "caption",
            "image.stream": "both",
            "image.dtype": "bfloat16",
            "image.max_sequence_length": 8,
            "image.massive": "zero",  # the planted channel is found and zeroed
            "image.shift": 1.0,  # unshifted: the scheduler's is 3.0
        },
        (1, 0.25),
    ),
    "flux": (
        ["extract.modalities=[image]", f"image.max_sequence_length={TEXT_LEN}"],
        {"image.guidance": 5.0},
        (1, 0.25),
    ),
    "sit": (["extract.modalities=[image]", "image.backbone=sit"], {"image.path": "gvp"}, (1, 0.5)),
}
NOT_WALKED = {
    "text.device_map": "weight placement of diffusion_gemma only (tests/models/test_diffusion_gemma.py)",
    "text.allow_large": "a permission to load, not a setting of the numbers (tests/run/test_text_families.py)",
    "extract.compile": "needs a C++ compiler; test_perf_options checks compiled features equal plain ones",
    "extract.modalities": "which branches run, not how",
    "image.dit": "a model source: identified by content (tests/run/test_trust.py swaps the weights)",
    "image.vae": "a model source, as image.dit",
    "text.ddit": "a model source, as image.dit",
    "text.tokenizer": "a model source, as image.dit",
    "image.name": "the label the user gives the model in keys and reports",
    "text.name": "the label the user gives the model in keys and reports",
}
CELLS = {"image": (1, 10), "text": (-1, 100)}  # t > 0: the noise (seed, ensemble) matters


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return plant_massive_channel(save_sd3(tmp_path_factory.mktemp("sd3") / "sd3"), channel=3)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return save_flux(tmp_path_factory.mktemp("flux") / "flux")


def base_config(models) -> RunConfig:
    dit, ddit = models
    return apply_overrides(
        RunConfig(),
        ["data.kind=demo", "data.options={n_train: 8, n_val: 2, n_test: 2}", f"image.dit={dit}", f"text.ddit={ddit}",
         "image.name=tiny", "text.name=tinytext", "extract.batch_size=4", "extract.shard_size=8",
         "extract.store_dtype=float32"],
    )  # fmt: skip


def extract_cell(cfg: RunConfig, out, modality: str, cells=CELLS) -> tuple[str, np.ndarray]:
    """The store key name and the features of the modality's walk cell, computed afresh in folder ``out``."""
    from dataclasses import replace

    exp = Experiment(replace(cfg, out=str(out)))
    block, t = cells[modality]
    block = block % exp.depth(modality)
    exp.ensure(modality, [block], [t], ["train"])
    key = exp.key(modality, (block, t), "train")
    return key.name, np.asarray(exp.store.read(key), dtype=np.float32)


def test_the_walk_covers_every_extraction_option():
    paths = {p for p, _, _ in option_paths(RunConfig) if p.split(".")[0] in ("extract", "image", "text")}
    family = {p for _, alternatives, _ in FAMILIES.values() for p in alternatives}
    assert paths == set(ALTERNATIVES) | family | set(NOT_WALKED)


def walk(base: RunConfig, alternatives: dict, cells: dict, out) -> list[str]:
    """Each alternative set through ``--set``; the options whose key and numbers do not change together."""
    reference = {m: extract_cell(base, out / "base", m, cells) for m in cells}
    wrong = []
    for i, (path, value) in enumerate(alternatives.items()):
        cfg = apply_overrides(base, [f"{path}={yaml.safe_dump(value, default_flow_style=True).strip()}"])
        section, name = path.split(".")
        assert getattr(getattr(cfg, section), name) == value, path  # settable with --set
        for modality in cells:
            key, features = extract_cell(cfg, out / f"opt{i}", modality, cells)
            ref_key, ref = reference[modality]
            numbers = features.shape != ref.shape or not np.allclose(features, ref, rtol=1e-4, atol=1e-5)
            if numbers != (key != ref_key):
                wrong.append(f"{path} ({modality}): numbers changed {numbers}, key changed {key != ref_key}")
    return wrong


@pytest.mark.slow
def test_each_extraction_option_changes_the_store_key_exactly_when_it_changes_the_numbers(tmp_path, models):
    assert not (wrong := walk(base_config(models), ALTERNATIVES, CELLS, tmp_path)), wrong


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_option_changes_the_store_key_exactly_when_it_changes_the_numbers(
    tmp_path, models, sd3, flux, family
):
    settings, alternatives, cell = FAMILIES[family]
    source = {"sd3": sd3, "flux": flux}.get(family, models[0])
    base = apply_overrides(base_config(models), [f"image.dit={source}", *settings])
    assert not (wrong := walk(base, alternatives, {"image": cell}, tmp_path)), wrong
