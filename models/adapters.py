"""Model adapters: wrap a network as the noise-prediction callable eps_fn(x, timesteps, cond) the solver takes."""
import numpy as np
import torch

from paratAA import NonFiniteModelOutput

from .flux import GUIDANCE_SCALE
from .pixart import FAMILIES as PIXART


def guides(cfg_scale):
    """Whether a scale turns classifier-free guidance on: only above 1, as diffusers' pipelines
    (do_classifier_free_guidance) and DiT's sample.py decide; at or below 1 the conditional model alone is used
    (SDXL-Turbo's guidance_scale 0 means no guidance, not the unconditional model)."""
    return cfg_scale > 1


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
        if not guides(self.cfg_scale):
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


class GuidedDenoiser:
    """A conditioned network with classifier-free guidance, as the solver's f(x, timesteps, cond).

    forward(x, timesteps, **inputs) -> the network's native prediction; inputs: {argument: (cond key, uncond key)}
    naming, per argument of forward, the entries of the per-input conditioning dict for the conditional and the
    unconditional branch. With guidance the batch is doubled ([uncond; cond]) and out = u + s (c - u), on the native
    prediction as the diffusers pipelines mix it; convert(out, x, timesteps), if given, then turns it into the
    solver's f (each conversion below is affine in the prediction, so mixing before or after is the same)."""

    def __init__(self, forward, inputs, cfg_scale=1.0, convert=None):
        self.forward, self.inputs, self.convert = forward, inputs, convert
        self.cfg_scale = float(cfg_scale)

    @torch.no_grad()
    def __call__(self, x, timesteps, cond):
        if not guides(self.cfg_scale):
            out = self.forward(x, timesteps, **{k: cond[c] for k, (c, _) in self.inputs.items()})
        else:
            both = self.forward(torch.cat([x, x]), torch.cat([timesteps, timesteps]),
                                **{k: torch.cat([cond[u], cond[c]]) for k, (c, u) in self.inputs.items()})
            uncond, cond_out = both.chunk(2)                                                   # [N, C, H, W] each
            out = uncond + self.cfg_scale * (cond_out - uncond)
        return self.convert(out, x, timesteps) if self.convert is not None else out


def _prediction_converter(prediction_type, alphas_cumprod, network=None):
    """The network's (guided) output as the solver's noise prediction, or None where it is one already. network: a
    UNet or transformer whose output may carry a learned variance after the prediction (out_channels twice
    in_channels: DiT, PixArt, some UNets), which is dropped, as DDPMScheduler.step splits it off (DDIM's steps take
    the noise only; guidance mixes both halves per channel, so keeping one half before or after is the same)."""
    config = getattr(network, "config", None) or {}
    C = config.get("in_channels")
    learned = C is not None and (config.get("out_channels") or C) == 2 * C
    convert = None if prediction_type == "epsilon" else \
        (lambda out, x, t: to_noise_prediction(out, x, alphas_cumprod, t, prediction_type))
    if not learned:
        return convert
    return lambda out, x, t: out[:, :C] if convert is None else convert(out[:, :C], x, t)


def SDDenoiser(unet, cfg_scale=1.0, prediction_type="epsilon", alphas_cumprod=None):
    """Stable Diffusion 1.x/2.x UNet (docs/ALGORITHM.md, section 7); cond {"cond", "uncond"}: [N, L, E] prompt and
    negative-prompt embeddings. v- and sample-predicting models are turned into noise predictions."""
    def forward(x, t, emb):
        # the embeddings in the network's dtype too: a pipeline whose unet alone was cast (pipe.unet.half()) has them
        # in the text encoder's, which failed inside torch (a dtype mismatch naming neither)
        return unet(x.to(unet.dtype), t, encoder_hidden_states=emb.to(unet.dtype)).sample
    return GuidedDenoiser(forward, {"emb": ("cond", "uncond")}, cfg_scale,
                          _prediction_converter(prediction_type, alphas_cumprod, unet))


def SDXLDenoiser(unet, cfg_scale=1.0, prediction_type="epsilon", alphas_cumprod=None):
    """SDXL's UNet: prompt embeddings of both text encoders, and the added conditions (the second encoder's pooled
    embedding and the size/crop time ids); cond {"cond", "uncond", "pooled", "uncond_pooled", "time_ids",
    "uncond_time_ids"}."""
    def forward(x, t, emb, pooled, time_ids):
        added = {"text_embeds": pooled.to(unet.dtype), "time_ids": time_ids.to(unet.dtype)}  # as SDDenoiser
        return unet(x.to(unet.dtype), t, encoder_hidden_states=emb.to(unet.dtype), added_cond_kwargs=added).sample
    return GuidedDenoiser(forward, {"emb": ("cond", "uncond"), "pooled": ("pooled", "uncond_pooled"),
                                    "time_ids": ("time_ids", "uncond_time_ids")}, cfg_scale,
                          _prediction_converter(prediction_type, alphas_cumprod, unet))


def SD3Denoiser(transformer, cfg_scale=1.0):
    """SD3's MMDiT: the flow velocity v from the joint prompt embeddings and the pooled ones; the timestep is the
    scheduler's float sigma * 1000; cond {"cond", "uncond", "pooled", "uncond_pooled"}."""
    def forward(x, t, emb, pooled):
        return transformer(hidden_states=x.to(transformer.dtype), timestep=t,  # as SDDenoiser
                           encoder_hidden_states=emb.to(transformer.dtype),
                           pooled_projections=pooled.to(transformer.dtype)).sample
    return GuidedDenoiser(forward, {"emb": ("cond", "uncond"), "pooled": ("pooled", "uncond_pooled")}, cfg_scale)


def PixArtDenoiser(transformer, cfg_scale=1.0, prediction_type="epsilon", alphas_cumprod=None,
                   size_conditioned=False):
    """PixArt's transformer (PixArtSigmaPipeline, PixArtAlphaPipeline; models/pixart.py): the noise from the T5
    embeddings and their attention mask (the padding not attended to); cond {"cond", "uncond": [N, L, E], "mask",
    "uncond_mask": [N, L]}, and with size_conditioned (PixArt-Alpha at 1024 px) "resolution" [N, 2], "aspect_ratio"
    [N, 1], the same in both branches, as the pipeline doubles them. Guidance mixes the whole output, then the noise
    half of a learned-sigma output is kept, as the pipeline does (the same as keeping it first: per channel)."""
    def forward(x, t, emb, mask, resolution=None, aspect_ratio=None):
        dtype = transformer.dtype
        added = {"resolution": None if resolution is None else resolution.to(dtype),
                 "aspect_ratio": None if aspect_ratio is None else aspect_ratio.to(dtype)}
        return transformer(x.to(dtype), encoder_hidden_states=emb.to(dtype), encoder_attention_mask=mask,
                           timestep=t, added_cond_kwargs=added, return_dict=False)[0]          # [N, C or 2C, H, W]
    inputs = {"emb": ("cond", "uncond"), "mask": ("mask", "uncond_mask")}
    if size_conditioned:
        inputs.update(resolution=("resolution", "resolution"), aspect_ratio=("aspect_ratio", "aspect_ratio"))
    return GuidedDenoiser(forward, inputs, cfg_scale, _prediction_converter(prediction_type, alphas_cumprod,
                                                                            transformer))


def pack_latents(x):
    """[N, C, H, W] latents as FLUX.1's transformer reads them, [N, H/2 * W/2, 4C]: each 2x2 patch one token, its
    features channel-major (c, dy, dx), tokens row by row, the order in which FluxPipeline packs its latents."""
    N, C, H, W = x.shape
    return x.reshape(N, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(N, (H // 2) * (W // 2), 4 * C)


def unpack_latents(tokens, height, width):
    """The inverse of pack_latents: tokens [N, H/2 * W/2, 4C] as latents [N, C, height, width]."""
    N, _, D = tokens.shape
    return tokens.reshape(N, height // 2, width // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(
        N, D // 4, height, width)


def image_ids(height, width, device, dtype):
    """[H/2 * W/2, 3] position of each packed token for FLUX.1's rotary embedding: (0, row, column) of its patch."""
    rows, cols = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(device=device, dtype=dtype)


def FluxDenoiser(transformer, guidance_scale=GUIDANCE_SCALE, true_cfg_scale=1.0):
    """FLUX.1's transformer (FluxPipeline) as the solver's f: the flow velocity on the unpacked latent [N, C, H, W].

    The solver's state is the latent as FluxPipeline draws its noise, before packing, so that a seed gives the
    pipeline's x_T; each call packs it into 2x2-patch tokens with their positions (image ids; the prompt's tokens all
    sit at position 0) and unpacks the prediction. The timestep goes in as the pipeline gives it, sigma (t / 1000).
    cond {"cond": [N, L, E] T5 embeddings, "pooled": [N, E'] CLIP's pooled one; with true_cfg_scale > 1 also
    "uncond", "uncond_pooled": the negative prompt's}.

    guidance_scale: FLUX.1-dev is guidance-distilled: the scale is an input of the network (guidance_embeds), given
    to both branches as the pipeline gives it; a transformer without that input (FLUX.1-schnell) ignores the scale,
    as the pipeline does. true_cfg_scale: classifier-free guidance with a negative prompt (the pipeline's
    true_cfg_scale), mixed as SD's guidance is; the pipeline makes two calls where this makes one of twice the
    batch."""
    guidance = float(guidance_scale) if transformer.config.guidance_embeds else None

    def forward(x, t, emb, pooled):
        N, _, H, W = x.shape
        dtype = transformer.dtype
        emb = emb.to(dtype)  # the embeddings in the network's dtype, as SDDenoiser casts them
        # the pipeline's guidance is float32 whatever the model's dtype (the network casts it, as the timestep)
        g = None if guidance is None else torch.full((N,), guidance, device=x.device, dtype=torch.float32)
        out = transformer(hidden_states=pack_latents(x.to(dtype)), timestep=t.to(dtype) / 1000, guidance=g,
                          pooled_projections=pooled.to(dtype), encoder_hidden_states=emb,
                          txt_ids=torch.zeros(emb.shape[1], 3, device=x.device, dtype=dtype),
                          img_ids=image_ids(H, W, x.device, dtype), return_dict=False)[0]
        return unpack_latents(out, H, W)
    return GuidedDenoiser(forward, {"emb": ("cond", "uncond"), "pooled": ("pooled", "uncond_pooled")},
                          true_cfg_scale)


class DiffusersDiTDenoiser:
    """diffusers' DiT (DiTPipeline's Transformer2DModel): class labels, the pipeline's null class
    (num_embeds_ada_norm, 1000 for the public models), guidance on all latent channels (as DiTPipeline does; the
    original DiT code guides 3), the noise half of a learned-sigma output."""

    def __init__(self, transformer, cfg_scale=1.0, prediction_type="epsilon", alphas_cumprod=None):
        self.transformer, self.cfg_scale = transformer, float(cfg_scale)
        self.null_class = transformer.config.num_embeds_ada_norm
        # the scheduler's prediction_type says what the output is (DiTPipeline hands it to scheduler.step)
        self.convert = _prediction_converter(prediction_type, alphas_cumprod)

    @torch.no_grad()
    def __call__(self, x, timesteps, labels):
        C = self.transformer.config.in_channels
        x_in = x.to(self.transformer.dtype)
        if not guides(self.cfg_scale):
            out = self.transformer(x_in, timestep=timesteps, class_labels=labels).sample[:, :C]
        else:
            both = self.transformer(torch.cat([x_in, x_in]), timestep=torch.cat([timesteps, timesteps]),
                                    class_labels=torch.cat([labels, torch.full_like(labels, self.null_class)])).sample
            cond, uncond = both[:, :C].chunk(2)
            out = uncond + self.cfg_scale * (cond - uncond)
        return self.convert(out, x, timesteps) if self.convert is not None else out


def decodes_in_float32(vae):
    """A float16 VAE whose config sets force_upcast (SD 1.x/2.x, SDXL: SDXL's overflows in float16) decodes in
    float32, as SDXL's __call__ does and the reference's SD scripts keep it."""
    return vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", True)


def unscale_latents(z, config, family=None):
    """Sampled latents z as the VAE decodes them, the way the pipeline `family` (a class name) unscales them in its
    __call__: SDXL with the VAE's latents_mean and latents_std where its config has both, z * std / scaling_factor +
    mean, else z / scaling_factor; SD 1.x/2.x, PixArt and DiTPipeline z / scaling_factor (none reads shift_factor
    nor the mean); SD3 and the DiT scripts' checkpoints (family None) z / scaling_factor + shift_factor (SD 1.x/2.x
    VAEs have no shift); Flux the same, on the unpacked latents (its solver state)."""
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if family == "StableDiffusionXLPipeline" and mean is not None and std is not None:
        shape = (1, -1) + (1,) * (z.dim() - 2)                                      # per channel
        return z * torch.tensor(std).view(shape).to(z) / config.scaling_factor + torch.tensor(mean).view(shape).to(z)
    if family in ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "DiTPipeline", *PIXART):
        return z / config.scaling_factor
    return z / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)


class VAEDecoder:
    """Latents (scaled by the VAE's scaling_factor) -> uint8 images [N, H, W, 3], in chunks. family: the diffusers
    pipeline class whose __call__ the latents are unscaled as (unscale_latents; None: the DiT scripts'). finish:
    images [n, 3, h, w] in [-1, 1] -> [n, 3, H, W], applied before quantising, where the pipeline's __call__ changes
    its decoded image (PixArt's resolution binning resizes it back, models/pixart.py; SDXL's watermark)."""

    def __init__(self, vae, device, chunk=16, family=None, finish=None):
        self.vae, self.device, self.chunk, self.family, self.finish = vae, device, chunk, family, finish

    @torch.no_grad()
    def __call__(self, latents):
        return self._upcast(lambda: np.concatenate([_quantise(x) for x in self._pixels(latents)]))

    @torch.no_grad()
    def levels(self, latents):
        """Latents -> float64 images [N, 3, H, W] in gray levels (0..255, not rounded), on the decoder's device: the
        image the stop rule compares between iterations (paratAA.solve's image_fn)."""
        return self._upcast(lambda: torch.cat([(x.double().clamp(-1, 1) + 1) * 127.5
                                               for x in self._pixels(latents)]))

    def _upcast(self, run):
        # a user's float16 pipeline (parallel_sample; the scripts' load_pipeline keeps such a VAE in float32): cast
        # for the decode and given back in float16, as SDXL's __call__ does
        upcast = decodes_in_float32(self.vae)
        if upcast:
            torch.nn.Module.to(self.vae, torch.float32)  # diffusers' own .to(dtype) warns about casting
        try:
            return run()
        finally:
            if upcast:
                torch.nn.Module.to(self.vae, torch.float16)

    def _pixels(self, latents):
        """The decoded images [n, 3, H, W] in [-1, 1] (finish applied), chunk by chunk."""
        for part in latents.split(self.chunk):
            z = unscale_latents(part.to(self.device, self.vae.dtype), self.vae.config, self.family)
            x = self.vae.decode(z).sample
            if not torch.isfinite(x).all():  # as uint8 every NaN would be a black pixel, and the run a success
                raise NonFiniteModelOutput("the VAE decoder returned non-finite pixels from finite latents: its "
                                           "weights are unusable (--vae_path, or the vae/ folder of --model_path)")
            yield x if self.finish is None else self.finish(x)


def _quantise(x):
    """Images [n, 3, H, W] in [-1, 1] -> uint8 [n, H, W, 3], on the host."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
