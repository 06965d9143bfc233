"""Training the embedded tiny models: the objectives learn, and a recipe reproduces its weights."""

import json

import numpy as np
import torch

from difffeat.demo.zoo import DDiTRecipe, DiTRecipe, ddit_loss, train_ddit, train_dit
from difffeat.models.ddit_load import load_ddit
from difffeat.models.dit_load import load_dit
from helpers import CAPTIONS, tiny_tokenizer

DIT = dict(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, batch_size=16, warmup=5, bf16=False)


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


def test_dit_recipe_reproduces_its_weights(tmp_path):
    a = load_dit(train_dit(blobs(), DiTRecipe(**DIT, steps=5), tmp_path / "a", log_every=0))
    b = load_dit(train_dit(blobs(), DiTRecipe(**DIT, steps=5), tmp_path / "b", log_every=0))
    c = load_dit(train_dit(blobs(), DiTRecipe(**DIT, steps=5, seed=1), tmp_path / "c", log_every=0))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_ddit_training_lowers_the_absorbing_loss_and_loads_back(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    recipe = DDiTRecipe(hidden_size=32, cond_dim=16, n_heads=2, n_blocks=2, length=16, steps=80, batch_size=16,
                        warmup=5, lr=3e-3, bf16=False)  # fmt: skip
    folder = train_ddit([[c] for c in CAPTIONS * 4], tok, recipe, tmp_path / "ddit")
    info = json.loads((folder / "recipe.json").read_text())
    assert info["final_loss"] < 0.9 * info["first_loss"]  # the 1/t weighting makes this loss noisy
    model = load_ddit(folder)
    assert model.mask_index == tok.vocab_size and model.config.kind == "mdlm"
    ids, mask, _ = tok.encode_batch(CAPTIONS, 16)
    assert torch.isfinite(ddit_loss(model, ids, mask.bool(), torch.Generator().manual_seed(0)))
