"""Sequential DDIM sampling with the solver's own coefficients: the solution the parallel solver must reach."""
import torch

from .config import is_integer
from .denoiser import check_finite, check_init, check_problem, evaluate
from .sharding import Sharding


@torch.no_grad()  # as solve: the model is called without autograd (denoiser.py)
def sample_sequential(eps_fn, schedule, noise, cond=None, *, init=None, start=None, steps=None,
                      model_dtype=torch.float32, sharding=None, callback=None):
    """x_{s} = a_s x_{s+1} + b_s eps(x_{s+1}) + c_s xi_s for s = start-1 .. 0, for B samples at once.

    noise: [B, T+1, *latent] as for `solve` (x_T = noise[:, T]). To start below the top (the warm-start
    reference), give init [B, T+1, *latent] and start: x_start is taken from init and the states above it are
    kept. steps: take only this many steps (default: all); the states below stay 0.
    callback(k, X): after the k-th step, with the trajectory so far [B, T+1, *latent].
    Returns the trajectory [B, T+1, *latent] float64 (x_0 = trajectory[:, 0]).
    """
    check_problem(eps_fn, schedule, noise, cond, model_dtype, sharding, callback)
    T = schedule.num_steps
    if init is None and start is not None:
        raise ValueError("start needs init (the trajectory whose state x_start the sampling starts from)")
    if init is not None:
        check_init(init, noise)
        if start is not None and (not is_integer(start) or not 1 <= start <= T):
            raise ValueError(f"start must be an integer in 1..{T}, got {start!r}")
    if steps is not None and (not is_integer(steps) or steps < 0):
        raise ValueError(f"steps must be an integer >= 0 or None (all), got {steps!r}")
    sharding = sharding or Sharding()
    sched = schedule.to(noise.device)
    xi = noise.to(torch.float64)
    if init is None:
        X = torch.zeros_like(xi)
        X[:, T] = xi[:, T]
        start = T
    else:
        X = init.to(noise.device, torch.float64).clone()
        start = T if start is None else start
    B = X.shape[0]
    for s in range(start - 1, -1 if steps is None else max(start - steps, 0) - 1, -1):
        t = sched.timesteps[s].repeat(B)
        def describe(i, s=s):
            return f"sample {i}, step {s} (model timestep {int(sched.timesteps[s])})"
        # a copy: in the states' own dtype (model_dtype float64) the model would get a view of the trajectory, and
        # an eps_fn scaling its input in place (x /= ...) changed x_{s+1} itself (the solver's inputs are a copy)
        eps = evaluate(eps_fn, sharding, X[:, s + 1].clone(), t, cond, model_dtype, start - s, describe, check=False)
        X[:, s] = sched.a[s] * X[:, s + 1] + sched.b[s] * eps + sched.c[s] * xi[:, s]
        # one check per step, on the new state: non-finite if the prediction was, or if finite predictions near the
        # top of the float range overflowed the step (the solver's residuals catch the same)
        if not bool(torch.isfinite(X[:, s].sum())):
            check_finite(eps, start - s, describe)
            if not bool(torch.isfinite(X[:, s]).all()):
                raise FloatingPointError(f"the states became non-finite at step {s} with finite model outputs: the "
                                         f"predictions are too large for the schedule's coefficients")
        if callback is not None:
            callback(start - s, X)
    return X
