"""The only view the samplers have of a model: a noise-prediction callable.

    eps_fn(x, timesteps, cond) -> eps

x: [N, *latent] in the model's dtype, timesteps: [N] long model timesteps, cond: the per-input conditioning (a
tensor or a dict of tensors with leading dimension N, or None), eps: [N, *latent] with guidance already applied.
Adapters for DiT and Stable Diffusion live with the scripts and in models/, never here.

The samplers call eps_fn under torch.no_grad(), as diffusers' pipelines and k-diffusion's samplers do: a plain
module can be passed as it is (its output would otherwise carry an autograd graph through every iteration), and an
eps_fn that needs gradients, e.g. for classifier guidance, turns them on inside with torch.enable_grad().
"""
import torch

from .schedule import Schedule


class NonFiniteModelOutput(FloatingPointError):
    pass


def check_problem(eps_fn, schedule, noise, cond, model_dtype, sharding=None, callback=None):
    """The arguments both samplers take, checked before any model call: eps_fn callable, schedule a Schedule,
    noise [B >= 1, T+1, *latent] (at least one latent dimension) floating point and finite, cond None or [B, ...]
    (a tensor or a dict of them), model_dtype a floating-point torch.dtype (the states are cast to it for every
    call), sharding None or a Sharding, callback None or callable. Raises TypeError or ValueError naming the
    argument (the rows of cond would otherwise be picked by index, and extra rows silently ignored)."""
    if not callable(eps_fn):
        raise TypeError(f"eps_fn must be callable (x, timesteps, cond) -> eps, got {type(eps_fn).__name__}")
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a paratAA.Schedule (e.g. dit_schedule(T), from_ddim_scheduler(...)), "
                        f"got {type(schedule).__name__}")
    _check_schedule(schedule)
    T = schedule.num_steps
    if not torch.is_tensor(noise) or not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point tensor [B, T+1={T + 1}, *latent], got "
                        f"{noise.dtype if torch.is_tensor(noise) else type(noise).__name__}")
    if noise.layout != torch.strided:  # a sparse tensor failed inside the solver ("reshape is not implemented")
        raise TypeError(f"noise must be a dense tensor, got layout {noise.layout} (call .to_dense())")
    if noise.dim() < 3 or noise.shape[1] != T + 1 or noise.shape[0] == 0 or 0 in noise.shape[2:]:
        raise ValueError(f"noise must be [B >= 1, T+1={T + 1}, *latent] (at least one latent dimension, none of size "
                         f"0), got "
                         f"{tuple(noise.shape)}")
    _check_has_values(noise, "noise")
    bad = _first_non_finite(noise)
    if bad:
        b, s = bad
        raise ValueError(f"noise has a non-finite value: sample {b}, index {s} (" +
                         ("x_T" if s == T else f"the noise of step {s}") + ")")
    if not isinstance(model_dtype, torch.dtype) or not model_dtype.is_floating_point:
        raise TypeError(f"model_dtype must be a floating-point torch.dtype, got {model_dtype!r}")
    _check_rows(cond, noise.shape[0], "cond")
    if sharding is not None and not callable(getattr(sharding, "evaluate", None)):
        raise TypeError(f"sharding must be a paratAA.Sharding or None, got {type(sharding).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")


def _check_schedule(schedule):
    """A Schedule built by hand (it is public) whose coefficients do not have one entry per step failed inside
    torch (a size mismatch, an index out of range) or, with extra entries, ignored them without a word."""
    t = schedule.timesteps
    if not torch.is_tensor(t) or t.dim() != 1 or len(t) == 0:
        raise ValueError(f"schedule.timesteps must be a 1-D tensor of the T >= 1 model timesteps, got "
                         f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
    for name in ("a", "b", "c", "sigma"):
        v = getattr(schedule, name)
        if not torch.is_tensor(v) or not v.is_floating_point() or tuple(v.shape) != (len(t),):
            got = f"{tuple(v.shape)} {v.dtype}" if torch.is_tensor(v) else type(v).__name__
            raise ValueError(f"schedule.{name} must be a floating-point tensor [T={len(t)}], one entry per step as "
                             f"schedule.timesteps, got {got}")
        _check_has_values(v, f"schedule.{name}")
        # a NaN coefficient was reported after model calls as the model's (or the noise's) fault, and a NaN or
        # huge sigma made every state pass its tolerance: a one-iteration "converged" sample far from the result
        finite = torch.isfinite(v)
        if not bool(finite.all()) or name == "sigma" and bool((v < 0).any()):
            step = int((~finite | (v < 0) if name == "sigma" else ~finite).nonzero()[0])
            raise ValueError(f"schedule.{name} must be finite{' and >= 0' if name == 'sigma' else ''}: step {step} "
                             f"is {float(v[step])!r}")


def check_init(init, noise):
    """A warm start's trajectory: a floating-point tensor shaped like noise, finite (a NaN in it would otherwise be
    reported as the model's)."""
    if not torch.is_tensor(init) or not init.is_floating_point() or tuple(init.shape) != tuple(noise.shape):
        got = (f"{tuple(init.shape)} {init.dtype}" if torch.is_tensor(init) else type(init).__name__)
        raise ValueError(f"init must be a floating-point tensor shaped like noise {tuple(noise.shape)}, got {got}")
    _check_has_values(init, "init")
    bad = _first_non_finite(init)
    if bad:
        raise ValueError(f"init has a non-finite value: sample {bad[0]}, state {bad[1]}")


def _check_has_values(x, name):
    """A tensor on the meta device has a shape and no values (torch fails on the first read, naming nothing)."""
    if x.device.type == "meta":
        raise ValueError(f"{name} is on the meta device: it has a shape but no values")


def _first_non_finite(x):
    """(sample, index) of the first entry of x [B, T+1, *latent] holding a non-finite value, or None (one sync)."""
    finite = torch.isfinite(x.flatten(2)).all(dim=2)                                   # [B, T+1]
    if bool(finite.all()):
        return None
    return tuple(int(i) for i in (~finite).nonzero()[0])


def _check_rows(cond, B, name):
    if cond is None:
        return
    if isinstance(cond, dict):
        for k, v in cond.items():
            _check_rows(v, B, f"{name}[{k!r}]")
    elif not torch.is_tensor(cond):
        raise TypeError(f"{name} must be a tensor, a dict of tensors or None, got {type(cond).__name__}")
    elif cond.dim() == 0 or cond.shape[0] != B:
        raise ValueError(f"{name} must have one row per sample (B = {B}), got shape {tuple(cond.shape)}")


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
    eps = sharding.evaluate(model_call(eps_fn, model_dtype), x, timesteps, cond)
    # one check for the whole call: a sum is finite only if every entry is
    if check and not bool(torch.isfinite(eps.sum(dtype=torch.float64))):
        check_finite(eps, iteration, describe)
    return eps


def model_call(eps_fn, model_dtype):
    """eps_fn on the samplers' float64 inputs, called in the model's dtype; its output checked (_checked)."""
    return lambda xs, ts, cs: _checked(eps_fn(xs.to(model_dtype), ts, cs), xs)


def _checked(eps, x):
    """The model's output must be a prediction per input, shaped like the inputs (host-side: no sync)."""
    if not torch.is_tensor(eps):
        hint = " (a diffusers model returns an output object: take its .sample)" if hasattr(eps, "sample") else ""
        raise TypeError(f"eps_fn must return a tensor, got {type(eps).__name__}{hint}")
    if not eps.is_floating_point():  # an integer, bool or complex tensor would be cast (and rounded) silently
        raise TypeError(f"eps_fn must return a floating-point tensor, got {eps.dtype}")
    if eps.shape != x.shape:
        raise ValueError(f"eps_fn returned shape {tuple(eps.shape)} for inputs of shape {tuple(x.shape)}: it must "
                         f"return one prediction per input, shaped like it")
    if eps.device != x.device:  # else torch fails later, naming neither the model nor the device it should use
        raise ValueError(f"eps_fn returned a tensor on {eps.device} for inputs on {x.device}: it must return its "
                         f"prediction on the inputs' device")
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
