"""The only view the samplers have of a model: a noise-prediction callable.

    eps_fn(x, timesteps, cond) -> eps

x: [N, *latent] in the model's dtype, timesteps: [N] long model timesteps, cond: the per-input conditioning (a
tensor or a dict of tensors with leading dimension N, or None), eps: [N, *latent] with guidance already applied.
Adapters for DiT and Stable Diffusion live with the scripts and in models/, never here.
"""
import torch


class NonFiniteModelOutput(FloatingPointError):
    pass


def select(cond, index):
    """Per-sample conditioning [B, ...] (or a dict of them) -> per-input conditioning [N, ...]."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: select(v, index) for k, v in cond.items()}
    return cond[index.to(cond.device)]


def take(cond, start, end):
    """Rows start..end-1 of conditioning (a tensor, a dict of tensors, or None)."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: take(v, start, end) for k, v in cond.items()}
    return cond[start:end]


def evaluate(eps_fn, sharding, x, timesteps, cond, model_dtype, iteration, describe, check=True):
    """One batched model call (sharded across processes), float64 out; refuses non-finite predictions.

    describe(i) names input i (sample, step, timestep) for the error message. check=False leaves the check to
    the caller (the solver reads every prediction's residual anyway and calls check_finite only when one of them
    is not finite: one device sync fewer per call)."""
    eps = sharding.evaluate(lambda xs, ts, cs: eps_fn(xs.to(model_dtype), ts, cs), x, timesteps, cond)
    # one check for the whole call: a sum is finite only if every entry is
    if check and not bool(torch.isfinite(eps.sum(dtype=torch.float64))):
        check_finite(eps, iteration, describe)
    return eps


def check_finite(eps, iteration, describe):
    """Raise NonFiniteModelOutput naming the first input whose prediction has a non-finite entry; return when
    there is none (float64 entries near the top of the range overflow a sum or a norm, not the model)."""
    finite = torch.isfinite(eps.flatten(1)).all(dim=1)
    if bool(finite.all()):
        return
    i = int((~finite).nonzero()[0])
    raise NonFiniteModelOutput(f"the model returned a non-finite noise prediction at iteration {iteration}, "
                               f"{describe(i)}")
