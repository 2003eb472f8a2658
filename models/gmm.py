"""A diffusion "model" with a closed form: the exact noise prediction of a Gaussian-mixture data distribution.

Data x_0 ~ sum_k w_k N(mu_k, s^2 I). At a level with alphas_cumprod A the noisy marginal is a mixture of
N(sqrt(A) mu_k, v I), v = A s^2 + 1 - A, and the optimal noise prediction is eps = -sqrt(1 - A) * score.
It is nonlinear (the posterior over components switches as noise falls), exact in float64 and costs nothing,
which makes it the reference model for testing the solver and counting its iterations.
"""
import torch


class GaussianMixtureEps:
    def __init__(self, alphas_cumprod, means, std=0.1, weights=None):
        """alphas_cumprod: [n_train] of the scheduler; means: [K, *latent]; std: the s of every component."""
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.means = means.to(torch.float64)                                       # [K, *latent]
        K = self.means.shape[0]
        w = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else torch.as_tensor(weights)
        self.log_w = torch.log(w.to(torch.float64))
        self.var0 = float(std) ** 2
        self.calls = 0   # batched calls, for counting iterations
        self.inputs = 0  # total inputs evaluated

    @classmethod
    def random(cls, alphas_cumprod, latent_shape, components=10, std=0.1, seed=0, spread=1.0):
        g = torch.Generator().manual_seed(seed)
        means = spread * torch.randn((components,) + tuple(latent_shape), generator=g, dtype=torch.float64)
        return cls(alphas_cumprod, means, std=std)

    def __call__(self, x, timesteps, cond=None):
        """x: [N, *latent], timesteps: [N]; cond (optional [N] long) restricts the mixture to component cond."""
        self.calls += 1
        self.inputs += x.shape[0]
        dtype = x.dtype
        x = x.to(torch.float64).flatten(1)                                              # [N, D]
        A = self.alphas_cumprod.to(x.device)[timesteps.long()][:, None]                  # [N, 1]
        mu = self.means.to(x.device).flatten(1)                                          # [K, D]
        v = A * self.var0 + 1 - A                                                        # [N, 1]
        centers = A.sqrt()[:, :, None] * mu.T[None]                                      # [N, D, K]
        diff = centers - x[:, :, None]                                                   # [N, D, K]
        logits = self.log_w.to(x.device)[None] - diff.pow(2).sum(1) / (2 * v)           # [N, K]
        if cond is not None:
            keep = torch.nn.functional.one_hot(cond.long(), mu.shape[0]).bool()
            logits = torch.where(keep, logits, -torch.inf)
        post = torch.softmax(logits, dim=1)                                              # [N, K]
        score = (diff * post[:, None, :]).sum(2) / v                                     # [N, D]
        eps = -(1 - A).sqrt() * score
        return eps.reshape(x.shape[0], *self.means.shape[1:]).to(dtype)
