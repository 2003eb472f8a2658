"""The per-step noise the solver takes: [S, T+1, *latent], xi[s] for step s and x_T at index T.

It is drawn once, before solving, from a CPU generator, so every process (and every rerun) sees the same values
and the parallel and sequential samplers share them. A run of many samples draws it batch by batch
(NoiseStream), with exactly the values one draw of all samples would give.
"""
import math

import torch

_BLOCK = 16  # torch's CPU normal sampler fills blocks of 16 values (and redraws the last 16 of a ragged tail)


def _index(value):
    """An integer torch can take as a size or a seed (anything with __index__), but not a bool."""
    return not isinstance(value, bool) and hasattr(value, "__index__")


def draw_noise(num_samples, T, latent, generator=None):
    """[num_samples, T+1, *latent] float64 standard normal from one generator (all samples in one draw)."""
    if not _index(num_samples) or num_samples < 0:
        raise ValueError(f"num_samples must be an integer >= 0, got {num_samples!r}")
    if not _index(T) or T < 1:
        raise ValueError(f"T must be an integer >= 1 (the number of steps), got {T!r}")
    if isinstance(latent, (str, bytes)) or not hasattr(latent, "__iter__") or \
            any(not _index(n) or n < 1 for n in tuple(latent)):  # draw_noise(1, 10, 4): "int is not iterable"
        raise ValueError(f"latent must be a shape (a tuple of integers >= 1, e.g. (4, 32, 32)), got {latent!r}")
    return torch.randn((num_samples, T + 1) + tuple(latent), generator=generator, dtype=torch.float64)


def noise_from_seeds(seeds, T, latent):
    """One generator per sample: sample i's noise depends only on seeds[i], whatever the others are."""
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds is empty: one seed per sample")
    for s in seeds:  # torch takes a seed modulo 2^64 and a float's integer part: two seeds would give one noise
        if not _index(s) or not 0 <= s < 2 ** 64:
            raise ValueError(f"seeds must be integers in 0..2^64-1, got {s!r}")
    return torch.stack([draw_noise(1, T, latent, torch.Generator().manual_seed(int(s)))[0] for s in seeds])


class NoiseStream:
    """draw_noise(num_samples, T, latent, generator), handed out a few samples at a time (`take`), so that a run
    never holds more noise than its current batch.

    The values equal the single draw's: torch fills a float64 normal tensor of n >= 16 values from n uniforms in
    blocks of 16 and, when n is not a multiple of 16, redraws its last 16 values from 16 more uniforms. Drawing
    the same values in pieces whose lengths are multiples of 16, with a last piece of at least 16 values, consumes
    the generator in the same order (tests/test_solver.py checks it for ragged sizes)."""

    def __init__(self, num_samples, T, latent, generator=None):
        self.shape = (T + 1,) + tuple(latent)
        self.per_sample = math.prod(self.shape)
        self.left = num_samples * self.per_sample       # values not drawn yet
        self.generator = generator
        self.buffer = torch.empty(0, dtype=torch.float64)

    def take(self, n):
        """The next n samples' noise, [n, T+1, *latent] float64."""
        need = n * self.per_sample - len(self.buffer)
        if need > self.left:
            raise ValueError(f"only {(len(self.buffer) + self.left) // self.per_sample} samples of noise are left")
        if need > 0:
            size = min(-(-need // _BLOCK) * _BLOCK, self.left)
            if self.left - size < _BLOCK:  # never leave a tail shorter than a block: it would be drawn differently
                size = self.left
            self.left -= size
            self.buffer = torch.cat([self.buffer, torch.randn(size, generator=self.generator, dtype=torch.float64)])
        out, self.buffer = self.buffer[:n * self.per_sample], self.buffer[n * self.per_sample:]
        return out.reshape((n,) + self.shape)
