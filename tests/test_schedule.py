"""The coefficients of equation (1) against independent derivations: diffusers' own DDIM loop and DiT's respacing."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from models.gmm import GaussianMixtureEps
from paratAA import dit_schedule, from_ddim_scheduler, sample_sequential


def sd_like_scheduler():
    # Stable Diffusion v1.5's scheduler config ("leading" spacing with offset 1, last step to alphas_cumprod[0])
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         set_alpha_to_one=False, steps_offset=1, clip_sample=False, timestep_spacing="leading")


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("T", [10, 50])
def test_sequential_equals_diffusers_ddim_loop(T, eta):
    schedule = from_ddim_scheduler(sd_like_scheduler(), T, eta)
    model = GaussianMixtureEps.random(sd_like_scheduler().alphas_cumprod, (4, 8, 8), seed=3)
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(2, T + 1, 4, 8, 8, generator=g, dtype=torch.float64)
    ours = sample_sequential(model, schedule, noise, model_dtype=torch.float64)[:, 0]

    ddim = sd_like_scheduler()
    # diffusers keeps alphas_cumprod in float32; give it the float64 product so that the loops differ only
    # in how they are written, not in rounding of the table
    ddim.alphas_cumprod = torch.cumprod(1 - ddim.betas.double(), 0)
    ddim.final_alpha_cumprod = ddim.alphas_cumprod[0]
    ddim.set_timesteps(T)
    x = noise[:, T].clone()
    for i, t in enumerate(ddim.timesteps):
        s = T - 1 - i  # our step index of this timestep
        eps = model(x, t.repeat(2))
        # (1) makes the last step deterministic (c = 0 there): diffusers' step with eta 0
        x = ddim.step(eps, t, x, eta=eta if s > 0 else 0.0, variance_noise=noise[:, s]).prev_sample
    assert torch.allclose(ours, x, atol=1e-9, rtol=0), float((ours - x).abs().max())


def _dit_respacing(T, n=1000):
    # DiT/ADM space_timesteps for one section: accumulate a fractional stride and round
    stride = (n - 1) / (T - 1) if T > 1 else 0
    idx, taken = 0.0, []
    for _ in range(T):
        taken.append(round(idx))
        idx += stride
    return sorted(set(taken))


@pytest.mark.parametrize("T", [2, 25, 50, 100, 250])
def test_dit_schedule_matches_respaced_diffusion(T):
    schedule = dit_schedule(T, eta=0.3)
    used = _dit_respacing(T)
    assert schedule.timesteps.tolist() == used
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    ac = np.cumprod(1 - betas)[used]
    ac_prev = np.concatenate([[1.0], ac[:-1]])
    sigma = np.sqrt((1 - ac_prev) / (1 - ac)) * np.sqrt(1 - ac / ac_prev)
    a = np.sqrt(ac_prev / ac)
    c = 0.3 * sigma
    c[0] = 0
    b = np.sqrt(1 - ac_prev - c ** 2) - a * np.sqrt(1 - ac)
    for ours, ref in [(schedule.a, a), (schedule.b, b), (schedule.c, c), (schedule.sigma, sigma)]:
        assert ours.dtype == torch.float64
        np.testing.assert_allclose(ours.numpy(), ref, rtol=2e-5, atol=1e-7)


def test_final_alpha_is_read_from_the_scheduler():
    # SD: the last step goes to alphas_cumprod[0], not to 1
    sd = from_ddim_scheduler(sd_like_scheduler(), 20)
    ac = torch.cumprod(1 - sd_like_scheduler().betas.double(), 0)
    ac0, A = float(ac[0]), float(ac[sd.timesteps[0]])
    assert float(sd.a[0]) == pytest.approx((ac0 / A) ** 0.5, rel=1e-12)
    assert float(dit_schedule(20).sigma[0]) == 0.0  # final alpha 1: the last step is deterministic


@pytest.mark.parametrize("bad, name", [(0, "timesteps"), (1001, "timesteps"), (2.5, "timesteps")])
def test_bad_number_of_steps(bad, name):
    with pytest.raises(ValueError, match=name):
        dit_schedule(bad)


@pytest.mark.parametrize("eta", [-0.1, float("nan"), float("inf")])
def test_bad_eta(eta):
    with pytest.raises(ValueError, match="eta"):
        dit_schedule(10, eta)
