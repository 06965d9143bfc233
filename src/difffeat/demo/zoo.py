"""Training the embedded tiny models: a pixel-space DiT (DDPM epsilon loss) and a DDiT (absorbing-state loss).

These are the models ``difffeat demo`` runs the method on. They are trained by difffeat itself on the demo
data, with the standard objectives of the real models, so that the demo exercises exactly the code paths a
user runs on DiT-XL/2 and SEDD: the same modules, the same loaders, the same extraction.

Training is reproducible: a recipe (dataclass) plus a seed fixes the data order, the noise and the weights;
it stops after a fixed number of steps (not a wall-clock budget) so a rerun gives the same checkpoint on the
same software. Each checkpoint folder records its recipe, time and final loss in ``recipe.json``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import difffeat
from difffeat.models.ddit import DDiT, DDiTConfig
from difffeat.models.ddit_load import save_ddit
from difffeat.models.dit import DiT, DiTConfig
from difffeat.models.dit_load import save_dit
from difffeat.models.schedule import DDPMSchedule, LogLinearSchedule
from difffeat.utils.progress import progress


@dataclass
class DiTRecipe:
    """A small unconditional pixel-space DiT. It only ever sees the null label (index ``num_classes``)."""

    input_size: int = 32
    patch_size: int = 4
    in_channels: int = 3
    hidden_size: int = 128
    depth: int = 6
    num_heads: int = 4
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    seed: int = 0
    bf16: bool = True
    num_threads: int = 2  # CPU threads; recorded because float reductions may depend on it


@dataclass
class DDiTRecipe:
    """A small DDiT trained with MDLM's absorbing-state (SUBS) loss, conditioned on sigma like SEDD."""

    hidden_size: int = 128
    cond_dim: int = 64
    n_heads: int = 4
    n_blocks: int = 6
    length: int = 40
    vocab_size: int = 256  # tokenizer vocabulary (the model adds one [MASK] token)
    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    seed: int = 0
    bf16: bool = True
    num_threads: int = 1  # CPU threads; recorded because float reductions may depend on it


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay with warm-up, ``min(decay, (1 + step) / (10 + step))``.

    A fixed 0.999 over a 1000-step run would leave 0.999^1000 = 37 % of the random initialisation in the EMA
    weights; the warm-up lets early steps replace the initialisation quickly.
    """
    return min(decay, (1 + step) / (10 + step))


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1 - decay)


def _autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def _write_recipe(folder: Path, recipe: object, extra: dict) -> None:
    info = {"recipe": asdict(recipe), "difffeat_version": difffeat.__version__, "torch": torch.__version__, **extra}
    (folder / "recipe.json").write_text(json.dumps(info, indent=1) + "\n")


def train_dit(images: np.ndarray, recipe: DiTRecipe, out: str | Path, log_every: int = 100) -> Path:
    """Train on uint8 images ``[N, H, W, 3]`` (H = W = recipe.input_size) with the DDPM epsilon-MSE loss."""
    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.num_threads)
    gen = torch.Generator().manual_seed(recipe.seed)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    cfg = DiTConfig(
        input_size=recipe.input_size,
        patch_size=recipe.patch_size,
        in_channels=recipe.in_channels,
        hidden_size=recipe.hidden_size,
        depth=recipe.depth,
        num_heads=recipe.num_heads,
        num_classes=1,
        learn_sigma=False,
    )
    model = DiT(cfg).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = DDPMSchedule()
    null = torch.full((recipe.batch_size,), model.null_class, dtype=torch.long)
    losses, start = [], time.time()
    for step in progress(range(recipe.steps), desc="train tiny DiT"):
        idx = torch.randint(0, len(x_all), (recipe.batch_size,), generator=gen)
        t = torch.randint(0, sched.num_steps, (recipe.batch_size,), generator=gen)
        noise = torch.randn(x_all[idx].shape, generator=gen)
        xt = sched.q_sample(x_all[idx], t, noise)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, recipe.steps, recipe.warmup, recipe.lr)
        with _autocast(recipe.bf16):
            loss = F.mse_loss(model(xt, t, null).float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _ema_update(ema, model, ema_decay_at(step, recipe.ema_decay))
        losses.append(loss.item())
        _log(step, losses, log_every, start)
    folder = save_dit(ema.half(), out)
    _write_recipe(folder, recipe, _summary(losses, start, len(x_all)))
    return folder


def _log(step: int, losses: Sequence[float], every: int, start: float) -> None:
    if every and (step + 1) % every == 0:
        tqdm.write(f"step {step + 1}: loss {np.mean(losses[-every:]):.4f} ({time.time() - start:.0f} s)")


def _summary(losses: Sequence[float], start: float, n_train: int) -> dict:
    tail = max(1, len(losses) // 20)
    return {
        "train_samples": n_train,
        "seconds": round(time.time() - start, 1),
        "first_loss": float(np.mean(losses[:tail])),
        "final_loss": float(np.mean(losses[-tail:])),
    }


def ddit_loss(model: DDiT, ids: torch.Tensor, mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """MDLM's continuous-time absorbing loss under the log-linear schedule.

    t ~ U[eps, 1]; each real token is masked with probability (1 - eps) t; the loss is the SUBS negative
    log-likelihood of the masked tokens weighted by dsigma / expm1(sigma), which is exactly 1 / t for the
    log-linear schedule, averaged over real tokens.
    """
    sched = LogLinearSchedule()
    t = sched.eps + (1 - sched.eps) * torch.rand(len(ids), generator=gen)
    move = (torch.rand(ids.shape, generator=gen) < sched.mask_prob(t).float()[:, None]) & mask
    noisy = torch.where(move, torch.full_like(ids, model.mask_index), ids)
    log_p = model.log_score(noisy, sched.sigma(t).float(), attention_mask=mask)
    nll = -log_p.float().gather(-1, ids[..., None]).squeeze(-1)
    weighted = nll * move / t[:, None]
    return weighted.sum() / mask.sum()


def train_ddit(
    captions: Sequence[Sequence[str]], tokenizer, recipe: DDiTRecipe, out: str | Path, log_every: int = 100
) -> Path:
    """Train on one randomly chosen caption of a sample per row; ``tokenizer`` is a loaded difffeat tokenizer."""
    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.num_threads)
    gen = torch.Generator().manual_seed(recipe.seed)
    flat = [c for caps in captions for c in caps]
    ids_all, mask_all, n_trunc = tokenizer.encode_batch(flat, recipe.length)
    mask_all = mask_all.bool()
    cfg = DDiTConfig(
        vocab_size=tokenizer.vocab_size + 1,
        hidden_size=recipe.hidden_size,
        cond_dim=recipe.cond_dim,
        n_heads=recipe.n_heads,
        n_blocks=recipe.n_blocks,
        length=recipe.length,
        kind="mdlm",
        scale_by_sigma=False,
        time_conditioning=True,
    )
    model = DDiT(cfg).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    losses, start = [], time.time()
    for step in progress(range(recipe.steps), desc="train tiny DDiT"):
        idx = torch.randint(0, len(flat), (recipe.batch_size,), generator=gen)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, recipe.steps, recipe.warmup, recipe.lr)
        with _autocast(recipe.bf16):
            loss = ddit_loss(model, ids_all[idx], mask_all[idx], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _ema_update(ema, model, ema_decay_at(step, recipe.ema_decay))
        losses.append(loss.item())
        _log(step, losses, log_every, start)
    folder = save_ddit(ema.half(), out)
    _write_recipe(folder, recipe, {**_summary(losses, start, len(flat)), "captions_truncated": int(n_trunc)})
    return folder
