"""Iteration counts: what TAA and the Picard form buy, on the closed-form mixture and on the trained embedded DiT."""
import functools

import pytest
import torch

from models import digits
from models.adapters import DiTDenoiser
from paratAA import dit_schedule, sample_sequential, solve
from tests.conftest import gmm_problem, rms, script_noise


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("T,equations", [(25, "ddim"), (50, "ddim"), (100, "ddim"), (100, "picard")])
def test_anderson_needs_fewer_iterations_than_fixed_point(T, equations, seed):
    # at the default order (= window = T); at low orders information moves too few levels per iteration for
    # the history to help (see BENCHMARKS.md, order ablation). In the Picard form plain iteration is already
    # fast on this model (8-10 iterations): on these 4x16x16 problems TAA pays at T = 100 (10 -> 5) but not
    # always below (seed 1: 9 -> 9-10); on the trained models it pays at every T (the last test below).
    # Tolerance 1e-3: the reference's default, at which these counts were measured.
    model, schedule, noise = gmm_problem(T, latent=(4, 16, 16), seed=seed)
    iters = {m: solve(model, schedule, noise, order=T, memory_size=m, equations=equations, tol1=1e-3, tol2=1e-3,
                      model_dtype=torch.float64).iterations[0] for m in (1, 2, 3)}
    assert iters[2] < iters[1] and iters[3] < iters[1], iters


def test_default_tolerance_lands_near_sequential():
    model, schedule, noise = gmm_problem(50, latent=(4, 16, 16))
    ref = sample_sequential(model, schedule, noise, model_dtype=torch.float64)[:, 0]
    out = solve(model, schedule, noise, model_dtype=torch.float64)
    assert out.iterations[0] < 25
    assert rms(out.samples, ref) < 1e-2


def test_anderson_and_picard_form_pay_on_the_trained_model():
    """On the embedded (trained) DiT at the defaults (order = window = T, m = 3): TAA needs fewer iterations than
    plain fixed-point iteration in either form, and the Picard form fewer than the paper's DDIM form."""
    T, classes = 50, torch.arange(6)
    eps = DiTDenoiser(digits.load_embedded_dit(), 4.0)
    noise = script_noise(0, len(classes), T, (4, 4, 4))

    def iterations(equations, m):
        return sum(solve(eps, dit_schedule(T), noise, classes, equations=equations, memory_size=m,
                         tol1=3e-4, tol2=3e-4).iterations)
    taa = {f: iterations(f, 3) for f in ("picard", "ddim")}
    fp = {f: iterations(f, 1) for f in ("picard", "ddim")}
    assert taa["picard"] < fp["picard"] and taa["ddim"] < fp["ddim"], (taa, fp)
    assert taa["picard"] < taa["ddim"], taa


@pytest.mark.parametrize("seed", [6, 11])
@pytest.mark.parametrize("m", [2, 3])
def test_the_default_form_never_loses_to_the_papers(seed, m):
    """Seeds where plain Picard TAA needed more iterations than the paper's DDIM form (T = 25, the mixture): the TAA
    guard (a state whose residual grew takes the plain step) brings the default form level or ahead."""
    model, schedule, noise = gmm_problem(25, latent=(4, 32, 32), seed=seed)

    def iterations(equations, taa_guard):
        return solve(model, schedule, noise, memory_size=m, equations=equations, tol1=1e-3, tol2=1e-3, stop_tol=0,
                     taa_guard=taa_guard, model_dtype=torch.float64).iterations[0]
    assert iterations("picard", 1.5) <= iterations("ddim", 1.5)
    if (seed, m) in ((6, 2), (6, 3)):  # without the guard it lost here
        assert iterations("picard", 0.0) > iterations("ddim", 0.0)


@pytest.mark.parametrize("T, eta", [(25, 0.0), (50, 0.5), (100, 0.0)])
def test_the_stop_comes_with_the_image(T, eta):
    """The stop rule ends each sample within one iteration of the first iterate within 1% of the latent's std of
    the sequential sample (median over 4 samples) and never before it (docs/ALGORITHM.md, section 4)."""
    from paratAA.noise import noise_from_seeds
    eps = DiTDenoiser(digits.load_embedded_dit(), 4.0)
    labels = torch.tensor([2, 5, 7, 9])
    noise = noise_from_seeds([300, 301, 302, 303], T, (4, 4, 4))
    ref = sample_sequential(eps, dit_schedule(T, eta), noise, labels)[:, 0]
    out = solve(eps, dit_schedule(T, eta), noise, labels, record_x0=True)
    lags = []
    for b, h in enumerate(out.history):
        scale = float(ref[b].std())
        close = [rms(x, ref[b]) <= 0.01 * scale for x in h.x0]
        assert close[-1], f"sample {b} stopped {rms(h.x0[-1], ref[b]) / scale:.3f} std from the sequential one"
        lags.append(len(close) - 1 - close.index(True))
        assert h.stopped or h.boundary[-1] == 0
    assert sorted(lags)[len(lags) // 2] <= 1, lags


@functools.lru_cache(maxsize=1)
def mode_decision_sample():
    """Text-to-image, "a digit zero", noise seed 1300, T = 100 (found on held-out seeds, BENCHMARKS.md section 1):
    a sample whose mode decision magnifies the defects frozen on its way ~100x. Returns (eps, schedule, noise,
    cond, image_rms_to_sequential(x_0))."""
    from models.adapters import SDDenoiser, VAEDecoder
    from models.sd import EMBEDDED_SD, encode, latent_shape, load_pipeline
    from paratAA import noise_from_seeds, pipeline_schedule
    from runner.metrics import image_rms
    pipe = load_pipeline(EMBEDDED_SD, torch.device("cpu"), torch.float32)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    eps, schedule = SDDenoiser(pipe.unet, 5.0), pipeline_schedule(pipe, 100, 0.0)
    cond = encode(pipe, ["a digit zero"], "", torch.device("cpu"))
    noise = noise_from_seeds([1300], 100, latent_shape(pipe, size, size))
    decode = VAEDecoder(pipe.vae, torch.device("cpu"))
    target = decode(sample_sequential(eps, schedule, noise, cond)[:, 0].float())[0]
    return eps, schedule, noise, cond, lambda x0: image_rms(decode(x0.float())[0], target)


def test_settle_keeps_a_mode_decision_on_the_sequential_image():
    """Window T: defects frozen at the plain per-state tolerance once the window is at x_0 end the image 2.1 gray
    levels off; the default (settle 0.1) ends it on the sequential image, after the same 13 iterations (12 with
    stop_tol 0.035, the default before)."""
    from runner.metrics import SAME_IMAGE
    eps, schedule, noise, cond, off_by = mode_decision_sample()
    default, plain = solve(eps, schedule, noise, cond), solve(eps, schedule, noise, cond, settle=1.0)
    diffs = [off_by(out.samples) for out in (default, plain)]
    assert diffs[0] <= SAME_IMAGE < diffs[1], diffs
    assert default.iterations == plain.iterations == [13]


@pytest.mark.parametrize("window", [16, 30])
def test_block_test_keeps_a_sliding_window_on_the_sequential_image(window):
    """Windows below T (30: what --window_size auto picks for this model on the development CPU): the states one
    iteration freezes while the window slides each pass their tolerance, but their defects add up, and this
    sample's mode decision ends the image 1.6-1.9 gray levels off with each state tested alone (block_tol 0); the
    default block test (block_tol 1) ends it on the sequential image."""
    from runner.metrics import SAME_IMAGE
    eps, schedule, noise, cond, off_by = mode_decision_sample()
    default = solve(eps, schedule, noise, cond, window_size=window)
    alone = solve(eps, schedule, noise, cond, window_size=window, block_tol=0.0)
    diffs = [off_by(out.samples) for out in (default, alone)]
    assert diffs[0] <= SAME_IMAGE < diffs[1], diffs


def test_new_states_started_by_ddim_steps_save_iterations_at_small_windows():
    """A state the window reaches first starts from DDIM steps down from the lowest state in use (noise prediction
    held at the newest one) instead of a copy of it: fewer iterations when the window is much smaller than T."""
    T, classes = 50, torch.arange(4)
    eps = DiTDenoiser(digits.load_embedded_dit(), 4.0)
    noise = script_noise(0, len(classes), T, (4, 4, 4))
    its = {init: sum(solve(eps, dit_schedule(T), noise, classes, window_size=8, init_states=init).iterations)
           for init in ("ddim", "copy")}
    assert its["ddim"] < its["copy"], its


def test_the_stop_rule_never_ends_a_sample_where_the_window_first_reaches_x0():
    """Below order = window the stop rule is off: at window 2, order 1 the first iteration whose window reached x_0
    had E below stop_tol, the residuals not yet carried to x_0, and it ended the samples 1.5-2.2 gray levels off."""
    import numpy as np
    from models.adapters import VAEDecoder
    from paratAA import draw_noise
    eps = DiTDenoiser(digits.load_embedded_dit(), 1.0)
    schedule = dit_schedule(13, 1.0)
    g = torch.Generator().manual_seed(1301)  # as parallel_dit.py --seed 1301 --num_samples 3: labels, then noise
    labels = torch.randint(0, 10, (3,), generator=g)
    noise = draw_noise(3, 13, (4, 4, 4), g)
    seq = sample_sequential(eps, schedule, noise, labels)[:, 0]
    out = solve(eps, schedule, noise, labels, window_size=2, order=1, memory_size=1)
    for h in out.history:
        reached = [e for e in h.estimate if e == e]  # the finite estimates: iterations with the window at x_0
        assert not h.stopped or len(reached) >= 2
    decode = VAEDecoder(digits.load_embedded_vae(), torch.device("cpu"))
    images = decode(out.samples.float()).astype(np.float64), decode(seq.float()).astype(np.float64)
    assert np.sqrt(((images[0] - images[1]) ** 2).reshape(3, -1).mean(1)).max() <= 1


def test_below_order_window_the_stop_rule_is_off():
    """An update of order below the window carries each residual only that many states down, so x_0 keeps most of
    the error E counts: on the embedded flow model (window 5, order 1, T = 20) the stop rule, waiting for a
    contraction measured at x_0, ended this sample 1.25 gray levels off the sequential image (a random sweep of
    settings: 6 of 255 such samples 1.0-1.7 off). With the rule off there the per-state test ends it on the image."""
    import numpy as np
    from models.adapters import VAEDecoder
    from models.sd import EMBEDDED_FLOW, denoiser, encode, latent_shape, load_pipeline
    from paratAA import noise_from_seeds, pipeline_schedule
    pipe = load_pipeline(EMBEDDED_FLOW, torch.device("cpu"), torch.float32)
    size = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    eps, schedule = denoiser(pipe, 2.0), pipeline_schedule(pipe, 20)
    noise = noise_from_seeds([6331], 20, latent_shape(pipe, size, size))
    cond = encode(pipe, ["the number 2"], "", torch.device("cpu"))
    seq = sample_sequential(eps, schedule, noise, cond)[:, 0]
    out = solve(eps, schedule, noise, cond, window_size=5, order=1, memory_size=2, init_states="copy")
    assert not out.history[0].stopped  # the per-state test ended it
    decode = VAEDecoder(pipe.vae, torch.device("cpu"))
    ours, ref = (decode(x.float()).astype(np.float64) for x in (out.samples, seq))
    assert np.sqrt(((ours - ref) ** 2).mean()) <= 1


def test_the_stops_update_does_not_take_a_taa_step_far_beyond_the_plain_one():
    """The update of the iteration that stops is the last, and no residual checks it: at T = 10, eta 0.3 (a random
    sweep of settings) TAA's step moved x_0 of this sample from 0.59 to 2.0 gray levels off the sequential image
    after E had passed. Where TAA moves x_0 more than STOP_STEP_RATIO plain steps, the stop takes the plain one."""
    import numpy as np
    from models.adapters import VAEDecoder
    from models.sd import EMBEDDED_SD, denoiser, encode, latent_shape, load_pipeline
    from paratAA import noise_from_seeds, pipeline_schedule
    pipe = load_pipeline(EMBEDDED_SD, torch.device("cpu"), torch.float32)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    eps, schedule = denoiser(pipe, 2.0), pipeline_schedule(pipe, 10, 0.3)
    noise = noise_from_seeds([9707, 9708, 9709], 10, latent_shape(pipe, size, size))
    cond = encode(pipe, ["a handwritten 5", "digit one", "a digit four"], "", torch.device("cpu"))
    seq = sample_sequential(eps, schedule, noise, cond)[:, 0]
    out = solve(eps, schedule, noise, cond, window_size=9, memory_size=5)
    assert out.history[2].stopped  # by the stop rule, which is what is checked here
    decode = VAEDecoder(pipe.vae, torch.device("cpu"))
    ours, ref = (decode(x.float()).astype(np.float64) for x in (out.samples, seq))
    assert np.sqrt(((ours - ref) ** 2).reshape(3, -1).mean(1)).max() <= 1


class Images:
    """image_fn for the mixture: x_0 itself, times scale, counting its calls and the E each call came at."""

    def __init__(self, scale):
        self.scale, self.calls = scale, 0

    def __call__(self, x0):
        self.calls += 1
        return self.scale * x0


def test_the_image_test_judges_what_image_fn_shows():
    """With image_fn each sample has an image test (equation 7) at the first iteration whose E is contracting and at
    most IMAGE_TEST_BELOW, and at every iteration where E alone would stop, which then waits for it: an image that
    cannot move (scale 0) stops the sample at its first test; one far more sensitive than gray levels (scale 1e9)
    never, not even where E would, so the per-state test ends the run, iterate for iterate as with the stop rule
    off (the test changes no iterate). Two decodes per test."""
    from paratAA.solver import IMAGE_TEST_BELOW
    model, schedule, noise = gmm_problem(50, batch=3, latent=(4, 16, 16), eta=0.5, seed=2)
    kw = dict(model_dtype=torch.float64, record_x0=True)
    latent_rule = solve(model, schedule, noise, **kw)
    per_state = solve(model, schedule, noise, stop_tol=0, **kw)
    blind, keen = Images(0.0), Images(1e9)
    at_once = solve(model, schedule, noise, image_fn=blind, **kw)
    never = solve(model, schedule, noise, image_fn=keen, **kw)
    tests = 0
    for b in range(3):
        E = latent_rule.history[b].estimate
        first = next(k for k in range(1, len(E))
                     if E[k] <= IMAGE_TEST_BELOW and E[k] <= 0.35 * E[k - 1])
        assert at_once.iterations[b] == first + 1 and at_once.history[b].stopped
        assert latent_rule.history[b].stopped
        assert torch.equal(never.history[b].x0[-1], per_state.history[b].x0[-1])
        judged = [g for g in never.history[b].image_estimate if g == g]
        assert len(judged) >= 2 and all(g > 1.2 for g in judged), judged  # the first test, and E's stops
        tests += len(judged)
    assert never.iterations == per_state.iterations
    assert all(n > k for n, k in zip(never.iterations, latent_rule.iterations))
    assert blind.calls == 2 * 3 and keen.calls == 2 * tests


def test_a_stop_by_E_waits_for_the_image_it_would_end_on(tmp_path):
    """E is a relative latent error: how many gray levels it becomes is the decoder's. A tiny SD whose VAE decoder
    has 4x the output gain (T 12, eta 1, guidance 30, twice the default size; a stress sweep's sample): E stopped
    image 0 at 0.0236 with the image 1.34 levels off the sequential one. Where the image is given, a stop by E is
    judged on it too (equation 7) and waits: it ends on the sequential image."""
    import numpy as np
    from diffusers import StableDiffusionPipeline
    from models.pipelines import parallel_sample
    from tests.tiny_models import build_tiny_sd
    pipe = StableDiffusionPipeline.from_pretrained(build_tiny_sd(str(tmp_path / "sd"), seed=10), safety_checker=None,
                                                   requires_safety_checker=False)
    with torch.no_grad():
        pipe.vae.decoder.conv_out.weight.mul_(4.0)
        pipe.vae.decoder.conv_out.bias.zero_()
    pipe.set_progress_bar_config(disable=True)
    size = 2 * pipe.unet.config.sample_size * pipe.vae_scale_factor
    kw = dict(num_inference_steps=12, guidance_scale=30.0, eta=1.0, seed=19067, num_images=2, output_type="np",
              height=size, width=size)
    prompt = "the number five written by hand, thick strokes, centered"
    ours, seq = (np.stack(parallel_sample(pipe, prompt, **kw, **extra).images).astype(np.float64)
                 for extra in ({}, {"window_size": 1}))
    off = np.sqrt(((ours - seq) ** 2).reshape(2, -1).mean(1))
    assert off.max() <= 1, off


def test_stop_image_tol_0_is_the_latent_rule():
    model, schedule, noise = gmm_problem(25, batch=2)
    kw = dict(model_dtype=torch.float64)
    images = Images(1.0)
    a = solve(model, schedule, noise, image_fn=images, stop_image_tol=0.0, **kw)
    b = solve(model, schedule, noise, **kw)
    assert a.iterations == b.iterations and torch.equal(a.samples, b.samples) and images.calls == 0


def test_image_estimate():
    from paratAA.solver import image_estimate
    assert image_estimate(0.5, 0.01, 0.02) == pytest.approx(1.0)  # scaled by E over the update's size
    assert image_estimate(0.5, 0.04, 0.02) == 0.5                 # a step beyond E counts as it is
    assert image_estimate(0.0, 0.0, 0.0) == 0.0
    assert image_estimate(0.0, 0.0, 0.01) == float("inf")          # nothing arrived while E says it is coming


def test_image_fn_must_be_a_callable_returning_floats():
    model, schedule, noise = gmm_problem(50, latent=(4, 16, 16), eta=0.5, seed=2)  # a sample with an image test
    with pytest.raises(TypeError, match="image_fn must be callable"):
        solve(model, schedule, noise, image_fn=3, model_dtype=torch.float64)
    with pytest.raises(TypeError, match="image_fn must return a floating-point tensor"):
        solve(model, schedule, noise, image_fn=lambda x: (x > 0), model_dtype=torch.float64)


def test_the_image_stop_waits_for_an_error_still_travelling_down():
    """Text-to-image, "handwritten digit three", noise seed 303, T = 25, eta 0.5 (a design sample of the image
    rule): at iteration 5 the update changed the image by 0.69 gray levels while it was 1.54 off the sequential
    one, the rest of the error still in the noisier states. G, the change times E over the update's size, was 1.25
    there: the default (1.2) waits, and ends the sample on the sequential image; 1.3 stops it 1.5 levels off."""
    import numpy as np
    from models.adapters import SDDenoiser, VAEDecoder
    from models.sd import EMBEDDED_SD, encode, latent_shape, load_pipeline
    from paratAA import noise_from_seeds, pipeline_schedule
    pipe = load_pipeline(EMBEDDED_SD, torch.device("cpu"), torch.float32)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    eps, schedule = SDDenoiser(pipe.unet, 5.0), pipeline_schedule(pipe, 25, 0.5)
    noise = noise_from_seeds([303], 25, latent_shape(pipe, size, size))
    cond = encode(pipe, ["handwritten digit three"], "", torch.device("cpu"))
    decode = VAEDecoder(pipe.vae, torch.device("cpu"))
    seq = decode(sample_sequential(eps, schedule, noise, cond)[:, 0].float()).astype(np.float64)
    off = {}
    for tol in (1.2, 1.3):
        out = solve(eps, schedule, noise, cond, image_fn=decode.levels, stop_image_tol=tol)
        assert out.history[0].stopped
        off[tol] = float(np.sqrt(((decode(out.samples.float()).astype(np.float64) - seq) ** 2).mean()))
    assert off[1.2] <= 1 < off[1.3], off
