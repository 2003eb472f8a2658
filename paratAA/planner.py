"""Choosing the window from the hardware (window_size="auto").

Parallel sampling trades model work for latency: with window W an iteration costs one batched call of W inputs per
sample, and the run takes K(W) iterations. On hardware with idle parallel capacity (a GPU at small batch) a call of
W inputs costs little more than a call of one; on a busy CPU it costs W times as much. So the best window depends
on the machine, and is found by measuring it:

    c(n)   seconds of one sharded model call of n inputs (guidance included), measured at a few n;
    o(W)   seconds of the solver's own work per iteration at window W, measured with a free model;
    K(W)   iterations at window W, modelled as  min(T, alpha T / W + beta)                               (5)

(the window slides down the T states about W / alpha per iteration once converged states freeze, and the last
window needs about beta more; alpha and beta were fitted on the embedded models, BENCHMARKS.md). The predicted
time of window W is K(W) (c(B W) + o(W)) for a batch of B samples, against T c(B) for sequential sampling; the
plan takes the W that minimises it, W = 1 being sequential sampling itself (K(1) = T exactly).
"""
import math
import time
from dataclasses import dataclass, field, replace

import torch

from .denoiser import model_call, select

ALPHA, BETA = 1.5, 4.3   # equation (5), fitted on the embedded models at T = 100 (BENCHMARKS.md, section 3)
REPEATS = 2              # timed calls of the solver's own work per window, after one warm-up call
# A cached curve is checked against one size timed afresh, c(B): off by more than this factor either way, it was
# measured under another load (a busy machine, other jobs on the GPU) and is measured again. c(B) is also what
# the run's speed-up rests on (sequential sampling is T calls of it): a stale one reported 9x for window 1.
STALE = 3.0
# Untimed calls of one state per sample before the curve is timed, for at most BURST_SECONDS: the first timings of a
# fresh process were high (the embedded DiT on one CPU thread: c(1) 2.01-2.09 ms, then 1.69-1.88 ms timed again and
# 1.77-1.92 ms per step of sequential sampling), which the run's sequential estimate and the choice of window took
BURST_CALLS, BURST_SECONDS = 20, 0.1


@dataclass
class Plan:
    window: int
    predicted_seconds: float             # K(W) (c(B W) + o(W))
    predicted_sequential_seconds: float  # T c(B)
    predicted_iterations: float
    call_seconds: dict = field(default_factory=dict)      # c: inputs per call -> seconds
    solver_seconds: dict = field(default_factory=dict)    # o: window -> seconds per iteration
    measured: bool = True                # False: the curves came from a cache
    checked_call_seconds: float = None   # c(B) timed by this run, against the cache's (None: nothing was cached)
    max_inputs: int = None               # the largest call that fit in memory when a larger one did not, else None
    failed_inputs: int = None            # that larger call's size (None: not known, or every call fit)
    # The predictions' unit: this run's c(B) over the curve's (1 unless the curves came from a cache). The curves
    # are kept as measured; the predicted times are the curves' times this factor (see plan_window).
    curve_scale: float = 1.0

    def to_dict(self):
        return {"window": self.window, "predicted_seconds": self.predicted_seconds,
                "predicted_sequential_seconds": self.predicted_sequential_seconds,
                "predicted_speedup": self.predicted_sequential_seconds / self.predicted_seconds,
                "predicted_iterations": self.predicted_iterations, "measured": self.measured,
                "checked_call_seconds": self.checked_call_seconds, "curve_scale": self.curve_scale,
                "max_inputs": self.max_inputs,
                "call_seconds": {str(k): v for k, v in sorted(self.call_seconds.items())},
                "solver_seconds": {str(k): v for k, v in sorted(self.solver_seconds.items())},
                "iteration_model": {"alpha": ALPHA, "beta": BETA}}

    def predict(self, samples, measured=None):
        """Predicted seconds of a batch of `samples` at the chosen window: predicted_seconds is the first batch's,
        and a smaller last batch calls the model at its own size (on a CPU a call of 1 costs far less than one of
        16: the run's prediction was the first batch's times the batches, 1.9x the time of 16 + 1 samples).
        measured: (states, seconds), a call this run timed, in its own time (a smaller last batch's call of one state
        per sample): below the curve's smallest size the curve is only a line to zero, which put a last batch's
        call of 1 at 1.5 ms where it took 1.8-2.3 ms."""
        curve = self.call_seconds
        if measured is not None:
            curve = {**curve, measured[0]: measured[1] / self.curve_scale}
        return self.curve_scale * batch_seconds(self.predicted_iterations, samples, self.window, curve,
                                                self.solver_seconds)


def batch_seconds(K, B, W, call_seconds, solver_seconds):
    """K(W) (c(B W) + o(W)): K iterations of a batch of B samples at window W, by the measured curves."""
    return K * (interpolate(call_seconds, B * W) + interpolate(solver_seconds, W))


def predicted_iterations(T, W, exact=False):
    """Equation (5); K(1) = T exactly (one state freezes per iteration). exact: tolerance 0 (tol1 = tol2 = 0), where
    no state passes before its inputs are final, so every window takes T: one boundary state per iteration."""
    return float(T) if W <= 1 or exact else min(float(T), ALPHA * T / W + BETA)


def sync(device):
    """Wait for the device's queued work (a GPU runs asynchronously): what a timer must do before reading."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, fits=None, repeats=REPEATS, warm=True):
    """The best of `repeats` timed calls of fn, after one untimed call (allocator, kernels, caches) unless warm is
    False. fits: a test of a call's output, read after the clock stopped: inf as soon as one output fails it, the
    warm-up's included."""
    out = fn() if warm else None
    best = math.inf
    for _ in range(repeats):
        if out is not None and fits is not None and not fits(out):
            return math.inf
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return math.inf if fits is not None and not fits(out) else best


def _finite(out):
    return bool(torch.isfinite(out).all())


def candidate_windows(T):
    """1, 2, 4, ... and T."""
    out, w = [], 1
    while w < T:
        out.append(w)
        w *= 2
    return out + [T]


def window_call(eps_fn, schedule, noise, cond, sharding, model_dtype, w, spare=False):
    """A callable making one sharded model call of w states per sample (spread over the T steps), as an iteration
    at window w does. spare: a process that runs out of memory returns NaN for its shard instead of raising, so that
    every process sees it in the gathered output and none is left waiting in the gather (measure_call_seconds)."""
    B, T, device = noise.shape[0], schedule.num_steps, noise.device
    x_T = noise[:, T].to(torch.float64)                                                     # [B, *latent]
    steps = torch.linspace(T - 1, 0, w, device=device).round().long()                      # [w] spread over T
    x = x_T.repeat_interleave(w, dim=0)                                                     # [B w, *latent]
    t = schedule.to(device).timesteps[steps].repeat(B)                                      # [B w]
    c = select(cond, torch.arange(B).repeat_interleave(w))
    call = model_call(eps_fn, model_dtype)
    return lambda: sharding.evaluate(_spared(call) if spare else call, x, t, c)


def warm_up(eps_fn, schedule, noise, cond, sharding, model_dtype, windows):
    """One untimed call at each size a timed run uses (the window's; sequential sampling's one state per sample),
    so that neither the sampling time nor the sequential one includes the device's first-call costs (kernel
    loading, autotuning, allocator growth): on a GPU they cost more than an iteration, and a run whose cost curve
    came from the cache has made no call before it is timed."""
    for w in dict.fromkeys(windows):
        window_call(eps_fn, schedule, noise, cond, sharding, model_dtype, w)()
    sync(noise.device)


def _spared(call):
    """call, with running out of device memory answered by NaN (see window_call)."""
    def spared(x, *args):
        try:
            return call(x, *args)
        except torch.OutOfMemoryError:
            if x.device.type == "cuda":
                torch.cuda.empty_cache()  # what the failed call held, for the run that follows
            return torch.full_like(x, math.nan)
    return spared


def measure_call_seconds(eps_fn, schedule, noise, cond, sharding, model_dtype, windows):
    """c(B w) for each window w: one sharded call of w inputs per sample, timed on every process; the slowest
    process's time counts (a call ends when every shard is gathered). Stops early once a call costs about twice
    the one of half its size: the calls are then compute-bound and larger windows cannot win (equation (5)). A
    size that does not fit in a process's device memory ends the measurement too, recorded as inf (a GPU of less
    memory than the model's largest window needs: the window is chosen among the sizes that fit); B states, one per
    sample, must fit, as sequential sampling needs them.

    Two passes: up the sizes (a warm-up call and a timed one each, which the early stop reads), then down them, two
    more timed calls each; a size's time is the least of its three. The second pass times every size as the run will
    meet it, after the largest call has been made: on a CPU a call of a size larger than any before it pays for
    memory the allocator has not yet kept (the embedded text-to-image model's 32 states per call took 19-22 ms up
    the sizes, 14 ms after a larger call and in the run itself, and the planner chose window 16 where 32 was 15%
    faster: BENCHMARKS.md, section 2)."""
    B, device = noise.shape[0], noise.device
    calls, out = {}, {}
    burst, t0 = window_call(eps_fn, schedule, noise, cond, sharding, model_dtype, 1), time.perf_counter()
    for _ in range(BURST_CALLS):  # the same count on every process: each call is a collective
        burst()
        if sharding.max(time.perf_counter() - t0) > BURST_SECONDS:
            break
    for w in windows:
        # a NaN in the gathered output of any call, the warm-up's or a timed one's (the allocator fragments): some
        # process ran out of memory (window_call's spare), and every process sees it; its answer took no model time
        calls[B * w] = window_call(eps_fn, schedule, noise, cond, sharding, model_dtype, w, spare=w > 1)
        out[B * w] = sharding.max(_timed(calls[B * w], device, fits=_finite if w > 1 else None, repeats=1))
        if math.isinf(out[B * w]):
            break
        half = out.get(B * (w // 2))
        if half is not None and w >= 4 and out[B * w] >= 1.9 * half:
            break
    for n in sorted((n for n, v in out.items() if math.isfinite(v)), reverse=True):  # the same on every process
        again = sharding.max(_timed(calls[n], device, fits=_finite if n > B else None, warm=False))
        if math.isinf(again):  # did not fit this time: neither it nor a larger call is one the run can count on
            out.update({m: math.inf for m in out if m >= n})
        else:
            out[n] = min(out[n], again)
    return never_above_a_larger(out)


def never_above_a_larger(curve):
    """curve with each time lowered to the least of the larger sizes': a call can always be padded up to a larger
    size, so a smaller one never costs more, and a time above a larger size's is noise (an H200 timed one SD UNet
    state at 49.6 ms and two at 29.4 ms: the sequential time the run reports is T c(B))."""
    least, out = math.inf, dict(curve)
    for n in sorted(out, reverse=True):
        least = out[n] = min(out[n], least)
    return out


def measure_solver_seconds(solve, schedule, noise, config, windows, sharding):
    """o(w): the solver's seconds per iteration at each window, with a free model (two iterations, the second
    with the TAA update), on this device. solve: paratAA.solve, passed in by the caller (the solver plans its own
    "auto" window, so this module does not import it)."""
    out = {}
    for w in windows:
        c = replace(config, window_size=w, order=min(config.order or w, w), tol1=0.0, tol2=0.0).capped(2)
        free = lambda x, t, cond: torch.zeros_like(x)  # noqa: E731
        seconds = _timed(lambda: solve(free, schedule, noise, None, c, model_dtype=noise.dtype), noise.device)
        out[w] = sharding.max(seconds / 2)
    return out


def interpolate(curve, n):
    """curve at n: linear between measured points, extended along the last segment."""
    xs = sorted(curve)
    if n <= xs[0]:
        return curve[xs[0]] * n / xs[0] if n < xs[0] else curve[xs[0]]
    for a, b in zip(xs, xs[1:]):
        if n <= b:
            return curve[a] + (curve[b] - curve[a]) * (n - a) / (b - a)
    if len(xs) == 1:
        return curve[xs[0]] * n / xs[0]
    a, b = xs[-2], xs[-1]
    return curve[b] + (curve[b] - curve[a]) * (n - b) / (b - a)


def choose(T, B, call_seconds, solver_seconds, measured=True, max_inputs=None, exact=False, scale=1.0,
           max_iterations=None):
    """The window minimising K(W) (c(B W) + o(W)) over W = 1 .. T, or over the windows whose call of B W inputs fits
    in memory (max_inputs: the largest measured that did). exact: the solve has tolerance 0 (predicted_iterations).
    scale: the predicted times are the curves' times this (Plan.curve_scale). It multiplies every window's time
    alike, and is applied after the choice, so the window is exactly the one the unscaled curves choose (rounding
    could otherwise break a near tie the other way). max_iterations: the cap max_steps puts on the solve
    (SolverConfig.max_iterations). The window is still the one the whole solve is best at, but the plan predicts
    the iterations the run will make: at most the cap (a run cut at 4 of 40 iterations was predicted the time of
    40, 9x its own, in the run's summary and metrics.json)."""
    best = None
    for W in range(1, min(T, max_inputs // B) + 1 if max_inputs else T + 1):
        K = predicted_iterations(T, W, exact)
        seconds = batch_seconds(K, B, W, call_seconds, solver_seconds)
        if best is None or seconds < best[1] - 1e-12:
            best = (W, seconds, K)
    W, seconds, K = best
    if max_iterations is not None and max_iterations < K:
        seconds, K = seconds * max_iterations / K, float(max_iterations)
    return Plan(window=W, predicted_seconds=scale * seconds,
                predicted_sequential_seconds=scale * T * interpolate(call_seconds, B), predicted_iterations=K,
                call_seconds=call_seconds, solver_seconds=solver_seconds, measured=measured, max_inputs=max_inputs,
                curve_scale=scale)


def cached_curves(hit, B, steps):
    """(call seconds, solver seconds, max_inputs, failed_inputs) of a cache entry as measured curves, or None when
    the entry is not one (an edited or damaged cache file) or does not cover this run: it is then measured again.
    It must time B inputs, every time must be a finite positive number (the solver's may be 0), the solver's curve
    must have a point (choose interpolates it: an empty one ended the run with an IndexError), and max_inputs, the
    largest call that fit in memory, None or an integer >= B. It must have been measured for at least this run's
    steps (its "steps"): a warm start measures windows up to its variation_steps only, and a full solve of T steps
    that read its curve chose among windows above any size measured, by extrapolation (an entry written before
    "steps" was recorded is measured again once). The call curve is read as measure_call_seconds leaves it, never
    above a larger size's: a cache written before it did so, or edited, said a larger call costs less (c(8) below
    c(1) took window 8 for a predicted 0.00 s; c(2) of 5e-324 predicted 0 s, and the plan's speed-up divided by
    it), and lowered so its c(B) fails the check against this run's timing (plan_window) and the curve is measured
    again. failed_inputs, the call that did not fit, is only said on the terminal: one that is not an integer above
    max_inputs is read as not known."""
    try:
        calls = {int(k): float(v) for k, v in hit["call_seconds"].items()}
        solver = {int(k): float(v) for k, v in hit["solver_seconds"].items()}
        limit = hit.get("max_inputs")  # an int (json's), or None
        measured_for, failed = hit.get("steps"), hit.get("failed_inputs")
    except (TypeError, ValueError, KeyError, AttributeError):
        return None
    good = B in calls and all(k >= 1 and math.isfinite(v) and v > 0 for k, v in calls.items()) and \
        len(solver) > 0 and all(k >= 1 and math.isfinite(v) and v >= 0 for k, v in solver.items()) and \
        (limit is None or type(limit) is int and limit >= B) and type(measured_for) is int and measured_for >= steps
    failed = failed if limit is not None and type(failed) is int and failed > limit else None
    return (never_above_a_larger(calls), solver, limit, failed) if good else None


def plan_window(eps_fn, schedule, noise, cond, config, sharding, model_dtype, *, solve, cache=None, key=None,
                steps=None):
    """Measure (or read from cache[key], checked against c(B) timed now: STALE) the cost curves of this model on
    this device and process group, and choose the window. solve: paratAA.solve, whose own work per iteration is
    measured. cache: a dict the caller may persist; key: what identifies the model, device, dtype, process count
    and batch (the caller's; without one nothing is cached). steps: the steps the solve takes (a warm start
    re-solves its variation_steps of the T; default T), recorded with the curves it measures (cached_curves).
    Every process takes the main process's choice."""
    T, B = steps or schedule.num_steps, noise.shape[0]
    hit = cached_curves(cache.get(key), B, T) if cache is not None and key is not None else None
    fresh = None
    # measuring is collective: all processes read, or all measure (a process without the entry, e.g. on another
    # node whose cache folder is its own, made the others measure while its own read failed with a TypeError)
    if sharding.min(hit is not None) == 0:
        hit = None
    else:
        fresh = measure_call_seconds(eps_fn, schedule, noise, cond, sharding, model_dtype, [1])[B]
        if sharding.min(hit[0][B] / STALE <= fresh <= hit[0][B] * STALE) == 0:  # each process read its own file
            hit = None
    if hit is not None:
        calls, solver, limit, failed = hit
        # The predictions are in this run's time: the cached curve scaled by fresh / cached c(B). The run's estimate
        # of sequential sampling is T calls of fresh c(B) (runner.planning), so the plan's predicted_sequential_seconds,
        # T c(B) from the unscaled curve, could differ from it in the same metrics.json by up to STALE. The one
        # timing says how much the load has changed, not how the curve's shape has, so it scales the model's and the
        # solver's curves alike (the solver runs on the same device under the same load): the window stays the one
        # the cached curves choose and the predicted speed-up is unchanged, only its times follow this run's clock.
        plan = choose(T, B, calls, solver, measured=False, max_inputs=limit, exact=config.exact,
                      scale=fresh / calls[B], max_iterations=config.max_iterations)
    else:
        calls = measure_call_seconds(eps_fn, schedule, noise, cond, sharding, model_dtype, candidate_windows(T))
        failed = min((n for n, v in calls.items() if math.isinf(v)), default=None)
        limit = max(n for n, v in calls.items() if math.isfinite(v)) if failed is not None else None
        calls = {n: v for n, v in calls.items() if math.isfinite(v)}
        solver = measure_solver_seconds(solve, schedule, noise, config, sorted({n // B for n in calls}), sharding)
        if cache is not None and key is not None:
            cache[key] = {"call_seconds": {str(k): v for k, v in calls.items()},
                          "solver_seconds": {str(k): v for k, v in solver.items()}, "max_inputs": limit,
                          "failed_inputs": failed, "steps": T}
        plan = choose(T, B, calls, solver, max_inputs=limit, exact=config.exact,
                      max_iterations=config.max_iterations)
    plan.checked_call_seconds, plan.failed_inputs = fresh, failed
    plan.window = int(sharding.from_main(plan.window))
    return plan
