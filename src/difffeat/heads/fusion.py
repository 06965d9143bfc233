"""Fusion head: combine per-modality features (image, text, ...) into one multi-label classifier.

Diff-Feat's design ("add"): each modality's chosen (block, t) feature is projected linearly to a common width and
the projections are summed, then one linear classifier reads the sum. With no nonlinearity the whole head is
linear, a factorised probe on the concatenated features whose projection width bounds its rank; summing rather than
concatenating is what lets differently sized modalities share one space. "concat" (concatenate, then project) and
an optional activation/dropout are ablations. Training is the probe's recipe (``difffeat.heads.train``), so fused and
single-modality scores are directly comparable.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from difffeat.heads.train import (
    ArrayLike,
    OneHead,
    TrainedHead,
    TrainOptions,
    init_prior_bias,
    prepare,
    train_heads,
)
from difffeat.utils.options import option
from difffeat.utils.runtime import seeded

__all__ = ["FusionHead", "FusionOptions", "FusionResult", "fit_fusion"]

Mode = Literal["add", "concat"]
_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class FusionHead(nn.Module):
    """Project each input to ``width``, fuse ("add": sum of projections; "concat": one projection of the
    concatenation), optionally activate and drop out, then classify linearly.

    Inputs are expected standardised (``fit_fusion`` does it with train statistics). ``in_dims=[d]`` is the
    single-modality case: a linear probe factorised through ``width``.
    """

    def __init__(
        self,
        in_dims: Sequence[int],
        num_classes: int,
        width: int = 2048,
        mode: Mode = "add",
        activation: str | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        if not in_dims:
            raise ValueError("FusionHead needs at least one input")
        if mode not in ("add", "concat"):
            raise ValueError(f"mode must be 'add' or 'concat', got {mode!r}")
        if activation is not None and activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be None or one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.in_dims, self.num_classes, self.width = [int(d) for d in in_dims], int(num_classes), int(width)
        self.mode, self.activation_name, self.dropout_p = mode, activation, float(dropout)
        dims = self.in_dims if mode == "add" else [sum(self.in_dims)]
        self.projections = nn.ModuleList(nn.Linear(d, self.width) for d in dims)
        self.activation = _ACTIVATIONS[activation]() if activation else nn.Identity()
        self.dropout = nn.Dropout(self.dropout_p)
        self.classifier = nn.Linear(self.width, self.num_classes)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_classes] from one [N, in_dims[i]] tensor per input, in ``in_dims`` order."""
        if len(inputs) != len(self.in_dims):
            raise ValueError(f"expected {len(self.in_dims)} inputs, got {len(inputs)}")
        if self.mode == "add":
            fused = sum(proj(x) for proj, x in zip(self.projections, inputs, strict=True))
        else:
            fused = self.projections[0](torch.cat(inputs, dim=1))
        return self.classifier(self.dropout(self.activation(fused)))

    def spec(self) -> dict:
        """Constructor arguments, enough to rebuild the head before loading its weights."""
        return {
            "in_dims": self.in_dims,
            "num_classes": self.num_classes,
            "width": self.width,
            "mode": self.mode,
            "activation": self.activation_name,
            "dropout": self.dropout_p,
        }


TEXT_STREAM = "text_stream"  # the image backbone's own text tokens at the image cell (the ``streams`` ablation)


def _ablations(names: list[str]) -> str | None:
    for name in names:
        if name not in ("image", "text", "concat", "streams") and not (name[:5] == "width" and name[5:].isdigit()):
            return f"{name!r} is not an ablation; use image, text, concat, streams or width<N> (e.g. width512)"
    return None


@dataclass
class FusionOptions(TrainOptions):
    """The fusion head: its shape, its training recipe (the probe's fields, with the defaults ``difffeat fit``
    uses), and which ablations, baselines and cheaper search-time fits a run adds. ``fit_fusion`` reads the shape
    and the recipe; the pipeline reads the rest.
    """

    epochs: int = option(100, min=1, numbers=True, help="most epochs; the cosine schedule spans all of them")
    batch_size: int = option(1024, min=0, numbers=True, help="rows per step; 0 = full batch")
    patience: int = option(15, min=1, numbers=True, help="stop after this many epochs without a new best")
    num_threads: int | None = option(None, min=1, help="torch CPU threads while fitting; none: torch's setting")
    width: int = option(2048, min=1, numbers=True, help="projection width (the paper's: 2048)")
    mode: str = option("add", choices=("add", "concat"), numbers=True, help="add projections, or project the concat")
    activation: str | None = option(
        None,
        choices=tuple(_ACTIVATIONS),
        numbers=True,
        help="none (the paper's linear head) or an activation after fusion",
    )
    dropout: float = option(0.0, min=0, max=0.99, numbers=True, help="dropout on the fused representation")
    ablations: list[str] = option(
        default_factory=lambda: ["image", "text", "concat"],
        check=_ablations,
        help="extra heads: image, text (one modality), concat, width<N>, streams (an MMDiT's own text tokens, "
        "alone and fused with its image tokens: one backbone, both modalities; needs image.condition: caption)",
    )
    baselines: list[str] = option(
        default_factory=list,
        choices=("pixels", "random_init"),
        help="reference heads: raw pixels, same architecture with random weights",
    )
    curve_sizes: list[int] = option(
        default_factory=list,
        min=1,
        help="labeled-set sizes of the label-efficiency curve (every head refitted on that many train rows)",
    )
    search_width: int = option(512, min=1, numbers="search", help="width of the fused fits the local search scores")
    search_epochs: int = option(40, min=1, numbers="search", help="epochs of those fits")


@dataclass
class FusionResult(TrainedHead):
    """A trained fusion head with the per-input train statistics it expects, plus how training went."""

    head: FusionHead
    means: list[torch.Tensor]
    stds: list[torch.Tensor]

    @torch.no_grad()
    def predict(self, feats: Sequence[ArrayLike]) -> np.ndarray:
        """Class probabilities [N, C] (sigmoid for bce, softmax for ce) from one feature array per input."""
        return self.probabilities(self.head, feats, list(zip(self.means, self.stds, strict=True)))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Head weights under ``head.``, statistics as ``mean.i`` / ``std.i``."""
        tensors = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        for i, (mean, std) in enumerate(zip(self.means, self.stds, strict=True)):
            tensors[f"mean.{i}"], tensors[f"std.{i}"] = mean, std
        return tensors

    def save(self, path: str | os.PathLike) -> None:
        """Save as one safetensors file; head shape and training summary travel in its metadata."""
        self.save_with(path, self.state_dict(), head=self.head.spec())

    @classmethod
    def load(cls, path: str | os.PathLike) -> FusionResult:
        """Inverse of ``save``."""
        tensors, info, summary = cls.read_file(path)
        head = FusionHead(**info["head"])
        head.load_state_dict({k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")})
        n = len(head.in_dims)
        means, stds = [tensors[f"mean.{i}"] for i in range(n)], [tensors[f"std.{i}"] for i in range(n)]
        return cls(head=head.eval(), means=means, stds=stds, **summary)


def _head_kwargs(cfg: FusionOptions) -> dict:
    return {"width": cfg.width, "mode": cfg.mode, "activation": cfg.activation, "dropout": cfg.dropout}


def fit_fusion(
    train_feats: Sequence[ArrayLike],
    train_y: ArrayLike,
    val_feats: Sequence[ArrayLike],
    val_y: ArrayLike,
    cfg: FusionOptions | None = None,
) -> FusionResult:
    """Fit a fusion head on one feature array per modality (same rows, same order in every array).

    Each input is standardised with its own train statistics; targets and scoring are as in ``fit_probe``
    (multi-hot + mAP for bce, int indices + top-1 for ce). Deterministic for a given ``cfg.seed``.
    """
    cfg = (cfg or FusionOptions()).for_targets(train_y)
    data = prepare(train_feats, train_y, val_feats, val_y, cfg.loss, cfg.standardize)
    with seeded(cfg.seed):
        head = FusionHead([x.shape[1] for x in data.inputs], data.num_classes, **_head_kwargs(cfg))
    init_prior_bias(head.classifier, data.targets, cfg.loss)
    inputs, val_inputs = [x[None] for x in data.inputs], [x[None] for x in data.val_inputs]
    (outcome,) = train_heads(OneHead(head), inputs, data.targets, val_inputs, data.val_targets, cfg)
    means, stds = [mean for mean, _ in data.stats], [std for _, std in data.stats]
    return FusionResult(head=head.cpu(), means=means, stds=stds, loss=cfg.loss, **vars(outcome))
