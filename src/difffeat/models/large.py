"""Large text models behind an explicit option: the parameter count is read from the config (a model built on the
meta device, so no weight is read or allocated), and a source above :data:`LARGE_PARAMS` is refused unless the user
says ``allow_large``.

Why refuse at all: a 7-26B checkpoint is tens of GB to download and more to hold in float32; a config that names
one by mistake (a hub id typo, the wrong folder) should cost one line, not an hour and an out-of-memory kill. The
user who means it sets ``text.allow_large: true``, and usually ``text.dtype: bfloat16`` and ``text.device_map``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from difffeat.models.checkpoints import CheckpointError

LARGE_PARAMS = 3_000_000_000  # above SEDD-medium/RADD-medium (~0.4B), below the 7-8B and 26B text diffusion models
DTYPES = ("float32", "bfloat16", "float16")


def meta_parameter_count(build: Callable[[], nn.Module]) -> int:
    """Parameters of the module ``build`` makes, built on the meta device (shapes only; tied weights once)."""
    with torch.device("meta"):
        module = build()
    return sum(p.numel() for p in module.parameters())


def refuse_large(count: int, source: str, allow_large: bool) -> None:
    """One-line refusal for a model above :data:`LARGE_PARAMS` (read at call time) unless ``allow_large``."""
    if count > LARGE_PARAMS and not allow_large:
        raise CheckpointError(
            f"{source}: {count / 1e9:.2f}B parameters, above the {LARGE_PARAMS / 1e9:g}B that load without asking; "
            "set text.allow_large: true to load it (with text.dtype: bfloat16 and text.device_map for one GPU)"
        )


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; a user's typo is one ValueError naming the choices."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, name)
