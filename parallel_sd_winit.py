"""Warm start: solve prompt1, then prompt2 starting from prompt1's trajectory (docs/ALGORITHM.md, section 4).

    python parallel_sd_winit.py --prompt1 "a handwritten digit one" --prompt2 "a handwritten digit seven" \\
        --variation_steps 40

prompt2 reuses prompt1's per-step noise and trajectory: its noisiest T - variation_steps states stay frozen at
prompt1's values and only the last variation_steps steps are re-solved, which takes fewer iterations than a
cold start. Output: one run folder with prompt1/ and prompt2/, each in the parallel_dit.py layout.
"""
from runner.errors import UsageError, add_kept, exit_on_error, exit_quietly_on_signals

if __name__ == "__main__":  # first: Ctrl-C while torch and the models import is one line, not a traceback
    exit_quietly_on_signals()

from models.bundles import sd_bundles  # noqa: E402
from models.sd import SD_CFG_HELP, check_sd_flags, parse_sd_args  # noqa: E402
from paratAA.solver import check_variation_steps  # noqa: E402
from runner.flags import add_common_flags, held_notes, make_parser, note  # noqa: E402
from runner.launch import start_session  # noqa: E402
from runner.loop import check_fits, open_run, sample_into, subfolder  # noqa: E402


def main(args):
    with held_notes():  # a refusal is the run's one line: the notes come once the flags pass and the model loads
        config = check_sd_flags(args, [("--prompt1", args.prompt1), ("--prompt2", args.prompt2)])
        try:
            check_variation_steps(args.variation_steps, args.timesteps)
        except ValueError as e:
            default = args.variation_steps == parse_args([]).variation_steps
            hint = f" (the default; for --timesteps {args.timesteps} give --variation_steps)" if default else ""
            raise UsageError(f"--{e}{hint}") from None
        session = start_session(args)
        first, second = sd_bundles(args, session, [[args.prompt1], [args.prompt2]])
    check_fits(first, args, config, session, keep_trajectories=True)
    with open_run(args, session, "SD-winit") as run_dir:
        prompt1 = subfolder(run_dir, "prompt1")
        r1 = sample_into(prompt1, first, args, config, session, "parallel_sd_winit", keep_trajectories=True,
                         must_finish="prompt2's warm start needs prompt1's finished trajectory")
        check_finished(r1, args, run_dir)
        try:
            r2 = sample_into(subfolder(run_dir, "prompt2"), second, args, config, session, "parallel_sd_winit",
                             init=r1["trajectory"], variation_steps=args.variation_steps)
        except BaseException as e:  # prompt1's run is complete and stays: the one line says so
            if prompt1:
                add_kept(e, prompt1, len(r1["iterations"]))
            raise
    if session.is_main:  # what each pass gained, as the other scripts say it (prompt2's sequential: its last steps)
        print(f"wrote {run_dir}")
        print("\n".join(["prompt1, from scratch:", *("  " + line for line in r1["summary"]),
                         f"prompt2, warm start from prompt1's trajectory (the last {args.variation_steps} of "
                         f"{args.timesteps} steps):", *("  " + line for line in r2["summary"])]), flush=True)
    session.wait()
    return run_dir


def check_finished(r1, args, run_dir):
    """prompt2 freezes prompt1's noisiest states and starts from the rest: a trajectory --max_steps cut short has
    unconverged states there, and states the window never reached hold nothing (zeros), so prompt2 would solve
    from them and call the result converged and equal to sequential sampling (which starts from them too). The
    paper mode goes on from it, said in a note, as the reference's script does (its example run capped prompt1 at
    --max_steps 20): a researcher repeating the reference's command gets its two passes."""
    unfinished = [i for i, done in enumerate(r1["converged"]) if not done]
    if not unfinished:
        return
    which = f"--max_steps {args.max_steps} stopped prompt1 before it converged (sample {', '.join(map(str, unfinished))})"
    if args.reference_quirks:
        note(f"{which}: prompt2 starts from its unfinished trajectory, as the reference's script does, and is "
             f"compared with sequential sampling from that trajectory; leave --max_steps out for a warm start from "
             f"prompt1's sequential trajectory")
        return
    kept = f" (prompt1's samples are kept in {run_dir})" if run_dir else ""
    raise UsageError(f"{which}: prompt2's warm start needs its finished trajectory; raise --max_steps or leave it "
                     f"out{kept}")


def parse_args(argv=None):
    parser = make_parser(__doc__)
    add_common_flags(parser, cfg_scale=None, cfg_help=SD_CFG_HELP)  # its default: parse_sd_args
    parser.add_argument("--prompt1", type=str, default="a handwritten digit one", help="prompt solved from scratch")
    parser.add_argument("--prompt2", type=str, default="a handwritten digit seven",
                        help="prompt solved from prompt1's trajectory")
    parser.add_argument("--variation_steps", type=int, default=40,
                        help="the last steps re-solved for prompt2 (1..T; T re-solves every step)")
    return parse_sd_args(parser, argv, "parallel_sd_winit")


if __name__ == "__main__":
    exit_on_error(main, parse_args())
