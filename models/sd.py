"""Stable Diffusion from a local diffusers folder: its flags and checks (shared by parallel_sd.py and
parallel_sd_winit.py), the folder's checks before anything heavy is loaded, loading, prompt encoding, and the
model as the solver's f, per family:

    StableDiffusionPipeline     SD 1.x and 2.x: UNet, one CLIP text encoder; the scheduler read as DDIM; the noise
                                ("epsilon"), velocity ("v_prediction", SD 2.x 768) or sample prediction turned into
                                the noise prediction
    StableDiffusionXLPipeline   SDXL: two text encoders, the pooled embedding and size/crop time ids as added
                                conditions; read as DDIM
    StableDiffusion3Pipeline    SD3: an MMDiT predicting the flow velocity, FlowMatchEulerDiscreteScheduler (its
                                timestep shift included) as Euler steps (paratAA.flow_schedule); text encoders 1-2
                                (a third, T5, when the folder has one)
    FluxPipeline                FLUX.1-dev / -schnell: as SD3's flow, with the pipeline's sigmas and dynamic shift,
                                packed latents, CLIP pooled + T5 embeddings, distilled guidance (models/flux.py)
    PixArtSigmaPipeline,        PixArt: a transformer predicting the noise (learned sigma), T5 embeddings with their
    PixArtAlphaPipeline         attention mask, the size binned by aspect ratio; read as DDIM (models/pixart.py)

Anything else is refused with one line naming what is supported.
"""
import argparse
import inspect
import itertools
import json
import math
import numbers
import os
import unicodedata

import torch

from paratAA.config import is_integer
from paratAA.schedule import (NONLINEAR, STEPS, ddim_copy, flow_schedule, from_ddim_scheduler,
                              pipeline_schedule)
from runner.errors import InputFileError, UsageError
from runner.flags import check_common_flags, note, path_value
from runner.presets import parse_with_preset

from . import flux, pixart
from .adapters import decodes_in_float32, guides
from .checkpoints import check_parts_loaded, quiet_loading, safetensors_headers, vae_problem, weights_variant

EMBEDDED_SD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded", "text2img")
EMBEDDED_FLOW = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded", "flow")  # SD3 layout
# said where --model_path is not found: any family the scripts drive (it named SD v1.5 for a FLUX.1-dev path)
SD_SOURCE = ("a local diffusers pipeline folder (Stable Diffusion 1.x/2.x, SDXL, SD3, Flux, PixArt), e.g. "
             "stable-diffusion-v1-5/stable-diffusion-v1-5 from the hub")
SD_CFG_SCALE = 5.0  # the default guidance of the SD scripts (the embedded model's best)
SD_CFG_HELP = ("classifier-free guidance scale; <= 1: none (the conditional model alone). For a FluxPipeline folder "
               "the guidance FLUX.1-dev was distilled with, fed to its network (the pipeline's guidance_scale; no "
               "unconditional pass, any value taken as it is), ignored by FLUX.1-schnell as by its pipeline "
               f"(default: {SD_CFG_SCALE:g}; for a FluxPipeline folder {flux.GUIDANCE_SCALE:g}, the pipeline's own)")
SUPPORTED = ("StableDiffusionPipeline (SD 1.x, 2.x; epsilon, v_prediction or sample prediction), "
             "StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline (FLUX.1 text-to-image), "
             "PixArtSigmaPipeline and PixArtAlphaPipeline folders")
# the parts each family's folder must have (marker file inside, or None)
PARTS = {
    "StableDiffusionPipeline": {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
                                "tokenizer": None, "scheduler": "scheduler_config.json"},
    "StableDiffusionXLPipeline": {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
                                  "text_encoder_2": "config.json", "tokenizer": None, "tokenizer_2": None,
                                  "scheduler": "scheduler_config.json"},
    "StableDiffusion3Pipeline": {"transformer": "config.json", "vae": "config.json", "text_encoder": "config.json",
                                 "text_encoder_2": "config.json", "tokenizer": None, "tokenizer_2": None,
                                 "scheduler": "scheduler_config.json"},
    # text_encoder: CLIP (its pooled embedding), text_encoder_2: T5 (the token embeddings)
    flux.FLUX: {"transformer": "config.json", "vae": "config.json", "text_encoder": "config.json",
                "text_encoder_2": "config.json", "tokenizer": None, "tokenizer_2": None,
                "scheduler": "scheduler_config.json"},
    # text_encoder: T5 (token embeddings and their attention mask)
    **dict.fromkeys(pixart.FAMILIES, {"transformer": "config.json", "vae": "config.json", "text_encoder": "config.json",
                                      "tokenizer": None, "scheduler": "scheduler_config.json"}),
}
FLOW_PIPELINES = ("StableDiffusion3Pipeline", flux.FLUX)  # the families whose network predicts a flow's velocity
PIPELINES = tuple(PARTS)
# class-conditional: sampled loaded by parallel_sample (its folders by parallel_dit.py, models/dit_source.py)
DIT_PIPELINE = "DiTPipeline"
DIT_PARTS = ("transformer", "vae", "scheduler")
T5_PARTS = ("text_encoder_3", "tokenizer_3")  # SD3's optional third text encoder
SD3_MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's default max_sequence_length of the T5 prompt
# the largest max_sequence_length SD3's and Flux's pipelines take; PixArt's check none (their tokenizer pads to any
# length), and are held to the same 512, the T5 tokenizer's model_max_length, rather than to none
MAX_T5_TOKENS = 512
T5_FAMILIES = ("StableDiffusion3Pipeline", flux.FLUX, *pixart.FAMILIES)  # whose prompt T5 reads: max_sequence_length
T5_NAMES = "SD3, Flux, PixArt"  # the same, as the messages name them
FLAGS_OF_PIPELINES = ("self", "requires_safety_checker", "force_zeros_for_empty_prompt", "add_watermarker")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")  # diffusers' timestep spacings
MAX_TRAIN_STEPS = 100_000
LIBRARIES = ("diffusers", "transformers", None)  # components load from these only: never code from the folder
MAX_SIDE = 8192  # pixels; the largest Stable Diffusion models make 1024-2048


def read_json(path, flag="--model_path"):
    """A JSON file of the folder, or one line naming it."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise InputFileError(f"{flag}: cannot read {path} as JSON ({type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0]})") from None
    if not isinstance(value, dict):
        raise InputFileError(f"{flag}: {path} holds no JSON object")
    where = _nan_key(value)
    if where:  # json reads NaN: a norm_eps of NaN sampled NaN, blamed on the model's output
        raise InputFileError(f"{flag}: {path} has {where} NaN: a number is needed")
    return value


def _nan_key(value, key=None):
    """The key of the first NaN in a JSON value (dicts and lists walked), or None. Not infinities: diffusers writes
    some on purpose (DPM-Solver's lambda_min_clipped -Infinity, in PixArt's folders)."""
    if isinstance(value, float) and math.isnan(value):
        return key
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        found = _nan_key(v, f"{key}[{k}]" if isinstance(k, int) else k if key is None else f"{key}.{k}")
        if found:
            return found
    return None


def config_value(config, key, path, flag="--model_path", kind=None, default=None):
    """config[key], or one line naming the file. kind: "count" (an integer >= 1; sample_size may be a pair of
    them), "list" (a non-empty list), "sizes" (a block size: a count, or a non-empty list of counts; optional, absent
    gives default)."""
    if key not in config:
        if kind == "sizes":
            return default
        raise InputFileError(f"{flag}: {path} has no \"{key}\"")
    value = config[key]
    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1
    def counts(v, n=None):
        return isinstance(v, list) and len(v) > 0 and (n is None or len(v) == n) and all(count(b) for b in v)
    ok = (kind is None or kind == "list" and isinstance(value, list) and len(value) > 0 or
          kind == "count" and (count(value) or key == "sample_size" and counts(value, 2)) or
          kind == "sizes" and (value is None or count(value) or counts(value)))
    if not ok:
        what = {"list": "a non-empty list", "sizes": "a positive integer (or a list of them)"}.get(
            kind, "a positive integer")
        raise InputFileError(f"{flag}: {path} has \"{key}\": {value!r}, {what} expected")
    return value


def check_folder(path, flag="--model_path"):
    """One line naming what is missing or unsupported, before anything heavy is loaded."""
    if not os.path.exists(path):
        raise InputFileError(f"{flag}: folder not found: {path} ({SD_SOURCE})")
    if not os.path.isdir(path):
        raise InputFileError(f"{flag}: expected a diffusers pipeline folder but found a file: {path}")
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_path):
        raise InputFileError(f"{flag}: {path} is not a diffusers pipeline folder (no model_index.json)")
    index = read_json(index_path, flag)
    kind = index.get("_class_name")
    if kind not in PIPELINES:
        # a "_class_name" missing or not a name was said as "a pipeline of unknown class folder", "a 5 folder"
        named = f"\"_class_name\": {json.dumps(kind)}" if "_class_name" in index else "no \"_class_name\""
        what = f"is a {kind} folder" if isinstance(kind, str) and kind else \
            f"has a model_index.json that names no pipeline class ({named})"
        raise InputFileError(f"{flag}: {path} {what}; the SD scripts drive {SUPPORTED}")
    for name, entry in index.items():
        if not name.startswith("_") and isinstance(entry, list) and entry and not own_library(entry[0]):
            raise InputFileError(f"{flag}: {index_path} loads {name} from {entry[0]!r}, code outside diffusers and "
                                 f"transformers, which is never run")
    configs = {}  # config.json of each part, by path
    for part, marker in PARTS[kind].items():
        sub = os.path.join(path, part)
        if not os.path.isdir(sub) or (marker and not os.path.isfile(os.path.join(sub, marker))):
            raise InputFileError(f"{flag}: {path} has no usable {part}/ folder"
                                 + (f" (missing {part}/{marker})" if marker else ""))
        config_path = os.path.join(sub, "config.json")
        if os.path.isfile(config_path):  # the text encoders' too (read_json: no NaN)
            configs[config_path] = read_json(config_path, flag)
        for file in sorted(os.listdir(sub)):  # diffusers passes over a weight "file" it cannot read to the next kind,
            weights = os.path.join(sub, file)   # and the error named a missing diffusion_pytorch_model.bin
            if file.endswith((".safetensors", ".bin")) and not os.path.isfile(weights):
                raise InputFileError(f"{flag}: {weights} is not a readable file (a folder, or a broken link or a "
                                     f"loop of links)")
        # PixArt's hub folders ship T5's sentencepiece model (spiece.model) without a tokenizer.json
        if part.startswith("tokenizer") and not (any(os.path.isfile(os.path.join(sub, f)) for f in (
                "tokenizer.json", "spiece.model")) or all(
                os.path.isfile(os.path.join(sub, f)) for f in ("vocab.json", "merges.txt"))):
            raise InputFileError(f"{flag}: {path} has no usable {part}/ folder (it needs tokenizer.json, spiece.model, "
                                 f"or vocab.json and merges.txt)")
        for name in ("tokenizer_config.json", "special_tokens_map.json") if part.startswith("tokenizer") else ():
            if os.path.isfile(os.path.join(sub, name)):  # a JSON object each (transformers failed in a pop() on a list)
                read_json(os.path.join(sub, name), flag)
        entry = index.get(part)  # diffusers unpacks it as (library, class): "too many values to unpack" otherwise
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
            raise InputFileError(f"{flag}: {index_path} gives {part} as {json.dumps(entry)}; a [library, class] pair "
                                 f"is needed")
    # a switch written as text ("false") is true to the libraries: SDXL's force_zeros_for_empty_prompt "false" and
    # Flux's guidance_embeds "false" sampled as true, exit 0 (the scheduler's are named by scheduler_problem)
    for config_path, config in ((index_path, index), *configs.items()):
        for key, value in config.items() if isinstance(config, dict) else ():
            if isinstance(value, str) and value.strip().lower() in ("true", "false"):
                raise InputFileError(f"{flag}: {config_path} has \"{key}\": {json.dumps(value)}, text; true or false "
                                     f"(without quotes) is needed")
    check_scheduler(path, flag)
    net_path, vae_path = _network_config(path), os.path.join(path, "vae", "config.json")
    net, vae = (configs[p] if p in configs else read_json(p, flag) for p in (net_path, vae_path))
    in_channels = config_value(net, "in_channels", net_path, flag, "count")
    latent_channels = config_value(vae, "latent_channels", vae_path, flag, "count")
    # sizes of the networks' blocks: a UNet's layers_per_block -1 failed in torch and its attention_head_dim 0 in a
    # ZeroDivisionError, both "unexpected"; a VAE's layers_per_block 0 dropped its weights, exit 0
    for config, config_path in ((net, net_path), (vae, vae_path)):
        for key in ("layers_per_block", "attention_head_dim", "num_attention_heads"):
            config_value(config, key, config_path, flag, "sizes")
    if kind == flux.FLUX:
        problem = flux.channels_problem(in_channels, latent_channels)
        if problem:
            raise InputFileError(f"{flag}: {path} has {problem}; the SD scripts drive {SUPPORTED}")
    elif in_channels != latent_channels:
        raise InputFileError(f"{flag}: {path}: the denoiser takes {net['in_channels']} channels but the VAE makes "
                             f"{vae['latent_channels']}-channel latents (an inpainting or other variant?); "
                             f"the SD scripts drive {SUPPORTED}")
    problem = vae_problem(vae)
    if problem:
        raise InputFileError(f"{flag}: {vae_path} {problem}")
    if kind in pixart.FAMILIES:
        problem = pixart.transformer_problem(kind, net, latent_channels)
        if problem:
            raise InputFileError(f"{flag}: {net_path} has {problem}")
    encoders = {}  # the text encoders as (class, config), those of PARTS checked above (SD3's optional T5 read here)
    for part in TEXT_ENCODERS:
        config_path = os.path.join(path, part, "config.json")
        if config_path in configs or isinstance(index.get(part), list) and None not in index[part] and \
                os.path.isfile(config_path):
            encoders[part] = index[part][1], configs.get(config_path) or read_json(config_path, flag)
    problem = network_problem(net, kind, encoders)
    if problem:
        raise InputFileError(f"{flag}: {net_path} {problem}")


def own_library(name):
    """Whether a model_index.json entry loads from diffusers or transformers: by name, or as one of diffusers' own
    pipeline modules (SD v1.x names its safety checker ["stable_diffusion", "StableDiffusionSafetyChecker"])."""
    if name in LIBRARIES:
        return True
    if not isinstance(name, str) or not name.isidentifier():
        return False
    import importlib.util
    return importlib.util.find_spec(f"diffusers.pipelines.{name}") is not None


SDXL = "StableDiffusionXLPipeline"
UNET_FAMILIES = ("StableDiffusionPipeline", SDXL)  # the rest have a transformer
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


# The widths of the prompt embeddings a family's network reads, each from its text encoders' configs: (the network's
# key, the encoders' parts and keys whose widths add up to it, and whether the network's may be wider: SD3 pads its
# CLIP embeddings with zeros to T5's width). A mismatch failed at the first model call ("mat1 and mat2 shapes cannot
# be multiplied"), naming no part; a part or key not there is not checked (SD3's optional T5)
TEXT_WIDTHS = {
    "StableDiffusionPipeline": [("cross_attention_dim", [("text_encoder", "hidden_size")], False)],
    SDXL: [("cross_attention_dim", [("text_encoder", "hidden_size"), ("text_encoder_2", "hidden_size")], False)],
    "StableDiffusion3Pipeline": [
        ("pooled_projection_dim", [("text_encoder", "projection_dim"), ("text_encoder_2", "projection_dim")], False),
        ("joint_attention_dim", [("text_encoder", "hidden_size"), ("text_encoder_2", "hidden_size")], True),
        ("joint_attention_dim", [("text_encoder_3", "d_model")], False)],
    flux.FLUX: [("pooled_projection_dim", [("text_encoder", "hidden_size")], False),
                ("joint_attention_dim", [("text_encoder_2", "d_model")], False)],
    **{k: [("caption_channels", [("text_encoder", "d_model")], False)] for k in pixart.FAMILIES},
}


def text_width_problem(kind, config, encoders):
    """Why the prompt embeddings of the text encoders (encoders: {part: (class name, config dict)}) do not fit a
    network of this config in pipeline class `kind` (to follow "has"), or None."""
    encoders = {part: encoder for part, (_, encoder) in encoders.items()}
    for key, parts, padded in TEXT_WIDTHS.get(kind, []):
        if key == "cross_attention_dim" and config.get("encoder_hid_dim") is not None:
            key = "encoder_hid_dim"  # the UNet projects the prompt embeddings from this width to its own
        width = config.get(key)
        if isinstance(width, (list, tuple)) and len(set(width)) == 1:  # a UNet's per-block cross_attention_dim
            width = width[0]
        given = [(part, name, encoders[part].get(name)) for part, name in parts
                 if isinstance(encoders.get(part), dict)]
        if not is_integer(width) or len(given) != len(parts) or not all(is_integer(v) for _, _, v in given):
            continue
        total = sum(v for _, _, v in given)
        if total > width if padded else total != width:
            said = " + ".join(f"{part}'s {name} {v}" for part, name, v in given)
            return (f"a {'unet' if kind in UNET_FAMILIES else 'transformer'} with {key} {width} and prompt "
                    f"embeddings {total} wide ({said}): the text encoders do not fit the network")
    return None


def output_problem(config, kind):
    """Why a UNet's or SD3's / Flux's transformer output cannot be the prediction (to follow "has"), or None: the
    latent's channels, or for a UNet twice them (a learned variance after the noise, as DDPMScheduler.step splits it:
    the noise half is sampled). PixArt's are checked by pixart.transformer_problem. Another width failed at the first
    model call, naming the solver's eps_fn."""
    channels, out = config.get("in_channels"), config.get("out_channels")
    if kind not in (*UNET_FAMILIES, *FLOW_PIPELINES) or out is None or not is_integer(channels):
        return None
    if kind in UNET_FAMILIES and out not in (channels, 2 * channels):
        return (f"a unet with out_channels {out!r} for in_channels {channels}: {channels} expected (the prediction), "
                f"or {2 * channels} (and a learned variance)")
    if kind not in UNET_FAMILIES and out != channels:
        return f"a transformer with out_channels {out!r} for in_channels {channels}: {channels} expected"
    return None


def network_problem(config, kind=None, encoders=None):
    """What keeps a denoising network (its config dict) from being sampled here by pipeline class `kind`, or None.
    encoders: the text encoders present, {part: (class name, config dict)}. A UNet with time_cond_proj_dim is guidance-distilled (LCM): diffusers'
    pipelines then skip classifier-free guidance and feed the scale as timestep_cond, for a consistency sampler, not
    the DDIM steps the solver parallelises."""
    if config.get("time_cond_proj_dim") is not None:
        return ("has a UNet with time_cond_proj_dim (a guidance-distilled LCM model, sampled by its own consistency "
                "steps); supported are UNets without it")
    # SDXL's UNet takes the pooled text embedding and the image's sizes (addition_embed_type text_time), which only
    # its own pipeline gives: either way round this failed inside (a TypeError on None, an AttributeError)
    added = config.get("addition_embed_type")
    if kind == SDXL and added != "text_time":
        return (f"has addition_embed_type {added!r}: SDXL's UNet takes text_time added conditions (the pooled text "
                f"embedding and the image sizes)")
    if kind in ("StableDiffusionPipeline",) and added is not None:
        return (f"has addition_embed_type {added!r}, an SDXL UNet, in a {kind} folder (model_index.json's "
                f"_class_name would be {SDXL})")
    encoders = encoders or {}
    if kind == SDXL and "text_encoder_2" in encoders:
        name, encoder = encoders["text_encoder_2"]
        if name != "CLIPTextModelWithProjection":  # its pooled text_embeds: None from a CLIPTextModel
            return (f"goes with a text_encoder_2 that is a {name}: SDXL reads the pooled embedding of a "
                    f"CLIPTextModelWithProjection")
        # what diffusers' _get_add_time_ids checks only when sampling ("Model expects an added time embedding
        # vector of length ..."): six sizes embedded each, and the pooled embedding. Always six in the text-to-image
        # pipeline: the refiner's five (an aesthetic score in place of the target size, requires_aesthetics_score)
        # are its img2img pipeline's, so a refiner UNet under a text-to-image model_index.json is refused here
        width, sizes = config.get("addition_time_embed_dim"), 6
        pooled, expected = encoder.get("projection_dim"), config.get("projection_class_embeddings_input_dim")
        if all(is_integer(v) for v in (width, pooled, expected)) and width * sizes + pooled != expected:
            return (f"has projection_class_embeddings_input_dim {expected}, but its addition_time_embed_dim {width} "
                    f"x {sizes} sizes + text_encoder_2's projection_dim {pooled} make {width * sizes + pooled}")
    if kind == flux.FLUX:  # the rotary embedding splits each head's features among the axes (a size error inside)
        axes, head = config.get("axes_dims_rope"), config.get("attention_head_dim")
        if isinstance(axes, list) and all(is_integer(a) for a in axes) and is_integer(head) and sum(axes) != head:
            return (f"has axes_dims_rope {axes}, which sum to {sum(axes)}, not its attention_head_dim {head}: the "
                    f"rotary embedding covers each head's features")
    # last: a network of another family (an SDXL UNet under StableDiffusionPipeline) is said as that above
    for problem in (output_problem(config, kind), text_width_problem(kind, config, encoders)):
        if problem:
            return f"has {problem}"
    return None


def family(path):
    """The pipeline class named by the folder's model_index.json (checked by check_folder)."""
    return read_json(os.path.join(path, "model_index.json")).get("_class_name")


def _network_config(path):
    """config.json of the folder's denoising network: unet/ (SD 1.x, 2.x, XL) or transformer/ (SD3)."""
    for part in ("unet", "transformer"):
        if os.path.isfile(os.path.join(path, part, "config.json")):
            return os.path.join(path, part, "config.json")
    return os.path.join(path, "unet", "config.json")


def check_scheduler(path, flag="--model_path"):
    """The scheduler settings the linear DDIM system (equation 1) can represent."""
    sched_path = os.path.join(path, "scheduler", "scheduler_config.json")
    raw = read_json(sched_path, flag)
    if isinstance(raw, dict) and all(k.startswith("_") for k in raw):  # {} sampled with diffusers' own defaults
        raise InputFileError(f"{flag}: {sched_path} sets none of the scheduler's values (num_train_timesteps, "
                             f"beta_schedule, ...): diffusers' defaults are not this model's noise schedule")
    kind = _scheduler_class(path) or (raw.get("_class_name") if isinstance(raw, dict) else None)  # what loads
    sched = as_loaded({**switch_defaults(kind), **raw} if isinstance(raw, dict) else raw, family(path))
    sched = {**sched, "_class_name": kind}
    if "num_train_timesteps" in sched:
        config_value(sched, "num_train_timesteps", sched_path, flag, "count")
    problem = scheduler_problem(sched, family(path))
    if problem:
        raise InputFileError(f"{flag}: {sched_path} {problem}")


def switch_defaults(kind):
    """The switches (SWITCHES, NONLINEAR) scheduler class `kind` sets where its config leaves them out: they differ
    by class (DDPMScheduler clips by default, DDIMScheduler too, Euler does not), and a config without clip_sample
    was read as not clipping, then refused after loading in a line calling itself unexpected."""
    import diffusers
    cls = getattr(diffusers, kind, None) if isinstance(kind, str) else None
    if not isinstance(cls, type):
        return {}
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if k in (*SWITCHES, *NONLINEAR) and isinstance(p.default, bool)}


def as_loaded(config, kind):
    """A folder's scheduler config (a dict) as the loaded pipeline holds it: diffusers' StableDiffusionPipeline
    resets an outdated steps_offset to 1 and clip_sample to false when it is built, so the checks made before
    loading read those values (a folder with steps_offset 0 passed --timesteps 1000 and then failed after loading)."""
    if kind == "StableDiffusionPipeline" and isinstance(config, dict):
        config = {**config, "steps_offset": 1}
        if config.get("clip_sample") is True:
            config["clip_sample"] = False
    return config


def note_scheduler(path):
    """Said once, by the flag check: a folder whose scheduler is sampled as DDIM (read_as_ddim)."""
    said = read_as_ddim(_scheduler_class(path), path)
    if said:
        note(said)


def read_as_ddim(kind, where):
    """What to tell a user whose scheduler class `kind` is neither DDIM nor a flow's Euler steps (SDXL's Euler,
    DPM-Solver): it is sampled as DDIM, equation (1) keeping its noise schedule, not its sampler's steps; or None."""
    if kind not in (None, "DDIMScheduler") and "FlowMatch" not in kind:
        return (f"{where} comes with {kind}: sampled as DDIM on its noise schedule (the result equals sequential "
                f"DDIM, not {kind}'s own steps)")
    return None


# the true / false settings of the schedulers read here (DDIM's and the flow's; the others' read as DDIM)
SWITCHES = ("set_alpha_to_one", "clip_sample", "thresholding", "rescale_betas_zero_snr", "skip_prk_steps",
            "stochastic_sampling", "use_dynamic_shifting", "use_karras_sigmas", "use_exponential_sigmas",
            "use_beta_sigmas", "invert_sigmas")


def scheduler_problem(sched, kind=None):
    """What keeps a scheduler config (a dict) from being read as the linear system (equation 1), or None. kind: the
    pipeline class it samples for (flow matching only with SD3's velocity-predicting transformer)."""
    n_train = sched.get("num_train_timesteps", 1000)
    if isinstance(n_train, int) and n_train > MAX_TRAIN_STEPS:  # one noise level per step is allocated
        return f"has num_train_timesteps {n_train}; at most {MAX_TRAIN_STEPS} are supported"
    name = str(sched.get("_class_name"))
    if "FlowMatch" in name and kind not in (None, *FLOW_PIPELINES):  # diffusers' own loop fails on it
        return (f"is a flow-matching {name}, for a {kind} whose UNet predicts noise: supported are schedulers with "
                f"betas (read as DDIM)")
    # A network that predicts a flow's velocity needs a flow-matching scheduler. FluxPipeline hands its scheduler
    # sigmas and the shift mu, which only flow-matching ones take (its own call fails on others; read as DDIM, this
    # failed after loading in a line calling itself unexpected); SD3's with betas read the velocity as noise, a
    # meaningless image with exit 0 (a config naming no class loads as model_index.json names it)
    if kind in FLOW_PIPELINES and sched.get("_class_name") is not None and "FlowMatch" not in name:
        return (f"is a {name}, with betas, for a {kind} whose network predicts a flow's velocity: it samples with a "
                f"flow-matching scheduler (FlowMatchEulerDiscreteScheduler, as SD3 and FLUX.1 come)")
    if "FlowMatch" in name:  # Euler steps of a flow: the model predicts the velocity
        if not is_flow_euler(name):  # Heun's two calls per step, LCM's re-noised consistency steps
            return (f"is a {name}: of the flow-matching schedulers, FlowMatchEulerDiscreteScheduler's deterministic "
                    f"Euler steps are supported (SD3, Flux)")
        if sched.get("stochastic_sampling"):  # re-noised steps: not the deterministic Euler steps solved here
            return ("sets stochastic_sampling: supported are flow-matching schedulers with deterministic Euler steps "
                    "(SD3, Flux)")
        # the shift then depends on the image size in a way each pipeline defines: FluxPipeline's is followed
        if sched.get("use_dynamic_shifting") and kind != flux.FLUX:
            return ("sets use_dynamic_shifting: supported are flow-matching schedulers with a fixed shift (SD3), "
                    "and dynamic shifting with FluxPipeline")
        if kind == flux.FLUX:  # the shift mu its __call__ computes in any case
            problem = flux.shift_problem(sched)
            if problem:
                return problem
        from diffusers import FlowMatchEulerDiscreteScheduler
        return _levels_problem(lambda: FlowMatchEulerDiscreteScheduler.from_config(sched).sigmas, "sigmas", 0,
                               zero_ok=True)
    if "Inverse" in name:  # DDIMInverse, DPMSolverMultistepInverse: read as DDIM, a sample where __call__ inverts
        return (f"is {name}, which runs the steps backwards (an image to its noise, for inversion): supported are "
                f"sampling schedulers with betas, read as DDIM, and flow matching")
    if "EDM" in name or "sigma_data" in sched:  # read as DDIM, DDIM's default betas
        return ("is an EDM scheduler (Karras noise levels sigma_min .. sigma_max, no beta schedule): supported are "
                "schedulers with betas, read as DDIM, and flow matching")
    if not has_betas(name, sched):  # KarrasVe, ScoreSdeVe, ...: its config would be read with DDIM's default betas
        return (f"is {name}, whose noise levels come from no beta schedule: supported are schedulers with betas, "
                f"read as DDIM, and flow matching")
    prediction = sched.get("prediction_type", "epsilon")
    for key in SWITCHES:  # "false", a string, is true to the scheduler: set_alpha_to_one "false" sampled with it on
        if sched.get(key) is not None and not isinstance(sched[key], bool):
            return f"has {key} {sched[key]!r}; true or false is needed"
    if prediction not in PREDICTIONS:
        return f"has prediction_type {prediction!r}; supported: {', '.join(PREDICTIONS)}"
    for key, why in NONLINEAR.items():
        if sched.get(key):
            return f"sets {key}: {why}; set it to false to sample this model here"
    spacing = sched.get("timestep_spacing", "leading")
    if spacing not in SPACINGS:
        return f"has timestep_spacing {spacing!r}; supported: {', '.join(SPACINGS)}"
    offset = sched.get("steps_offset", 0)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:  # a negative one indexes from the end
        return f"has steps_offset {offset!r}; a non-negative integer is needed"
    from diffusers import DDIMScheduler
    return _levels_problem(lambda: DDIMScheduler.from_config(sched).alphas_cumprod, "alphas_cumprod", n_train)


def _diffusers_class(name):
    """diffusers' class of that name, or None: no such class, or a placeholder for one whose extra package is
    missing (DPMSolverSDEScheduler without torchsde takes only *args, **kwargs)."""
    import diffusers
    cls = getattr(diffusers, name, None) if name.isidentifier() else None
    if not isinstance(cls, type) or cls.__module__.startswith("diffusers.utils.dummy_"):
        return None
    return cls


def is_flow_euler(name):
    """Whether a scheduler class name is FlowMatchEulerDiscreteScheduler (or a subclass: the same steps)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    cls = _diffusers_class(name)
    return cls is not None and issubclass(cls, FlowMatchEulerDiscreteScheduler)


def has_betas(name, sched):
    """Whether a scheduler's noise levels come from betas (what DDIM reads): a diffusers class by its parameters,
    another by its config's keys. A config that names no class is read as DDIM's, its defaults included."""
    if sched.get("_class_name") is None:
        return True
    cls = _diffusers_class(name)
    if cls is not None:  # IPNDM takes trained_betas but reads them as no DDPM schedule does
        return "beta_schedule" in inspect.signature(cls.__init__).parameters
    return any(k in sched for k in ("beta_start", "beta_end", "beta_schedule", "trained_betas"))


def _levels_problem(make, name, count, zero_ok=False):
    """Its noise levels (built from the config as the sampler will) must exist and lie in (0, 1] ([0, 1] with
    zero_ok: a flow's sigmas end at 0); count: how many there must be (0: any)."""
    try:
        with quiet_loading():
            levels = torch.as_tensor(make()).double()
    except Exception as e:  # whatever diffusers makes of a config it cannot use (a bad beta_schedule, betas...)
        return f"gives no usable noise levels ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    low_ok = levels >= 0 if zero_ok else levels > 0
    if count and len(levels) != count:
        return f"gives {len(levels)} {name} for num_train_timesteps {count} (trained_betas of another length?)"
    if not bool((torch.isfinite(levels) & low_ok & (levels <= 1)).all()):
        return f"gives {name} outside {'[0' if zero_ok else '(0'}, 1] (its betas are not a noise schedule)"
    return None


def pipeline_problem(pipe):
    """What keeps a loaded pipeline from being sampled here (the checks check_folder makes on a folder), or None."""
    kind = pipeline_kind(pipe)
    if kind is None:
        return (f"is a {type(pipe).__name__}; supported are {SUPPORTED.replace(' folders', '')}, and the "
                f"class-conditional {DIT_PIPELINE}")
    if kind == "StableDiffusionXLPipeline" and (pipe.text_encoder is None or pipe.tokenizer is None):
        return ("has no text_encoder or tokenizer (only the second encoder, as the SDXL refiner); supported are "
                "SDXL pipelines with both text encoders")
    # a part set to None (pipe.vae = None) failed inside, an AttributeError on None naming no part
    parts = DIT_PARTS if kind == DIT_PIPELINE else PARTS[kind]
    missing = [part for part in parts if getattr(pipe, part, None) is None]
    if missing:
        return f"has {', '.join(missing)} set to None; sampling needs its {', '.join(parts)}"
    # weights without data (loaded with a device_map of "meta", or moved there): a device error inside naming no part
    empty = [part for part in parts if isinstance(getattr(pipe, part), torch.nn.Module) and any(
        t.is_meta for t in itertools.chain(getattr(pipe, part).parameters(), getattr(pipe, part).buffers()))]
    if empty:
        if any(hasattr(m, "_hf_hook") for m in getattr(pipe, empty[0]).modules()):  # accelerate's offload hooks
            return ("has its weights offloaded layer by layer (enable_sequential_cpu_offload), which the solver's "
                    "batched calls do not support (a TypeError inside): use enable_model_cpu_offload")
        return f"has {', '.join(empty)} on the meta device (weights without data): load or move it to a real device"
    from diffusers import FlowMatchEulerDiscreteScheduler
    own = "FlowMatchEulerDiscreteScheduler" if isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) \
        else type(pipe.scheduler).__name__  # the class that steps, whatever its config says
    problem = scheduler_problem({**pipe.scheduler.config, "_class_name": own}, kind)
    if problem:
        return f"has a scheduler that {problem}"
    problem = vae_problem(pipe.vae.config)
    if problem:
        return f"has a VAE that {problem}"
    problem = tokenizer_problem(pipe)
    if problem:
        return f"has a {problem[0]} that {problem[1]}"
    encoders = {part: (type(module).__name__, module.config.to_dict()) for part in TEXT_ENCODERS
                if (module := getattr(pipe, part, None)) is not None and hasattr(module, "config")}
    problem = network_problem(network(pipe).config, kind, encoders)
    if problem:
        return problem
    channels, latent = network(pipe).config.in_channels, pipe.vae.config.latent_channels
    if kind == flux.FLUX:
        problem = flux.channels_problem(channels, latent)
        return f"has {problem}" if problem else None
    if kind in pixart.FAMILIES:  # what the pipeline reads: the transformer as loaded (its resolved conditions)
        config = {**network(pipe).config, "use_additional_conditions": network(pipe).use_additional_conditions}
        problem = pixart.transformer_problem(kind, config, latent)
        if problem:
            return f"has {problem}"
    if channels != latent:
        return (f"has a denoiser taking {channels} channels but a VAE making {latent}-channel latents (an "
                f"inpainting or other variant?)")
    return None


def pipeline_kind(pipe):
    """The supported pipeline class pipe is (or derives from), or None: one of PIPELINES, or DIT_PIPELINE (whose
    folders the DiT script samples, not these)."""
    return next((c.__name__ for c in type(pipe).__mro__ if c.__name__ in (*PIPELINES, DIT_PIPELINE)), None)


def parse_sd_args(parser, argv, script):
    """The SD scripts' command line: the model's flags added to the script's own, parsed with --preset
    (presets.parse_with_preset), and the guidance default filled in, which depends on the folder."""
    add_sd_flags(parser)
    args = parse_with_preset(parser, argv, script)
    fill_guidance_default(args)
    return args


def fill_guidance_default(args):
    """--cfg_scale when not given, once the flags are parsed (its flag has no default: it depends on the folder):
    FluxPipeline's own default for a Flux folder, whose scale is FLUX.1-dev's distilled guidance, else the SD
    scripts' SD_CFG_SCALE."""
    if args.cfg_scale is None:
        args.cfg_scale = flux.GUIDANCE_SCALE if _is_flux(args.model_path) else SD_CFG_SCALE


def _is_flux(path):
    """Whether the --model_path given is a readable Flux folder (what is wrong with another, check_folder says)."""
    return bool(path) and _family_if_readable(path) == flux.FLUX


def _family_if_readable(path):
    """family(path), or None where the folder cannot tell yet (check_folder then says what is wrong with it)."""
    try:
        return family(path) if os.path.isdir(path) else None
    except InputFileError:
        return None


def _scheduler_class(path):
    """The scheduler class diffusers loads: model_index.json's entry names it (with scheduler_config.json's
    values), where that differs from the config's own _class_name (an Euler index over a DDIM config was stepped
    with Euler and sampled here as DDIM without the note)."""
    try:
        entry = read_json(os.path.join(path, "model_index.json")).get("scheduler")
        if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str):
            return entry[1]
        return read_json(os.path.join(path, "scheduler", "scheduler_config.json")).get("_class_name")
    except InputFileError:
        return None  # check_folder says what is wrong with the folder


def factor_of(block_out_channels):
    """Pixels per latent cell of an AutoencoderKL with these blocks: each block after the first halves the side (SD's
    VAE, four blocks: 8). The one place the pipelines' formula is written here."""
    return 2 ** (len(block_out_channels) - 1)


def vae_scale_factor(path):
    """Pixels per latent cell, read from vae/config.json (SD v1.5: 8)."""
    vae_path = os.path.join(path, "vae", "config.json")
    return factor_of(config_value(read_json(vae_path), "block_out_channels", vae_path, kind="list"))


def default_size(path):
    """(height, width) in pixels the pipeline makes by default: the network's sample_size (one number, or
    (height, width) in some configs) times the VAE factor."""
    if family(path) == flux.FLUX:  # its transformer has no sample_size: the pipeline's own default
        return sample_pixels(flux.DEFAULT_CELLS, vae_scale_factor(path))
    net_path = _network_config(path)
    return sample_pixels(config_value(read_json(net_path), "sample_size", net_path, kind="count"),
                         vae_scale_factor(path))


def sample_pixels(cells, factor):
    """A network config's sample_size (latent cells: a number or (height, width)) as (height, width) pixels."""
    h, w = cells if isinstance(cells, (list, tuple)) else (cells, cells)
    return int(h) * factor, int(w) * factor


def check_size(args, path):
    """--height/--width: default from the model config, else a positive multiple of the VAE factor (times the
    patch size of a transformer, SD3), no larger than the transformer's position embedding reaches."""
    factor = vae_scale_factor(path)
    net_path = _network_config(path)
    net = read_json(net_path)
    patch, reach = patch_of(family(path), net), net.get("pos_embed_max_size")
    if not isinstance(patch, int) or patch < 1 or reach is not None and (not isinstance(reach, int) or reach < 1):
        raise InputFileError(f"--model_path: {net_path} has patch_size {patch!r} and pos_embed_max_size {reach!r}: "
                             f"positive integers expected")
    kind = family(path)
    args._sizes_from_model = []  # the memory check names the flags given, and the model's config for the others
    for name, default in zip(("height", "width"), default_size(path)):
        v = getattr(args, name)
        if v is None:
            setattr(args, name, default)
            args._sizes_from_model.append(name)
        elif kind not in pixart.FAMILIES:  # PixArt's sizes: below, once both are known
            size_problem = wrong_size(v, factor, patch, reach)
            if size_problem:
                raise UsageError(f"--{name} must be {size_problem}")
    if kind in pixart.FAMILIES:
        problem = binned_size_problem(kind, net["sample_size"], args.height, args.width, factor, patch, reach)
        if problem:
            raise UsageError(f"--{problem[0]} {problem[1]}")


def binned_size_problem(kind, sample_size, height, width, factor, patch=1, reach=None):
    """PixArt's sizes (kind: its pipeline): (side, what is wrong with it, to follow its name), or None. The
    pipeline samples the aspect-ratio bin nearest height x width and resizes the image back to any size, so the
    size asked for is only bounded; the bin must suit the VAE and the transformer's patches (always, for PixArt's
    own models: their bins are multiples of 16 pixels, as their 8 x 2)."""
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 1 <= v <= MAX_SIDE:
            return name, f"must be an integer in 1..{MAX_SIDE}, got {v!r}"
    binned = pixart.binned_size(kind, sample_size, height, width)
    for name, v in zip(("height", "width"), binned):
        problem = wrong_size(v, factor, patch, reach)
        if problem:
            return name, (f"{height if name == 'height' else width} is sampled at {kind}'s aspect-ratio bin "
                          f"{binned[0]}x{binned[1]}, whose {name} is not {problem}")
    return None


def sampled_size(pipe, height, width):
    """(height, width) in pixels of the image the pipeline samples, for one asked of height x width: PixArt's
    aspect-ratio bin (resized back after decoding), the size itself for the others."""
    kind = pipeline_kind(pipe)
    if kind in pixart.FAMILIES:
        return pixart.binned_size(kind, network(pipe).config.sample_size, height, width)
    return height, width


def patch_of(kind, net_config):
    """Latent cells per side of the denoiser's token: the transformer's patch_size (SD3), Flux's packing of 2x2,
    1 for a UNet."""
    return flux.PATCH if kind == flux.FLUX else net_config.get("patch_size") or 1


def wrong_size(v, factor, patch=1, reach=None):
    """What an image side v of pixels must be, or None when it is that: a multiple of the VAE factor (times the
    patch size of a transformer), no larger than the transformer's position embedding reaches (reach cells)."""
    step = factor * patch
    top = MAX_SIDE if reach is None else min(MAX_SIDE, reach * step)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < step or v % step or v > top:
        what = f"the VAE factor {factor}" if patch == 1 else f"{step} (VAE factor {factor} x patch size {patch})"
        return f"a multiple of {what} in {step}..{top}, got {v!r}"
    return None


MAX_PROMPT_TOKENS = 100_000  # a CLIP tokenizer reads 77; transformers reads 1e30 where model_max_length is missing


def tokenizer_problem(pipe):
    """(part, what) for a tokenizer the prompt encoding cannot use, or None. A CLIP tokenizer's model_max_length:
    where its tokenizer_config.json has none, transformers reads 1e30 and encode_prompt fails (an OverflowError naming
    no file); at 0 the prompt was dropped with two notes; SDXL's two must agree (their embeddings are joined token by
    token). PixArt's one tokenizer (T5) is read to max_sequence_length. Every tokenizer's ids must be rows of its
    text encoder's embedding (a CLIP tokenizer where T5's belongs: an IndexError naming nothing)."""
    kind = pipeline_kind(pipe)
    clip = [] if kind in pixart.FAMILIES else \
        ["tokenizer", "tokenizer_2"] if kind == "StableDiffusionXLPipeline" else ["tokenizer"]
    for part in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tokenizer = getattr(pipe, part, None)
        if tokenizer is None:  # a DiT pipeline's; a missing one is said where the parts are checked
            continue
        encoder = part.replace("tokenizer", "text_encoder")
        config = getattr(getattr(pipe, encoder, None), "config", None)
        vocab = getattr(config, "vocab_size", None)
        if is_integer(vocab) and len(tokenizer) > vocab:
            return part, (f"gives token ids up to {len(tokenizer) - 1}, but {encoder}/config.json's vocab_size is "
                          f"{vocab}: not the tokenizer of this text encoder")
        if part not in clip:
            continue
        length = getattr(tokenizer, "model_max_length", None)
        if not is_integer(length) or not 1 <= length <= MAX_PROMPT_TOKENS:
            shown = "none (transformers then reads 1e30)" if is_integer(length) and length > 1e29 else repr(length)
            return part, (f"has model_max_length {shown}; the prompt length its text encoder reads (77 for CLIP) "
                          f"is needed")
        # a prompt is padded to model_max_length: longer than the encoder's positions, every prompt failed in a
        # ValueError said as unexpected
        positions = getattr(config, "max_position_embeddings", None)
        if is_integer(positions) and length > positions:
            return part, (f"has model_max_length {length}, more than {encoder}/config.json's max_position_embeddings "
                          f"{positions}: its text encoder cannot read prompts that long")
        first = getattr(pipe, "tokenizer", None)
        if part == "tokenizer_2" and first is not None and length != first.model_max_length:
            return part, (f"has model_max_length {length} and tokenizer/ {first.model_max_length}: SDXL joins the "
                          f"two text encoders' outputs token by token, so the lengths must agree")
    return None


def shape_mismatch(path, index):
    """The first tensor of a transformers part (the text encoders) whose shape in its safetensors files differs from
    the one its config.json makes, said as "<part>/: <name> is (..) in its weight files, (..) by its config.json", or
    None. The model is built on the meta device: nothing is allocated."""
    import transformers
    for part, entry in index.items():
        sub = os.path.join(path, part)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] == "transformers") or not os.path.isdir(sub):
            continue
        cls = getattr(transformers, str(entry[1]), None)
        if not isinstance(cls, type) or not hasattr(cls, "config_class"):
            continue
        try:
            with torch.device("meta"):
                model = cls(cls.config_class.from_pretrained(sub))
        except Exception:  # a config that does not build: the loading error says it
            continue
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        for _, k, header in safetensors_headers(sub):
            theirs = tuple(header.get_shape())
            if k in ours and ours[k] != theirs:
                return (f"{part}/: {k} is {theirs} in its weight files but {ours[k]} by its config.json: the config "
                        f"is not the one these weights were saved with")
    return None


def load_pipeline(path, device, dtype):
    import diffusers
    check_folder(path)
    kind = family(path)
    cls = getattr(diffusers, kind)
    extra = dict(requires_safety_checker=False) if kind == "StableDiffusionPipeline" else {}
    # parts the solver never uses are not loaded (safety checker, feature extractor, image encoder), nor an optional
    # one the folder names but does not have (SD3's T5, used when both its folders are there)
    index = read_json(os.path.join(path, "model_index.json"))
    t5 = all(os.path.isdir(os.path.join(path, name)) and index.get(name) not in ([None, None], None)
             for name in T5_PARTS)
    for name in inspect.signature(cls.__init__).parameters:
        if name in PARTS[kind] or name in FLAGS_OF_PIPELINES or name in T5_PARTS and t5:
            continue
        extra[name] = None
    variant = weights_variant(path, [*PARTS[kind], *(T5_PARTS if t5 else ())])  # weight files only are read
    with quiet_loading():
        try:
            pipe = cls.from_pretrained(path, dtype=dtype, local_files_only=True, variant=variant, **extra)
        except Exception as e:  # whatever diffusers, transformers or safetensors make of a bad part
            # transformers' size mismatch points at a report that quiet loading does not print: named here
            mismatch = shape_mismatch(path, index) if "mismatch" in str(e) else None
            raise InputFileError(f"--model_path: cannot load {path} as a Stable Diffusion pipeline ("
                                 + (mismatch or f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}") + ")") \
                from None
        check_parts_loaded(pipe, path, "--model_path")
        problem = tokenizer_problem(pipe)
        if problem:
            raise InputFileError(f"--model_path: {os.path.join(path, problem[0], 'tokenizer_config.json')} "
                                 f"{problem[1]}")
        pipe.set_progress_bar_config(disable=True)
        # float16 on a CPU is slow but works here (the tests run it); diffusers' advice against it is not printed
        pipe = pipe.to(device, silence_dtype_warnings=True)
        # --fp16 is the denoiser's precision: the VAE is kept in float32 where it decodes in it (VAEDecoder would
        # otherwise cast it at every decode), as the reference's SD scripts keep it
        if decodes_in_float32(pipe.vae):
            pipe.vae.to(torch.float32)
    return pipe


@torch.no_grad()
def encode(pipe, prompts, negative_prompt, device, size=None, max_sequence_length=None):
    """Per-prompt conditioning, through the pipeline's own encode_prompt: {"cond", "uncond"} [P, L, E] prompt and
    negative-prompt embeddings, and for SDXL and SD3 the pooled ones ("pooled", "uncond_pooled" [P, E']), for SDXL
    the size/crop time ids of an image of `size` (height, width) ("time_ids", "uncond_time_ids" [P, 6]); for Flux
    {"cond", "pooled"} (T5's embeddings and CLIP's pooled one), with "uncond" and "uncond_pooled" only for a negative
    prompt (true classifier-free guidance); for PixArt {"cond", "uncond", "mask", "uncond_mask"} (T5's embeddings and
    attention masks; Alpha at 1024 px also the resolution and aspect ratio of `size`: pixart.encode).
    max_sequence_length: the T5 prompt's tokens (SD3, Flux, PixArt; None: the pipeline's default). A prompt longer
    than a text encoder takes is cut, as the pipeline does; said once, in one line."""
    kind = pipeline_kind(pipe)
    # (tokenizer, tokens it reads, what the cut loses); Flux reads the prompt with CLIP for its pooled embedding only
    readers = [(pipe.tokenizer, pipe.tokenizer.model_max_length, "the text encoder reads the first {}: the rest is "
                                                                  "ignored")]
    if kind == flux.FLUX:
        readers = [(pipe.tokenizer, pipe.tokenizer.model_max_length, "CLIP's pooled embedding reads the first {}"),
                   (pipe.tokenizer_2, max_sequence_length or flux.MAX_SEQUENCE_LENGTH,
                    "the T5 text encoder reads the first {} (max_sequence_length): the rest is ignored")]
    if kind in pixart.FAMILIES:  # one T5 encoder
        readers = [(pipe.tokenizer, max_sequence_length or pixart.MAX_SEQUENCE_LENGTH[kind],
                    "the T5 text encoder reads the first {} (max_sequence_length): the rest is ignored")]
    if kind == "StableDiffusion3Pipeline" and getattr(pipe, "tokenizer_3", None) is not None:
        readers = [(pipe.tokenizer, pipe.tokenizer.model_max_length, "the CLIP text encoders read the first {}"),
                   (pipe.tokenizer_3, max_sequence_length or SD3_MAX_SEQUENCE_LENGTH,
                    "the T5 text encoder reads the first {} (max_sequence_length): the rest is ignored")]
    with quiet_loading():  # the tokenizer's and the pipeline's own (multi-line) warnings about long prompts
        # named by its text, not by a flag: the scripts take prompts under three flags, parallel_sample as arguments
        for what, text in [("prompt", p) for p in prompts] + [("negative prompt", negative_prompt or "")]:
            for tokenizer, limit, cut in readers:
                n = len(tokenizer(text).input_ids)
                if n > limit:
                    note(f"the {what} {text[:40]!r}... has {n} tokens; {cut.format(limit)}")
        if kind == flux.FLUX:
            return flux.encode(pipe, prompts, device, max_sequence_length, negative_prompt)
        if kind in pixart.FAMILIES:
            return pixart.encode(pipe, kind, prompts, negative_prompt, device, size, max_sequence_length)
        # no negative prompt (None): each pipeline does what its __call__ does by default (SDXL with
        # force_zeros_for_empty_prompt: zero embeddings); "" is the empty prompt, encoded, as __call__ takes it
        negatives = [negative_prompt] * len(prompts) if negative_prompt is not None else None
        if kind == "StableDiffusionPipeline":
            cond, uncond = pipe.encode_prompt(list(prompts), device, 1, True, negative_prompt=negatives)
            return {"cond": cond, "uncond": uncond}
        if kind == "StableDiffusionXLPipeline":
            cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
                prompt=list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=True,
                negative_prompt=negatives)
            projection = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None \
                else int(pooled.shape[-1])
            time_ids = pipe._get_add_time_ids(tuple(size), (0, 0), tuple(size), dtype=cond.dtype,
                                              text_encoder_projection_dim=projection).to(device)      # [1, 6]
            time_ids = time_ids.repeat(len(prompts), 1)
            return {"cond": cond, "uncond": uncond, "pooled": pooled, "uncond_pooled": uncond_pooled,
                    "time_ids": time_ids, "uncond_time_ids": time_ids}
        # SD3 without its T5 still appends max_sequence_length zero tokens: the length is an input either way
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=True, negative_prompt=negatives,
            max_sequence_length=max_sequence_length or SD3_MAX_SEQUENCE_LENGTH)
        return {"cond": cond, "uncond": uncond, "pooled": pooled, "uncond_pooled": uncond_pooled}


def denoiser(pipe, cfg_scale, true_cfg_scale=1.0):
    """The pipeline's network as the solver's f (models/adapters.py). true_cfg_scale: Flux's classifier-free
    guidance (its cfg_scale is the distilled guidance input)."""
    from .adapters import FluxDenoiser, PixArtDenoiser, SD3Denoiser, SDDenoiser, SDXLDenoiser
    kind = pipeline_kind(pipe)
    if kind in pixart.FAMILIES:
        return PixArtDenoiser(pipe.transformer, cfg_scale, pipe.scheduler.config.get("prediction_type", "epsilon"),
                              pipe.scheduler.alphas_cumprod,
                              pixart.size_conditioned(kind, pipe.transformer.config.sample_size))
    if kind == flux.FLUX:  # cfg_scale: FLUX.1-dev's guidance input (distilled), not classifier-free guidance
        return FluxDenoiser(pipe.transformer, cfg_scale, true_cfg_scale)
    if kind == "StableDiffusion3Pipeline":
        return SD3Denoiser(pipe.transformer, cfg_scale)
    make = SDXLDenoiser if kind == "StableDiffusionXLPipeline" else SDDenoiser
    return make(pipe.unet, cfg_scale, pipe.scheduler.config.get("prediction_type", "epsilon"),
                pipe.scheduler.alphas_cumprod)


def network(pipe):
    """The pipeline's denoising network (UNet or transformer)."""
    return pipe.transformer if hasattr(pipe, "transformer") and getattr(pipe, "unet", None) is None else pipe.unet


def pixels_per_cell(pipe):
    """The VAE factor of a loaded pipeline (SD v1.5: 8): its vae_scale_factor, which DiTPipeline does not set, else
    read from its VAE's config as the other pipelines compute it."""
    return getattr(pipe, "vae_scale_factor", None) or factor_of(pipe.vae.config.block_out_channels)


def latent_shape(pipe, height, width):
    """The solver's state: [C, H/f, W/f] (Flux: unpacked, C a quarter of the transformer's in_channels)."""
    f = pixels_per_cell(pipe)
    channels = network(pipe).config.in_channels
    return (channels // flux.PATCH ** 2 if pipeline_kind(pipe) == flux.FLUX else channels, height // f, width // f)


def schedule_of(pipe, T, eta, height, width, name=STEPS):
    """The Schedule of the pipeline's own loop: Flux's depends on the image size (flux.flux_schedule), the others'
    do not (paratAA.pipeline_schedule: a flow's Euler steps, else read as DDIM)."""
    if pipeline_kind(pipe) == flux.FLUX:
        return flux.flux_schedule(pipe.scheduler, T, eta, height, width, pipe.vae_scale_factor, name)
    return pipeline_schedule(pipe, T, eta, name)


class PromptList(argparse.Action):
    """--prompt "a b" ["c d" ...] or repeated --prompt: each quoted prompt is one prompt. Several values of which
    some have no space are almost surely one prompt typed without quotes, which would silently become several
    one-word prompts: refused with one line saying how to quote it."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(values) > 1 and any(not any(c.isspace() for c in v) for v in values):
            # one line: a value holding a line break or another unprinted character is shown quoted
            joined = " ".join(v if v.isprintable() else repr(v) for v in values)
            parser.error(f"{option_string} got {len(values)} values, some of them single words ({joined}): quote a "
                         f"prompt that has spaces ({option_string} \"{joined}\"); for several prompts quote each one "
                         f"or repeat {option_string}")
        setattr(namespace, self.dest, (getattr(namespace, self.dest) or []) + list(values))


def add_sd_flags(parser):
    g = parser.add_argument_group("model")
    g.add_argument("--model_path", type=path_value, default=None,
                   help="local diffusers folder: Stable Diffusion 1.x/2.x, SDXL, SD3 or Flux (default: the embedded "
                        "digits model)")
    g.add_argument("--negative_prompt", type=str, default=None,
                   help="prompt of the unconditional guidance branch (default: none, the pipeline's default: the "
                        "empty prompt, or for SDXL zero embeddings; \"\" encodes the empty prompt); for Flux only "
                        "with --true_cfg_scale")
    g.add_argument("--true_cfg_scale", type=float, default=None,
                   help="Flux only: classifier-free guidance away from --negative_prompt (FluxPipeline's "
                        "true_cfg_scale, a second pass per state), on top of the distilled guidance of --cfg_scale "
                        "(default: none, 1)")
    g.add_argument("--max_sequence_length", type=int, default=None,
                   help=f"SD3, Flux and PixArt: tokens of the T5 prompt (default: the pipeline's, SD3 "
                        f"{SD3_MAX_SEQUENCE_LENGTH}, Flux {flux.MAX_SEQUENCE_LENGTH}, PixArt-Alpha "
                        f"{pixart.MAX_SEQUENCE_LENGTH[pixart.ALPHA]}, PixArt-Sigma "
                        f"{pixart.MAX_SEQUENCE_LENGTH[pixart.SIGMA]}; at most {MAX_T5_TOKENS})")
    g.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    g.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")


def check_prompt_flags(args, kind):
    """--negative_prompt, --true_cfg_scale and --max_sequence_length against the folder's family (kind; None where
    the folder cannot tell yet: check_folder then says why). A negative prompt only enters the unconditional branch
    of guidance, which is --cfg_scale's (SD) or, for Flux, whose --cfg_scale is a distilled input of the network,
    --true_cfg_scale's: given without that guidance it would be ignored."""
    if args.max_sequence_length is not None:
        if kind is not None and kind not in T5_FAMILIES:
            where = args.model_path or "the embedded model"
            raise UsageError(f"--max_sequence_length is the T5 prompt's length ({T5_NAMES}); {where} is a {kind}")
        if not 1 <= args.max_sequence_length <= MAX_T5_TOKENS:
            raise UsageError(f"--max_sequence_length must be in 1..{MAX_T5_TOKENS} (the pipelines' limit), got "
                             f"{args.max_sequence_length}")
    if kind == flux.FLUX:
        problem = flux.true_cfg_problem(1.0 if args.true_cfg_scale is None else args.true_cfg_scale,
                                        args.negative_prompt, "--true_cfg_scale", "--negative_prompt")
        if problem:
            raise UsageError(problem)
        return
    if args.true_cfg_scale is not None and kind is not None:
        raise UsageError(f"--true_cfg_scale is FluxPipeline's classifier-free guidance; for a {kind} it is "
                         f"--cfg_scale")
    if args.negative_prompt is not None and not guides(args.cfg_scale):  # "" is a prompt too (encoded)
        raise UsageError(f"--negative_prompt has no effect without guidance (--cfg_scale {args.cfg_scale:g} <= 1)")


def blank(text):
    """Whether a prompt says nothing: empty, spaces, or only invisible characters (a zero-width space is neither
    space nor printed; control characters such as NUL)."""
    return all(c.isspace() or unicodedata.category(c) in ("Cf", "Cc") for c in text)


def undecodable(text):
    """Whether text holds bytes that were not UTF-8: Python keeps them as lone surrogates (a command line in another
    encoding), which no tokenizer takes."""
    return any("\ud800" <= c <= "\udfff" for c in text)


def check_sd_flags(args, prompts):
    """prompts: [(flag, prompt)]. Every flag before anything is loaded; returns the resolved SolverConfig."""
    for flag, p in prompts + [("--negative_prompt", args.negative_prompt or "")]:
        if undecodable(p):
            raise UsageError(f"{flag} is not valid UTF-8 text (bytes of another encoding?)")
    for flag, p in prompts:
        if blank(p):
            raise UsageError(f"{flag} must not be empty")
    # Flux's --cfg_scale is its network's guidance input: no note that it is off below 1, no negative prompt
    distilled = _is_flux(args.model_path)
    config = check_common_flags(args, 1000, distilled_guidance=distilled)
    if args.eta != 0 and args.model_path and os.path.isdir(args.model_path) and \
            "FlowMatch" in str(_scheduler_class(args.model_path)):
        raise UsageError(f"--eta applies to DDIM; {args.model_path} samples a flow by Euler steps, which add no "
                         f"noise: --eta must be 0, got {args.eta:g}")
    check_prompt_flags(args, _family_if_readable(args.model_path or EMBEDDED_SD))
    args.model_path = args.model_path or EMBEDDED_SD
    check_folder(args.model_path)
    check_size(args, args.model_path)
    check_timesteps(args.timesteps, args.eta, args.model_path, (args.height, args.width))
    check_prompts_known(args.model_path, prompts + [("--negative_prompt", args.negative_prompt or "")])
    note_scheduler(args.model_path)
    return config


def check_prompts_known(path, prompts):
    """prompts: [(flag, prompt)], read by the folder's (first) tokenizer. A prompt none of whose characters it has a
    token for reads as the empty prompt, which the flags refuse: "🙂🙂" gave the ids of "" with the embedded model
    (one id for unknown, end and padding), exit 0. Partly unknown: said in a note. Only prompts beyond ASCII are
    read here (a byte-level or character vocabulary knows ASCII), so the tokenizer is loaded only for them."""
    prompts = [(flag, p) for flag, p in prompts if p.strip() and not p.isascii()]
    if not prompts:
        return
    from transformers import AutoTokenizer
    with quiet_loading():
        try:
            tokenizer = AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer"), local_files_only=True)
        except Exception:  # said when the pipeline loads
            return
    unknown = tokenizer.unk_token_id
    for flag, p in prompts:
        ids = tokenizer(p, add_special_tokens=False).input_ids
        lost = sum(i == unknown for i in ids) if unknown is not None else 0
        if not ids or lost == len(ids):
            raise UsageError(f"{flag} {p!r}: the model's tokenizer has a token for none of its characters, so it "
                             f"would be sampled as the empty prompt")
        if lost:
            note(f"{flag} {p[:40]!r}: {lost} of its {len(ids)} tokens are unknown to the model's tokenizer "
                 f"(characters it has no token for), read as its unknown token")


def check_timesteps(T, eta, path, size):
    """--timesteps against the folder's scheduler before anything is loaded: a DDIM one's training steps, and its
    spacing, which with steps_offset can give a model timestep past them (T = 1000 with SD v1.5's "leading"); a
    flow's levels as the loaded pipeline will build them for an image of `size` (height, width; Flux's depend on it):
    T against its training steps, and finite (shift_terminal with T = 1 divides 0 by 0). Checked only after loading,
    these failed in a line calling themselves unexpected, or as NaN states blamed on the model."""
    config = as_loaded(read_json(os.path.join(path, "scheduler", "scheduler_config.json")), family(path))
    try:
        if "FlowMatch" in str(_scheduler_class(path)):
            from diffusers import FlowMatchEulerDiscreteScheduler
            with quiet_loading():  # keys of other diffusers versions: said by from_config, ignored by it
                scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
            if family(path) == flux.FLUX:
                flux.flux_schedule(scheduler, T, eta, *size, vae_scale_factor(path))
            else:
                flow_schedule(scheduler, T, eta)
        else:
            from_ddim_scheduler(ddim_copy(config), T, eta)
    except ValueError as e:
        if str(e).startswith(("timesteps", "eta")):  # the flag's value
            raise UsageError(f"--{e}") from None
        raise InputFileError(f"--model_path: {os.path.join(path, 'scheduler', 'scheduler_config.json')}: {e}") \
            from None
