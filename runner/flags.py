"""Command-line flags shared by the scripts: the solver's, generated from paratAA.SolverConfig, and the run's.

Every flag is checked before anything is loaded; a bad value is a UsageError naming the flag (exit 2).
"""
import argparse
import contextlib
import math
import os
import sys
from dataclasses import fields

from tqdm.auto import tqdm

from paratAA import SolverConfig
from paratAA.schedule import check_eta, check_num_steps

from .errors import UsageError, rank
from .rundir import check_output_path

def _window(text):
    """A window size on the command line: a number, or auto."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid window (an integer or auto): {text!r}") from None


_TYPES = {"int": int, "count": int, "window": _window, "float": float, "choice": str}


SEED_MAX = 2 ** 64 - 1          # torch generators take seeds up to this
DIST_TIMEOUT_MAX = 7 * 24 * 3600  # a week: longer waits overflow the process group's timer


class FlagParser(argparse.ArgumentParser):
    """argparse with the scripts' conventions: a bad flag is one line on stderr and exit 2 (no usage block), and
    no abbreviations (--timestep is not --timesteps)."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def path_value(text):
    """argparse type of a file or folder flag: a blank value (e.g. an unset shell variable, --model_path "$MODEL") is
    refused rather than read as the flag left out, which would quietly use the default."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty (leave the flag out for its default)")
    return home_path(text)


def home_path(text):
    """argparse type of a file or folder flag whose blank value its own check names (a report, a run folder): a ~
    is the home folder. The shell leaves a ~ after "=" as it is (--out=~/x.json), and the benchmarks wrote their
    reports into a folder named "~"."""
    return os.path.expanduser(text)


def make_parser(description):
    return FlagParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


_held = None  # the notes said inside held_notes, not printed yet


def note(message):
    """A line on stderr from the first process only (every process checks the flags)."""
    if rank() == 0:  # as errors are said: RANK set but empty (a launcher's template) silenced every note
        _say(f"{os.path.basename(sys.argv[0])}: note: {message}")


def _say(line):
    """A note's line: kept while held_notes holds them, else printed."""
    if _held is not None:
        _held.append(line)
    else:  # above a progress bar, if one is drawn (a note while sampling shared the bar's line)
        tqdm.write(line, file=sys.stderr)


@contextlib.contextmanager
def held_notes():
    """The notes said inside are printed when it ends, and dropped if it ends in an error: a run refused by a
    later check (a flag against another, a file that will not load) says only why (before: "note: --cfg_scale 0.5
    is below 1 ...", then the error)."""
    global _held
    outer, _held = _held, []
    try:
        yield
    except BaseException:
        _held = outer
        raise
    lines, _held = _held, outer
    for line in lines:  # to an outer hold, if any
        _say(line)


# The one default the scripts take differently from SolverConfig: they run on a known device and process group,
# so they choose the window from the model's measured cost there (paratAA/planner.py); in Python, solve() keeps
# window T unless asked (its iteration counts are the algorithm's, whatever the machine).
SCRIPT_DEFAULTS = {"window_size": "auto"}
# init_states is left unset until the flags are checked, so that a value given on the command line can be told from
# the default: --reference_quirks starts new states as the reference does, and an explicit ddim beside it would be
# ignored without a word (check_common_flags).
UNSET_UNTIL_CHECKED = {"init_states": "ddim; copy with --reference_quirks, which replaces it"}


def add_solver_flags(parser):
    """One flag per SolverConfig field, with its default (SCRIPT_DEFAULTS aside) and help text."""
    g = parser.add_argument_group("ParaTAA solver (paratAA.SolverConfig)")
    for f in fields(SolverConfig):
        default = SCRIPT_DEFAULTS.get(f.name, f.default)
        # argparse formats help with %: a help text's own "18%" must reach it as "18%%"
        text = f.metadata["help"].replace("%", "%%")
        if f.name in UNSET_UNTIL_CHECKED:
            default, text = None, f"{text} (default: {UNSET_UNTIL_CHECKED[f.name]})"
        if f.metadata["kind"] == "bool":
            g.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            g.add_argument(f"--{f.name}", type=_TYPES[f.metadata["kind"]], default=default,
                           help=text + (f" (scripts' default: {default})" if f.name in SCRIPT_DEFAULTS else ""))
    return g


CFG_HELP = "classifier-free guidance scale; <= 1: none (the conditional model alone)"


def add_run_flags(parser, cfg_scale, cfg_help=CFG_HELP):
    """cfg_help: what --cfg_scale means for the script's models (the SD scripts add Flux's distilled guidance)."""
    g = parser.add_argument_group("sampling and output")
    g.add_argument("--timesteps", type=int, default=100, help="number of DDIM steps T")
    g.add_argument("--cfg_scale", type=float, default=cfg_scale, help=cfg_help)
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 is the ODE sampler, > 0 the SDE sampler")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the per-step noise (and of the class labels where drawn)")
    g.add_argument("--num_samples", type=int, default=10, help="number of samples to generate")
    g.add_argument("--batch_size", type=int, default=1, help="samples solved together (one model call each iteration)")
    g.add_argument("--compare_sequential", action="store_true",
                   help="also sample sequentially and record the distance to it after every iteration")
    g.add_argument("--output_path", type=home_path, default="output", help="run folders are created under this folder")
    g.add_argument("--fp16", action="store_true", help="run the model in float16")
    g.add_argument("--dist_timeout", type=float, default=300.0,
                   help="seconds a process waits for the others in a collective before giving up")
    return g


def add_common_flags(parser, cfg_scale, cfg_help=CFG_HELP):
    add_run_flags(parser, cfg_scale, cfg_help)
    add_solver_flags(parser)


def _flag_error(e):
    """The algorithm's ValueError ("name must be ...") as the flag's UsageError ("--name must be ...")."""
    return UsageError(f"--{e}")


def at_least_flag(args, name, low):
    """UsageError unless the number args.<name> is at least low (also for the benchmarks' own flags)."""
    v = getattr(args, name)
    if v < low:
        raise UsageError(f"--{name} must be >= {low}, got {v}")


def finite_flag(args, name, low=None, high=None):
    """UsageError unless args.<name> is a finite number in low..high (either bound optional)."""
    v = getattr(args, name)
    if not math.isfinite(v) or (low is not None and v < low) or (high is not None and v > high):
        span = f" in {low:g}..{high:g}" if high is not None else f" >= {low:g}" if low is not None else ""
        raise UsageError(f"--{name} must be a finite number{span}, got {v:g}")


LOOSE_TOL = 0.01  # ten times the paper's per-state tolerance: a note above it


def check_common_flags(args, num_train_timesteps, distilled_guidance=False):
    """Check every flag of add_common_flags before anything is loaded. distilled_guidance: --cfg_scale is an input of
    the network (Flux's guidance embedding), taken as it is, not a classifier-free guidance scale that is off below 1.

    Returns the SolverConfig resolved for --timesteps and writes the values used back into args, so that
    args.json records them (window_size and order default to T and are capped at it)."""
    given_init = args.init_states  # None unless given (or set by a preset: copy)
    if given_init is None:  # recorded as what ran (args.json)
        args.init_states = "copy" if args.reference_quirks else SolverConfig.init_states
    try:
        check_num_steps(args.timesteps, num_train_timesteps)
        check_eta(args.eta)
        config = SolverConfig(**{f.name: getattr(args, f.name) for f in fields(SolverConfig)})
    except ValueError as e:
        raise _flag_error(e) from None
    if config.ignores_init_states(given_init):
        via = f" (on in --preset {args.preset})" if getattr(args, "preset", None) else ""
        raise UsageError(f"--init_states {given_init} has no effect with --reference_quirks{via}, which starts new "
                         f"states as the reference does: "
                         + ("add --no-reference_quirks to use it" if via else "leave out one of the two"))
    if config.order is not None and isinstance(config.window_size, int) and config.order > config.window_size:
        # the solver takes such an order as the window; on the command line it is more likely a typo
        raise UsageError(f"--order must be <= --window_size ({config.window_size}), got {config.order}")
    for name in ("num_samples", "batch_size"):
        at_least_flag(args, name, 1)
    if args.batch_size > args.num_samples:  # recorded as used, so that args.json says what ran
        note(f"--batch_size {args.batch_size} is more than --num_samples {args.num_samples}; using "
             f"{args.num_samples}")
        args.batch_size = args.num_samples
    if not 0 <= args.seed <= SEED_MAX:
        raise UsageError(f"--seed must be in 0..{SEED_MAX}, got {args.seed}")
    finite_flag(args, "cfg_scale")
    # diffusers' pipelines and DiT's sample.py guide only above 1; say so
    if args.cfg_scale < 1 and not distilled_guidance:
        note(f"--cfg_scale {args.cfg_scale:g} is below 1: guidance is off, as at 1 (the conditional model alone, as "
             f"diffusers' pipelines and DiT's sample.py take such a scale)")
    finite_flag(args, "dist_timeout", 1.0, DIST_TIMEOUT_MAX)
    # a state's residual is an RMS over a latent of about unit scale: well below the refused 1, a loose tolerance
    # still passes states far from their solution, and the sample is "converged" (--tol1 --tol2 0.99: the embedded
    # DiT 17-48 gray levels off the sequential image; 0.5: one sample of four 32 off)
    loose = [f"--{name} {getattr(config, name):g}" for name in ("tol1", "tol2") if getattr(config, name) > LOOSE_TOL]
    if loose:
        note(f"{' and '.join(loose)} above {LOOSE_TOL:g}: a state passes with a residual up to that fraction of the "
             f"latent's scale, and a sample may end far from the sequential one yet count as converged (default "
             f"1e-4, the paper's 1e-3; --compare_sequential measures it)")
    check_output_path(args.output_path)
    resolved = config.resolve(args.timesteps)
    # a value the user asked for: not the default, nor a preset's (presets.apply_preset), which is capped silently
    if resolved.memory_size < config.memory_size != SolverConfig().memory_size and \
            "memory_size" not in getattr(args, "_preset_filled", ()):
        note(f"--memory_size {config.memory_size} is more than {args.timesteps} iterations can fill; using "
             f"{resolved.memory_size}")
    args._order_given = config.order  # the planner's note names it, not the cap at T (args.json: what ran)
    args.window_size, args.order, args.memory_size = resolved.window_size, resolved.order, resolved.memory_size
    return resolved
