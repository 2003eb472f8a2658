"""ParaTAA: windowed fixed-point iteration with triangular Anderson acceleration (docs/ALGORITHM.md, sections 3-4).

Each iteration evaluates the model once, in one batch, at the `window_size` noisiest unfrozen states of every
sample, tests each state's order-1 residual, freezes what has converged and updates the rest. Solver state is
float64; the model runs in its own dtype.

The test (docs/ALGORITHM.md, section 4): a state converges at RMS(residual) <= its tolerance; while the window is
short of x_0 the states that would freeze together must also pass as a block (block_tol), and once it reaches x_0
a state must settle first (settle), and the stop rule may end the sample: by x_0's estimated error (stop_tol) or,
where the caller shows the solver the sample's image, by a test of the image (stop_image_tol), which also
judges every stop by E.

Boundary rule. After the test, with p the highest (noisiest) unconverged state of the window:
  - states above p passed the test and are frozen at the values that passed it;
  - p takes the plain order-k update, computed from frozen values only, so it is final and is frozen too;
  - states below p take the TAA update (or the plain one when memory_size = 1).
When every state of the window passes, all of them take one more plain order-k update (it needs no model call and
brings the sample closer to the sequential one) and are frozen. So the boundary drops by at least one state per
iteration: never more than T iterations, whatever TAA does, and the guarantee does not rest on a residual coming
out exactly zero in floating point.

Where this departs from the public reference implementation, and what each departure changes, is listed in
docs/ALGORITHM.md (section "Departures from the reference").
"""
import bisect
import itertools
import math
from dataclasses import dataclass, field, replace

import torch

from .anderson import AndersonMemory
from .config import SolverConfig, is_integer
from .denoiser import check_finite, check_init, check_problem, evaluate, select
from .equations import OrderKEquations
from .planner import plan_window
from .sequential import sample_sequential
from .sharding import Sharding


@dataclass
class SampleHistory:
    """Per-iteration record of one sample (index k is iteration k + 1)."""
    residual: list = field(default_factory=list)     # max RMS order-1 residual over the window
    boundary: list = field(default_factory=list)     # frozen boundary after the iteration (0: done)
    evaluations: list = field(default_factory=list)  # model evaluations in the iteration (window inputs)
    fallbacks: list = field(default_factory=list)    # states whose TAA problem was unusable (plain step)
    x0: list = field(default_factory=list)           # x_0 estimate before iteration 1 and after each one
    estimate: list = field(default_factory=list)     # stop rule's E / std(x_0) (nan: window short of x_0)
    image_estimate: list = field(default_factory=list)  # the image test's G, gray levels (nan: no test)
    stopped: bool = False                            # ended by the stop rule (not by the boundary reaching 0)


@dataclass
class SolveResult:
    samples: torch.Tensor       # [B, *latent] float64, x_0
    trajectory: torch.Tensor    # [B, T+1, *latent] float64, x_0 .. x_T
    iterations: list            # per sample: model calls it took part in
    converged: list             # per sample: x_0 frozen before max_steps ran out
    evaluations: list           # per sample: total model evaluations (a guided evaluation counts once)
    history: list               # per sample: SampleHistory
    config: SolverConfig = None  # the values used (window_size and order resolved for T)
    plan: object = None          # planner.Plan when window_size was "auto"

    @property
    def max_iterations(self):
        return max(self.iterations) if self.iterations else 0


STOP_STEP_RATIO = 1.25  # the largest TAA step on x_0, in plain steps, that the stop's final update takes
# The image test (equation 7) is made first at the first iteration whose E is contracting and at most this (and
# above stop_tol, where E alone stops), then at each stop by E: two decodes a test. On the design samples a test at
# E <= 0.05-0.07 stopped more of them one iteration after the image was final than one at 0.1, where the image was
# more often not yet final and the test, failing, left the stop to E (BENCHMARKS.md, section 1)
IMAGE_TEST_BELOW = 0.07


def image_estimate(change, moved, estimate):
    """The image stop rule's G (docs/ALGORITHM.md, equation 7): how far, in the image's units (gray levels), the
    image before the iteration's update is from the final one. change: RMS change of the image in the update;
    moved: RMS change of x_0 in it, over std(x_0); estimate: E. The update moves x_0 by about the error E counts,
    less what cancels or has not reached x_0 yet (an error still travelling down the window), so the image change
    is scaled by E / moved (>= 1: a TAA step larger than E counts as it is). An update that moved nothing is an
    error that has not arrived (inf) unless E is 0 too."""
    if moved <= 0:
        return 0.0 if estimate <= 0 and change <= 0 else math.inf
    return change * max(1.0, estimate / moved)


def image_test_due(estimate, previous, stop_ratio):
    """Whether a sample not yet tested takes its one image test (equation 7) at this iteration: E contracting
    (<= stop_ratio of the previous iteration's) and at most IMAGE_TEST_BELOW."""
    return estimate <= IMAGE_TEST_BELOW and estimate <= stop_ratio * previous


def stop_rule(estimate, previous, stop_tol, stop_ratio, carried=True):
    """The stop rule (docs/ALGORITHM.md, equation 6): x_0's estimated remaining error E is small (<= stop_tol of
    its scale) and contracting (<= stop_ratio of the previous iteration's E; inf when the window did not reach x_0
    then). carried: each update carries every residual of the window down to x_0 (order >= the window), which is
    what makes x_0 after the update much closer than E: E is x_0's error before it. With a lower order a residual
    moves order states an update, x_0 keeps most of the error E counts, and the rule is off (the per-state test
    decides): with order 1 it ended 13-21 of 64 embedded DiT runs 1-2.5 gray levels off at windows 2-4 when it fired
    at the first iteration at x_0, and, when it waited for a contraction measured there, still 6 of 255 embedded
    flow-model samples 1.0-1.7 levels off (a random sweep of settings). It ends a sample and changes no iterate
    but, rarely, the x_0 of the update it ends on (STOP_STEP_RATIO: none of 300 held-out samples), so a run recorded
    with the rule off tells where any (stop_tol, stop_ratio) would have stopped it (benchmarks/stop_sweep.py)."""
    return carried and stop_tol > 0 and estimate <= stop_tol and estimate <= stop_ratio * previous


def check_variation_steps(variation_steps, T):
    """A warm start re-solves the last variation_steps of T steps."""
    V = variation_steps
    if not is_integer(V) or not 1 <= V <= T:
        raise ValueError(f"variation_steps must be an integer in 1..{T}, got {V!r}")


def state_bytes(config, T, D, batch):
    """Bytes the solver allocates for `batch` samples of D latent values at T steps (config resolved for T):
    the states, the TAA memory (last iterate and residual, m - 1 difference columns of each per state), the
    per-iteration temporaries of the window, and the ddim form's product matrices. The noise is the caller's."""
    per_sample = (T + 1) + 6 * min(config.window_size, T)
    if config.memory_size > 1:
        per_sample += 2 * config.memory_size * T
    matrices = 2 * (T + 1) ** 2 if config.equations == "ddim" and config.order > 1 else 0
    return 8 * (batch * D * per_sample + matrices)


@torch.no_grad()  # nothing here is differentiated; an eps_fn needing gradients enables them (denoiser.py)
def solve(eps_fn, schedule, noise, cond=None, config=None, *, init=None, variation_steps=None,
          model_dtype=torch.float32, sharding=None, record_x0=False, callback=None, image_fn=None, **overrides):
    """Solve the triangular DDIM system of B independent samples in parallel.

    eps_fn: noise prediction (see denoiser.py). schedule: paratAA.Schedule with T steps.
    noise: [B, T+1, *latent], xi[s] for step s and noise[:, T] = x_T (float64 recommended; paratAA.noise).
    cond: per-sample conditioning, [B, ...] tensor or dict of them, or None.
    config: a SolverConfig (default: SolverConfig()); keyword overrides of its fields are applied on top,
        e.g. solve(eps_fn, schedule, noise, window_size=8, memory_size=2).
    init, variation_steps: warm start. init [B, T+1, *latent] is an existing trajectory (same noise); its
    noisiest T - variation_steps states stay frozen and the rest are re-solved starting from init's values.
    sharding: paratAA.Sharding splitting each model call across processes (default: this process only).
    record_x0: keep the x_0 estimate (the lowest state reached) before and after every iteration.
    callback(iteration, boundaries): called after every iteration, e.g. for a progress bar.
    image_fn(x0 [1, *latent] float64) -> the sample's image as a float tensor in gray levels (e.g. a VAE decode,
        not rounded): the stop rule may then also stop a sample by its image (stop_image_tol, equation 7), and a
        stop by E waits for the image to pass it; each test calls image_fn twice; every process calls it, and the
        main one's result decides.
    """
    if isinstance(cond, SolverConfig):
        raise TypeError("solve(eps_fn, schedule, noise, cond, config): the fourth argument is the conditioning; "
                        "pass the SolverConfig as config=...")
    check_problem(eps_fn, schedule, noise, cond, model_dtype, sharding, callback)
    if not isinstance(record_x0, bool):  # "yes" (or "no", which a truth test reads as yes) was taken for True
        raise TypeError(f"record_x0 must be True or False, got {record_x0!r}")
    if image_fn is not None and not callable(image_fn):
        raise TypeError(f"image_fn must be callable (x_0 latents -> image) or None, got {type(image_fn).__name__}")
    T = schedule.num_steps
    config = SolverConfig.with_overrides(config, overrides, "solve").resolve(T)
    solved = schedule.solved(config.reference_quirks)  # the paper mode: the reference's arithmetic of the steps
    if solved is not schedule:  # from_ddim_scheduler's, or a hand-built one: checked as the schedule given
        check_problem(eps_fn, solved, noise, cond, model_dtype, sharding, callback)
        schedule = solved
    if variation_steps is not None:
        check_variation_steps(variation_steps, T)
    if (init is None) != (variation_steps is None):
        raise ValueError("a warm start needs both init and variation_steps")
    if init is not None:
        check_init(init, noise)
    plan = None
    if config.window_size == "auto":  # measure the model on this hardware and choose (planner.py)
        plan = plan_window(eps_fn, schedule, noise, cond, config, sharding or Sharding(), model_dtype, solve=solve,
                           steps=variation_steps)  # a warm start re-solves only its last variation_steps
        config = replace(config, window_size=plan.window).resolve(T)
    window_size, order, memory_size = config.window_size, config.order, config.memory_size
    lam, tol1, tol2, max_steps = config.lam, config.tol1, config.tol2, config.max_iterations
    # the stop rule (docs/ALGORITHM.md): off with tolerance 0, so that tolerance 0 still solves exactly
    stop_tol = 0.0 if config.exact else config.stop_tol
    stop_ratio, taa_guard = config.stop_ratio, config.taa_guard
    carried = order >= min(window_size, T)  # each update carries every residual to x_0 (stop_rule)
    # the image test (equation 7), where the caller can show the solver its image
    by_image = image_fn is not None and stop_tol > 0 and config.stop_image_tol > 0 and carried
    sharding = sharding or Sharding()
    if window_size == 1:  # one state per iteration is sequential sampling itself: no solver work is needed
        return _one_state_per_iteration(eps_fn, schedule, noise, cond, config, init, variation_steps, model_dtype,
                                        sharding, record_x0, callback, plan)
    device = noise.device
    sched = schedule.to(device)
    a_col, b_col, c_col = sched.a[:, None], sched.b[:, None], sched.c[:, None]          # [T, 1] each
    noisy = bool((sched.c != 0).any())
    eq = OrderKEquations(schedule, order, config.equations, device=device)
    B, latent = noise.shape[0], tuple(noise.shape[2:])
    xi = noise.to(torch.float64).flatten(2)                                   # [B, T+1, D]

    if init is None:
        X = torch.zeros_like(xi)                                              # [B, T+1, D]
        X[:, T] = xi[:, T]
        top = T
    else:
        X = init.to(device, torch.float64).flatten(2).clone()
        top = variation_steps
    boundary = [top] * B      # states >= boundary are frozen
    # weight of state s's order-1 residual in x_0 under the DDIM composition: P(0, s) = a_0 ... a_{s-1}
    carry = torch.cat([torch.ones(1, dtype=torch.float64, device=device), torch.cumprod(sched.a[:-1], 0)])
    positions = torch.arange(T, dtype=torch.float64, device=device)         # window positions, for the test
    one = torch.ones((), dtype=torch.float64, device=device)
    last_estimate = [math.inf] * B
    tested = [False] * B  # the sample had its first image test (equation 7)
    threshold = torch.clamp(tol2 * sched.sigma, min=tol1)                    # [T] per-state tolerance
    # slide_tol (opt-in): while the window is short of x_0 its slide is what costs iterations, so the test is
    # loosened there, scaled so that the states one iteration freezes (at most a window of them, whose defects point
    # much the same way) carry about slide_tol T / 100 in all. A frozen defect is permanent, and at a mode decision
    # it grows on its way to x_0, which is why this is not the default (BENCHMARKS.md, section 1). Once the window
    # reaches x_0 freezing saves only evaluations: the per-state tolerance and the stop rule decide.
    slide = torch.clamp(threshold, min=config.slide_tol * T / (100 * window_size)) if tol1 > 0 or tol2 > 0 \
        else threshold
    # settle: once the window reaches x_0 nothing is left to slide, and a defect frozen there can still grow on its
    # way to x_0 (at a mode decision, 100x: BENCHMARKS.md, section 1), so the test asks settle x the tolerance. A
    # state whose residual no longer halves has reached what the model's round-off allows (e.g. TF32 convolutions on
    # a GPU) and passes at the plain tolerance: asking more of it would cost an iteration per state.
    settled = threshold * config.settle if config.settle < 1 else None  # [T]
    # block_tol: the states one iteration freezes while the window slides form a block whose defects point much the
    # same way and add up (each under its tolerance, five tolerances in all in the sample that showed it), and at a
    # mode decision their sum grows on its way to x_0 (BENCHMARKS.md, section 1). So the block freezes only as far
    # down as its residuals, each over its tolerance, sum to at most block_tol; the rest stays in the window for one
    # more iteration. Only states still converging fast (residual down 8x since the previous iteration) count: one
    # near the model's round-off floor carries noise, which does not add up, and counting it would stall the slide.
    block_tol = config.block_tol if tol1 > 0 or tol2 > 0 else 0.0
    # half of each state's previous residual (inf: none yet), for both tests
    half_last = torch.full((B, T), math.inf, dtype=torch.float64, device=device) \
        if settled is not None or block_tol > 0 else None
    last_eps = [None] * B     # noise prediction of the lowest step evaluated last (initialises new states)
    stopped = [False] * B
    reached = [top if init is None else 0] * B  # lowest state initialised so far
    # lowest state the window has reached: the x_0 estimate recorded (a warm start's states below its window hold
    # the trajectory it started from, not estimates of this solve's x_0; window 1 records the same states)
    lowest = [top] * B
    quirks = config.reference_quirks
    uninit = [top - 1 if init is None else -1] * B  # the reference's highest state it has not started yet

    m = memory_size
    if m > 1:
        memory = [AndersonMemory(m, T, X.shape[2], device) for _ in range(B)]
    history = [SampleHistory() for _ in range(B)]
    iterations = [0] * B
    if record_x0:  # before iteration 1: what the run starts from, x_T or the x_0 of a warm start's trajectory
        start = top if init is None else 0  # (its sample: prompt1's image, as the reference's step_0 shows it)
        for b in range(B):
            history[b].x0.append(X[b, start].reshape(latent).to("cpu", copy=True))

    it = 0
    while any(f > 0 for f in boundary) and (max_steps is None or it < max_steps):
        it += 1
        active = [b for b in range(B) if boundary[b] > 0]
        spans = []
        for b in active:
            F = boundary[b]
            lo = max(F - window_size, 0)
            if quirks:  # the reference's start: the lowest new state stays 0, the previous lowest is copied over
                if 0 <= uninit[b] and F - uninit[b] < window_size:
                    end = max(-1, F - window_size)
                    X[b, end + 1:uninit[b] + 1] = X[b, uninit[b] + 1]
                    uninit[b] = end
                reached[b] = min(reached[b], lo)
            elif lo < reached[b]:  # newly reached states start from the lowest state in use (init_states)
                if config.init_states == "ddim" and last_eps[b] is not None:
                    # DDIM steps down from it with the noise prediction held at the newest one
                    for s_ in range(reached[b] - 1, lo - 1, -1):
                        X[b, s_] = sched.a[s_] * X[b, s_ + 1] + sched.b[s_] * last_eps[b] + sched.c[s_] * xi[b, s_]
                else:
                    X[b, lo:reached[b]] = X[b, reached[b]]
                reached[b] = lo
            lowest[b] = min(lowest[b], lo)
            spans.append((b, lo, F))

        # one batched model call for every window of every sample: inputs x_{lo+1} .. x_F
        x_in = torch.cat([X[b, lo + 1:F + 1] for b, lo, F in spans]).reshape(-1, *latent)   # [N, *latent]
        t_in = _cat([sched.timesteps[lo:F] for b, lo, F in spans])                          # [N]
        owner = _cat([torch.full((F - lo,), b, dtype=torch.long) for b, lo, F in spans])
        starts = list(itertools.accumulate([F - lo for _, lo, F in spans], initial=0))  # host ints: no syncs

        def describe(i):
            k = bisect.bisect_right(starts, i) - 1
            b, lo, _ = spans[k]
            s = lo + i - starts[k]
            return f"sample {b}, step {s} (model timestep {int(sched.timesteps[s])})"

        # not checked for finiteness here: every prediction enters a residual whose norm the host reads below
        eps = evaluate(eps_fn, sharding, x_in, t_in, select(cond, owner), model_dtype, it, describe, check=False)
        eps = eps.flatten(1)                                                                  # [N, D]
        for k, (b, lo, F) in enumerate(spans):
            if lo > 0:  # the window can still reach new states
                last_eps[b] = eps[starts[k]]                                                 # float64

        for k, (b, lo, F) in enumerate(spans):
            # in-place arithmetic: at SD latent sizes each [W, D] temporary is 13 MB
            e = b_col[lo:F] * eps[starts[k]:starts[k + 1]]
            if noisy:  # eta > 0
                e.addcmul_(c_col[lo:F], xi[b, lo:F])
            x = X[b]                                                                          # [T+1, D]
            xw = x[lo:F]                                                                      # [W, D] view
            r1 = (a_col[lo:F] * x[lo + 1:F + 1]).add_(e).sub_(xw)                            # order-1 residual
            rms = torch.linalg.vector_norm(r1, dim=1) / r1.shape[1] ** 0.5                    # [W]
            # what the host needs, read in one transfer (one device sync per sample and iteration): the window
            # position of the highest unconverged state (-1: none), the largest residual, and when the window
            # reaches x_0 the stop rule's sum and x_0's scale
            test = slide[lo:F] if lo > 0 else threshold[lo:F]
            fail = None
            if half_last is not None:
                last = half_last[b, lo:F]                                                     # [W] view
                if lo == 0 and settled is not None:  # still halving: the tighter test (a first residual counts)
                    test = torch.where(rms < last, settled[:F], test)
                elif lo > 0 and block_tol > 0:
                    # counted: residual below an eighth of the previous one (last holds half of it)
                    share = torch.where(rms * 4 < last, rms / test, 0.0)                      # [W]
                    # what the block from each position up to the window's top would carry
                    fail = share.flip(0).cumsum(0).flip(0) > block_tol
                torch.mul(rms, 0.5, out=last)
            fail = rms > test if fail is None else fail.logical_or_(rms > test)
            wanted = [torch.where(fail, positions[:F - lo], -1.0).max(), rms.max()]
            if lo == 0:
                wanted += [(carry[:F] * rms).sum(), x[0].std() if x.shape[1] > 1 else one]
            read = torch.stack(wanted).tolist()
            if not math.isfinite(read[1]):  # a non-finite prediction (or residuals past the float64 range)
                if not bool(torch.isfinite(x[lo:F + 1]).all()):
                    # the states the model was given, not the model: a network answers NaN for an inf input
                    taa = f", or the TAA step overflowed (lam {lam:g}, taa_guard {taa_guard:g}: lam above 0 and " \
                          f"the guard on keep it bounded)" if m > 1 and (lam == 0 or taa_guard == 0) else ""
                    raise FloatingPointError(
                        f"the states of sample {b} became non-finite before iteration {it} while the model's "
                        f"outputs were finite: its predictions are too large for the schedule's steps{taa}")
                check_finite(eps, it, describe)
                if math.isnan(read[1]):  # not the model's: a NaN residual would pass every test as converged
                    raise FloatingPointError(f"the states of sample {b} became NaN at iteration {it} with finite "
                                             f"model outputs: the schedule's coefficients or the noise are unusable")
            p, fallbacks = int(read[0]), 0
            estimate, stop, looking, judged = math.nan, False, False, math.nan
            if lo == 0:  # the window reaches x_0: estimate its remaining error (stop rule)
                estimate = read[2] / max(read[3], 1e-12)
                stop = stop_rule(estimate, last_estimate[b], stop_tol, stop_ratio, carried)
                # where the image is given, judge the image the update leaves (equation 7): once before E would
                # stop, and at every stop by E, which then waits for it (E cannot see how steeply the decoder
                # turns latent error into gray levels). Not where every state passed (p < 0): x_0 is final then
                looking = by_image and p >= 0 and (stop or not tested[b] and image_test_due(
                    estimate, last_estimate[b], stop_ratio))
            last_estimate[b] = estimate if lo == 0 else math.inf
            if looking:  # x_0 and its image before the update
                tested[b] = True
                x0_before = x[0].clone()
                image_before = _image(image_fn, x0_before, latent)
            if p < 0:  # every window state passed: one more plain update, no model call (as the
                xw.add_(eq.residual(x, e, r1, lo, F))  # reference does), then all are frozen
                new_boundary = lo
            else:
                R = eq.residual(x, e, r1, lo, F)               # [W, D] order-k residual
                step = R
                if m > 1:
                    grew = None
                    if taa_guard > 0 and p > 0:
                        grew = (torch.linalg.vector_norm(R[:p], dim=1)
                                > taa_guard * torch.linalg.vector_norm(memory[b].last_r[lo:lo + p], dim=1))
                        seen = memory[b].seen_mask(lo, lo + p)
                        if seen is not None:  # a state without a previous residual has not grown
                            grew &= seen
                    memory[b].push(xw, R, lo, F)
                    if p > 0:
                        # the safeguard: where R grew, the plain step
                        step, bad = memory[b].step(R, lo, F, p, lam, oldest=quirks, plain=grew)
                        fallbacks = bad.sum()  # read at the end, not now: no sync
                        # the stop's update is the last, and no residual checks it: where TAA moves x_0 much
                        # farther than the plain update (which carries the residuals E measured), the plain one.
                        # Where the image is given, the image test judges that update instead (equation 7)
                        if stop and not looking and bool(torch.linalg.vector_norm(step[0])  # the window is at x_0
                                                         > STOP_STEP_RATIO * torch.linalg.vector_norm(R[0])):
                            step = R
                xw[:p].add_(step[:p] if step.shape[0] > p else step)
                xw[p].copy_(eq.boundary_update(x, e, r1, lo, F, lo + p))  # final: not from x_p (round-off)
                if quirks:  # the reference also updates the states above p, which passed, once more
                    xw[p + 1:].add_(R[p + 1:])
                new_boundary = lo + p
            if looking and new_boundary > 0:
                change = float((_image(image_fn, x[0], latent) - image_before).pow(2).mean().sqrt())
                moved = float((x[0] - x0_before).pow(2).mean().sqrt()) / max(read[3], 1e-12)
                # every process decides on the main one's value: their decoders need not agree to the last bit
                judged = sharding.from_main(image_estimate(change, moved, estimate))
                stop = judged <= config.stop_image_tol
            if stop:  # the stop rule: x_0 (just updated) is final
                new_boundary = 0
                stopped[b] = True
            del r1
            boundary[b] = new_boundary
            uninit[b] = min(uninit[b], lo)
            iterations[b] += 1
            h = history[b]
            h.residual.append(read[1])
            h.boundary.append(new_boundary)
            h.evaluations.append(F - lo)
            h.fallbacks.append(fallbacks)
            h.estimate.append(estimate)
            h.image_estimate.append(judged)
            h.stopped = stopped[b]
            if record_x0:
                h.x0.append(X[b, lowest[b]].reshape(latent).to("cpu", copy=True))
        if callback is not None:
            callback(it, list(boundary))

    for h in history:  # the fallback counts stayed on the device during the run
        h.fallbacks = [int(v) for v in h.fallbacks]
    # a sample stopped by max_steps before the window reached x_0: its estimate is the lowest state reached
    samples = torch.stack([X[b, lowest[b]] for b in range(B)]).reshape(B, *latent)
    return SolveResult(samples=samples, trajectory=X.reshape(B, T + 1, *latent),
                       iterations=iterations, converged=[f == 0 for f in boundary],
                       evaluations=[sum(h.evaluations) for h in history], history=history, config=config,
                       plan=plan)


def _image(image_fn, x0, latent):
    """image_fn on one sample's x_0 (float64 [D] -> [1, *latent]), as a float64 tensor."""
    image = image_fn(x0.reshape(1, *latent))
    if not torch.is_tensor(image) or not image.is_floating_point():
        raise TypeError(f"image_fn must return a floating-point tensor, got "
                        f"{image.dtype if torch.is_tensor(image) else type(image).__name__}")
    return image.to(torch.float64)


def _cat(parts):
    """torch.cat, without a copy for a single part (one sample)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _one_state_per_iteration(eps_fn, schedule, noise, cond, config, init, variation_steps, model_dtype, sharding,
                             record_x0, callback, plan):
    """Window 1: iteration k computes state top - k from the frozen one above it, which is a DDIM step; so it is
    run as one (sequential.py) and recorded as the solver records an iteration. Same states as the windowed
    iteration up to round-off, without its per-iteration work (what the planner relies on when it picks 1)."""
    T = schedule.num_steps
    top = T if init is None else variation_steps
    steps = top if config.max_iterations is None else min(top, config.max_iterations)
    B = noise.shape[0]
    history = [SampleHistory() for _ in range(B)]
    if record_x0:  # what the run starts from, as the windowed iteration records it
        start = (noise[:, T] if init is None else init[:, 0]).to(torch.float64)           # [B, *latent]
        for b in range(B):
            history[b].x0.append(start[b].to("cpu", copy=True))

    def record(k, X):  # state s = top - k was just computed from x_{s+1}
        s = top - k
        change = (X[:, s] - X[:, s + 1]).flatten(1)     # the order-1 residual of a state started as a copy
        for b, h in enumerate(history):
            h.residual.append(float(torch.linalg.vector_norm(change[b]) / change.shape[1] ** 0.5))
            h.boundary.append(s)
            h.evaluations.append(1)
            h.fallbacks.append(0)
            h.estimate.append(math.nan)
            h.image_estimate.append(math.nan)
            if record_x0:
                h.x0.append(X[b, s].to("cpu", copy=True))
        if callback is not None:
            callback(k, [s] * B)

    X = sample_sequential(eps_fn, schedule, noise, cond, init=init, start=None if init is None else top, steps=steps,
                          model_dtype=model_dtype, sharding=sharding, callback=record)
    X[:, :top - steps] = X[:, top - steps:top - steps + 1]  # not reached (max_steps): the lowest state reached
    return SolveResult(samples=X[:, 0], trajectory=X, iterations=[steps] * B, converged=[steps == top] * B,
                       evaluations=[steps] * B, history=history, config=config, plan=plan)
