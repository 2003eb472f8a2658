"""The training loop every embedded model shares, and the noisy-latent batch of the diffusion models.

Seeded and CPU-deterministic: the same arguments give the same weights bit for bit, which is how the committed
weights stay reproducible by the committed scripts.
"""
import copy
import math
import time

import torch


def lr_at(step, total, base, warmup):
    """Linear warm-up, then cosine down to 10% so that the last steps refine rather than stop."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


@torch.no_grad()
def update_ema(ema, model, decay):
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.mul_(decay).add_(p.detach(), alpha=1 - decay)


def train(model, params, batch_loss, steps, lr, warmup, name, log_every, clip=None, ema_decay=None, on_step=None):
    """Train model for `steps` AdamW steps (no weight decay) on params.

    batch_loss(step) -> {"loss": tensor, other logged scalars...}: draws its batch from its own generator.
    clip: gradient-norm bound (None: no clipping). ema_decay: keep an EMA copy, its decay warmed up as
    min(ema_decay, (1 + step) / (10 + step)) so that a short run is not dominated by the random init.
    on_step(step, ema or model): called after every step (evaluation during training).
    Returns the EMA copy when ema_decay is set, else the model."""
    ema = copy.deepcopy(model).eval().requires_grad_(False) if ema_decay is not None else None
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        logged = batch_loss(step)
        opt.zero_grad(set_to_none=True)
        logged["loss"].backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        if ema is not None:
            update_ema(ema, model, min(ema_decay, (1 + step) / (10 + step)))
        if step % log_every == 0 or step == steps - 1:
            values = " ".join(f"{k} {float(torch.as_tensor(v).detach()):.4f}" for k, v in logged.items())
            print(f"[{name} {step:5d}] {values} ({time.time() - t0:.0f}s)", flush=True)
        if on_step is not None:
            on_step(step, ema if ema is not None else model)
    return ema if ema is not None else model


def noisy_latents(lat_mean, lat_std, scale, batch, scheduler, g):
    """A training batch of the latent diffusion models: (index into the dataset [B], z_t, t [B], noise).

    z_0 is a posterior sample of the VAE (as DiT trains), so that the prior covers the decoder's input region."""
    idx = torch.randint(0, len(lat_mean), (batch,), generator=g)
    z0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)) * scale  # [B, 4, 4, 4]
    noise = torch.randn(z0.shape, generator=g)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=g)
    return idx, scheduler.add_noise(z0, noise, t), t, noise
