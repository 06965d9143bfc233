"""The backbone registry: the keyword options each family's loader takes, which the pipeline passes from a config
(and rejects when set for a family that does not take them)."""

from __future__ import annotations

import pytest

from difffeat.models.base import loader_options

TEXT = {"tokenizer", "add_special", "max_length", "dtype"}  # every text family's, from CaptionsAdapter


@pytest.mark.parametrize(("family", "expected"), [
    ("ddit", TEXT),
    ("radd", TEXT | {"allow_large"}),  # load_model's own, handed on through from_pretrained's **options
    ("diffusion_gemma", TEXT | {"allow_large", "device_map"}),
    ("dit", {"vae", "numerics", "image_size", "sample_posterior", "vae_dtype"}),
])  # fmt: skip
def test_loader_options_are_the_familys_own(family, expected) -> None:
    assert loader_options(family) == expected
