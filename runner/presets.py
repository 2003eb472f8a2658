"""--preset paper: every solver setting of a script set to the public reference script's defaults.

The reference's three scripts parse these defaults (their argument parsers). Explicit
flags still win: `--preset paper --memory_size 3` keeps memory size 3. The stop is the reference's per-state
rule (stop_tol 0), new states start as copies, no TAA guard, and the equations are its DDIM form
(paratAA.config.PAPER). args.json records the preset and the values used.
"""
import sys

from paratAA.config import PAPER

from .errors import UsageError

_REFERENCE = dict(PAPER, cfg_scale=4.0, eta=0.0, max_steps=None, window_size=100)
PRESETS = {
    "paper": {
        "parallel_dit": {**_REFERENCE, "timesteps": 100, "order": 100},
        "parallel_sd": {**_REFERENCE, "timesteps": 50, "order": 20},
        # the reference's parallel_sd_winit.py has no --num_samples: it solves one sample per prompt
        "parallel_sd_winit": {**_REFERENCE, "timesteps": 50, "order": 20, "variation_steps": 10, "num_samples": 1},
    },
}


def add_preset_flag(parser):
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="paper: the reference implementation's defaults for every solver setting of this script "
                             "(T, cfg, eta, window, order, memory size, tolerances, max_steps, DDIM equations, "
                             "per-state stop, copies for new states, no guard, no block test or settling, "
                             "reference_quirks; the warm start: one sample per prompt); flags given explicitly still "
                             "win")


def parse_with_preset(parser, argv, script):
    """The script's flags with --preset added, parsed (argv None: the command line's), the preset's values filled in
    for the flags argv does not give."""
    add_preset_flag(parser)
    args = parser.parse_args(argv)
    apply_preset(args, sys.argv[1:] if argv is None else argv, script)
    return args


def given_flags(argv):
    """The names of the flags argv gives, in every form the scripts' parser takes: --flag, --flag=value and
    --no-flag (a BooleanOptionalAction's negative form, e.g. --no-reference_quirks). FlagParser takes no
    abbreviations, so there are no other forms; and a value that starts with "--" is one only in the --flag=value
    form, since argparse reads a separate "--..." token as a flag."""
    names = set()
    for token in argv:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0]
            names.add(name[3:] if name.startswith("no-") else name)
    return names


def apply_preset(args, argv, script):
    """Fill the preset's values into args for every flag not given explicitly in argv."""
    if args.preset is None:
        return
    given = given_flags(argv)
    values = PRESETS[args.preset].get(script)
    if values is None:
        raise UsageError(f"--preset {args.preset} has no values for {script}")
    filled = [name for name in values if name not in given and hasattr(args, name)]
    for name in filled:
        setattr(args, name, values[name])
    # what the preset set, for the notes that name a flag (not recorded in args.json: rundir.save_args): with
    # --window_size auto its order is bounded by the planner's window at run time, as by an explicit window here,
    # and a note "--order 20 is above the window the planner chose" named a flag that was never given
    args._preset_filled = frozenset(filled)
    # a preset's value that an explicit flag bounds follows that flag, as the reference's would within its own
    # defaults: its order at most the window (--window_size 10), its variation steps at most T (--timesteps 5)
    if "order" not in given and isinstance(args.order, int) and isinstance(args.window_size, int):
        args.order = min(args.order, args.window_size)
    if "variation_steps" not in given and hasattr(args, "variation_steps"):
        args.variation_steps = min(args.variation_steps, args.timesteps)
