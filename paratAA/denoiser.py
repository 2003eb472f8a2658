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


def evaluate(eps_fn, sharding, x, timesteps, cond, model_dtype, iteration, describe):
    """One batched model call (sharded across processes), float64 out; refuses non-finite predictions.

    describe(i) names input i (sample, step, timestep) for the error message."""
    eps = sharding.evaluate(lambda xs, ts, cs: eps_fn(xs.to(model_dtype), ts, cs), x, timesteps, cond)
    # one check for the whole call: a sum is finite only if every entry is; when it is not, the entries say which
    # (or that float64 entries near the top of the range overflowed it)
    if not bool(torch.isfinite(eps.sum(dtype=torch.float64))):
        finite = torch.isfinite(eps.flatten(1)).all(dim=1)
        if bool(finite.all()):  # float64 entries near the top of the range: the sum overflowed, not the model
            return eps
        i = int((~finite).nonzero()[0])
        raise NonFiniteModelOutput(f"the model returned a non-finite noise prediction at iteration {iteration}, "
                                   f"{describe(i)}")
    return eps
