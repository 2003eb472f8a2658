"""Coefficients of the triangular system (docs/ALGORITHM.md, equation 1).

Step s (s = 0 .. T-1, s = 0 is the last, least noisy step) maps state x_{s+1} to x_s:

    x_s = a[s] * x_{s+1} + b[s] * eps(x_{s+1}, timesteps[s]) + c[s] * xi[s]

x_T is pure noise and x_0 the sample. The noise tensor that the solver takes holds T + 1 draws: xi[s] for step s and
xi[T] = x_T. Three sources of the noise levels, each computed the way its reference computes them, in float64:

    dit_schedule        DiT's own diffusion: float64 linear betas, respaced by DiT's accumulate-and-round rule,
                        the cumulative products recomputed from the respaced betas, final alpha 1
    from_ddim_scheduler a diffusers scheduler read as DDIM (Stable Diffusion): its timestep list, its
                        alphas_cumprod as it stores them (float32), its final_alpha_cumprod, and the steps
                        DDIMScheduler.step takes between them
    flow_schedule       a flow-matching scheduler's Euler steps (SD3, Flux): a = 1, b = the drop of sigma, f = the
                        velocity
"""
import copy
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from diffusers import DDIMScheduler

from .config import is_integer, is_real


@dataclass(frozen=True)
class Schedule:
    timesteps: torch.Tensor  # [T] model timestep fed with x_{s+1} at step s (ascending; long, float for flows)
    a: torch.Tensor          # [T] float64, weight of x_{s+1}
    b: torch.Tensor          # [T] float64, weight of eps
    c: torch.Tensor          # [T] float64, weight of the fresh noise xi[s] (eta * sigma, 0 at s = 0)
    sigma: torch.Tensor      # [T] float64, the step's noise scale for tol2 (DDIM: the DDPM posterior std, eta 1)
    eta: float
    num_train_timesteps: int
    # the same steps in the reference implementation's arithmetic, where its coefficients differ (a diffusers
    # scheduler's: 1 - A taken in float32), for the paper mode to solve its system; None where they are the same
    reference: "Schedule | None" = None

    @property
    def num_steps(self):
        return len(self.timesteps)

    def solved(self, reference_quirks):
        """The steps a solver solves: the reference's arithmetic with reference_quirks (the paper mode), so that its
        iterates are the reference's to round-off; these otherwise."""
        return self.reference if reference_quirks and self.reference is not None else self

    def to(self, device):
        move = {k: getattr(self, k).to(device) for k in ("timesteps", "a", "b", "c", "sigma")}
        return Schedule(eta=self.eta, num_train_timesteps=self.num_train_timesteps,
                        reference=None if self.reference is None else self.reference.to(device), **move)


def check_eta(eta):
    """eta in 0..1: above 1 the DDIM noise would exceed the posterior's (1 - A' - c^2 < 0): no valid step."""
    if not (is_real(eta) and math.isfinite(eta) and 0 <= eta <= 1):
        raise ValueError(f"eta must be a number in 0..1, got {eta!r}")


STEPS = "timesteps (number of sampling steps T)"  # how the number of steps is named in errors (the scripts' flag)


def check_num_steps(num_steps, num_train_timesteps, name=STEPS):
    """num_steps as a Python int, or ValueError. name: what the caller calls the number (the scripts' --timesteps,
    parallel_sample's num_inference_steps). The int: a numpy np.uint8(5) passed the check and overflowed inside
    diffusers' set_timesteps ("Python integer 1000 out of bounds for uint8")."""
    if not is_integer(num_steps) or not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"{name} must be an integer in 1..{num_train_timesteps}, got {num_steps!r}")
    return int(num_steps)


def coefficients(timesteps, one_minus, one_minus_next, eta, num_train_timesteps):
    """Equation (1) from 1 - A and 1 - A' of each step (float64 [T]; A' of the last step is the final alpha).

    Written as the reference writes it (the alphas recovered as 1 - (1 - A)), so that its coefficients are met
    to round-off from the same 1 - A (a float64 one recovers A to 1e-16 absolute):
    sigma = sqrt((1-A')/(1-A)) sqrt(1 - A/A'),  c = eta sigma (0 at the last step),
    a = sqrt(A'/A),  b = sqrt(1 - A' - c^2) - a sqrt(1 - A)."""
    now, nxt = one_minus.clamp(min=0), one_minus_next.clamp(min=0)
    A, A_next = (1 - now).clamp(min=0), (1 - nxt).clamp(min=0)
    sigma = torch.sqrt(nxt / now) * torch.sqrt(1 - (1 - now) / (1 - nxt))
    c = eta * sigma
    c[0] = 0.0  # the last step adds no noise, as in DDIM
    a = torch.sqrt(A_next) / torch.sqrt(A)
    # the root's argument is >= 0 for eta <= 1 (check_eta); the clamp only absorbs round-off at eta = 1
    b = torch.sqrt(torch.clamp(nxt - c ** 2, min=0)) - torch.sqrt(now) * a
    usable = torch.isfinite(a + b + c + sigma)  # not, e.g., where a noise level 1 - A is 0 or above 1
    if not bool(usable.all()):
        bad = int((~usable).nonzero()[0])
        raise ValueError(f"the scheduler's noise levels give no usable DDIM step {bad} (model timestep "
                         f"{int(timesteps[bad])}: alphas_cumprod {float(1 - one_minus[bad]):.3g}, next "
                         f"{float(1 - one_minus_next[bad]):.3g})")
    return Schedule(timesteps=timesteps, a=a, b=b, c=c, sigma=sigma, eta=float(eta),
                    num_train_timesteps=num_train_timesteps)


def from_ddim_scheduler(scheduler, num_steps, eta=0.0, name=STEPS):
    """Schedule for `num_steps` DDIM steps of a diffusers scheduler (any scheduler config is read as DDIM).

    The model is called at the scheduler's timesteps t, and each step goes where diffusers' DDIMScheduler.step
    takes it: to the alpha of t - num_train // T, or the scheduler's final_alpha_cumprod below 0. For "leading"
    spacing (Stable Diffusion v1.x, 2.x, XL) that is the next timestep of the list and, after the last, the final
    alpha, as the reference's SD script has it (with set_alpha_to_one false); for "trailing" spacing with
    num_train % T != 0 and for "linspace", diffusers' own loop steps to a noise level the next model call is not
    told (e.g. trailing, T = 7: from 999 to 857, then called at 856), and the solver follows it, so that the result
    is that loop's. The alphas are the scheduler's own, in the dtype it keeps them (float32), and 1 - A is taken in
    float64. The reference's SD script takes 1 - A in float32 and steps to the next listed timestep whatever the
    spacing: its system is kept as Schedule.reference where it differs, for the paper mode (docs/ALGORITHM.md,
    section 9).
    """
    check_eta(eta)
    if not hasattr(scheduler, "config"):
        raise TypeError(f"scheduler must be a diffusers scheduler, got {type(scheduler).__name__}")
    # set_timesteps below changes the scheduler it is called on: work on a copy, never on the caller's
    scheduler = copy.deepcopy(scheduler) if isinstance(scheduler, DDIMScheduler) else ddim_copy(scheduler.config)
    check_linear(scheduler.config)
    n_train = scheduler.config.num_train_timesteps
    num_steps = check_num_steps(num_steps, n_train, name)
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps.flip(0).long()                  # [T] ascending: step s uses timesteps[s]
    if int(timesteps.max()) >= n_train:  # "leading" spacing with steps_offset, e.g. T = n_train: 1 .. n_train
        raise ValueError(f"{name} {num_steps} is too many for this scheduler: its "
                         f"spacing ({scheduler.config.timestep_spacing}, steps_offset "
                         f"{scheduler.config.steps_offset}) gives model timestep {int(timesteps.max())}, beyond its "
                         f"{n_train} training steps; use fewer")
    if int(timesteps.min()) < 0:  # a negative steps_offset: the alphas would be read from the end of the list
        raise ValueError(f"the scheduler's spacing (steps_offset {scheduler.config.steps_offset}) gives model "
                         f"timestep {int(timesteps.min())}, below 0")
    alphas = torch.as_tensor(scheduler.alphas_cumprod)              # [n_train] as the scheduler keeps them
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=alphas.dtype).reshape(1)
    alpha = alphas[timesteps]                                       # [T]  A  of step s
    prev = timesteps - n_train // num_steps                         # [T]  where DDIMScheduler.step goes from t
    alpha_next = torch.where(prev >= 0, alphas[prev.clamp(min=0)], final)  # [T]  A' of step s (state x_s)
    # 1 - A in float64 from the scheduler's float32 A, which diffusers' step uses as it is. The reference's SD script
    # takes 1 - A in float32 and recovers A from it, which loses A's digits where A is small: 1e-5 of A at SD's
    # noisiest level (0.0058), but a level of 2e-7 (linear betas to 0.03) came back 12% low and one of 2.4e-9
    # (squaredcos_cap_v2 at t = 999) as 0: 7% off diffusers' own loop at tolerance 0, and refused. The paper mode
    # solves the reference's system (Schedule.reference), where it has a usable step: that arithmetic, and its
    # steps, each to the next listed timestep and after the last to alphas_cumprod[0]
    exact = coefficients(timesteps, 1 - alpha.double(), 1 - alpha_next.double(), eta, n_train)
    listed_next = alphas[torch.cat([timesteps.new_zeros(1), timesteps[:-1]])]     # [T]  the reference's A' of step s
    try:
        theirs = coefficients(timesteps, (1 - alpha).double(), (1 - listed_next).double(), eta, n_train)
    except ValueError:  # no usable step there (a level recovered as 0): the reference's own steps are inf or NaN
        return exact
    same = all(torch.equal(getattr(exact, k), getattr(theirs, k)) for k in ("a", "b", "c", "sigma"))
    return exact if same else replace(exact, reference=theirs)


def check_linear(config):
    """A scheduler config whose own steps are not equation (1): the solver would reach another result than its loop
    (diffusers' DDIMScheduler() clips x_0 by default). Only what the config itself sets counts: a DDIM copy made
    from another scheduler's config takes DDIM's defaults for keys that scheduler does not have."""
    for key, why in NONLINEAR.items():
        if config.get(key):
            raise ValueError(f"scheduler sets {key}: {why}, and the result would differ from its own loop; set "
                             f"{key}=False")


# the scheduler settings whose loop is not equation (1), each with why
NONLINEAR = {"clip_sample": "its steps clip x_0, so they are not the linear DDIM steps of equation (1)",
             "thresholding": "its steps threshold x_0, so they are not the linear DDIM steps of equation (1)",
             "rescale_betas_zero_snr": "its last noise level has no signal left (alphas_cumprod 0), where equation "
                                       "(1)'s coefficients in the noise prediction divide by it"}


def ddim_copy(config):
    """A DDIMScheduler on a scheduler config's noise levels (any scheduler's), the config checked (check_linear)
    first: the copy then sets none of NONLINEAR, whose DDIM defaults (clip_sample) the config may not have."""
    check_linear(config)
    return DDIMScheduler.from_config(config, **dict.fromkeys(NONLINEAR, False))


def dit_respacing(T, num_train=1000):
    """The timesteps DiT keeps for T steps (its space_timesteps with one section): a fractional stride
    (num_train - 1) / (T - 1) accumulated T times, each rounded with Python's round (half to even)."""
    stride = (num_train - 1) / (T - 1) if T > 1 else 1
    cur, kept = 0.0, set()
    for _ in range(T):
        kept.add(round(cur))
        cur += stride
    return sorted(kept)


def dit_alphas_cumprod(num_train=1000):
    """DiT / ADM's noise levels: num_train linear betas 1e-4 .. 0.02 in float64 (scaled by 1000 / num_train), their
    cumulative products of 1 - beta ([num_train] float64, numpy)."""
    scale = 1000 / num_train
    return np.cumprod(1.0 - np.linspace(scale * 1e-4, scale * 0.02, num_train, dtype=np.float64))


def dit_schedule(num_steps, eta=0.0, num_train=1000):
    """DiT / ADM's diffusion respaced to num_steps, as its diffusion code does it; the model is fed the original
    timestep, as DiT's respaced wrapper does."""
    check_eta(eta)
    if not is_integer(num_train) or num_train < 2:
        raise ValueError(f"num_train (the diffusion's training steps) must be an integer >= 2, got {num_train!r}")
    num_steps = check_num_steps(num_steps, num_train)
    base = dit_alphas_cumprod(num_train)
    kept = dit_respacing(num_steps, num_train)
    last, new_betas = 1.0, []
    for t in kept:  # the respaced process: one beta per kept step, from the base cumulative products
        new_betas.append(1 - base[t] / last)
        last = base[t]
    alphas = np.cumprod(1.0 - np.array(new_betas))                 # recomputed, as DiT's respaced diffusion does
    alphas_prev = np.append(1.0, alphas[:-1])
    return coefficients(torch.tensor(kept, dtype=torch.long), torch.from_numpy(1 - alphas),
                        torch.from_numpy(1 - alphas_prev), eta, num_train)


def flow_schedule(scheduler, num_steps, eta=0.0, name=STEPS, sigmas=None, mu=None):
    """Euler steps of a flow-matching scheduler (diffusers' FlowMatchEulerDiscreteScheduler: SD3, Flux; its timestep
    shift included) as the triangular system with f = v, the model's velocity:

        x_s = x_{s+1} + (sigma'_s - sigma_s) v(x_{s+1}, t_s),     a = 1,  b = sigma' - sigma,  c = 0

    sigma_s the noise level the scheduler gives step s, sigma'_s the next one (0 after the last step), t_s the
    model timestep (sigma_s times num_train_timesteps, as a float). The convergence test's scale (the Schedule's
    sigma) is the step's drop of the noise level, sigma_s - sigma'_s. Flow sampling here is deterministic (eta 0).

    sigmas, mu: what a pipeline hands the scheduler's set_timesteps, for its levels to be the ones its own loop
    steps through. sigmas: the T levels before the shift (Flux: linspace(1, 1/T, T); default the scheduler's own
    spacing). mu: the shift of a scheduler with use_dynamic_shifting, which depends on the image size, so only the
    caller knows it (Flux computes it from the number of image tokens); required for such a scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):  # Heun, LCM: other steps than Euler's
        raise TypeError(f"scheduler must be a flow-matching scheduler (FlowMatchEulerDiscreteScheduler), got "
                        f"{type(scheduler).__name__}")
    if eta != 0:
        raise ValueError(f"eta must be 0 for a flow-matching scheduler (its Euler steps add no noise), got {eta!r}")
    n_train = scheduler.config.num_train_timesteps
    num_steps = check_num_steps(num_steps, n_train, name)
    if getattr(scheduler.config, "use_dynamic_shifting", False) and mu is None:
        raise ValueError("mu must be given for a scheduler with use_dynamic_shifting: its shift depends on the image "
                         "size, which the pipeline turns into mu (Flux: from the number of image tokens)")
    if mu is not None and not (is_real(mu) and math.isfinite(mu)):
        raise ValueError(f"mu must be a finite number, got {mu!r}")
    if sigmas is not None:
        levels = np.asarray(sigmas, dtype=np.float64)
        if levels.shape != (num_steps,) or not (np.isfinite(levels).all() and (levels > 0).all()
                                                and (levels <= 1).all()):
            raise ValueError(f"sigmas must be {num_steps} noise levels in (0, 1], one per step, got "
                             f"{levels.shape[0] if levels.ndim == 1 else levels.shape} values")
    scheduler = copy.deepcopy(scheduler)  # set_timesteps changes it: leave the caller's as it was
    with np.errstate(divide="ignore", invalid="ignore"):  # numpy's warning on a 0/0: said below, in one line
        try:
            scheduler.set_timesteps(num_steps, sigmas=sigmas, mu=mu)
        except TypeError as e:  # a setting of another type that only set_timesteps reads (shift_terminal "0.2")
            raise ValueError(f"the scheduler's config gives no usable noise levels for {name} {num_steps} "
                             f"(TypeError: {e})") from None
    if not bool(torch.isfinite(scheduler.sigmas).all()):  # else NaN states, blamed on the model's predictions
        # (shift_terminal stretches the levels to end at it, dividing 0 by 0 when there is one level)
        raise ValueError(f"the scheduler gives non-finite noise levels for {name} {num_steps} (shift_terminal "
                         f"{scheduler.config.get('shift_terminal')!r}): choose more steps or another config")
    levels = scheduler.sigmas.double()
    if not bool((levels[:-1] > levels[1:]).all() and (levels >= 0).all()):
        # a flow is sampled from noise down to data: invert_sigmas, a shift_terminal outside (0, 1) or a shift so
        # large that the levels tie went the other way or stood still (a negative "noise" step, said after
        # loading as schedule.sigma, or one effective step, where the pipeline's own call fails)
        said = ", ".join(f"{k} {scheduler.config.get(k)!r}" for k in ("shift", "shift_terminal", "invert_sigmas")
                         if k in scheduler.config)
        raise ValueError(f"the scheduler's noise levels for {name} {num_steps} do not fall from noise to data, "
                         f"each below the one before ({said})")
    sig = scheduler.sigmas.to(torch.float32)                       # [T+1] descending, as the scheduler keeps them
    timesteps = scheduler.timesteps.flip(0).to(torch.float32)      # [T] ascending: step s uses timesteps[s]
    drop = (sig[:-1] - sig[1:]).flip(0).double()                   # [T] sigma_s - sigma'_s, float32 as its step
    return Schedule(timesteps=timesteps, a=torch.ones(num_steps, dtype=torch.float64), b=-drop,
                    c=torch.zeros(num_steps, dtype=torch.float64), sigma=drop.clone(), eta=0.0,
                    num_train_timesteps=n_train)


def is_flow(scheduler):
    return "FlowMatch" in type(scheduler).__name__


def pipeline_schedule(pipeline, num_steps, eta=0.0, name=STEPS):
    """Schedule of whatever scheduler a diffusers pipeline carries: a flow-matching scheduler's Euler steps
    (flow_schedule), anything else read as DDIM (Stable Diffusion: keeping its set_alpha_to_one, so the last step
    uses alphas_cumprod[0] for SD v1.5). name: the number of steps as the caller calls it, in errors."""
    # both work on a copy: the pipeline's own scheduler keeps its state
    if is_flow(pipeline.scheduler):
        return flow_schedule(pipeline.scheduler, num_steps, eta, name)
    return from_ddim_scheduler(pipeline.scheduler, num_steps, eta, name)
