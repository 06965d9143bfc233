import math

import numpy as np
import pytest
import torch

from difffeat.models.schedule import DDPMSchedule, LogLinearSchedule, per_sample_randn, sample_seed


def test_ddpm_linear_betas_match_dit_reference_values():
    s = DDPMSchedule()
    assert s.betas.dtype == np.float64
    assert s.betas[0] == pytest.approx(1e-4) and s.betas[-1] == pytest.approx(0.02)
    # values quoted in the checkpoint reference sheet (DiT gaussian_diffusion, float64)
    assert s.alphas_cumprod[0] == pytest.approx(0.9999, abs=1e-12)
    assert s.alphas_cumprod[499] == pytest.approx(0.07859, rel=1e-3)
    assert s.alphas_cumprod[999] == pytest.approx(4.036e-5, rel=1e-3)


def test_q_sample_matches_diffusers_ddpm_add_noise():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 499, 999])
    ours = DDPMSchedule().q_sample(x0, t, eps)
    theirs = ref.add_noise(x0, eps, t)
    # diffusers builds betas in float32: agreement to float32 rounding of the coefficients
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_q_sample_hand_worked():
    s = DDPMSchedule()
    x0, eps = torch.ones(1, 1), torch.full((1, 1), 2.0)
    a = math.sqrt(s.alphas_cumprod[10])
    assert s.q_sample(x0, 10, eps).item() == pytest.approx(a + 2 * math.sqrt(1 - a * a), rel=1e-6)


@pytest.mark.parametrize("bad", [-1, 1000, 2.5, True])
def test_timestep_out_of_range_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="0..999"):
        DDPMSchedule().check_timestep(bad)


def test_per_sample_noise_does_not_depend_on_batch():
    a = per_sample_randn([4, 2], ["x", "y", "z"], seed=3, t=50)
    b = per_sample_randn([4, 2], ["z", "x"], seed=3, t=50)
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])
    assert not torch.equal(a[0], a[1])
    assert sample_seed(0, "x", 50) != sample_seed(0, "x", 51) != sample_seed(1, "x", 51)


def test_loglinear_sigma_and_mask_probability():
    s = LogLinearSchedule()
    assert float(s.sigma(0.0)) == 0.0
    assert float(s.sigma(1.0)) == pytest.approx(-math.log(1e-3))
    assert float(s.mask_prob(0.5)) == pytest.approx(0.999 * 0.5)


def test_absorbing_corruption_rate_matches_one_minus_exp_minus_sigma():
    s = LogLinearSchedule()
    ids = torch.full((400, 50), 7)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 40:] = False  # padding is never corrupted
    keys = [f"s{i}" for i in range(400)]
    out = s.corrupt(ids, mask, keys, step=300, mask_index=99, seed=0)
    rate = (out[:, :40] == 99).float().mean().item()
    p = 1 - math.exp(-float(s.sigma(0.3)))
    n = 400 * 40
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert (out[:, 40:] == 7).all()
    assert torch.equal(s.corrupt(ids, mask, keys, step=0, mask_index=99, seed=0), ids)


def test_corruption_of_a_caption_ignores_its_batch_padding():
    s = LogLinearSchedule()
    ids = torch.arange(1, 31).view(1, 30)
    alone = s.corrupt(ids[:, :10], torch.ones(1, 10, dtype=torch.bool), ["c"], 500, 0, seed=1)
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[0, :10], mask[1] = True, True
    batch = s.corrupt(torch.cat([ids, ids]), mask, ["c", "d"], 500, 0, seed=1)
    assert torch.equal(batch[0, :10], alone[0])
