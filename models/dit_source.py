"""Where a DiT comes from, for parallel_dit.py and the DiT benchmark: its flags, their checks (before anything heavy
is loaded) and the loading, for three sources:

    the embedded DiT-Digits       models/embedded (the default)
    --model NAME --model_path W   .pt (state dict or training checkpoint) or .safetensors weights of a registry DiT,
                                  with --vae_path (DiT-XL/2 256 and 512: the public checkpoints)
    --model_path FOLDER           a diffusers DiTPipeline folder (transformer, VAE, scheduler): its timestep is the
                                  scheduler's (read as DDIM), its null class the pipeline's (num_embeds_ada_norm,
                                  1000 for the public models), guidance on every latent channel as DiTPipeline does
"""
import json
import math
import os

import torch

from runner.errors import InputFileError, UsageError
from runner.flags import path_value

from . import digits
from .checkpoints import (DIT_WEIGHTS_URL, VAE_SOURCE, check_parts_loaded, load_into, load_state_dict, quiet_loading,
                          require_file, weights_variant)
from .dit import DiT_models
from .sd import (DIT_PARTS, DIT_PIPELINE, check_scheduler, config_value, factor_of, note_scheduler, read_json,
                 sample_pixels)

EMBEDDED_DIT = "DiT-Digits"
DIFFUSERS_DIT = "diffusers DiTPipeline"  # --model recorded for a DiTPipeline folder
DIT_CFG_SCALE = 4.0                      # the default guidance of parallel_dit.py (the reference's)
MAX_CLASSES = 10 ** 6    # more class embeddings than any checkpoint has; keeps a typo from allocating gigabytes
MAX_SIDE = 4096          # pixels


def add_dit_flags(parser, labels_help="labels of the samples, repeated cyclically (default: random from the seed)"):
    g = parser.add_argument_group("model")
    g.add_argument("--model", type=str, default=None,
                   help=f"DiT registry name for --model_path weights (default: the embedded {EMBEDDED_DIT})")
    g.add_argument("--model_path", type=path_value, default=None,
                   help="DiT weights: raw state dict .pt, training checkpoint with 'ema'/'model', .safetensors, or a "
                        "diffusers DiTPipeline folder (its own VAE, sizes and classes)")
    g.add_argument("--vae_path", type=path_value, default=None,
                   help="local diffusers AutoencoderKL folder (default for a DiTPipeline folder: its vae/)")
    g.add_argument("--image_size", type=int, default=None,
                   help="image side in pixels of a checkpoint (default 256; the public ones are 256 and 512; the "
                        "embedded model makes 8x8 images)")
    g.add_argument("--num_classes", type=int, default=None,
                   help="classes of a DiT checkpoint (default 1000; the embedded model has 10)")
    # extend: a repeated --class_labels adds its labels (as a repeated --prompt does), so that the count check sees
    # every label the command line gives, not only the last flag's
    g.add_argument("--class_labels", type=int, nargs="+", action="extend", default=None, help=labels_help)


def check_dit_flags(args):
    """The model flags: defaults filled in as used (recorded so in args.json), UsageError naming a bad one."""
    if is_dit_folder(args.model_path):  # a diffusers DiT: sizes and classes come from the folder's configs
        if args.model not in (None, DIFFUSERS_DIT):
            raise UsageError(f"--model names a DiT for .pt/.safetensors weights; {args.model_path} is a diffusers "
                             f"DiTPipeline folder, which needs no --model")
        args.model = DIFFUSERS_DIT
        for flag, used in zip(("image_size", "num_classes"), folder_sizes(args.model_path)):
            if getattr(args, flag) not in (None, used):
                raise UsageError(f"--{flag}: {args.model_path} has {flag} {used}, got {getattr(args, flag)}")
            setattr(args, flag, used)  # recorded as used
        args.vae_path = args.vae_path or os.path.join(args.model_path, "vae")
        note_scheduler(args.model_path)
    elif args.model is None or args.model == EMBEDDED_DIT:
        # its size and classes are fixed: a flag asking for others would be ignored, so it is refused
        args.model = EMBEDDED_DIT
        for flag, used in (("image_size", digits.EMBEDDED_IMAGE_SIZE), ("num_classes", digits.EMBEDDED_CLASSES)):
            if getattr(args, flag) not in (None, used):
                raise UsageError(f"--{flag} applies to DiT checkpoints; the embedded {EMBEDDED_DIT} has {flag} {used}, "
                                 f"got {getattr(args, flag)}")
            setattr(args, flag, used)  # recorded as used
        args.model_path = args.model_path or digits.DIT_WEIGHTS
        args.vae_path = args.vae_path or digits.VAE_DIR
    else:
        if args.model not in DiT_models:
            raise UsageError(f"--model must be one of {', '.join(DiT_models)}, got {args.model!r}")
        if not args.model_path or not args.vae_path:
            raise UsageError(f"--model {args.model} needs --model_path (a DiT checkpoint) and --vae_path ({VAE_SOURCE})")
        args.image_size = 256 if args.image_size is None else args.image_size
        args.num_classes = 1000 if args.num_classes is None else args.num_classes
        factor = latent_factor(args)
        if args.image_size % factor or not factor <= args.image_size <= MAX_SIDE:  # the weights' shapes
            raise UsageError(f"--image_size must be a multiple of {factor} (the factor of --vae_path's VAE) in "
                             f"{factor}..{MAX_SIDE} (the public DiT-XL/2 checkpoints: 256 or 512), got "
                             f"{args.image_size}")
        patch = int(args.model.rsplit("/", 1)[1]) if "/" in args.model else 1  # DiT-XL/2: patch size 2
        side = args.image_size // factor
        if side % patch:  # a latent side the patches do not tile would lose its last row
            raise UsageError(f"--image_size {args.image_size} gives a {side}x{side} latent, which {args.model}'s "
                             f"{patch}x{patch} patches do not tile: use a multiple of {factor * patch}")
        if not 1 <= args.num_classes <= MAX_CLASSES:
            raise UsageError(f"--num_classes must be in 1..{MAX_CLASSES}, got {args.num_classes}")
    if args.model in (EMBEDDED_DIT, DIFFUSERS_DIT):  # its latent side is fixed: another VAE factor, another size
        own = digits.VAE_DIR if args.model == EMBEDDED_DIT else os.path.join(args.model_path, "vae")
        given, needed = vae_factor(args.vae_path), vae_factor(own)
        if None not in (given, needed) and given != needed:
            side = args.image_size // needed
            # the reference's command (--model_path a DiT-XL/2 checkpoint, --vae_path SD's VAE) has no --model: it
            # always builds DiT-XL/2, where the default here is the embedded model
            other = args.model == EMBEDDED_DIT and os.path.abspath(args.model_path) != os.path.abspath(
                digits.DIT_WEIGHTS) and not is_dit_folder(args.model_path)
            hint = (f"; --model is {EMBEDDED_DIT} by default: for a DiT-XL/2 checkpoint, as the reference's command "
                    f"loads, add --model DiT-XL/2 --image_size 256" if other else "")
            raise UsageError(f"--vae_path: {args.vae_path} decodes {given}x{given} pixels per latent cell; "
                             f"{args.model}'s {side}x{side} latents need a VAE of factor {needed} (its "
                             f"{args.image_size}x{args.image_size} images){hint}")
    for c in args.class_labels or []:
        if not 0 <= c < args.num_classes:
            raise UsageError(f"--class_labels must be in 0..{args.num_classes - 1}, got {c}")


def vae_factor(vae_path):
    """Pixels per latent cell of an AutoencoderKL folder (sd.factor_of its block_out_channels; SD's VAE, which DiT
    uses: 8); None where its config.json cannot be read as one (load_vae says what is wrong with the folder)."""
    if not vae_path:
        return None
    try:
        blocks = read_json(os.path.join(vae_path, "config.json"), "--vae_path").get("block_out_channels")
    except InputFileError:
        return None
    return factor_of(blocks) if isinstance(blocks, list) and blocks else None


def latent_factor(args):
    """What a registry DiT's --image_size is divided by for its latent side: --vae_path's factor. A VAE of another
    factor than SD's 8 was read as 8, and its images came out at another size than --image_size said, with exit 0."""
    return vae_factor(args.vae_path) or 8


def load_dit(args, device, dtype):
    """The registry DiT named by --model with --model_path's weights (checked flags), in eval mode."""
    if args.model == EMBEDDED_DIT:
        kwargs = {k: v for k, v in digits.load_embedded_config().items() if k not in ("model", "training")}
        hint = ("the embedded weights ship with the repository in models/embedded"
                if os.path.abspath(args.model_path) == os.path.abspath(digits.DIT_WEIGHTS) else "")
    else:
        kwargs = dict(input_size=args.image_size // latent_factor(args), num_classes=args.num_classes)
        hint = "public DiT-XL/2 weights: " + DIT_WEIGHTS_URL.format(
            name=f"DiT-XL-2-{args.image_size}x{args.image_size}.pt")
    if os.path.isdir(args.model_path):  # a folder, but not a DiTPipeline one (is_dit_folder): say what it is
        index = os.path.join(args.model_path, "model_index.json")
        try:
            kind = str(read_json(index).get("_class_name")) if os.path.isfile(index) else None
        except (InputFileError, AttributeError):  # unreadable, or not an object: the line below says enough
            kind = None
        names = ""
        if kind:
            names = f" (its model_index.json names {kind}" + ("; parallel_sd.py samples it)" if "Diffusion" in kind
                                                               else ")")
        raise InputFileError(f"--model_path: {args.model_path} is a folder but not a diffusers DiTPipeline folder"
                             f"{names}; give DiT weights (.pt, .safetensors) or a DiTPipeline folder")
    require_file(args.model_path, "--model_path", hint)
    model = DiT_models[args.model](**kwargs)
    state = load_state_dict(args.model_path)
    try:
        load_into(model, state, args.model_path)
    except InputFileError as e:
        if args.model == EMBEDDED_DIT and not hint:  # the reference's script has no --model: it is always DiT-XL/2
            raise InputFileError(f"{e}; --model names the architecture, the embedded {EMBEDDED_DIT} by default "
                                 f"(the public checkpoints: --model DiT-XL/2)") from None
        implied = implied_flags(state, model, args)
        if implied:
            raise InputFileError(f"{e}; the checkpoint's shapes say {implied}") from None
        raise
    return model.to(device=device, dtype=dtype).eval()


def implied_flags(state, model, args):
    """The --image_size / --num_classes a DiT state dict was trained with, where they differ from the flags (its
    position embedding has one row per patch, its class table one per class and the null class)."""
    said = []
    pos = state.get("pos_embed")
    patch = model.patch_size
    if pos is not None and pos.dim() == 3 and math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:
        size = math.isqrt(pos.shape[1]) * patch * latent_factor(args)  # patches per side x patch x the VAE's
        if size != args.image_size:
            said.append(f"--image_size {size}")
    table = state.get("y_embedder.embedding_table.weight")
    if table is not None and table.dim() == 2 and table.shape[0] - 1 != args.num_classes:
        said.append(f"--num_classes {table.shape[0] - 1}")
    final = state.get("final_layer.linear.weight")
    if final is not None and final.dim() == 2 and final.shape[0] == patch * patch * model.in_channels:
        said.append("no learned variance (learn_sigma=False), which the registry models, DiT's, do not take")
    return " ".join(said)


def is_dit_folder(path):
    """A folder whose model_index.json names DiTPipeline."""
    index = os.path.join(path or "", "model_index.json")
    return bool(path) and os.path.isdir(path) and os.path.isfile(index) and \
        read_json(index).get("_class_name") == DIT_PIPELINE


def folder_sizes(path, flag="--model_path"):
    """(image size in pixels, classes) of the folder's DiT, from its configs; checks the folder on the way."""
    for part in DIT_PARTS:
        if not os.path.isdir(os.path.join(path, part)):
            raise InputFileError(f"{flag}: {path} has no {part}/ folder (a DiTPipeline folder has "
                                 f"{', '.join(DIT_PARTS)})")
    check_scheduler(path, flag)
    net_path, vae_path = os.path.join(path, "transformer", "config.json"), os.path.join(path, "vae", "config.json")
    net, vae = read_json(net_path, flag), read_json(vae_path, flag)
    factor = factor_of(config_value(vae, "block_out_channels", vae_path, flag, "list"))
    if config_value(net, "in_channels", net_path, flag, "count") != \
            config_value(vae, "latent_channels", vae_path, flag, "count"):
        raise InputFileError(f"{flag}: {path}: the transformer takes {net['in_channels']} channels but the VAE makes "
                             f"{vae['latent_channels']}-channel latents")
    cells = config_value(net, "sample_size", net_path, flag, "count")
    height, width = sample_pixels(cells, factor)
    if height != width:  # DiTPipeline draws square latents of sample_size cells
        raise InputFileError(f"{flag}: {net_path} has sample_size {cells}; DiTPipeline samples square latents")
    if net.get("patch_size") is not None:  # a side the patches do not tile came back smaller from the transformer
        patch = config_value(net, "patch_size", net_path, flag, "count")
        if height // factor % patch:
            raise InputFileError(f"{flag}: {net_path} has sample_size {cells} and patch_size {patch}: the latent "
                                 f"side must be a multiple of the patch size")
    classes = config_value(net, "num_embeds_ada_norm", net_path, flag, "count")
    # DiTPipeline reads id2label {"<class id>": "name, other name"} when it is built: anything else failed there,
    # in a line naming the folder but not the key
    index_path = os.path.join(path, "model_index.json")
    labels = read_json(index_path, flag).get("id2label")
    if labels is not None and not (isinstance(labels, dict) and all(
            isinstance(k, str) and k.strip().isdigit() and int(k) < classes and isinstance(v, str)
            for k, v in labels.items())):
        shown = json.dumps(labels)
        raise InputFileError(f"{flag}: {index_path} has \"id2label\": {shown[:80] + ('...' if len(shown) > 80 else '')}"
                             f"; class ids 0..{classes - 1} (as text) naming their labels (text) are needed")
    return height, classes


def load_dit_pipeline(path, device, dtype, flag="--model_path"):
    from diffusers import DiTPipeline
    with quiet_loading():
        try:
            pipe = DiTPipeline.from_pretrained(path, dtype=dtype, local_files_only=True,
                                               variant=weights_variant(path, ("transformer", "vae")))
        except Exception as e:  # whatever diffusers or safetensors make of a bad part: said in one line
            raise InputFileError(f"{flag}: cannot load {path} as a DiTPipeline "
                                 f"({type(e).__name__}: {(str(e).splitlines() or [''])[0]})") from None
    check_parts_loaded(pipe, path, flag)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, silence_dtype_warnings=True)  # float16 on a CPU is slow but works (as for SD)


def pipeline_denoiser(pipe, cfg_scale):
    """A DiTPipeline's transformer as the solver's f: its output read as the scheduler's prediction_type says, as
    DiTPipeline's loop hands it to scheduler.step (v- and sample-predicting models turned into noise predictions)."""
    from .adapters import DiffusersDiTDenoiser
    return DiffusersDiTDenoiser(pipe.transformer, cfg_scale, pipe.scheduler.config.get("prediction_type", "epsilon"),
                                pipe.scheduler.alphas_cumprod)


class LoadedDiT:
    """A DiT from any of the three sources, as the solver and the decoder need it.

    eps_fn(x, timesteps, labels); schedule(T, eta) -> paratAA.Schedule; latent: (C, h, w); vae: the AutoencoderKL;
    family: the pipeline whose __call__ its latents are decoded as (VAEDecoder; None: the DiT checkpoints');
    scheduler: what metrics.json records about the noise levels."""

    def __init__(self, args, device, dtype):
        from paratAA import dit_schedule, pipeline_schedule
        from .adapters import DiTDenoiser
        from .checkpoints import load_vae
        self.family = DIT_PIPELINE if args.model == DIFFUSERS_DIT else None
        if args.model == DIFFUSERS_DIT:
            pipe = load_dit_pipeline(args.model_path, device, dtype)
            net = pipe.transformer
            self.eps_fn = pipeline_denoiser(pipe, args.cfg_scale)
            self.schedule = lambda T, eta=0.0: pipeline_schedule(pipe, T, eta)
            cells, _ = sample_pixels(net.config.sample_size, 1)  # checked square by folder_sizes
            self.latent = (net.config.in_channels, cells, cells)
            self.scheduler = {"class": type(pipe.scheduler).__name__, "config": dict(pipe.scheduler.config),
                              "read_as": "DDIMScheduler (paratAA.from_ddim_scheduler)"}
        else:
            model = load_dit(args, device, dtype)
            self.eps_fn, self.schedule = DiTDenoiser(model, args.cfg_scale), dit_schedule
            self.latent = (model.in_channels, model.x_embedder.img_size[0], model.x_embedder.img_size[1])
            self.scheduler = {"class": "DiT's respaced GaussianDiffusion (paratAA.dit_schedule)",
                              "config": {"betas": "linear 1e-4 .. 0.02, float64", "num_train_timesteps": 1000}}
        self.vae = load_vae(args.vae_path, device, torch.float32)
        if self.vae.config.latent_channels != self.latent[0]:
            raise InputFileError(f"--vae_path: {args.vae_path} makes {self.vae.config.latent_channels}-channel "
                                 f"latents, the DiT takes {self.latent[0]}")
