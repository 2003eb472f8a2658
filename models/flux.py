"""Flux (diffusers' FluxPipeline folders: FLUX.1-dev, FLUX.1-schnell) where it differs from SD3's flow matching,
for models/sd.py (the folder and pipeline checks, loading, prompt encoding) and models/adapters.py (FluxDenoiser):

    schedule    the FlowMatchEuler scheduler with the levels FluxPipeline gives it: sigmas linspace(1, 1/T, T)
                before the shift, and with use_dynamic_shifting (FLUX.1-dev) a shift mu that grows with the number
                of image tokens (calculate_shift), so it depends on the image size
    latents     the solver's state is the unpacked latent [C, H/f, W/f], as FluxPipeline draws its noise; the
                transformer sees it packed into 2x2-patch tokens (4C features each), so the sides are multiples of
                2f, and its in_channels is 4x the VAE's latent channels
    prompts     CLIP's pooled embedding and T5's token embeddings (up to max_sequence_length tokens)
    guidance    two kinds. FLUX.1-dev's distilled guidance is an input of the network (guidance_embeds), which
                --cfg_scale / guidance_scale set: one pass per state. True classifier-free guidance (the pipeline's
                true_cfg_scale, --true_cfg_scale) adds a pass on a negative prompt and mixes the two as SD's guidance
                does; FluxPipeline uses it only when a negative prompt is given, and so it is refused here without
                one (and a negative prompt without it), rather than silently ignored
"""
import math

import numpy as np

from paratAA.config import is_real
from paratAA.schedule import STEPS, check_num_steps, flow_schedule

FLUX = "FluxPipeline"
PATCH = 2  # latent cells per side of one token: the pipeline packs 2x2 patches
DEFAULT_CELLS = 128  # FluxPipeline.__init__'s default_sample_size: latent cells per side of the default image
MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default (and largest) max_sequence_length of the T5 prompt
GUIDANCE_SCALE = 3.5  # FluxPipeline.__call__'s default guidance_scale (parallel_sample's default for Flux)


def true_cfg_problem(true_cfg_scale, negative_prompt, scale_name, prompt_name):
    """Why a true classifier-free guidance scale and a negative prompt do not make sense together for Flux (named
    as the caller names them: flags or arguments), or None. FluxPipeline guides only when both are there (scale > 1
    and a negative prompt, "" included) and silently drops the one given alone."""
    if not (is_real(true_cfg_scale) and math.isfinite(true_cfg_scale)):
        return f"{scale_name} must be a finite number, got {true_cfg_scale!r}"
    if negative_prompt is not None and true_cfg_scale <= 1:
        return (f"{prompt_name} has no effect without true classifier-free guidance ({scale_name} "
                f"{true_cfg_scale:g} <= 1): FluxPipeline's distilled guidance (the guidance scale) has no "
                f"unconditional branch")
    if negative_prompt is None and true_cfg_scale > 1:
        return (f"{scale_name} {true_cfg_scale:g} guides away from a negative prompt, and none was given "
                f"({prompt_name}; \"\" for the empty prompt): FluxPipeline ignores it without one")
    return None


def image_tokens(height, width, vae_scale_factor):
    """How many tokens the transformer sees for an image of height x width pixels (one per 2x2 latent cells)."""
    step = vae_scale_factor * PATCH
    return (int(height) // step) * (int(width) // step)


SHIFT_DEFAULTS = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}


def mu_of(config, tokens):
    """The shift mu FluxPipeline hands its scheduler: linear in the number of image tokens, base_shift at
    base_image_seq_len and max_shift at max_image_seq_len (the scheduler config's values, the pipeline's defaults
    where absent). diffusers' own calculate_shift computes it."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    return calculate_shift(tokens, *(config.get(key, default) for key, default in SHIFT_DEFAULTS.items()))


def shift_problem(config):
    """Why FluxPipeline cannot compute its shift mu from a scheduler config (a dict; to follow "has"), or None.
    FluxPipeline computes mu at every call, whether or not the scheduler shifts dynamically, as the line through
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift): a null or a string there, or two equal
    lengths, failed inside calculate_shift (a TypeError, a ZeroDivisionError) naming no setting."""
    values = {key: config.get(key, default) for key, default in SHIFT_DEFAULTS.items()}
    bad = [f"{key} {v!r}" for key, v in values.items() if not (is_real(v) and math.isfinite(v))]
    if bad:
        return f"has {', '.join(bad)}: FluxPipeline computes its shift mu from finite numbers there"
    if values["base_image_seq_len"] == values["max_image_seq_len"]:
        return (f"has base_image_seq_len = max_image_seq_len = {values['max_image_seq_len']!r}: FluxPipeline's shift "
                f"mu is the line through (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), which "
                f"needs two different lengths")
    return None


def flux_schedule(scheduler, num_steps, eta, height, width, vae_scale_factor, name=STEPS):
    """The Schedule of FluxPipeline's own loop at num_steps for an image of height x width pixels: its Euler steps
    through the levels linspace(1, 1/T, T) (the scheduler's own with use_flow_sigmas, as the pipeline defers to
    it), shifted by mu where the scheduler shifts dynamically (paratAA.flow_schedule)."""
    num_steps = check_num_steps(num_steps, scheduler.config.num_train_timesteps, name)  # before linspace takes it
    sigmas = None if getattr(scheduler.config, "use_flow_sigmas", False) else \
        np.linspace(1.0, 1 / num_steps, num_steps)
    mu = mu_of(scheduler.config, image_tokens(height, width, vae_scale_factor))
    return flow_schedule(scheduler, num_steps, eta, name, sigmas=sigmas, mu=mu)


def channels_problem(in_channels, latent_channels):
    """Why a FluxPipeline's transformer does not fit its VAE (to follow "has"), or None: it reads 2x2 patches of the
    latent, 4x its channels (FLUX.1 Fill and Control widen the input with image conditions: their own pipelines)."""
    if in_channels != PATCH * PATCH * latent_channels:
        return (f"a transformer taking {in_channels} features per token but a VAE making {latent_channels}-channel "
                f"latents, packed 2x2 into {PATCH * PATCH * latent_channels} (a Fill or Control variant?)")
    return None


def encode(pipe, prompts, device, max_sequence_length=None, negative_prompt=None):
    """{"cond": [P, L, E] T5 embeddings, "pooled": [P, E'] CLIP's pooled embedding} through the pipeline's own
    encode_prompt (its text ids are all zero: FluxDenoiser makes them); with a negative prompt (true classifier-free
    guidance) also "uncond" and "uncond_pooled", the same for it, as __call__ encodes it."""
    def embed(texts):
        emb, pooled, _ = pipe.encode_prompt(prompt=list(texts), prompt_2=None, device=device,
                                            num_images_per_prompt=1,
                                            max_sequence_length=max_sequence_length or MAX_SEQUENCE_LENGTH)
        return emb, pooled
    out = dict(zip(("cond", "pooled"), embed(prompts)))
    if negative_prompt is not None:
        out.update(zip(("uncond", "uncond_pooled"), embed([negative_prompt] * len(prompts))))
    return out
