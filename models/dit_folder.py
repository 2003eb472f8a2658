"""diffusers-format DiT folders (DiTPipeline: a DiT transformer, a VAE, a scheduler), for parallel_dit.py:
recognised, checked and sized before anything heavy is loaded, then loaded.

The transformer's timestep is the scheduler's (read as DDIM, as for Stable Diffusion), the null class is the
pipeline's (num_embeds_ada_norm, 1000 for the public models) and guidance mixes every latent channel, as DiTPipeline
does (models/adapters.py DiffusersDiTDenoiser).
"""
import os

from runner.errors import InputFileError

from .sd import check_scheduler, config_value, quiet_loading, read_json

PARTS = ("transformer", "vae", "scheduler")


def is_dit_folder(path):
    """A folder whose model_index.json names DiTPipeline."""
    index = os.path.join(path or "", "model_index.json")
    return bool(path) and os.path.isdir(path) and os.path.isfile(index) and \
        read_json(index).get("_class_name") == "DiTPipeline"


def folder_sizes(path, flag="--model_path"):
    """(image size in pixels, classes) of the folder's DiT, from its configs; checks the folder on the way."""
    for part in PARTS:
        if not os.path.isdir(os.path.join(path, part)):
            raise InputFileError(f"{flag}: {path} has no {part}/ folder (a DiTPipeline folder has {', '.join(PARTS)})")
    check_scheduler(path, flag)
    net_path, vae_path = os.path.join(path, "transformer", "config.json"), os.path.join(path, "vae", "config.json")
    net, vae = read_json(net_path, flag), read_json(vae_path, flag)
    factor = 2 ** (len(config_value(vae, "block_out_channels", vae_path, flag)) - 1)
    if config_value(net, "in_channels", net_path, flag) != config_value(vae, "latent_channels", vae_path, flag):
        raise InputFileError(f"{flag}: {path}: the transformer takes {net['in_channels']} channels but the VAE makes "
                             f"{vae['latent_channels']}-channel latents")
    return config_value(net, "sample_size", net_path, flag) * factor, config_value(net, "num_embeds_ada_norm",
                                                                                   net_path, flag)


def load_dit_pipeline(path, device, dtype, flag="--model_path"):
    from diffusers import DiTPipeline
    with quiet_loading():
        try:
            pipe = DiTPipeline.from_pretrained(path, dtype=dtype, local_files_only=True)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError, ImportError) as e:
            raise InputFileError(f"{flag}: cannot load {path} as a DiTPipeline "
                                 f"({type(e).__name__}: {(str(e).splitlines() or [''])[0]})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
