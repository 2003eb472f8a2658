"""ParaTAA: windowed fixed-point iteration with triangular Anderson acceleration (METHOD.md sections 3-4).

Each iteration evaluates the model once, in one batch, at the `window_size` noisiest unfrozen states of every
sample, tests each state's order-1 residual, freezes what has converged and updates the rest. Solver state is
float64; the model runs in its own dtype.

Boundary rule. After the test, with p the highest (noisiest) unconverged state of the window:
  - states above p passed the test and are frozen at the values that passed it;
  - p takes the plain order-k update, computed from frozen values only, so it is final and is frozen too;
  - states below p take the TAA update (or the plain one when memory_size = 1).
So the boundary drops by at least one state per iteration: never more than T iterations, whatever TAA does,
and the guarantee does not rest on a residual coming out exactly zero in floating point.

Departures from the public reference implementation, each deliberate: the order-k equations default to the
Picard form (equations.py; equations="ddim" is the paper's form), which reaches the same image in a quarter to
a half fewer iterations on the embedded models; the boundary rule above (the reference
updates converged states once more and freezes p one iteration later); window_size = 1 with tolerance 0 is
exactly sequential DDIM (the reference's initialisation of newly reached states is off by one); a state's TAA
columns are its newest ones (the reference masks a short history from the oldest end); samples of a batch are
solved together, each with its own boundary.
"""
import math
from dataclasses import dataclass, field

import torch

from .anderson import triangular_anderson_step
from .denoiser import evaluate, select
from .equations import OrderKEquations, check_form
from .sharding import Sharding


@dataclass
class SampleHistory:
    """Per-iteration record of one sample (index k is iteration k + 1)."""
    residual: list = field(default_factory=list)     # max RMS order-1 residual over the window
    boundary: list = field(default_factory=list)     # frozen boundary after the iteration (0: done)
    evaluations: list = field(default_factory=list)  # model evaluations in the iteration (window inputs)
    fallbacks: list = field(default_factory=list)    # states whose TAA problem was unusable (plain step)
    x0: list = field(default_factory=list)           # x_0 estimate before iteration 1 and after each one


@dataclass
class SolveResult:
    samples: torch.Tensor       # [B, *latent] float64, x_0
    trajectory: torch.Tensor    # [B, T+1, *latent] float64, x_0 .. x_T
    iterations: list            # per sample: model calls it took part in
    converged: list             # per sample: x_0 frozen before max_steps ran out
    evaluations: list           # per sample: total model evaluations (a guided evaluation counts once)
    history: list               # per sample: SampleHistory

    @property
    def max_iterations(self):
        return max(self.iterations) if self.iterations else 0


def _check_int(name, value, low, high=None):
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        span = f"in {low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {span}, got {value!r}")


def _check_nonneg(name, value):
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_config(T, window_size, order, memory_size, tol1, tol2, lam=1e-3, max_steps=None, variation_steps=None,
                 equations="picard"):
    """ValueError naming the first bad parameter (shared by the scripts' flag checks)."""
    _check_int("timesteps", T, 1)
    _check_int("window_size", window_size, 1)
    _check_int("order", order, 1)
    check_form(equations)
    _check_int("memory_size", memory_size, 1)
    _check_nonneg("tol1", tol1)
    _check_nonneg("tol2", tol2)
    _check_nonneg("lam", lam)
    if max_steps is not None:
        _check_int("max_steps", max_steps, 1)
    if variation_steps is not None:
        _check_int("variation_steps", variation_steps, 1, T)


def solve(eps_fn, schedule, noise, cond=None, *, window_size=None, order=None, equations="picard", memory_size=2,
          lam=1e-3, tol1=1e-3, tol2=1e-3, max_steps=None, init=None, variation_steps=None, model_dtype=torch.float32,
          sharding=None, record_x0=False, callback=None):
    """Solve the triangular DDIM system of B independent samples in parallel.

    eps_fn: noise prediction (see denoiser.py). schedule: paratAA.Schedule with T steps.
    noise: [B, T+1, *latent], xi[s] for step s and noise[:, T] = x_T (float64 recommended).
    cond: per-sample conditioning, [B, ...] tensor or dict of them, or None.
    window_size: states evaluated per sample per iteration (default T); order: order of the equations
    (default window_size); equations: their form, "picard" or "ddim" (the paper's; see equations.py);
    memory_size: TAA memory m (1 = plain fixed-point); lam: TAA regulariser.
    tol1, tol2: a state has converged when RMS(order-1 residual) <= max(tol1, tol2 * sigma).
    max_steps: iteration cap (default: none; T always suffices).
    init, variation_steps: warm start. init [B, T+1, *latent] is an existing trajectory (same noise); its
    noisiest T - variation_steps states stay frozen and the rest are re-solved starting from init's values.
    sharding: paratAA.Sharding splitting each model call across processes (default: this process only).
    record_x0: keep the x_0 estimate (the lowest state reached) before and after every iteration.
    callback(iteration, boundaries): called after every iteration, e.g. for a progress bar.
    """
    T = schedule.num_steps
    window_size = T if window_size is None else window_size
    order = window_size if order is None else order
    check_config(T, window_size, order, memory_size, tol1, tol2, lam, max_steps, variation_steps, equations)
    if noise.dim() < 2 or noise.shape[1] != T + 1:
        raise ValueError(f"noise must be [B, T+1={T + 1}, *latent], got {tuple(noise.shape)}")
    if (init is None) != (variation_steps is None):
        raise ValueError("a warm start needs both init and variation_steps")
    sharding = sharding or Sharding()
    device = noise.device
    sched = schedule.to(device)
    eq = OrderKEquations(schedule, min(order, T), equations, device=device)
    B, latent = noise.shape[0], tuple(noise.shape[2:])
    xi = noise.to(torch.float64).flatten(2)                                   # [B, T+1, D]

    if init is None:
        X = torch.zeros_like(xi)                                              # [B, T+1, D]
        X[:, T] = xi[:, T]
        top = T
    else:
        if tuple(init.shape) != tuple(noise.shape):
            raise ValueError(f"init must have the shape of noise {tuple(noise.shape)}, got {tuple(init.shape)}")
        X = init.to(device, torch.float64).flatten(2).clone()
        top = variation_steps
    boundary = [top] * B      # states >= boundary are frozen
    reached = [top if init is None else 0] * B  # lowest state initialised so far

    m = memory_size
    if m > 1:
        memory = [_History(m, T, X.shape[2], device) for _ in range(B)]
    history = [SampleHistory() for _ in range(B)]
    iterations = [0] * B
    if record_x0:
        for b in range(B):
            history[b].x0.append(X[b, reached[b]].reshape(latent).to("cpu", copy=True))

    it = 0
    while any(f > 0 for f in boundary) and (max_steps is None or it < max_steps):
        it += 1
        active = [b for b in range(B) if boundary[b] > 0]
        spans = []
        for b in active:
            F = boundary[b]
            lo = max(F - window_size, 0)
            if lo < reached[b]:  # newly reached states start as copies of the lowest state in use
                X[b, lo:reached[b]] = X[b, reached[b]]
                reached[b] = lo
            spans.append((b, lo, F))

        # one batched model call for every window of every sample: inputs x_{lo+1} .. x_F
        x_in = torch.cat([X[b, lo + 1:F + 1] for b, lo, F in spans]).reshape(-1, *latent)   # [N, *latent]
        t_in = torch.cat([sched.timesteps[lo:F] for b, lo, F in spans])                     # [N]
        owner = torch.cat([torch.full((F - lo,), b, dtype=torch.long) for b, lo, F in spans])
        starts = torch.tensor([0] + [F - lo for _, lo, F in spans]).cumsum(0)

        def describe(i):
            k = int(torch.searchsorted(starts, i, right=True)) - 1
            b, lo, _ = spans[k]
            s = lo + i - int(starts[k])
            return f"sample {b}, step {s} (model timestep {int(sched.timesteps[s])})"

        eps = evaluate(eps_fn, sharding, x_in, t_in, select(cond, owner), model_dtype, it, describe)
        eps = eps.flatten(1)                                                                  # [N, D]

        for k, (b, lo, F) in enumerate(spans):
            # in-place arithmetic: at SD latent sizes each [W, D] temporary is 13 MB
            e = (sched.b[lo:F, None] * eps[starts[k]:starts[k + 1]]).addcmul_(sched.c[lo:F, None], xi[b, lo:F])
            x = X[b]                                                                          # [T+1, D]
            r1 = (sched.a[lo:F, None] * x[lo + 1:F + 1]).add_(e).sub_(x[lo:F])               # order-1 residual
            rms = torch.linalg.vector_norm(r1, dim=1) / r1.shape[1] ** 0.5                    # [W]
            threshold = torch.clamp(tol2 * sched.sigma[lo:F], min=tol1)
            unconverged = (rms > threshold).nonzero()
            fallbacks = 0
            if len(unconverged) == 0:
                new_boundary = lo
            else:
                p = int(unconverged.max())                     # window position of the highest unconverged
                R = eq.residual(x, e, r1, lo, F)               # [W, D] order-k residual
                step = R
                if m > 1:
                    memory[b].push(x, R, lo, F)
                    if p > 0:
                        step, bad = memory[b].anderson_step(R, lo, F, p, lam)
                        fallbacks = int(bad.sum())
                x[lo:lo + p] += step[:p]
                x[lo + p] += R[p]
                new_boundary = lo + p
            del r1
            boundary[b] = new_boundary
            iterations[b] += 1
            h = history[b]
            h.residual.append(float(rms.max()))
            h.boundary.append(new_boundary)
            h.evaluations.append(F - lo)
            h.fallbacks.append(fallbacks)
            if record_x0:
                h.x0.append(X[b, reached[b]].reshape(latent).to("cpu", copy=True))
        if callback is not None:
            callback(it, list(boundary))

    return SolveResult(samples=X[:, 0].reshape(B, *latent), trajectory=X.reshape(B, T + 1, *latent),
                       iterations=iterations, converged=[f == 0 for f in boundary],
                       evaluations=[sum(h.evaluations) for h in history], history=history)


class _History:
    """One sample's TAA memory: the last iterate and residual of every state, and rings of the last m - 1
    differences dX, dR. Storing differences (not iterates) means no history is copied per iteration."""

    def __init__(self, m, T, D, device):
        M = m - 1
        self.M = M
        self.last_x = torch.zeros(T, D, dtype=torch.float64, device=device)
        self.last_r = torch.zeros(T, D, dtype=torch.float64, device=device)
        self.dX = torch.zeros(M, T, D, dtype=torch.float64, device=device)
        self.dR = torch.zeros(M, T, D, dtype=torch.float64, device=device)
        self.count = torch.zeros(T, dtype=torch.long, device=device)   # iterates seen per state (capped)
        self.pushes = 0

    def push(self, x, R, lo, F):
        """Record this iteration's window iterate x[lo:F] and residual R; a state seen before gains a column."""
        slot = self.pushes % self.M
        torch.sub(x[lo:F], self.last_x[lo:F], out=self.dX[slot, lo:F])
        torch.sub(R, self.last_r[lo:F], out=self.dR[slot, lo:F])
        self.last_x[lo:F] = x[lo:F]
        self.last_r[lo:F] = R
        self.count[lo:F] = torch.clamp(self.count[lo:F] + 1, max=self.M + 1)
        self.pushes += 1

    def anderson_step(self, R, lo, F, p, lam):
        slots = [(self.pushes - 1 - j) % self.M for j in range(self.M)]   # newest first
        dX = [self.dX[s, lo:lo + p] for s in slots]
        dR = [self.dR[s, lo:F] for s in slots]
        # the least-squares sums run over every window state at or above t, so dR spans the whole window
        return triangular_anderson_step(R, dX, dR, self.count[lo:F] - 1, lam, p)
