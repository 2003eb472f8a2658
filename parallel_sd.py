"""A text-to-image model in a local diffusers folder (SD 1.x / 2.x, SDXL, SD3, Flux) sampled in parallel with ParaTAA.

    python parallel_sd.py --prompt "a handwritten digit seven"          # the embedded digits model
    accelerate launch --num_processes 8 parallel_sd.py --model_path stable-diffusion-v1-5 --fp16 \\
        --prompt "a photo of an astronaut riding a horse"

The scheduler is the pipeline's own, read as DDIM (SD v1.5 keeps alphas_cumprod[0] after the last step); SD3's and
Flux's flow-matching schedulers as their Euler steps (Flux's through the levels FluxPipeline sets for the image size).
"""
from runner.errors import UsageError, exit_on_error, exit_quietly_on_signals

if __name__ == "__main__":  # first: Ctrl-C while torch and the models import is one line, not a traceback
    exit_quietly_on_signals()

from models.bundles import sd_bundles  # noqa: E402
from models.sd import SD_CFG_HELP, PromptList, check_sd_flags, parse_sd_args  # noqa: E402
from runner.flags import add_common_flags, held_notes, make_parser  # noqa: E402
from runner.launch import start_session  # noqa: E402
from runner.loop import sample_run  # noqa: E402

DEFAULT_PROMPT = "a handwritten digit seven"


def main(args):
    args.prompt = args.prompt or [DEFAULT_PROMPT]
    with held_notes():  # a refusal is the run's one line: the notes come once the flags pass and the model loads
        config = check_sd_flags(args, [("--prompt", p) for p in args.prompt])  # all flags before any model loads
        if len(args.prompt) > args.num_samples:
            raise UsageError(f"--prompt gives {len(args.prompt)} prompts for --num_samples {args.num_samples}: the "
                             f"last {len(args.prompt) - args.num_samples} would be ignored")
        session = start_session(args)
        (bundle,) = sd_bundles(args, session, [args.prompt])
    return sample_run(args, config, session, bundle, "SD", "parallel_sd")


def parse_args(argv=None):
    parser = make_parser(__doc__)
    add_common_flags(parser, cfg_scale=None, cfg_help=SD_CFG_HELP)  # its default: parse_sd_args
    parser.add_argument("--prompt", type=str, nargs="+", action=PromptList, default=None,
                        help=f"prompt(s), each quoted, or --prompt repeated; cycled over the samples "
                             f"(default: {DEFAULT_PROMPT!r})")
    return parse_sd_args(parser, argv, "parallel_sd")


if __name__ == "__main__":
    exit_on_error(main, parse_args())
