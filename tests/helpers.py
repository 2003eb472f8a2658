"""Shared fixtures-as-functions for the tests: small closed-form and DiT problems."""
import socket

import torch

from models.gmm import GaussianMixtureEps
from paratAA import dit_schedule, dit_scheduler


def gmm_problem(T, batch=1, latent=(4, 8, 8), eta=0.0, seed=0, components=10, std=0.1):
    """A nonlinear model with an exact float64 noise prediction, its schedule and the per-step noise."""
    schedule = dit_schedule(T, eta)
    model = GaussianMixtureEps.random(dit_scheduler().alphas_cumprod, latent, components=components, std=std,
                                      seed=seed)
    g = torch.Generator().manual_seed(1000 + seed)
    noise = torch.randn((batch, T + 1) + tuple(latent), generator=g, dtype=torch.float64)
    return model, schedule, noise


def rms(a, b):
    return float((a - b).pow(2).mean().sqrt())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
