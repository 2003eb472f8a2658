"""Class-conditional DiT sampled in parallel with ParaTAA.

    python parallel_dit.py                                   # the embedded digits model, CPU, no downloads
    accelerate launch --num_processes 8 parallel_dit.py --model DiT-XL/2 --image_size 256 \\
        --model_path DiT-XL-2-256x256.pt --vae_path sd-vae-ft-ema --fp16

Each iteration evaluates the DiT at the window of every sample in one batch, split across the processes.
"""
from runner.errors import UsageError, exit_on_error, exit_quietly_on_signals

if __name__ == "__main__":  # first: Ctrl-C while torch and the models import is one line, not a traceback
    exit_quietly_on_signals()

from models.bundles import dit_bundle  # noqa: E402
from models.dit_source import DIT_CFG_SCALE, add_dit_flags, check_dit_flags  # noqa: E402
from runner.flags import add_common_flags, check_common_flags, held_notes, make_parser  # noqa: E402
from runner.launch import start_session  # noqa: E402
from runner.loop import sample_run  # noqa: E402
from runner.presets import parse_with_preset  # noqa: E402


def check_arguments(args):
    """Every flag before anything is loaded; returns the resolved SolverConfig."""
    check_dit_flags(args)
    config = check_common_flags(args, 1000)
    if args.class_labels and len(args.class_labels) > args.num_samples:
        raise UsageError(f"--class_labels gives {len(args.class_labels)} labels for --num_samples {args.num_samples}: "
                         f"the last {len(args.class_labels) - args.num_samples} would be ignored")
    return config


def main(args):
    with held_notes():  # a refusal is the run's one line: the notes come once the flags pass and the model loads
        config = check_arguments(args)
        session = start_session(args)
        bundle = dit_bundle(args, session)
    return sample_run(args, config, session, bundle, "DiT", "parallel_dit")


def parse_args(argv=None):
    parser = make_parser(__doc__)
    add_common_flags(parser, cfg_scale=DIT_CFG_SCALE)
    add_dit_flags(parser)
    args = parse_with_preset(parser, argv, "parallel_dit")
    return args


if __name__ == "__main__":
    exit_on_error(main, parse_args())
