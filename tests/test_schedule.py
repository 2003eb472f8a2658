"""The coefficients of equation (1) against independent derivations: diffusers' own DDIM loop and DiT's respacing."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from models.gmm import GaussianMixtureEps
from paratAA import dit_schedule, from_ddim_scheduler, sample_sequential


def sd_like_scheduler(spacing="leading", set_alpha_to_one=False):
    # Stable Diffusion v1.5's scheduler config ("leading" spacing with offset 1, last step to alphas_cumprod[0]);
    # "trailing" is SD 2.x 768's and the Turbo models' spacing
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         set_alpha_to_one=set_alpha_to_one, steps_offset=1, clip_sample=False,
                         timestep_spacing=spacing)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("T, spacing, set_alpha_to_one", [
    (10, "leading", False), (50, "leading", False), (7, "leading", True),
    # 1000 % T != 0: diffusers' step goes to t - 1000 // T, not to the next listed timestep (t = 856 after 999 at
    # T = 7), and the last step of trailing T = 7 ends at alphas_cumprod[0], not at the final alpha; the solver
    # followed the list before and missed diffusers' loop by up to 3.3 on a latent of size 15
    (7, "trailing", False), (30, "trailing", True), (3, "trailing", True), (10, "linspace", False),
    (7, "linspace", True)])
def test_sequential_equals_diffusers_ddim_loop(T, spacing, set_alpha_to_one, eta):
    # diffusers keeps alphas_cumprod in float32; give both loops the float64 product so that they differ only in
    # how they are written, not in rounding of the table
    patched = sd_like_scheduler(spacing, set_alpha_to_one)
    patched.alphas_cumprod = torch.cumprod(1 - patched.betas.double(), 0)
    patched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if set_alpha_to_one \
        else patched.alphas_cumprod[0]
    schedule = from_ddim_scheduler(patched, T, eta)
    model = GaussianMixtureEps.random(sd_like_scheduler().alphas_cumprod, (4, 8, 8), seed=3)
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(2, T + 1, 4, 8, 8, generator=g, dtype=torch.float64)
    ours = sample_sequential(model, schedule, noise, model_dtype=torch.float64)[:, 0]

    ddim = sd_like_scheduler(spacing, set_alpha_to_one)
    ddim.alphas_cumprod = patched.alphas_cumprod
    ddim.final_alpha_cumprod = patched.final_alpha_cumprod
    ddim.set_timesteps(T)
    x = noise[:, T].clone()
    for i, t in enumerate(ddim.timesteps):
        s = T - 1 - i  # our step index of this timestep
        eps = model(x, t.repeat(2))
        # (1) makes the last step deterministic (c = 0 there): diffusers' step with eta 0
        x = ddim.step(eps, t, x, eta=eta if s > 0 else 0.0, variance_noise=noise[:, s]).prev_sample
    assert torch.allclose(ours, x, atol=1e-9, rtol=0), float((ours - x).abs().max())


def _dit_spaced_diffusion(T):
    """DiT's diffusion respaced to T steps, written out as its diffusion code does it: float64 linear betas,
    space_timesteps with one section (a fractional stride accumulated and rounded), SpacedDiffusion's new betas,
    and GaussianDiffusion's cumulative products of the respaced process (final alpha 1)."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
    frac_stride = 999 / (T - 1) if T > 1 else 1
    cur, use = 0.0, set()
    for _ in range(T):
        use.add(round(cur))
        cur += frac_stride
    last, new_betas, timestep_map = 1.0, [], []
    for i, alpha_cumprod in enumerate(alphas_cumprod):
        if i in use:
            new_betas.append(1 - alpha_cumprod / last)
            last = alpha_cumprod
            timestep_map.append(i)
    ac = np.cumprod(1.0 - np.array(new_betas), axis=0)
    return timestep_map, ac, np.append(1.0, ac[:-1])


def _reference_coefficients(one_minus, one_minus_next, eta):
    """Equation (1) in the reference implementation's arithmetic (alphas recovered as 1 - (1 - A)), numpy."""
    now, nxt = np.maximum(one_minus, 0), np.maximum(one_minus_next, 0)
    sigma = np.sqrt(nxt / now) * np.sqrt(1 - (1 - now) / (1 - nxt))
    c = eta * sigma
    c[0] = 0
    a = np.sqrt(np.maximum(1 - nxt, 0)) / np.sqrt(np.maximum(1 - now, 0))
    b = np.sqrt(np.maximum(nxt - c ** 2, 0)) - np.sqrt(now) * a
    return a, b, c, sigma


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("T", [1, 2, 10, 21, 25, 50, 59, 100, 250, 1000])
def test_dit_schedule_is_dits_own_to_round_off(T, eta):
    """Float64 betas respaced as DiT does (for 278 values of T its list differs from rounding linspace(0, 999, T),
    e.g. T = 59), to 1e-12; diffusers' float32 betas would miss this by 1e-9 .. 1e-7."""
    timestep_map, ac, prev = _dit_spaced_diffusion(T)
    schedule = dit_schedule(T, eta)
    assert schedule.timesteps.tolist() == timestep_map
    for ours, ref in zip((schedule.a, schedule.b, schedule.c, schedule.sigma),
                         _reference_coefficients(1 - ac, 1 - prev, eta)):
        assert ours.dtype == torch.float64
        np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-12)


def test_coefficients_equal_the_reference_implementations():
    """Values printed by the public reference implementation's own code (DiT at T = 100, SD v1.5's scheduler at
    T = 50, eta 0)."""
    dit = dit_schedule(100)
    for got, want in [(dit.a[0], 1.0000500037503126), (dit.b[0], -0.010000500037502575),
                      (dit.a[99], 1.1057858082538288), (dit.b[99], -0.10578816881820796),
                      (dit.sigma[99], 0.4268230229750927), (dit.sigma[1], 0.009769875651682792)]:
        assert float(got) == pytest.approx(want, rel=1e-14, abs=0)
    # SD: the reference takes 1 - A in float32, here in float64 (diffusers' step uses the float32 A as it is). The
    # same where A is near 1 (step 0); at the noisiest step (A = 0.0058) within what that rounding moves: 2^-24 of
    # 1 - A is 1.0e-5 of A, and 1.3e-5 of b, whose two terms nearly cancel
    sd = from_ddim_scheduler(sd_like_scheduler(), 50)
    for got, want, rel in [(sd.a[0], 1.0004276152480363, 1e-14), (sd.b[0], -0.012141781008114992, 1e-14),
                           (sd.sigma[0], 0.020648354325774276, 1e-14), (sd.a[49], 1.1228501181338602, 2e-5),
                           (sd.b[49], -0.12325041850681007, 2e-5), (sd.sigma[49], 0.4544608199742898, 2e-5)]:
        assert float(got) == pytest.approx(want, rel=rel, abs=0)


@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_sd_coefficients_read_the_schedulers_float32_alphas(eta):
    """The scheduler's float32 alphas_cumprod as they are, which diffusers' step uses, and 1 - A taken in float64
    (the reference's SD script takes it in float32, which loses the digits of a small A: tests/test_families.py,
    small_alpha and cosine)."""
    T = 50
    sched = sd_like_scheduler()
    sched.set_timesteps(T)
    asc = sched.timesteps.flip(0).tolist()
    acp = sched.alphas_cumprod.double()                               # float32 values, as diffusers keeps them
    now = np.array([float(1 - acp[t]) for t in asc])
    nxt = np.array([float(1 - acp[0])] + [float(1 - acp[t]) for t in asc[:-1]])
    schedule = from_ddim_scheduler(sd_like_scheduler(), T, eta)
    for ours, ref in zip((schedule.a, schedule.b, schedule.c, schedule.sigma), _reference_coefficients(now, nxt, eta)):
        np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-12)


def test_the_paper_mode_solves_the_references_arithmetic():
    """SolverConfig.paper() solves SD's steps in the reference script's arithmetic (1 - A in float32: its printed
    coefficients, to 1e-14), so that its iterates are the reference's; the default solves them with the scheduler's
    A, as diffusers' loop does. Where the two differ little (SD's betas) and much (linear betas to 0.03, whose
    noisiest level 2e-7 the float32 1 - A recovers 12% low), each mode at tolerance 0 is its own sequential sample."""
    sd = from_ddim_scheduler(sd_like_scheduler(), 50).reference
    for got, want in [(sd.a[49], 1.1228501181338602), (sd.b[49], -0.12325041850681007),
                      (sd.sigma[49], 0.4544608199742898), (sd.a[0], 1.0004276152480363)]:
        assert float(got) == pytest.approx(want, rel=1e-14, abs=0)
    from paratAA import SolverConfig, draw_noise, sample_sequential, solve
    eps_fn = lambda x, t, cond: 0.5 * x + 0.1  # noqa: E731  (closed form: each step is linear)
    for scheduler in (sd_like_scheduler(), DDIMScheduler(beta_schedule="linear", beta_start=0.0005, beta_end=0.03,
                                                         timestep_spacing="trailing", clip_sample=False)):
        schedule = from_ddim_scheduler(scheduler, 10, eta=0.5)
        noise = draw_noise(2, 10, (3, 4), torch.Generator().manual_seed(0))
        runs = {}
        for mode, config, steps in [("default", SolverConfig(), schedule), ("paper", SolverConfig.paper(),
                                                                           schedule.reference)]:
            seq = sample_sequential(eps_fn, steps, noise, model_dtype=torch.float64)[:, 0]
            runs[mode] = solve(eps_fn, schedule, noise, config=config, tol1=0, tol2=0,
                               model_dtype=torch.float64).samples
            assert torch.allclose(runs[mode], seq, rtol=0, atol=1e-12 * float(seq.abs().max()))
        gap = float((runs["paper"] - runs["default"]).abs().max() / runs["default"].abs().max())
        assert 1e-9 < gap < (1e-4 if scheduler.config.beta_schedule == "scaled_linear" else 1), gap
    # where the two are the same, nothing is kept
    assert from_ddim_scheduler(DDIMScheduler(trained_betas=[0.5] * 10, num_train_timesteps=10, clip_sample=False,
                                             set_alpha_to_one=False), 5).reference is None


@pytest.mark.parametrize("spacing, T, to_one", [("linspace", 10, False), ("trailing", 7, False),
                                                ("leading", 20, True), ("leading", 50, False)])
def test_the_paper_mode_steps_to_the_next_listed_timestep(spacing, T, to_one):
    """The reference's SD script steps from each listed timestep to the next one listed, and after the last to
    alphas_cumprod[0], whatever the spacing; diffusers' DDIMScheduler.step goes to t - 1000 // T, which is another
    noise level for "linspace" and for "trailing" with 1000 % T != 0, and after the last step to alpha 1 with
    set_alpha_to_one. The paper mode solves the reference's steps (before: diffusers' there, its iterates off the
    reference's by 1-17% of the latents, its iteration counts and boundaries other at linspace); the default keeps
    diffusers' loop. Both read here from the scheduler's own alphas by those two rules."""
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0,
                              set_alpha_to_one=to_one)
    schedule = from_ddim_scheduler(scheduler, T)
    copy = DDIMScheduler.from_config(scheduler.config)
    copy.set_timesteps(T)
    listed = [int(t) for t in copy.timesteps]                          # descending, as the reference reads them
    ac = copy.alphas_cumprod                                           # float32, as the scheduler keeps them
    final = 1.0 if to_one else float(ac[0])
    for s, t in enumerate(reversed(listed)):                           # step s from timestep t (ascending order)
        nxt = listed[len(listed) - s] if s > 0 else 0                   # the next listed one (0 after the last)
        one_minus, one_minus_next = float(1 - ac[t]), float(1 - ac[nxt])  # the reference's float32 1 - A
        A, A_next = 1 - one_minus, 1 - one_minus_next
        assert float(schedule.reference.a[s]) == pytest.approx((A_next / A) ** 0.5, rel=1e-12)
        assert float(schedule.reference.b[s]) == pytest.approx(
            one_minus_next ** 0.5 - (A_next / A) ** 0.5 * one_minus ** 0.5, rel=1e-9, abs=1e-12)
        # the default: diffusers' step, from the scheduler's A as it is
        prev = t - 1000 // T
        A, A_next = float(ac[t]), float(ac[prev]) if prev >= 0 else final
        assert float(schedule.a[s]) == pytest.approx((A_next / A) ** 0.5, rel=1e-12)


def test_final_alpha_is_read_from_the_scheduler():
    # SD: the last step goes to alphas_cumprod[0], not to 1
    sd = from_ddim_scheduler(sd_like_scheduler(), 20)
    ac = sd_like_scheduler().alphas_cumprod                                   # the scheduler's own (float32)
    ac0, A = float(ac[0]), float(ac[sd.timesteps[0]])
    assert float(sd.a[0]) == pytest.approx((ac0 / A) ** 0.5, rel=1e-12)
    assert float(dit_schedule(20).sigma[0]) == 0.0  # final alpha 1: the last step is deterministic


@pytest.mark.parametrize("bad, name", [(0, "timesteps"), (1001, "timesteps"), (2.5, "timesteps")])
def test_bad_number_of_steps(bad, name):
    with pytest.raises(ValueError, match=name):
        dit_schedule(bad)


@pytest.mark.parametrize("eta", [-0.1, float("nan"), float("inf"), 1.01])
def test_bad_eta(eta):
    with pytest.raises(ValueError, match="eta"):
        dit_schedule(10, eta)


@pytest.mark.parametrize("config", [dict(beta_schedule="linear", beta_end=5.0),   # 1 - beta < 0: alphas negative
                                    dict(trained_betas=[0.0] * 1000)])             # no noise: 1 - A = 0
def test_noise_levels_without_a_ddim_step_are_refused(config):
    """Coefficients computed from them would be inf or NaN, and a NaN residual passes every convergence test."""
    with pytest.raises(ValueError, match=r"no usable DDIM step \d+ \(model timestep"):
        from_ddim_scheduler(DDIMScheduler(**config, clip_sample=False), 10)


def test_a_spacing_below_timestep_0_is_refused():
    """A negative steps_offset made the first step read alphas_cumprod[-5], the end of the list: silently wrong."""
    with pytest.raises(ValueError, match="steps_offset -5.*model timestep -5, below 0"):
        from_ddim_scheduler(DDIMScheduler(steps_offset=-5, clip_sample=False), 10)


@pytest.mark.parametrize("key", ["clip_sample", "thresholding", "rescale_betas_zero_snr"])
def test_a_scheduler_whose_steps_are_not_linear_is_refused(key):
    """diffusers' DDIMScheduler() clips x_0 by default: its loop then differs from equation (1), which pipeline_schedule
    and from_ddim_scheduler built without a word (the scripts and parallel_sample refused such a folder)."""
    with pytest.raises(ValueError, match=f"scheduler sets {key}"):
        from_ddim_scheduler(DDIMScheduler.from_config(sd_like_scheduler().config, **{key: True}), 10)


def test_helpers_name_a_bad_argument():
    """Each raised a torch or attribute error that named nothing, or (seeds) gave two seeds one noise silently."""
    from paratAA import draw_noise, flow_schedule, noise_from_seeds
    cases = [(lambda: draw_noise(1, -5, (2,)), ValueError, "T must be"),
             (lambda: draw_noise(1, 10, (-2,)), ValueError, "latent must be"),
             (lambda: noise_from_seeds([-1], 5, (2,)), ValueError, "seeds must be integers in 0..2"),
             (lambda: noise_from_seeds([1.7], 5, (2,)), ValueError, "seeds must be"),
             (lambda: noise_from_seeds([2 ** 64], 5, (2,)), ValueError, "seeds must be"),
             (lambda: from_ddim_scheduler("x", 10), TypeError, "scheduler must be a diffusers scheduler"),
             (lambda: flow_schedule(DDIMScheduler(), 10), TypeError, "scheduler must be a flow-matching scheduler"),
             (lambda: dit_schedule(10, num_train=0), ValueError, "num_train")]
    for call, error, text in cases:
        with pytest.raises(error, match=text):
            call()
    assert torch.equal(noise_from_seeds([np.uint64(5)], 5, (2,)), noise_from_seeds([5], 5, (2,)))


def test_the_callers_scheduler_keeps_its_timesteps():
    """from_ddim_scheduler and flow_schedule called set_timesteps on the scheduler given: a user's scheduler set to
    50 steps was left at 10."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from paratAA import flow_schedule
    for sched, make in ((sd_like_scheduler(), from_ddim_scheduler), (FlowMatchEulerDiscreteScheduler(shift=3.0),
                                                                      flow_schedule)):
        sched.set_timesteps(50)
        before = sched.timesteps.clone()
        assert make(sched, 10).num_steps == 10
        assert torch.equal(sched.timesteps, before)
