"""Class-conditional DiT sampled in parallel with ParaTAA.

    python parallel_dit.py                                   # the embedded digits model, CPU, no downloads
    accelerate launch --num_processes 8 parallel_dit.py --model DiT-XL/2 --image_size 256 \\
        --model_path DiT-XL-2-256x256.pt --vae_path sd-vae-ft-ema --fp16

Each iteration evaluates the DiT at the window of every sample in one batch, split across the processes.
"""
from models.bundles import DIT_CFG_SCALE, EMBEDDED_DIT, dit_bundle
from models.checkpoints import VAE_SOURCE
from models.dit import DiT_models
from runner.errors import UsageError, exit_on_error
from runner.flags import add_common_flags, check_common_flags, make_parser
from runner.launch import start_session
from runner.loop import sample_run


def check_arguments(args):
    """Every flag before anything is loaded; returns the resolved SolverConfig."""
    if args.model not in DiT_models:
        raise UsageError(f"--model must be one of {', '.join(DiT_models)}, got {args.model!r}")
    if args.model == EMBEDDED_DIT:
        from models import digits
        args.model_path = args.model_path or digits.DIT_WEIGHTS
        args.vae_path = args.vae_path or digits.VAE_DIR
        args.num_classes = digits.load_embedded_config()["num_classes"]
    else:
        if args.image_size not in (256, 512):
            raise UsageError(f"--image_size must be 256 or 512 for a DiT checkpoint, got {args.image_size}")
        if not args.model_path or not args.vae_path:
            raise UsageError(f"--model {args.model} needs --model_path (a DiT checkpoint) and --vae_path ({VAE_SOURCE})")
    config = check_common_flags(args, 1000)
    if args.num_classes < 1:
        raise UsageError(f"--num_classes must be >= 1, got {args.num_classes}")
    for c in args.class_labels or []:
        if not 0 <= c < args.num_classes:
            raise UsageError(f"--class_labels must be in 0..{args.num_classes - 1}, got {c}")
    return config


def main(args):
    config = check_arguments(args)
    session = start_session(args)
    return sample_run(args, config, session, dit_bundle(args, session), "DiT", "parallel_dit")


def parse_args(argv=None):
    parser = make_parser(__doc__)
    add_common_flags(parser, cfg_scale=DIT_CFG_SCALE)
    g = parser.add_argument_group("model")
    g.add_argument("--model", type=str, default=EMBEDDED_DIT, help=f"DiT registry name (default: the embedded {EMBEDDED_DIT})")
    g.add_argument("--model_path", type=str, default=None,
                   help="DiT weights: raw state dict .pt, training checkpoint with 'ema'/'model', or .safetensors")
    g.add_argument("--vae_path", type=str, default=None, help="local diffusers AutoencoderKL folder")
    g.add_argument("--image_size", type=int, default=256, help="256 or 512 for the public DiT-XL/2 checkpoints")
    g.add_argument("--num_classes", type=int, default=1000, help="classes of the checkpoint (the embedded model: 10)")
    g.add_argument("--class_labels", type=int, nargs="+", default=None,
                   help="labels of the samples, repeated cyclically (default: random from the seed)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_error(main, parse_args())
