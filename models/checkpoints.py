"""Loading weights from local files only; every failure is an InputFileError naming the file and the problem."""
import argparse
import contextlib
import itertools
import json
import math
import os
import pickle
import re
import warnings
import zipfile

import torch

from paratAA.config import is_real
from runner.errors import InputFileError

DIT_WEIGHTS_URL = "https://dl.fbaipublicfiles.com/DiT/models/{name}"  # where the public DiT weights come from
VAE_SOURCE = "a diffusers AutoencoderKL folder, e.g. stabilityai/sd-vae-ft-ema from the Hugging Face hub"


def _broken_link(path, flag):
    if os.path.islink(path) and not os.path.exists(path):
        raise InputFileError(f"{flag}: {path} is a symbolic link to nothing (or a loop of links)")


def require_file(path, flag, hint=""):
    _broken_link(path, flag)
    if not os.path.exists(path):
        raise InputFileError(f"{flag}: file not found: {path}" + (f" ({hint})" if hint else ""))
    if os.path.isdir(path):
        raise InputFileError(f"{flag}: expected a file but found a folder: {path}")
    if not os.path.isfile(path):  # a FIFO or a device: reading it could wait forever
        raise InputFileError(f"{flag}: {path} is not a regular file")


def require_folder(path, flag, marker, hint=""):
    _broken_link(path, flag)
    if not os.path.exists(path):
        raise InputFileError(f"{flag}: folder not found: {path}" + (f" ({hint})" if hint else ""))
    if not os.path.isdir(path):
        raise InputFileError(f"{flag}: expected a folder but found a file: {path}")
    if not os.path.isfile(os.path.join(path, marker)):
        raise InputFileError(f"{flag}: {path} is not a diffusers folder (no {marker})" + (f"; {hint}" if hint else ""))


def load_state_dict(path, flag="--model_path"):
    """A state dict from a raw .pt state dict, a training checkpoint holding "ema" (or "model"), or .safetensors.

    A .pt file is read with torch.load(weights_only=True) and nothing else: unpickling arbitrary objects can run
    code. The only class allowed besides tensors and containers is argparse.Namespace, which DiT's training
    checkpoints store under "args" (it holds plain values and runs nothing)."""
    require_file(path, flag)
    try:
        if is_safetensors(path):  # by its header, not its name (a .pt that is safetensors, a hub cache blob)
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            check_zip_crc(path)
            with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
                # torch's advice on a pickle protocol it may not read: the failure, if any, is said below
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                # torch's note that it checks a sparse tensor's invariants: load_into refuses such a tensor
                warnings.filterwarnings("ignore", message="Validating sparse tensor invariants")
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any reader failure (torch, zip, safetensors) is a bad file, said in one line
        msg = str(e)
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", msg)
        if isinstance(e, pickle.UnpicklingError) and found:  # weights_only refused an object: never retried
            raise InputFileError(f"{flag}: {path} is not a plain checkpoint: it pickles {found.group(1)}, which is "
                                 f"never loaded because unpickling can run code; save only its state dict "
                                 f"(torch.save(model.state_dict(), path)) or convert it to .safetensors") from None
        detail = [line for line in msg.splitlines() if line.strip() and "Weights only" not in line
                  and "WeightsUnpickler" not in line and "issue" not in line]
        raise InputFileError(f"{flag}: cannot read {path} as a checkpoint ({type(e).__name__}: "
                             f"{detail[0].strip() if detail else 'truncated or corrupt'})") from None
    if isinstance(state, dict):
        for key in ("ema", "model", "state_dict"):
            if key in state and isinstance(state[key], dict) and state[key]:  # an empty "ema" hid "model"'s weights
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise InputFileError(f"{flag}: {path} holds no state dict of named tensors")
    return strip_wrappers(state)


def check_zip_crc(path):
    """A .pt in torch's zip format stores a CRC-32 of every record, which torch.load does not check: bytes changed in
    a copy or download (not only a truncated file, which torch does notice) loaded as other weights and sampled
    other images without a word. zipfile checks each CRC as it reads a record to its end (BadZipFile, said by
    load_state_dict); a record saved without one (torch.serialization.set_crc32_options(False)) stores 0 and is not
    checked. A file that is not a zip (torch's legacy format) has no CRC to check."""
    if not zipfile.is_zipfile(path):
        return
    with zipfile.ZipFile(path) as archive:
        for record in archive.infolist():
            if record.CRC:
                with archive.open(record) as f:
                    while f.read(1 << 24):
                        pass


def is_safetensors(path):
    """A safetensors file starts with the 8-byte length of its JSON header, and the header with "{"."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= os.path.getsize(path)


WRAPPERS = ("module.", "_orig_mod.")  # DistributedDataParallel / DataParallel, torch.compile


def strip_wrappers(state):
    """A state dict saved from a wrapped model has every name prefixed by the wrapper: the model's own names."""
    changed = True
    while changed and state:
        changed = False
        for prefix in WRAPPERS:
            if all(k.startswith(prefix) for k in state):
                state, changed = {k[len(prefix):]: v for k, v in state.items()}, True
    return state


def load_into(model, state, path, flag="--model_path"):
    """load_state_dict(strict=True), with a mismatch reported as one line. Weights must be floating point where
    the model's are: an integer tensor would be cast silently into a different model."""
    ours = model.state_dict()
    for k, v in state.items():
        if k in ours and ours[k].is_floating_point() and not v.is_floating_point():
            raise InputFileError(f"{flag}: {path} holds {k} as {str(v.dtype).replace('torch.', '')}, not floating "
                                 f"point: not the weights of this model")
        if k in ours and v.layout != torch.strided:  # load_state_dict's own error names neither key nor layout
            raise InputFileError(f"{flag}: {path} holds {k} as a {str(v.layout).replace('torch.', '')} tensor; the "
                                 f"model's weights are dense (save them with .to_dense())")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        ours = model.state_dict()
        missing = [k for k in ours if k not in state]
        extra = [k for k in state if k not in ours]
        shapes = [k for k in ours if k in state and tuple(ours[k].shape) != tuple(state[k].shape)]
        what = (f"shape of {shapes[0]} is {tuple(state[shapes[0]].shape)}, the model needs "
                f"{tuple(ours[shapes[0]].shape)}" if shapes else
                f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra else str(e).splitlines()[0])
        raise InputFileError(f"{flag}: {path} does not fit the chosen model ({what}; "
                             f"{len(shapes)} shape mismatches, {len(missing)} missing, {len(extra)} unexpected keys)")
    return model


def load_vae(path, device, dtype, flag="--vae_path"):
    from diffusers import AutoencoderKL
    require_folder(path, flag, "config.json", VAE_SOURCE)
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise InputFileError(f"{flag}: cannot read {os.path.join(path, 'config.json')} as JSON "
                             f"({type(e).__name__})") from None
    if not isinstance(config, dict):
        raise InputFileError(f"{flag}: {os.path.join(path, 'config.json')} holds a JSON {type(config).__name__}, "
                             f"not an object (a model's settings by name)")
    kind = config.get("_class_name", "AutoencoderKL")
    if kind != "AutoencoderKL":  # loading another model's config into a VAE would give random weights
        raise InputFileError(f"{flag}: {path} holds a {kind}, not an AutoencoderKL ({VAE_SOURCE})")
    with quiet_loading():  # diffusers lists every weight it did not find over many lines: said below in one
        try:
            vae = AutoencoderKL.from_pretrained(path, dtype=dtype,  # a .to(dtype) afterwards would warn each run
                                                variant=weights_variant(path, [""]))
        except Exception as e:  # whatever diffusers or safetensors make of a bad folder: said in one line
            raise InputFileError(f"{flag}: {path} is not a usable AutoencoderKL folder ({type(e).__name__}: "
                                 f"{(str(e).splitlines() or [''])[0]})") from None
    check_weights_loaded(vae, path, flag)
    problem = vae_problem(vae.config)
    if problem:
        raise InputFileError(f"{flag}: {os.path.join(path, 'config.json')} {problem}")
    return vae.to(device).eval()


def weights_variant(path, parts):
    """The variant ("fp16") to load when a part of the folder holds its weights only as variant files
    (unet/diffusion_pytorch_model.fp16.safetensors, as the hub's fp16 downloads), else None: diffusers looks for
    the plain names unless told, and a folder holding both loads the plain ones, as diffusers does by default."""
    found = set()
    for part in parts:
        sub = os.path.join(path, part)
        names = os.listdir(sub) if os.path.isdir(sub) else []
        # model[.variant][-00001-of-00002].safetensors, or the shard before the variant
        weights = [re.fullmatch(r"(?:diffusion_pytorch_model|model)(?:-\d+-of-\d+)?(?:\.(\w+))?(?:-\d+-of-\d+)?"
                                r"\.(?:safetensors|bin)", n) for n in names]
        weights = [w for w in weights if w]
        if weights and all(w.group(1) for w in weights):  # only variant files
            found |= {w.group(1) for w in weights}
    return found.pop() if len(found) == 1 else None


@contextlib.contextmanager
def quiet_loading():
    """diffusers' and transformers' loading bars, advice and deprecation warnings off while a pipeline loads: a run
    prints its own. Their errors too: a part that cannot be loaded raises, and the run says so in one line."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    bars = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    transformers_logging.set_verbosity(transformers_logging.CRITICAL)
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():  # deprecation notes to the pipeline's authors (e.g. a steps_offset
            warnings.simplefilter("ignore", FutureWarning)  # other than 1, which diffusers then sets to 1 itself)
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # a .bin part: failure said below
            yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])
        if bars[0]:
            diffusers_logging.enable_progress_bar()
        if bars[1]:
            transformers_logging.enable_progress_bar()


def safetensors_headers(folder):
    """(file, tensor name, its header: get_shape(), get_dtype()) for every tensor of the folder's safetensors files,
    in file order. Only the headers are read, not the data."""
    from safetensors import safe_open
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".safetensors"):
            file = os.path.join(folder, name)
            with safe_open(file, "pt") as f:
                for k in f.keys():
                    yield file, k, f.get_slice(k)


def check_weights_loaded(module, path, flag):
    """diffusers leaves a weight its files do not hold (other tensor names than the config's model has) on the meta
    device, without data, and only a later .to(device) fails, naming no file: said here, naming the folder. A weight
    its safetensors files hold as integers where the module's is floating point, diffusers and transformers cast into
    the module without a word, which then samples other images (a DiT checkpoint's are refused by load_into): said
    too, read from the files' headers."""
    for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
        if tensor.is_meta:
            raise InputFileError(f"{flag}: {path}: its weight files do not hold the tensors its config.json asks for "
                                 f"(e.g. {name})")
    # transformers (the text encoders) fills such a weight at random instead, and marks every parameter it did load
    # (_is_hf_initialized): a text encoder without its position embeddings sampled other images, exit 0. Read only
    # where the marks are there at all (a model transformers did not load has none)
    params = list(module.named_parameters())
    if any(getattr(p, "_is_hf_initialized", False) for _, p in params):
        unloaded = [name for name, p in params if not getattr(p, "_is_hf_initialized", False)]
        if unloaded:
            raise InputFileError(f"{flag}: {path}: its weight files do not hold the tensors its config.json asks for "
                                 f"(e.g. {unloaded[0]}; {len(unloaded)} missing, which would be filled at random)")
    ours = module.state_dict()
    floating = {k for k, v in ours.items() if v.is_floating_point()}
    held = set()  # every tensor name the folder's safetensors files hold
    for file, k, header in safetensors_headers(path):
        dtype = header.get_dtype()  # "F32", "BF16", "F8_E4M3"; "I64", "BOOL", "C64"
        if k in floating and not dtype.startswith(("F", "BF")):
            raise InputFileError(f"{flag}: {file} holds {k} as {dtype}, not floating point: not the weights of this "
                                 f"model")
        held.add(k)
    # A config asking for fewer blocks than the files hold (a VAE's layers_per_block 1 of a VAE trained with 2): the
    # libraries drop the extra tensors without a word, and the run sampled other images, exit 0. Compared as
    # numbered names (decoder.up_blocks.0.resnets.2.) only where the module has that numbered name at all, since the
    # libraries rename some keys of older checkpoints on loading. A text encoder's config asking for fewer layers
    # is how "clip skip" is set (SD 2.x's and some SD 1.x folders use the penultimate layer on purpose): said, not
    # refused.
    for part, switch in SWITCHED_PARTS.items():  # a part the config switches off, whose weights the files hold
        if any(f".{part}." in k for k in held) and not any(f".{part}." in k for k in ours):
            raise InputFileError(f"{flag}: {path}: its weight files hold {part} tensors that its config.json leaves "
                                 f"out ({switch}): the config is not the one these weights were saved with")
    theirs, mine = _block_counts(held), _block_counts(ours)
    for prefix in sorted(set(theirs) & set(mine)):
        if theirs[prefix] > mine[prefix]:
            said = (f"{path}: its weight files hold {theirs[prefix]} blocks {prefix}.N but its config.json makes "
                    f"{mine[prefix]}")
            if type(module).__module__.startswith("transformers."):
                from runner.flags import note
                note(f"{said}: the last {theirs[prefix] - mine[prefix]} are not used (as a \"clip skip\" setting "
                     f"does)")
                return
            raise InputFileError(f"{flag}: {said}: the config is not the one these weights were saved with")


# parts of a network that a config switch leaves out, which the libraries then drop from the files without a word:
# FLUX.1-dev's weights with "guidance_embeds": false sampled ignoring --cfg_scale, exit 0
SWITCHED_PARTS = {"guidance_embedder": "Flux's guidance_embeds",
                  "resolution_embedder": "PixArt's use_additional_conditions"}


def _block_counts(names):
    """{"encoder.layers": 12, "encoder.layers.0.mlp.fc": ...}: for each numbered part of the tensor names, how many
    there are (the highest number + 1)."""
    counts = {}
    for name in names:
        for m in re.finditer(r"\.(\d+)(?=\.)", name):
            prefix = name[:m.start()]
            counts[prefix] = max(counts.get(prefix, 0), int(m.group(1)) + 1)
    return counts


def check_parts_loaded(pipe, path, flag):
    """check_weights_loaded for every network of a diffusers pipeline loaded from folder path (each in its part's
    subfolder)."""
    for name, part in pipe.components.items():
        if isinstance(part, torch.nn.Module):
            check_weights_loaded(part, os.path.join(path, name), flag)


VAE_SCALE_RANGE = (1e-3, 1e3)  # a trained VAE's latent scaling: SD 0.18215, SDXL 0.13025, Flux 0.3611, SD3 1.5305


def vae_problem(config):
    """What keeps a VAE config from decoding the sampled latents, or None: latents are divided by its
    scaling_factor (and shifted by its shift_factor) before decoding, so 0 makes every image black, 1e308 every image
    the same (a silent result), and a non-number fails after sampling (a TypeError naming no file)."""
    factor = config.get("scaling_factor", 1.0)  # a hand-written config without it: the library's default applies
    lo, hi = VAE_SCALE_RANGE
    if not (is_real(factor) and math.isfinite(factor)) or not lo <= factor <= hi:
        return f"has scaling_factor {factor!r}; a number in {lo:g}..{hi:g} is needed"
    shift = config.get("shift_factor")
    if shift is not None and (not (is_real(shift) and math.isfinite(shift)) or abs(shift) > hi):
        return f"has shift_factor {shift!r}; a number in -{hi:g}..{hi:g} (or none) is needed"
    # SDXL's __call__ unscales the latents per channel with these where the config has both (models.adapters
    # .unscale_latents): a wrong count or a string failed at the decode, after the whole run was sampled
    channels = config.get("latent_channels", 4)
    for key in ("latents_mean", "latents_std"):
        values = config.get(key)
        if values is not None and not (isinstance(values, (list, tuple)) and len(values) == channels and all(
                is_real(v) and math.isfinite(v) and (key == "latents_mean" or v > 0) for v in values)):
            what = "finite numbers" if key == "latents_mean" else "positive finite numbers"
            return f"has {key} {values!r}; {channels} {what} (one per latent channel) or none are needed"
    return None
