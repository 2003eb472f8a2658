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


def to_noise_prediction(out, x, alphas_cumprod, timesteps, prediction_type):
    """A model's native prediction as the noise prediction eps of equation (1), as diffusers' DDIM step reads it:
    v (velocity): eps = sqrt(A) v + sqrt(1 - A) x;  sample (x_0): eps = (x - sqrt(A) x_0) / sqrt(1 - A)."""
    if prediction_type == "epsilon":
        return out
    A = alphas_cumprod.to(x.device)[timesteps.long()].to(out.dtype).reshape(-1, *([1] * (x.dim() - 1)))  # [N, 1, ..]
    x = x.to(out.dtype)
    if prediction_type == "v_prediction":
        return A.sqrt() * out + (1 - A).sqrt() * x
    if prediction_type == "sample":
        return (x - A.sqrt() * out) / (1 - A).sqrt()
    raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}")


class SDDenoiser:
    """Stable Diffusion UNet with classifier-free guidance out = out_u + s (out_c - out_u) (docs/ALGORITHM.md,
    section 6), turned into a noise prediction when the model predicts v or the sample (SD 2.x 768 predicts v).

    cond: {"cond": [N, L, E] prompt embeddings, "uncond": [N, L, E] negative-prompt embeddings}.
    alphas_cumprod: the scheduler's (needed for v_prediction and sample).
    """

    def __init__(self, unet, cfg_scale=1.0, prediction_type="epsilon", alphas_cumprod=None):
        self.unet = unet
        self.cfg_scale = float(cfg_scale)
        self.prediction_type, self.alphas_cumprod = prediction_type, alphas_cumprod

    @torch.no_grad()
    def __call__(self, x, timesteps, cond):
        x = x.to(self.unet.dtype)
        if self.cfg_scale == 1.0:
            out = self.unet(x, timesteps, encoder_hidden_states=cond["cond"]).sample
        else:
            emb = torch.cat([cond["uncond"], cond["cond"]])                                   # [2N, L, E]
            both = self.unet(torch.cat([x, x]), torch.cat([timesteps, timesteps]), encoder_hidden_states=emb).sample
            uncond, cond_out = both.chunk(2)                                                   # [N, C, H, W] each
            # guidance on the native prediction, as the pipeline does; each conversion below is affine in it
            out = uncond + self.cfg_scale * (cond_out - uncond)
        return to_noise_prediction(out, x, self.alphas_cumprod, timesteps, self.prediction_type)


class VAEDecoder:
    """Latents (scaled by the VAE's scaling_factor) -> uint8 images [N, H, W, 3], in chunks."""

    def __init__(self, vae, device, chunk=16):
        self.vae, self.device, self.chunk = vae, device, chunk

    @torch.no_grad()
    def __call__(self, latents):
        imgs = []
        for part in latents.split(self.chunk):
            # latents = (z - shift) * scale; SD 1.x/2.x VAEs have no shift
            z = part.to(self.device, self.vae.dtype) / self.vae.config.scaling_factor
            z = z + (getattr(self.vae.config, "shift_factor", None) or 0.0)
            x = self.vae.decode(z).sample
            imgs.append(((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
        return torch.cat(imgs).numpy()
