"""The variables a launcher (accelerate launch, torchrun) sets for each process, read in one place: whether they
describe a process group, and which process this one is. Imports nothing heavy: runner.errors asks for the rank
before torch is imported."""
import os
import re

# set by hand, or left from another job, a bad one ended the run in a ValueError from int() or from accelerate
# ("MASTER_ADDR env was not set"), said as unexpected
INTEGER_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT")


def _integer(env, name, default):
    """env[name] as a non-negative integer, default where unset, None where it is not one ("abc", "", "-1")."""
    value = env.get(name)
    if value is None:
        return default
    return int(value) if re.fullmatch(r"\s*[0-9]+\s*", value) else None


def launch_env_problem(env):
    """What is wrong with the process-group variables in env (os.environ), or None."""
    for name in INTEGER_VARIABLES:
        if _integer(env, name, 0) is None:
            return f"the environment's {name}={env[name]!r} is not a non-negative integer"
    world, rank = _integer(env, "WORLD_SIZE", 1), _integer(env, "RANK", 0)
    if world == 0:
        return "the environment's WORLD_SIZE is 0: a run needs at least one process"
    if rank >= world:
        return f"the environment's RANK={rank} is not below its WORLD_SIZE={world}"
    if world > 1 and not env.get("MASTER_ADDR", "").strip():
        return f"the environment's WORLD_SIZE={world} asks for a process group, but MASTER_ADDR is not set"
    return None


def process_rank(env=None):
    """This process's rank in a launch: RANK, or 0 on its own. A RANK that is not one (RANK=abc, RANK set but
    empty, not below WORLD_SIZE) counts as 0, so that the refusal of it (runner.launch.start_session) is said."""
    env = os.environ if env is None else env
    rank, world = _integer(env, "RANK", 0), _integer(env, "WORLD_SIZE", 1)
    return rank if rank is not None and world is not None and rank < world else 0
