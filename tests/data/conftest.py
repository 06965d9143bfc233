"""Fixtures: each writes a small copy of one dataset, in its real distributed format, into ``tmp_path``."""

from pathlib import Path

import pytest
from datafmt import build_cifar, build_coco, build_nuswide, build_vg, build_voc


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    return build_coco(tmp_path)


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    return build_voc(tmp_path)


@pytest.fixture
def nuswide_root(tmp_path: Path) -> Path:
    return build_nuswide(tmp_path)


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    return build_cifar(tmp_path)


@pytest.fixture
def vg_root(tmp_path: Path) -> Path:
    return build_vg(tmp_path)
