"""Training the embedded tiny models: a pixel-space DiT (DDPM epsilon loss) and a DDiT (absorbing-state loss).

These are the models ``difffeat demo`` runs the method on. They are trained by difffeat itself on the demo
data, with the standard objectives of the real models, so that the demo exercises exactly the code paths a
user runs on DiT-XL/2 and SEDD: the same modules, the same loaders, the same extraction.

Both trainers share one loop (:func:`_train`): AdamW, warm-up then cosine learning rate, an EMA copy of the
weights, bf16 autocast on request; only the model and its batch loss differ. The loop runs inside ``seeded`` and
``torch_threads``, and draws every random number from its own generator, so it changes no global state of the
caller (the RNG and thread count are as they were before).

Training is reproducible: a recipe (dataclass) plus a seed fixes the data order, the noise and the weights;
it stops after a fixed number of steps (not a wall-clock budget) so a rerun gives the same checkpoint on the
same software and device. Each checkpoint folder records its recipe, where it ran (device, torch version,
threads), how long it took and its losses in ``recipe.json``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import difffeat
from difffeat.models.ddit import DDiT, DDiTConfig
from difffeat.models.ddit_load import save_ddit
from difffeat.models.dit import DiT, DiTConfig
from difffeat.models.dit_load import save_dit
from difffeat.models.schedule import DDPMSchedule, LogLinearSchedule
from difffeat.utils.progress import progress
from difffeat.utils.runtime import autocast, resolve_device, seeded, torch_threads

DDIT_LOSSES = ("mdlm", "score_entropy", "ce_all")


@dataclass
class TrainRecipe:
    """What every tiny-model training shares. ``pool`` > 0 trains on that many scenes of demo world 2's
    unlabeled pool (:func:`difffeat.demo.data.make_pool`); 0 on world 1's labeled train split (the committed
    models' recipe)."""

    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    seed: int = 0
    bf16: bool = True
    num_threads: int = 2  # CPU threads; recorded because float reductions may depend on it
    device: str = "cpu"  # "auto": CUDA when present
    pool: int = 0
    pool_seed: int = 0
    hidden_size: int = 128  # the one architecture field both tiny models name alike


@dataclass
class DiTRecipe(TrainRecipe):
    """A small unconditional pixel-space DiT. It only ever sees the null label (index ``num_classes``)."""

    input_size: int = 32
    patch_size: int = 4
    in_channels: int = 3
    depth: int = 6
    num_heads: int = 4


@dataclass
class DDiTRecipe(TrainRecipe):
    """A small DDiT conditioned on sigma like SEDD. ``loss``: "mdlm" (MDLM's SUBS absorbing loss), "score_entropy"
    (SEDD's absorbing score entropy; the model is then a SEDD-kind DDiT with scale_by_sigma) or "ce_all" (plain
    cross-entropy of the clean token at every position, masked or not: a control that trains every position)."""

    steps: int = 1500
    num_threads: int = 1
    cond_dim: int = 64
    n_heads: int = 4
    n_blocks: int = 6
    length: int = 40
    vocab_size: int = 256  # tokenizer vocabulary (the model adds one [MASK] token)
    loss: str = "mdlm"

    def __post_init__(self) -> None:
        if self.loss not in DDIT_LOSSES:
            raise ValueError(f"DDiTRecipe.loss must be one of {DDIT_LOSSES}, got {self.loss!r}")


# ------------------------------------------------------------------------------------------------ the loop


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    done = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay with warm-up, ``min(decay, (1 + step) / (10 + step))``.

    A fixed 0.999 over a 1000-step run would leave 0.999^1000 = 37 % of the random initialisation in the EMA
    weights; the warm-up lets early steps replace the initialisation quickly.
    """
    return min(decay, (1 + step) / (10 + step))


def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1 - decay)


BatchLoss = Callable[[nn.Module, torch.Generator], torch.Tensor]


@dataclass
class _Trained:
    ema: nn.Module
    losses: list[float]
    seconds: float
    device: torch.device


def _train(
    build: Callable[[], nn.Module],
    batch_loss: BatchLoss,
    recipe: TrainRecipe,
    desc: str,
    log_every: int,
    max_seconds: float | None = None,
) -> _Trained:
    """The one diffusion-training loop. ``build`` makes the model (inside the recipe's seed, so the init is
    reproducible), ``batch_loss(model, gen)`` draws a batch and its noise from ``gen`` and returns the loss.
    ``max_seconds`` stops early (the recipe then records how many steps ran): a guard for a borrowed GPU."""
    device = resolve_device(recipe.device)
    with seeded(recipe.seed), torch_threads(recipe.num_threads):
        model = build().to(device).train()
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        gen = torch.Generator(device).manual_seed(recipe.seed)
        losses, start = [], time.perf_counter()
        for step in progress(range(recipe.steps), desc=desc):
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, recipe.steps, recipe.warmup, recipe.lr)
            with autocast(device, recipe.bf16):
                loss = batch_loss(model, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _ema_update(ema, model, ema_decay_at(step, recipe.ema_decay))
            losses.append(loss.detach())
            if log_every and (step + 1) % log_every == 0:
                recent = torch.stack(losses[-log_every:]).float().mean().item()
                tqdm.write(f"{desc} step {step + 1}: loss {recent:.4f} ({time.perf_counter() - start:.0f} s)")
            if max_seconds is not None and time.perf_counter() - start > max_seconds:
                break
        values = torch.stack(losses).float().cpu().tolist()
    return _Trained(ema.cpu(), values, time.perf_counter() - start, device)


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def _where(device: torch.device, recipe: TrainRecipe) -> dict:
    """Where a training ran, for recipe.json: device name, torch and CUDA versions, CPU threads."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "num_threads": recipe.num_threads,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }


def _write_recipe(folder: Path, recipe: TrainRecipe, run: _Trained, n_train: int, extra: dict) -> None:
    tail = max(1, len(run.losses) // 20)
    info = {
        "recipe": asdict(recipe),
        "difffeat_version": difffeat.__version__,
        **_where(run.device, recipe),
        "train_samples": n_train,
        "steps_done": len(run.losses),
        "seconds": round(run.seconds, 1),
        "first_loss": float(np.mean(run.losses[:tail])),
        "final_loss": float(np.mean(run.losses[-tail:])),
        **extra,
    }
    (folder / "recipe.json").write_text(json.dumps(info, indent=1) + "\n")


# ------------------------------------------------------------------------------------------------ DiT


def dit_config(recipe: DiTRecipe) -> DiTConfig:
    return DiTConfig(
        input_size=recipe.input_size,
        patch_size=recipe.patch_size,
        in_channels=recipe.in_channels,
        hidden_size=recipe.hidden_size,
        depth=recipe.depth,
        num_heads=recipe.num_heads,
        num_classes=1,
        learn_sigma=False,
    )


def train_dit(
    images: np.ndarray, recipe: DiTRecipe, out: str | Path, log_every: int = 100, max_seconds: float | None = None
) -> Path:
    """Train on uint8 images ``[N, H, W, 3]`` (H = W = recipe.input_size) with the DDPM epsilon-MSE loss."""
    device = resolve_device(recipe.device)
    x_all = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(device)  # uint8 until batched
    sched = DDPMSchedule()

    def batch_loss(model: nn.Module, gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(x_all), (recipe.batch_size,), generator=gen, device=device)
        t = torch.randint(0, sched.num_steps, (recipe.batch_size,), generator=gen, device=device)
        x0 = x_all[idx].float().div(127.5).sub(1.0)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        null = torch.full((recipe.batch_size,), model.null_class, dtype=torch.long, device=device)
        return F.mse_loss(model(sched.q_sample(x0, t, noise), t, null).float(), noise)

    run = _train(lambda: DiT(dit_config(recipe)), batch_loss, recipe, "train tiny DiT", log_every, max_seconds)
    folder = save_dit(run.ema.half(), out)
    _write_recipe(folder, recipe, run, len(x_all), {})
    return folder


# ------------------------------------------------------------------------------------------------ DDiT losses


def _absorb(model: DDiT, ids: torch.Tensor, mask: torch.Tensor, gen: torch.Generator):
    """t ~ U[eps, 1] per sequence and the absorbing corruption: each real token becomes [MASK] with probability
    (1 - eps) t (SEDD's and MDLM's forward process under the log-linear schedule). Returns t, sigma, the moved
    positions and the noisy ids."""
    sched = LogLinearSchedule()
    t = sched.eps + (1 - sched.eps) * torch.rand(len(ids), generator=gen, device=ids.device)
    move = (torch.rand(ids.shape, generator=gen, device=ids.device) < sched.mask_prob(t).float()[:, None]) & mask
    noisy = torch.where(move, torch.full_like(ids, model.mask_index), ids)
    return t, sched.sigma(t).float(), move, noisy


def mdlm_loss(model: DDiT, ids: torch.Tensor, mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """MDLM's continuous-time absorbing loss under the log-linear schedule.

    The loss is the SUBS negative log-likelihood of the masked tokens weighted by dsigma / expm1(sigma), which is
    exactly 1 / t for the log-linear schedule, averaged over real tokens. SUBS copies unmasked tokens, so only
    masked positions' outputs are trained.
    """
    t, sigma, move, noisy = _absorb(model, ids, mask, gen)
    log_p = model.log_score(noisy, sigma, attention_mask=mask)
    nll = -log_p.float().gather(-1, ids[..., None]).squeeze(-1)
    return (nll * move / t[:, None]).sum() / mask.sum()


ddit_loss = mdlm_loss  # the committed DDiT's recipe name for it


def score_entropy(score: torch.Tensor, sigma: torch.Tensor, noisy: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """SEDD's absorbing-graph score entropy per position ``[B, L]`` (graph_lib.Absorbing.score_entropy).

    ``score`` is the log score ``[B, L, V + 1]`` (the last entry is [MASK]), ``sigma`` ``[B]``. Only positions
    that were absorbed have a term: an unmasked token can move only to [MASK], a transition the absorbing graph
    never reverses, so SEDD's loss (like MDLM's) leaves unmasked positions' outputs untrained.
    """
    esigm1 = torch.where(sigma < 0.5, torch.expm1(sigma), sigma.exp() - 1)[:, None].expand_as(noisy)
    absorbed = noisy == score.shape[-1] - 1
    ratio = 1 / esigm1[absorbed]
    neg = ratio * score[absorbed].gather(-1, ids[absorbed][:, None]).squeeze(-1)
    pos = score[absorbed][:, :-1].exp().sum(-1)
    const = ratio * (ratio.log() - 1)
    entropy = torch.zeros(noisy.shape, dtype=score.dtype, device=score.device)
    entropy[absorbed] = pos - neg + const
    return entropy


def score_entropy_loss(model: DDiT, ids: torch.Tensor, mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """SEDD's training loss (losses.get_loss_fn): dsigma-weighted score entropy, here averaged over real tokens
    (SEDD sums over the sequence; the scale only moves the learning rate)."""
    sched = LogLinearSchedule()
    t, sigma, _, noisy = _absorb(model, ids, mask, gen)
    dsigma = (1 - sched.eps) / (1 - (1 - sched.eps) * t)
    score = model.log_score(noisy, sigma, attention_mask=mask).float()
    return (dsigma[:, None] * score_entropy(score, sigma, noisy, ids) * mask).sum() / mask.sum()


def ce_all_loss(model: DDiT, ids: torch.Tensor, mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Cross-entropy of the clean token at every real position of the noisy sequence, masked or not (never
    predicting [MASK]): the control in which unmasked positions' outputs are trained too (to copy)."""
    _, sigma, _, noisy = _absorb(model, ids, mask, gen)
    logits = model(noisy, sigma, attention_mask=mask).float()
    logits = logits.index_fill(-1, torch.tensor([model.mask_index], device=logits.device), -torch.inf)
    nll = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
    return (nll * mask).sum() / mask.sum()


_DDIT_LOSS_FNS = {"mdlm": mdlm_loss, "score_entropy": score_entropy_loss, "ce_all": ce_all_loss}


def ddit_config(recipe: DDiTRecipe, vocab_size: int) -> DDiTConfig:
    """SEDD's kind (scale_by_sigma, log score) for score entropy, MDLM's (SUBS) otherwise."""
    sedd = recipe.loss == "score_entropy"
    return DDiTConfig(
        vocab_size=vocab_size + 1,
        hidden_size=recipe.hidden_size,
        cond_dim=recipe.cond_dim,
        n_heads=recipe.n_heads,
        n_blocks=recipe.n_blocks,
        length=recipe.length,
        kind="sedd" if sedd else "mdlm",
        scale_by_sigma=sedd,
        time_conditioning=True,
    )


def train_ddit(
    captions: Sequence[Sequence[str]],
    tokenizer,
    recipe: DDiTRecipe,
    out: str | Path,
    log_every: int = 100,
    max_seconds: float | None = None,
) -> Path:
    """Train on every caption of every sample (batches drawn uniformly); ``tokenizer`` is a loaded difffeat
    tokenizer."""
    device = resolve_device(recipe.device)
    flat = [c for caps in captions for c in caps]
    ids_all, mask_all, n_trunc = tokenizer.encode_batch(flat, recipe.length)
    ids_all, mask_all = ids_all.to(device), mask_all.bool().to(device)
    loss_fn = _DDIT_LOSS_FNS[recipe.loss]

    def batch_loss(model: nn.Module, gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(flat), (recipe.batch_size,), generator=gen, device=device)
        ids, mask = ids_all[idx], mask_all[idx]
        if device.type == "cpu":  # rows are padded to the longest caption of all: cut to this batch's longest (on
            width = int(mask.sum(1).max())  # a GPU reading the width would sync every step; padding costs it little)
            ids, mask = ids[:, :width], mask[:, :width]
        return loss_fn(model, ids, mask, gen)

    build = lambda: DDiT(ddit_config(recipe, tokenizer.vocab_size))  # noqa: E731
    run = _train(build, batch_loss, recipe, f"train tiny DDiT ({recipe.loss})", log_every, max_seconds)
    folder = save_ddit(run.ema.half(), out)
    _write_recipe(folder, recipe, run, len(flat), {"captions_truncated": int(n_trunc)})
    return folder


# ------------------------------------------------------------------------------------------------ data


def training_data(recipe: TrainRecipe, workers: int = 1) -> tuple[np.ndarray, list[tuple[str, ...]]]:
    """Images and captions a recipe trains on: world 2's unlabeled pool, or world 1's labeled train split."""
    from difffeat.demo.data import demo_dataset, make_pool

    if recipe.pool:
        return make_pool(recipe.pool, seed=recipe.pool_seed, world=2, workers=workers)
    train = demo_dataset().split("train")
    return np.stack([s.image for s in train]), [s.captions for s in train]
