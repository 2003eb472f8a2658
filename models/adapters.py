"""Model adapters: wrap a network as the noise-prediction callable eps_fn(x, timesteps, cond) the solver takes."""
import torch


class DiTDenoiser:
    """Class-conditional DiT with classifier-free guidance (METHOD.md section 6).

    cond: [N] class labels. With guidance the batch is doubled ([cond; null]) and the model's own
    forward_with_cfg mixes the halves, keeping DiT's convention of guiding only its first 3 channels. Only the
    noise half of the output (the first latent-channels channels) is returned; the learned variance is unused.
    """

    def __init__(self, model, cfg_scale=1.0):
        self.model = model
        self.cfg_scale = float(cfg_scale)
        self.null_class = model.num_classes  # the extra embedding row, not a hard-coded 1000

    @torch.no_grad()
    def __call__(self, x, timesteps, labels):
        C = x.shape[1]
        if self.cfg_scale == 1.0:
            return self.model(x, timesteps, labels)[:, :C]
        null = torch.full_like(labels, self.null_class)
        out = self.model.forward_with_cfg(torch.cat([x, x]), torch.cat([timesteps, timesteps]),
                                          torch.cat([labels, null]), self.cfg_scale)  # [2N, 2C, H, W]
        return out[: x.shape[0], :C]
