"""DDIM coefficients of the triangular system (docs/ALGORITHM.md, equation 1).

Step s (s = 0 .. T-1, s = 0 is the last, least noisy step) maps state x_{s+1} to x_s:

    x_s = a[s] * x_{s+1} + b[s] * eps(x_{s+1}, timesteps[s]) + c[s] * xi[s]

x_T is pure noise and x_0 the sample. The noise tensor that the solver takes holds T + 1 draws: xi[s] for
step s and xi[T] = x_T. The coefficients are read from a diffusers `DDIMScheduler` (its alphas_cumprod, its
timestep list and its final_alpha_cumprod) and computed in float64, for any eta >= 0.
"""
import math
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler


@dataclass(frozen=True)
class Schedule:
    timesteps: torch.Tensor  # [T] long, model timestep fed with x_{s+1} at step s (ascending)
    a: torch.Tensor          # [T] float64, weight of x_{s+1}
    b: torch.Tensor          # [T] float64, weight of eps
    c: torch.Tensor          # [T] float64, weight of the fresh noise xi[s] (eta * sigma, 0 at s = 0)
    sigma: torch.Tensor      # [T] float64, DDPM posterior std of step s (eta = 1), scales tol2
    eta: float
    num_train_timesteps: int

    @property
    def num_steps(self):
        return len(self.timesteps)

    def to(self, device):
        move = {k: getattr(self, k).to(device) for k in ("timesteps", "a", "b", "c", "sigma")}
        return Schedule(eta=self.eta, num_train_timesteps=self.num_train_timesteps, **move)


def check_eta(eta):
    """eta in 0..1: above 1 the DDIM noise would exceed the posterior's (1 - A' - c^2 < 0): no valid step."""
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and 0 <= eta <= 1):
        raise ValueError(f"eta must be a number in 0..1, got {eta!r}")


def check_num_steps(num_steps, num_train_timesteps):
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(
            f"timesteps (number of sampling steps T) must be an integer in 1..{num_train_timesteps}, got {num_steps!r}")


def from_ddim_scheduler(scheduler, num_steps, eta=0.0):
    """Schedule for `num_steps` DDIM steps of a diffusers scheduler (any scheduler config is read as DDIM).

    The next (less noisy) alpha of a step is the alpha of the next timestep in the scheduler's own list, and
    after the last step the scheduler's final_alpha_cumprod: this is DDIM on exactly the timesteps the
    scheduler chose. (diffusers' DDIMScheduler.step instead assumes an even stride num_train // T, which is
    the same list for "leading"/"trailing" spacing but not for "linspace".)
    """
    check_eta(eta)
    if not isinstance(scheduler, DDIMScheduler):
        scheduler = DDIMScheduler.from_config(scheduler.config)
    n_train = scheduler.config.num_train_timesteps
    check_num_steps(num_steps, n_train)
    scheduler.set_timesteps(num_steps)

    timesteps = scheduler.timesteps.flip(0).long()                  # [T] ascending: step s uses timesteps[s]
    # diffusers keeps alphas_cumprod in float32; the product of its betas is redone in float64 (as DiT does)
    alphas = torch.cumprod(1 - scheduler.betas.to(torch.float64), dim=0)      # [n_train]
    final = torch.ones(1, dtype=torch.float64) if scheduler.config.set_alpha_to_one else alphas[:1]
    alpha = alphas[timesteps]                                       # [T]  A  of step s
    alpha_next = torch.cat([final, alpha[:-1]])                     # [T]  A' of step s (state x_s)

    sigma = torch.sqrt((1 - alpha_next) / (1 - alpha)) * torch.sqrt(1 - alpha / alpha_next)
    c = eta * sigma
    c[0] = 0.0  # the last step adds no noise, as in DDIM
    a = torch.sqrt(alpha_next / alpha)
    # the root's argument is >= 0 for eta <= 1 (check_eta); the clamp only absorbs round-off at eta = 1
    b = torch.sqrt(torch.clamp(1 - alpha_next - c ** 2, min=0)) - a * torch.sqrt(1 - alpha)
    return Schedule(timesteps=timesteps, a=a, b=b, c=c, sigma=sigma, eta=float(eta), num_train_timesteps=n_train)


def dit_scheduler():
    """The DiT / ADM diffusion: 1000 linear betas 1e-4..0.02, final alpha 1.

    "linspace" spacing rounds linspace(0, 999, T), which is DiT's respacing of T steps, and the model is fed the
    original timestep, as DiT's respaced wrapper does.
    """
    return DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                         set_alpha_to_one=True, timestep_spacing="linspace", clip_sample=False, steps_offset=0)


def dit_schedule(num_steps, eta=0.0):
    return from_ddim_scheduler(dit_scheduler(), num_steps, eta)


def pipeline_schedule(pipeline, num_steps, eta=0.0):
    """Schedule of whatever scheduler a diffusers pipeline carries (Stable Diffusion: read as DDIM, keeping its
    set_alpha_to_one, so the last step uses alphas_cumprod[0] for SD v1.5)."""
    return from_ddim_scheduler(DDIMScheduler.from_config(pipeline.scheduler.config), num_steps, eta)
