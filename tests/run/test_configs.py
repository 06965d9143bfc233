"""The ready-made configs parse against the schema and name readers and models that exist."""

from pathlib import Path

import pytest

from difffeat.data.registry import available_datasets
from difffeat.models.base import DDPM, MASKED, resolve_family
from difffeat.models.diffusers_dits import FLOW
from difffeat.models.diffusion_gemma import UNIFORM
from difffeat.models.sit import SIT_FLOW
from difffeat.run.config import load_config

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_there_is_a_config_per_dataset():
    assert {p.stem for p in CONFIGS} >= {"coco", "vg500", "voc2007", "nuswide", "cifar100"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_parses_and_names_a_reader(path):
    cfg = load_config(path)
    assert cfg.data.kind in [*available_datasets(), "demo"]
    assert cfg.image.dit
    assert cfg.search.mode in ("search", "grid")
    if cfg.search.image_start:
        assert len(cfg.search.image_start) == 2


CONVENTIONS = {"dit": DDPM, "sit": SIT_FLOW, "pixart": DDPM, "sd3": FLOW, "flux": FLOW}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_times_are_in_its_backbones_convention(path):
    """What the pipeline checks once the model is loaded, checked here from the family alone (named, read from a
    hub id, or a DiT for the checkpoint files these configs point at)."""
    cfg = load_config(path)
    try:
        family = resolve_family(cfg.image.dit, "image", cfg.image.backbone)
    except ValueError:
        family = "dit"
    s = cfg.search
    start = [s.image_start[1]] if s.image_start else []
    for t in [*cfg.extract.image_timesteps, *s.image_grid_timesteps, *start]:
        CONVENTIONS[family].check(t)


TEXT_CONVENTIONS = {"ddit": MASKED, "radd": MASKED, "diffusion_gemma": UNIFORM}


@pytest.mark.parametrize("path", [p for p in CONFIGS if load_config(p).text.ddit], ids=lambda p: p.stem)
def test_config_text_times_are_in_its_backbones_convention(path):
    cfg = load_config(path)
    family = resolve_family(cfg.text.ddit, "text", cfg.text.backbone)
    s = cfg.search
    for t in [*cfg.extract.text_timesteps, *s.text_grid_timesteps, *([s.text_start[1]] if s.text_start else [])]:
        TEXT_CONVENTIONS[family].check(t)
