"""The ready-made configs parse against the schema and name readers and models that exist."""

from pathlib import Path

import pytest

from difffeat.data.registry import available_datasets
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
