"""ParaTAA: parallel sampling of diffusion models by triangular Anderson acceleration (Tang et al., ICML 2024).

The algorithm only: it imports torch (and diffusers' scheduler, for the coefficients), never the run layer.

    config      SolverConfig: every solver parameter, its default, check and help text
    schedule    DDIM coefficients of the triangular system, from a diffusers scheduler
    noise       the per-step noise tensor [S, T+1, *latent]
    equations   order-k equations, Picard or DDIM form
    anderson    the triangular Anderson update and its memory
    solver      windowed fixed-point iteration: `solve`, the entry point
    sequential  the sequential reference sampler with the same coefficients
    sharding    splitting each batched model call across processes
    denoiser    the noise-prediction callable contract
"""
from .config import SolverConfig
from .denoiser import NonFiniteModelOutput
from .noise import NoiseStream, draw_noise, noise_from_seeds
from .schedule import (Schedule, dit_alphas_cumprod, dit_schedule, flow_schedule, from_ddim_scheduler,
                       pipeline_schedule)
from .sequential import sample_sequential
from .sharding import Sharding, shard_bounds
from .solver import SolveResult, solve

__all__ = ["SolverConfig", "Schedule", "dit_schedule", "dit_alphas_cumprod", "flow_schedule", "from_ddim_scheduler",
           "pipeline_schedule", "draw_noise", "noise_from_seeds", "NoiseStream", "solve", "SolveResult",
           "sample_sequential", "Sharding", "shard_bounds", "NonFiniteModelOutput"]
