"""Warm start: solve prompt1, then prompt2 starting from prompt1's trajectory (METHOD.md section 4).

    python parallel_sd_winit.py --prompt1 "a handwritten digit one" --prompt2 "a handwritten digit seven" \\
        --variation_steps 40

prompt2 reuses prompt1's per-step noise and trajectory: its noisiest T - variation_steps states stay frozen at
prompt1's values and only the last variation_steps steps are re-solved, which takes fewer iterations than a
cold start. Output: one run folder with prompt1/ and prompt2/, each in the parallel_dit.py layout.
"""
import argparse
import os

from paratAA.cli import UsageError, add_solver_arguments, create_run_dir, exit_on_error, sample_batches
from parallel_sd import Setup, add_model_arguments, check_model_arguments


def main(args):
    check_model_arguments(args, [("--prompt1", args.prompt1), ("--prompt2", args.prompt2)])
    if not 1 <= args.variation_steps <= args.timesteps:
        raise UsageError(f"--variation_steps must be in 1..{args.timesteps} (--timesteps), got {args.variation_steps}")
    s = Setup(args)
    noise = s.noise(args)
    run_dir = create_run_dir(args.output_path, "SD-winit") if s.is_main else None
    results = {}
    for name, prompt in (("prompt1", args.prompt1), ("prompt2", args.prompt2)):
        prompts = [prompt] * args.num_samples
        folder = None
        if s.is_main:
            folder = os.path.join(run_dir, name)
            os.makedirs(folder)
        writer = s.writer(folder, args, "parallel_sd_winit", prompts)
        init = results["prompt1"]["trajectory"] if name == "prompt2" else None
        results[name] = sample_batches(s.eps_fn, s.schedule, noise, s.conditioning(prompts, args), args,
                                       s.sharding, s.dtype, s.is_main, init=init,
                                       variation_steps=args.variation_steps if init is not None else None,
                                       writer=writer)
        if s.is_main:
            writer.close()
    if s.is_main:
        print(f"wrote {run_dir}: iterations prompt1 {results['prompt1']['iterations']}, "
              f"prompt2 (warm, last {args.variation_steps} steps) {results['prompt2']['iterations']}")
    s.accelerator.wait_for_everyone()
    return run_dir


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_solver_arguments(parser, cfg_scale=5.0)
    parser.add_argument("--prompt1", type=str, default="a handwritten digit one", help="prompt solved from scratch")
    parser.add_argument("--prompt2", type=str, default="a handwritten digit seven",
                        help="prompt solved from prompt1's trajectory")
    parser.add_argument("--variation_steps", type=int, default=40,
                        help="the last steps re-solved for prompt2 (1..T; T re-solves every step)")
    add_model_arguments(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_error(main, parse_args())
