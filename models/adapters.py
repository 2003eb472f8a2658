"""Model adapters: wrap a network as the noise-prediction callable eps_fn(x, timesteps, cond) the solver takes."""
import torch


class DiTDenoiser:
    """Class-conditional DiT with classifier-free guidance (docs/ALGORITHM.md, section 6).

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


class SDDenoiser:
    """Stable Diffusion UNet with classifier-free guidance eps = eps_u + s (eps_c - eps_u) (docs/ALGORITHM.md, section 6).

    cond: {"cond": [N, L, E] prompt embeddings, "uncond": [N, L, E] negative-prompt embeddings}.
    """

    def __init__(self, unet, cfg_scale=1.0):
        self.unet = unet
        self.cfg_scale = float(cfg_scale)

    @torch.no_grad()
    def __call__(self, x, timesteps, cond):
        x = x.to(self.unet.dtype)
        if self.cfg_scale == 1.0:
            return self.unet(x, timesteps, encoder_hidden_states=cond["cond"]).sample
        emb = torch.cat([cond["uncond"], cond["cond"]])                                   # [2N, L, E]
        out = self.unet(torch.cat([x, x]), torch.cat([timesteps, timesteps]), encoder_hidden_states=emb).sample
        uncond, cond_eps = out.chunk(2)                                                    # [N, C, H, W] each
        return uncond + self.cfg_scale * (cond_eps - uncond)


class VAEDecoder:
    """Latents (scaled by the VAE's scaling_factor) -> uint8 images [N, H, W, 3], in chunks."""

    def __init__(self, vae, device, chunk=16):
        self.vae, self.device, self.chunk = vae, device, chunk

    @torch.no_grad()
    def __call__(self, latents):
        imgs = []
        for part in latents.split(self.chunk):
            x = self.vae.decode(part.to(self.device, self.vae.dtype) / self.vae.config.scaling_factor).sample
            imgs.append(((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
        return torch.cat(imgs).numpy()
