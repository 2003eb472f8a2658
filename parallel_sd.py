"""Stable Diffusion (v1.5 layout, local diffusers folder) sampled in parallel with ParaTAA.

    python parallel_sd.py --prompt "a handwritten digit seven"          # the embedded digits model
    accelerate launch --num_processes 8 parallel_sd.py --model_path stable-diffusion-v1-5 --fp16 \\
        --prompt "a photo of an astronaut riding a horse"

The scheduler is the pipeline's own, read as DDIM (SD v1.5 keeps alphas_cumprod[0] after the last step).
"""
from models.bundles import sd_bundles
from models.sd import SD_CFG_SCALE, add_sd_flags, check_sd_flags
from runner.errors import exit_on_error
from runner.flags import add_common_flags, make_parser
from runner.launch import start_session
from runner.loop import sample_run

DEFAULT_PROMPT = "a handwritten digit seven"


def main(args):
    config = check_sd_flags(args, [("--prompt", p) for p in args.prompt])  # all flags before any model is loaded
    session = start_session(args)
    prompts = [args.prompt[i % len(args.prompt)] for i in range(args.num_samples)]
    (bundle,) = sd_bundles(args, session, [prompts])
    return sample_run(args, config, session, bundle, "SD", "parallel_sd")


def parse_args(argv=None):
    parser = make_parser(__doc__)
    add_common_flags(parser, cfg_scale=SD_CFG_SCALE)
    parser.add_argument("--prompt", type=str, nargs="+", default=[DEFAULT_PROMPT],
                        help="prompt(s), repeated cyclically over the samples")
    add_sd_flags(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_error(main, parse_args())
