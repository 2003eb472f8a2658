"""The per-step noise the solver takes: [S, T+1, *latent], xi[s] for step s and x_T at index T.

It is drawn once, before solving, from a CPU generator, so every process (and every rerun) sees the same values
and the parallel and sequential samplers share them.
"""
import torch


def draw_noise(num_samples, T, latent, generator=None):
    """[num_samples, T+1, *latent] float64 standard normal from one generator (all samples in one draw)."""
    return torch.randn((num_samples, T + 1) + tuple(latent), generator=generator, dtype=torch.float64)


def noise_from_seeds(seeds, T, latent):
    """One generator per sample: sample i's noise depends only on seeds[i], whatever the others are."""
    return torch.stack([draw_noise(1, T, latent, torch.Generator().manual_seed(int(s)))[0] for s in seeds])
