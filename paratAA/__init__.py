"""ParaTAA: parallel sampling of diffusion models by triangular Anderson acceleration (Tang et al., ICML 2024).

    schedule    DDIM coefficients of the triangular system, from a diffusers scheduler
    equations   order-k equations (banded products of the step coefficients)
    anderson    the triangular Anderson update
    solver      windowed fixed-point iteration: `solve`, the entry point
    sequential  the sequential reference sampler with the same coefficients
    sharding    splitting each batched model call across processes
    denoiser    the noise-prediction callable contract
"""
from .denoiser import NonFiniteModelOutput
from .schedule import Schedule, dit_schedule, dit_scheduler, from_ddim_scheduler, pipeline_schedule
from .sequential import sample_sequential
from .sharding import Sharding, shard_bounds
from .solver import SolveResult, check_config, solve

__all__ = ["Schedule", "dit_schedule", "dit_scheduler", "from_ddim_scheduler", "pipeline_schedule", "solve",
           "SolveResult", "check_config", "sample_sequential", "Sharding", "shard_bounds", "NonFiniteModelOutput"]
