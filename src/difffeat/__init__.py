"""difffeat: pretrained diffusion transformers as feature extractors for multi-label classification.

The public API is imported on first use (PEP 562), so ``import difffeat`` and the command line stay fast: torch,
diffusers and transformers load only when a name that needs them is touched.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ImageFeaturizer": "difffeat.features.featurizer",
    "TextFeaturizer": "difffeat.features.featurizer",
    "Features": "difffeat.features.featurizer",
    "register_backbone": "difffeat.models.base",
    "load_dit": "difffeat.models.dit_load",
    "load_ddit": "difffeat.models.ddit_load",
    "load_vae": "difffeat.models.vae",
    "load_tokenizer": "difffeat.models.tokenizers",
    "FeatureStore": "difffeat.features.store",
    "multilabel_metrics": "difffeat.metrics",
    "fit_probe": "difffeat.heads.probe",
    "fit_fusion": "difffeat.heads.fusion",
    "local_search": "difffeat.search",
    "load_dataset": "difffeat.data",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'difffeat' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
