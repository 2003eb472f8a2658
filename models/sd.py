"""Stable Diffusion (v1.5 folder layout) from a local diffusers folder: its flags and checks (shared by
parallel_sd.py and parallel_sd_winit.py), loading, prompt encoding."""
import json
import os

import torch

from runner.errors import InputFileError, UsageError
from runner.flags import check_common_flags

EMBEDDED_SD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded", "text2img")
SD_SOURCE = "a local diffusers Stable Diffusion v1.5 folder, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5 from the hub"
SD_CFG_SCALE = 5.0  # the default guidance of the SD scripts (the embedded model's best)
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


def add_sd_flags(parser):
    g = parser.add_argument_group("model")
    g.add_argument("--model_path", type=str, default=None,
                   help="local diffusers Stable Diffusion folder (default: the embedded digits model)")
    g.add_argument("--negative_prompt", type=str, default="", help="prompt of the unconditional guidance branch")
    g.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    g.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")


def check_sd_flags(args, prompts):
    """prompts: [(flag, prompt)]. Every flag before anything is loaded; returns the resolved SolverConfig."""
    for flag, p in prompts:
        if not p or not p.strip():
            raise UsageError(f"{flag} must not be empty")
    config = check_common_flags(args, 1000)
    args.model_path = args.model_path or EMBEDDED_SD
    check_folder(args.model_path)
    check_size(args, args.model_path)
    return config
