"""Class-conditional DiT sampled in parallel with ParaTAA.

    python parallel_dit.py                                   # the embedded digits model, CPU, no downloads
    accelerate launch --num_processes 8 parallel_dit.py --model DiT-XL/2 --image_size 256 \\
        --model_path DiT-XL-2-256x256.pt --vae_path sd-vae-ft-ema --fp16

Each iteration evaluates the DiT at the window of every sample in one batch, split across the processes.
"""
import os
import sys

from runner.errors import UsageError, exit_on_error, exit_quietly_on_signals

if __name__ == "__main__":  # first: Ctrl-C while torch and the models import is one line, not a traceback
    exit_quietly_on_signals()

from models.bundles import DIFFUSERS_DIT, DIT_CFG_SCALE, EMBEDDED_DIT, dit_bundle  # noqa: E402
from models.checkpoints import VAE_SOURCE  # noqa: E402
from models.dit import DiT_models  # noqa: E402
from models.dit_folder import folder_sizes, is_dit_folder  # noqa: E402
from runner.flags import add_common_flags, check_common_flags, make_parser  # noqa: E402
from runner.launch import start_session  # noqa: E402
from runner.loop import sample_run  # noqa: E402
from runner.presets import add_preset_flag, apply_preset  # noqa: E402

MAX_CLASSES = 10 ** 6  # more class embeddings than any checkpoint has; keeps a typo from allocating gigabytes


def check_arguments(args):
    """Every flag before anything is loaded; returns the resolved SolverConfig."""
    if is_dit_folder(args.model_path):  # a diffusers DiT: sizes and classes come from the folder's configs
        if args.model not in (None, DIFFUSERS_DIT):
            raise UsageError(f"--model names a DiT for .pt/.safetensors weights; {args.model_path} is a diffusers "
                             f"DiTPipeline folder, which needs no --model")
        args.model = DIFFUSERS_DIT
        for flag, used in zip(("image_size", "num_classes"), folder_sizes(args.model_path)):
            if getattr(args, flag) not in (None, used):
                raise UsageError(f"--{flag}: {args.model_path} has {flag} {used}, got {getattr(args, flag)}")
            setattr(args, flag, used)  # recorded as used
    elif args.model is None or args.model not in DiT_models:
        if args.model is not None:
            raise UsageError(f"--model must be one of {', '.join(DiT_models)}, got {args.model!r}")
        args.model = EMBEDDED_DIT
    if args.model == DIFFUSERS_DIT:
        args.vae_path = args.vae_path or os.path.join(args.model_path, "vae")
    elif args.model == EMBEDDED_DIT:
        # its size and classes are fixed: a flag asking for others would be ignored, so it is refused
        from models import digits
        for flag, used in (("image_size", digits.EMBEDDED_IMAGE_SIZE), ("num_classes", digits.EMBEDDED_CLASSES)):
            if getattr(args, flag) not in (None, used):
                raise UsageError(f"--{flag} applies to DiT checkpoints; the embedded {EMBEDDED_DIT} has {flag} {used}, "
                                 f"got {getattr(args, flag)}")
            setattr(args, flag, used)  # recorded as used
        args.model_path = args.model_path or digits.DIT_WEIGHTS
        args.vae_path = args.vae_path or digits.VAE_DIR
    else:
        args.image_size = 256 if args.image_size is None else args.image_size
        args.num_classes = 1000 if args.num_classes is None else args.num_classes
        if args.image_size not in (256, 512):
            raise UsageError(f"--image_size must be 256 or 512 for a DiT checkpoint, got {args.image_size}")
        if not args.model_path or not args.vae_path:
            raise UsageError(f"--model {args.model} needs --model_path (a DiT checkpoint) and --vae_path ({VAE_SOURCE})")
        if not 1 <= args.num_classes <= MAX_CLASSES:
            raise UsageError(f"--num_classes must be in 1..{MAX_CLASSES}, got {args.num_classes}")
    config = check_common_flags(args, 1000)
    for c in args.class_labels or []:
        if not 0 <= c < args.num_classes:
            raise UsageError(f"--class_labels must be in 0..{args.num_classes - 1}, got {c}")
    if args.class_labels and len(args.class_labels) > args.num_samples:
        raise UsageError(f"--class_labels gives {len(args.class_labels)} labels for --num_samples {args.num_samples}: "
                         f"the last {len(args.class_labels) - args.num_samples} would be ignored")
    return config


def main(args):
    config = check_arguments(args)
    session = start_session(args)
    return sample_run(args, config, session, dit_bundle(args, session), "DiT", "parallel_dit")


def parse_args(argv=None):
    parser = make_parser(__doc__)
    add_common_flags(parser, cfg_scale=DIT_CFG_SCALE)
    g = parser.add_argument_group("model")
    g.add_argument("--model", type=str, default=None,
                   help=f"DiT registry name for --model_path weights (default: the embedded {EMBEDDED_DIT})")
    g.add_argument("--model_path", type=str, default=None,
                   help="DiT weights: raw state dict .pt, training checkpoint with 'ema'/'model', .safetensors, or a "
                        "diffusers DiTPipeline folder (its own VAE, sizes and classes)")
    g.add_argument("--vae_path", type=str, default=None,
                   help="local diffusers AutoencoderKL folder (default for a DiTPipeline folder: its vae/)")
    g.add_argument("--image_size", type=int, default=None,
                   help="256 (default) or 512, for DiT checkpoints (the embedded model makes 8x8 images)")
    g.add_argument("--num_classes", type=int, default=None,
                   help="classes of a DiT checkpoint (default 1000; the embedded model has 10)")
    g.add_argument("--class_labels", type=int, nargs="+", default=None,
                   help="labels of the samples, repeated cyclically (default: random from the seed)")
    add_preset_flag(parser)
    args = parser.parse_args(argv)
    apply_preset(args, sys.argv[1:] if argv is None else argv, "parallel_dit")
    return args


if __name__ == "__main__":
    exit_on_error(main, parse_args())
