"""Stable Diffusion (v1.5 folder layout) from a local diffusers folder: checks, loading, prompt encoding."""
import json
import os

import torch

from paratAA.cli import InputFileError, UsageError

EMBEDDED_SD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded", "text2img")
SD_SOURCE = "a local diffusers Stable Diffusion v1.5 folder, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5 from the hub"
PARTS = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json", "tokenizer": None,
         "scheduler": "scheduler_config.json"}


def check_folder(path, flag="--model_path"):
    """One line naming what is missing, before anything heavy is loaded."""
    if not os.path.exists(path):
        raise InputFileError(f"{flag}: folder not found: {path} ({SD_SOURCE})")
    if not os.path.isdir(path):
        raise InputFileError(f"{flag}: expected a diffusers pipeline folder but found a file: {path}")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise InputFileError(f"{flag}: {path} is not a diffusers pipeline folder (no model_index.json)")
    for part, marker in PARTS.items():
        sub = os.path.join(path, part)
        if not os.path.isdir(sub) or (marker and not os.path.isfile(os.path.join(sub, marker))):
            raise InputFileError(f"{flag}: {path} has no usable {part}/ folder"
                                 + (f" (missing {part}/{marker})" if marker else ""))


def vae_scale_factor(path):
    """Pixels per latent cell, read from vae/config.json (SD v1.5: 8)."""
    with open(os.path.join(path, "vae", "config.json")) as f:
        return 2 ** (len(json.load(f)["block_out_channels"]) - 1)


def default_size(path):
    with open(os.path.join(path, "unet", "config.json")) as f:
        return json.load(f)["sample_size"] * vae_scale_factor(path)


def check_size(args, path):
    """--height/--width: default from the model config, else a positive multiple of the VAE factor."""
    factor = vae_scale_factor(path)
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is None:
            setattr(args, name, default_size(path))
        elif v < factor or v % factor:
            raise UsageError(f"--{name} must be a positive multiple of the VAE factor {factor}, got {v}")


def load_pipeline(path, device, dtype):
    from diffusers import StableDiffusionPipeline
    check_folder(path)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=dtype, safety_checker=None,
                                                       feature_extractor=None, requires_safety_checker=False,
                                                       local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError) as e:
        raise InputFileError(f"--model_path: cannot load {path} as a Stable Diffusion pipeline "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def encode(pipe, prompts, negative_prompt, device):
    """Per-sample conditioning {"cond", "uncond"}: [S, L, E] each, through the pipeline's own encode_prompt."""
    cond, uncond = pipe.encode_prompt(list(prompts), device, 1, True,
                                      negative_prompt=[negative_prompt] * len(prompts))
    return {"cond": cond, "uncond": uncond}


def latent_shape(pipe, height, width):
    f = pipe.vae_scale_factor
    return (pipe.unet.config.in_channels, height // f, width // f)
