"""Training the embedded tiny models: the objectives learn, match their references, a recipe reproduces its weights
and records where it ran, and training leaves the caller's global state alone."""

import json
import math

import numpy as np
import pytest
import torch

from difffeat.demo.zoo import (
    DDiTRecipe,
    DiTRecipe,
    _absorb,
    ce_all_loss,
    ddit_config,
    dit_config,
    mdlm_loss,
    score_entropy,
    score_entropy_loss,
    train_ddit,
    train_dit,
    training_data,
)
from difffeat.models.ddit import DDiT, DDiTConfig
from difffeat.models.ddit_load import load_ddit
from difffeat.models.dit_load import load_dit
from difffeat.run.demo import ZOO
from helpers import CAPTIONS, tiny_tokenizer

DIT = dict(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, batch_size=16, warmup=5, bf16=False)
DDIT = dict(hidden_size=32, cond_dim=16, n_heads=2, n_blocks=2, length=16, batch_size=16, warmup=5, bf16=False)


def blobs(n=64, seed=0):
    """Images with one bright square: easy structure for the denoiser to learn."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 8, 8, 3), dtype=np.uint8)
    for i, (r, c) in enumerate(rng.integers(0, 5, size=(n, 2))):
        x[i, r : r + 3, c : c + 3] = 255
    return x


def test_dit_training_lowers_the_loss_and_loads_back(tmp_path):
    folder = train_dit(blobs(), DiTRecipe(**DIT, steps=60, lr=3e-3), tmp_path / "dit", log_every=0)
    info = json.loads((folder / "recipe.json").read_text())
    assert info["final_loss"] < 0.8 * info["first_loss"]
    model = load_dit(folder)
    assert model.null_class == 1 and model.config.learn_sigma is False


@pytest.mark.parametrize("folder", sorted(p.name for p in ZOO.iterdir()))
def test_each_committed_recipe_json_loads_as_a_recipe_and_rebuilds_its_model_config(folder):
    recipe = json.loads((ZOO / folder / "recipe.json").read_text())["recipe"]
    if "depth" in recipe:
        assert dit_config(DiTRecipe(**recipe)) == load_dit(ZOO / folder).config
    else:
        r = DDiTRecipe(**recipe)
        assert ddit_config(r, r.vocab_size) == load_ddit(ZOO / folder).config


def test_recipe_records_where_and_how_long_it_ran(tmp_path):
    folder = train_dit(blobs(), DiTRecipe(**DIT, steps=3, num_threads=1), tmp_path / "dit", log_every=0)
    info = json.loads((folder / "recipe.json").read_text())
    assert info["device"] == "cpu" and info["torch"] == torch.__version__ and info["num_threads"] == 1
    assert info["steps_done"] == 3 and info["seconds"] >= 0.0 and info["train_samples"] == 64  # rounded to 0.1 s
    assert info["recipe"]["steps"] == 3 and info["recipe"]["pool"] == 0


def test_max_seconds_stops_early_and_says_so(tmp_path):
    folder = train_dit(blobs(), DiTRecipe(**DIT, steps=10_000), tmp_path / "dit", log_every=0, max_seconds=0.0)
    assert json.loads((folder / "recipe.json").read_text())["steps_done"] == 1


def test_dit_recipe_reproduces_its_weights(tmp_path):
    a = load_dit(train_dit(blobs(), DiTRecipe(**DIT, steps=5), tmp_path / "a", log_every=0))
    b = load_dit(train_dit(blobs(), DiTRecipe(**DIT, steps=5), tmp_path / "b", log_every=0))
    c = load_dit(train_dit(blobs(), DiTRecipe(**DIT, steps=5, seed=1), tmp_path / "c", log_every=0))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_training_changes_no_global_state(tmp_path):
    """The RNG and thread count after training are what they were before, for both trainers."""
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    state = torch.get_rng_state()
    train_dit(blobs(), DiTRecipe(**DIT, steps=2, num_threads=max(1, threads - 1) if threads > 1 else 2), tmp_path / "a")
    tok = tiny_tokenizer(tmp_path)
    train_ddit([[c] for c in CAPTIONS], tok, DDiTRecipe(**DDIT, steps=2, num_threads=threads + 1), tmp_path / "b")
    assert torch.equal(torch.get_rng_state(), state) and torch.get_num_threads() == threads


@pytest.mark.parametrize(("loss", "kind", "drop"), [("mdlm", "mdlm", 0.9), ("score_entropy", "sedd", 0.9),
                                                    ("ce_all", "mdlm", 0.8)])  # fmt: skip
def test_ddit_training_lowers_each_loss_and_loads_back(tmp_path, loss, kind, drop):
    tok = tiny_tokenizer(tmp_path)
    recipe = DDiTRecipe(**DDIT, steps=80, lr=3e-3, loss=loss)
    folder = train_ddit([[c] for c in CAPTIONS * 4], tok, recipe, tmp_path / "ddit", log_every=0)
    info = json.loads((folder / "recipe.json").read_text())
    assert info["final_loss"] < drop * info["first_loss"]  # the 1/t weighting makes the absorbing losses noisy
    model = load_ddit(folder)
    assert model.mask_index == tok.vocab_size and model.config.kind == kind
    assert model.config.scale_by_sigma == (loss == "score_entropy")


def _sedd_score_entropy(score, sigma, x, x0):
    """graph_lib.Absorbing.score_entropy of louaaron/Score-Entropy-Discrete-Diffusion, verbatim (``self.dim`` is
    the vocabulary with the absorbing state, ``sigma`` is ``[B, 1]``): the reference."""
    dim = score.shape[-1]
    rel_ind = x == dim - 1
    esigm1 = torch.where(sigma < 0.5, torch.expm1(sigma), torch.exp(sigma) - 1)
    ratio = 1 / esigm1.expand_as(x)[rel_ind]
    other_ind = x0[rel_ind]
    neg_term = ratio * torch.gather(score[rel_ind], -1, other_ind[..., None]).squeeze(-1)
    pos_term = score[rel_ind][:, :-1].exp().sum(dim=-1)
    const = ratio * (ratio.log() - 1)
    entropy = torch.zeros(*x.shape, device=x.device)
    entropy[rel_ind] += pos_term - neg_term + const
    return entropy


def test_score_entropy_matches_sedd_and_is_minimal_at_the_true_score():
    gen = torch.Generator().manual_seed(0)
    vocab, b, n = 9, 4, 7  # 8 tokens + [MASK] = 8
    x0 = torch.randint(0, vocab - 1, (b, n), generator=gen)
    sigma = torch.tensor([0.05, 0.3, 0.7, 2.0])
    x = torch.where(torch.rand(b, n, generator=gen) < 0.5, torch.full_like(x0, vocab - 1), x0)
    score = torch.randn(b, n, vocab, generator=gen)
    ours = score_entropy(score, sigma, x, x0)
    torch.testing.assert_close(ours, _sedd_score_entropy(score, sigma[:, None], x, x0))
    assert (ours[x != vocab - 1] == 0).all()
    # The minimiser over the score at a masked position is log(ratio) at the clean token and -inf elsewhere:
    # there the entropy is 0, and any other score gives more.
    best = torch.full_like(score, -30.0)
    esigm1 = torch.expm1(sigma)[:, None, None].expand(b, n, 1)
    best.scatter_(-1, x0[..., None], (1 / esigm1).log())
    at_best = score_entropy(best, sigma, x, x0)
    assert at_best.abs().max() < 1e-5 and (ours[x == vocab - 1] > 1e-3).all()


def test_losses_train_the_positions_they_claim():
    """MDLM and score entropy give no gradient through unmasked positions' outputs; ce_all does."""
    ids = torch.randint(0, 20, (8, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids, dtype=torch.bool)
    for loss, kind in ((mdlm_loss, "mdlm"), (score_entropy_loss, "sedd"), (ce_all_loss, "mdlm")):
        torch.manual_seed(0)
        cfg = DDiTConfig(vocab_size=21, hidden_size=16, cond_dim=8, n_heads=2, n_blocks=1, length=10, kind=kind,
                         scale_by_sigma=kind == "sedd")  # fmt: skip
        model = DDiT(cfg)
        grads = {}

        def keep_grad(module, inputs, output, grads=grads):
            output.register_hook(lambda g: grads.update(g=g))

        model.output_layer.register_forward_hook(keep_grad)
        loss(model, ids, mask, torch.Generator().manual_seed(3)).backward()
        _, _, move, _ = _absorb(model, ids, mask, torch.Generator().manual_seed(3))  # the same draws
        assert move.any() and (~move).any()
        per_position = grads["g"].abs().sum(-1)
        assert bool((per_position[move] > 0).all())
        assert bool((per_position[~move] > 0).any()) == (loss is ce_all_loss), loss.__name__


def test_training_data_pool_or_world_1(monkeypatch):
    import difffeat.demo.data as dd

    calls = []
    monkeypatch.setattr(dd, "make_pool", lambda n, **kw: calls.append((n, kw)) or (np.zeros((n, 32, 32, 3)), []))
    images, _ = training_data(DiTRecipe(pool=7, pool_seed=2), workers=3)
    assert len(images) == 7 and calls == [(7, {"seed": 2, "world": 2, "workers": 3})]


def test_mdlm_and_score_entropy_agree_at_the_uniform_prediction():
    """Hand-worked: with zero logits SUBS predicts uniformly over the N - 1 real tokens (NLL log(N - 1)), and SEDD's
    scaled score gives entropy ratio * log(N - 1) with ratio = 1 / expm1(sigma), weighted by dsigma: 1 / t, MDLM's
    weight. So on the same draws both losses are the mean over real tokens of move * log(N - 1) / t."""
    ids = torch.randint(0, 20, (6, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids, dtype=torch.bool)
    values = []
    for loss, kind in ((mdlm_loss, "mdlm"), (score_entropy_loss, "sedd")):
        model = DDiT(DDiTConfig(vocab_size=21, hidden_size=16, cond_dim=8, n_heads=2, n_blocks=1, length=9,
                                kind=kind, scale_by_sigma=kind == "sedd"))  # fmt: skip
        assert not model.output_layer.linear.weight.any()  # zero-initialised output: logits are all 0
        values.append(loss(model, ids, mask, torch.Generator().manual_seed(4)).item())
    t, _, move, _ = _absorb(model, ids, mask, torch.Generator().manual_seed(4))
    expected = (move * math.log(20) / t[:, None]).sum().item() / mask.sum().item()
    assert values == pytest.approx([expected, expected], rel=1e-5)
