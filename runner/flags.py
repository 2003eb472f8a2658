"""Command-line flags shared by the scripts: the solver's, generated from paratAA.SolverConfig, and the run's.

Every flag is checked before anything is loaded; a bad value is a UsageError naming the flag (exit 2).
"""
import argparse
import math
from dataclasses import fields

from paratAA import SolverConfig
from paratAA.schedule import check_eta, check_num_steps

from .errors import UsageError
from .rundir import check_output_path

_TYPES = {"int": int, "count": int, "float": float, "choice": str}


def make_parser(description):
    return argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_solver_flags(parser):
    """One flag per SolverConfig field, with its default and help text."""
    g = parser.add_argument_group("ParaTAA solver (paratAA.SolverConfig)")
    for f in fields(SolverConfig):
        g.add_argument(f"--{f.name}", type=_TYPES[f.metadata["kind"]], default=f.default, help=f.metadata["help"])
    return g


def add_run_flags(parser, cfg_scale):
    g = parser.add_argument_group("sampling and output")
    g.add_argument("--timesteps", type=int, default=100, help="number of DDIM steps T")
    g.add_argument("--cfg_scale", type=float, default=cfg_scale, help="classifier-free guidance scale (1: none)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 is the ODE sampler, > 0 the SDE sampler")
    g.add_argument("--seed", type=int, default=0, help="seed of the labels and the per-step noise")
    g.add_argument("--num_samples", type=int, default=10, help="number of samples to generate")
    g.add_argument("--batch_size", type=int, default=1, help="samples solved together (one model call each iteration)")
    g.add_argument("--compare_sequential", action="store_true",
                   help="also sample sequentially and record the distance to it after every iteration")
    g.add_argument("--output_path", type=str, default="output", help="run folders are created under this folder")
    g.add_argument("--fp16", action="store_true", help="run the model in float16")
    g.add_argument("--dist_timeout", type=float, default=300.0,
                   help="seconds a process waits for the others in a collective before giving up")
    return g


def add_common_flags(parser, cfg_scale):
    add_run_flags(parser, cfg_scale)
    add_solver_flags(parser)


def _flag_error(e):
    """The algorithm's ValueError ("name must be ...") as the flag's UsageError ("--name must be ...")."""
    return UsageError(f"--{e}")


def _at_least(args, name, low):
    v = getattr(args, name)
    if v < low:
        raise UsageError(f"--{name} must be >= {low}, got {v}")


def _finite(args, name, low=None):
    v = getattr(args, name)
    if not math.isfinite(v) or (low is not None and v < low):
        raise UsageError(f"--{name} must be a finite number" + (f" >= {low}" if low is not None else "") + f", got {v}")


def check_common_flags(args, num_train_timesteps):
    """Check every flag of add_common_flags before anything is loaded.

    Returns the SolverConfig resolved for --timesteps and writes the values used back into args, so that
    args.json records them (window_size and order default to T and are capped at it)."""
    try:
        check_num_steps(args.timesteps, num_train_timesteps)
        check_eta(args.eta)
        config = SolverConfig(**{f.name: getattr(args, f.name) for f in fields(SolverConfig)})
    except ValueError as e:
        raise _flag_error(e) from None
    if config.order is not None and config.window_size is not None and config.order > config.window_size:
        # the solver takes such an order as the window; on the command line it is more likely a typo
        raise UsageError(f"--order must be <= --window_size ({config.window_size}), got {config.order}")
    for name in ("num_samples", "batch_size"):
        _at_least(args, name, 1)
    _finite(args, "cfg_scale")
    _finite(args, "dist_timeout", 1.0)
    check_output_path(args.output_path)
    config = config.resolve(args.timesteps)
    args.window_size, args.order = config.window_size, config.order
    return config
