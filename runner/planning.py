"""The run's window plan and speed estimate, with the measured cost curves cached between runs.

window_size auto: paratAA.planner measures the model on this device and process group and chooses the window; the
curves are kept in a cache file (PARATAA_CACHE, default ~/.cache/paratAA/cost_curves.json) under a key naming the
model, guidance, device, dtype, thread count, process count, batch, latent and T, so that a second run does not
measure again; a cached curve is reused only by a run of no more steps than it was measured for (a warm start's
curve stops at its variation_steps), is checked against one size timed afresh and measured again when the load it
was measured under has changed (planner.STALE), and otherwise predicts in this run's time (Plan.curve_scale). Every
run needs one number from the model, the seconds of a call of one state per sample, to estimate what sequential
sampling would have cost (unless --compare_sequential measures it): it is always this run's own timing, never the
cache's, which may come from a busier or an idler machine.
"""
import json
import os
import platform
from dataclasses import replace

import torch

from paratAA import solve
from paratAA.planner import measure_call_seconds, plan_window, warm_up

from .flags import note


def cache_path():
    # a ~ expanded as in the path flags (flags.home_path): a shell expands it only unquoted at the start of a word,
    # and PARATAA_CACHE="~/cache" (quoted, or set in a .env file, a container's ENV, a subprocess's env) made a
    # folder named "~" in the working directory
    root = os.path.expanduser(os.environ.get("PARATAA_CACHE") or os.path.join("~", ".cache", "paratAA"))
    return os.path.join(root, "cost_curves.json")


# The longest model call or solver iteration a cache entry may hold. Its times are read back as measurements, so
# one that no run could have measured (a hand edit, a damaged file) must not reach the plan: 1e308 seconds made
# the predicted times inf and metrics.json non-strict JSON ("Infinity").
MAX_SECONDS = 3600.0


def _load():
    """The cache's entries whose times are all measurements; the others are left out, so measured again."""
    if os.path.exists(cache_path()) and not os.path.isfile(cache_path()):  # a FIFO: open() waited for a writer forever
        return {}
    try:
        with open(cache_path()) as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError):  # no cache yet, or unreadable (nested too deep too): measure again
        return {}
    return {key: entry for key, entry in data.items() if _measured(entry)} if isinstance(data, dict) else {}


def _measured(entry):
    """Whether every time of a cache entry is one a measurement gives (see _seconds), a call's above 0 (the solver's
    may be 0). cached_curves checks the rest of the entry's shape."""
    try:
        calls, solver = entry["call_seconds"].values(), entry["solver_seconds"].values()
    except (TypeError, KeyError, AttributeError):
        return False
    return all(_seconds(t) and t > 0 for t in calls) and all(_seconds(t) for t in solver)


def _seconds(value):
    """An int or float (json.load makes only numbers into those: not a string such as "0.1", which float() would
    take, nor a bool) in 0..MAX_SECONDS, so finite (nan fails every comparison)."""
    return type(value) in (int, float) and 0 <= value <= MAX_SECONDS


def _save(key, entry):
    """Add one entry to the cache file as it is now: another run may have saved its own entry since this one
    loaded the file (two runs started together each wrote back what they had loaded plus their own, and the
    last one dropped the other's)."""
    path = cache_path()
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w") as f:
            json.dump({**_load(), key: entry}, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home is no reason to fail a run: the next one measures again, said
        _remove(tmp)
        root = os.path.dirname(path)
        why = f"{root} is not a folder" if os.path.exists(root) and not os.path.isdir(root) else \
            f"{e.strerror or type(e).__name__}: {e.filename or path}"
        note(f"window auto: the measured cost curve is not cached ({why}; PARATAA_CACHE names the folder): the next "
             f"run measures it again")


def _remove(path):
    """A temporary file a failed save left (the cache file a folder, a full disk): one per run would pile up."""
    try:
        os.remove(path)
    except OSError:
        pass


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def cache_key(bundle, args, config, session, batch):
    """What the cost curves depend on. model_path too: a diffusers DiT folder's bundle.info names no architecture
    (its model is the generic DiTPipeline), so a folder of 8 layers read the curve measured for one of 2."""
    return json.dumps({"model": bundle.info, "model_path": _path(getattr(args, "model_path", None)),
                       "cfg_scale": args.cfg_scale, "device": device_name(session.device),
                       "dtype": str(session.model_dtype), "processes": session.world_size, "batch": batch,
                       "latent": list(bundle.latent), "T": bundle.schedule.num_steps,
                       "memory_size": config.memory_size, "equations": config.equations}, sort_keys=True)


def _path(path):
    """The same model whichever way the path was written (relative, absolute)."""
    return os.path.abspath(path) if path else None


def plan_run(bundle, args, config, session, noise, cond, steps=None):
    """(config with the window chosen, plan or None, seconds of one call of one state per sample), the model warmed
    up at the sizes the timed runs use.

    noise, cond: the first batch's, on the device. steps: the steps a solve takes (a warm start's variation_steps;
    default T), which the window is chosen for."""
    config, plan, call_seconds = _plan(bundle, args, config, session, noise, cond, steps)
    _warm_up_run(bundle, args, config, session, noise, cond, steps)
    return config, plan, call_seconds


def batch_call_seconds(bundle, args, config, session, noise, cond, estimate, steps=None):
    """A batch of another size than the first (the last one, of fewer samples): warmed up at its own sizes, as the
    first batch was by plan_run, and, when sequential sampling is estimated (estimate), the seconds of one call of
    one state per sample at its size, timed now: sequential sampling of n samples costs T calls of n, not of the
    first batch's B (on a CPU a call of 16 digits samples costs 6x one of 1)."""
    _warm_up_run(bundle, args, config, session, noise, cond, steps)
    if not estimate:
        return None
    return measure_call_seconds(bundle.eps_fn, bundle.schedule, noise, cond, session.sharding, session.model_dtype,
                                [1])[noise.shape[0]]


def _warm_up_run(bundle, args, config, session, noise, cond, steps):
    """warm_up at the sizes a run of this batch calls: its window (the paper mode keeps one above T; a warm start's
    calls hold at most its steps per sample) and, with --compare_sequential, one state per sample."""
    window = min(config.window_size, steps or bundle.schedule.num_steps)
    warm_up(bundle.eps_fn, bundle.schedule, noise, cond, session.sharding, session.model_dtype,
            [window] + ([1] if args.compare_sequential else []))


def _plan(bundle, args, config, session, noise, cond, steps):
    B, T = noise.shape[0], bundle.schedule.num_steps
    if config.window_size == "auto":
        cache, key = _load(), cache_key(bundle, args, config, session, B)
        plan = plan_window(bundle.eps_fn, bundle.schedule, noise, cond, config, session.sharding,
                           session.model_dtype, solve=solve, cache=cache, key=key, steps=steps)
        if session.is_main and plan.measured:
            _save(key, cache[key])
        if plan.max_inputs is not None:
            _say_max_inputs(plan, B)
        # as with a fixed window, said, not silent; a preset's order follows the window without a word, as it does
        # an explicit --window_size (presets.apply_preset)
        if config.order is not None and config.order > plan.window and \
                "order" not in getattr(args, "_preset_filled", ()):
            note(f"--order {getattr(args, '_order_given', None) or config.order} is above the window the planner "
                 f"chose ({plan.window}); an order above the window acts as the window: using {plan.window}")
        config = replace(config, window_size=plan.window, order=config.order or plan.window).resolve(T)
        # the per-call time of the run's sequential estimate, as the plan's predictions take it: the fresh check of
        # a cached curve; where the check found the cache stale and the curves were measured again, their c(B) (the
        # check was one timing off by more than STALE, e.g. under a moment's load: 1.12 s against 0.15 s)
        return config, plan, plan.call_seconds[B] if plan.measured else plan.checked_call_seconds
    if args.compare_sequential:  # measured by running it
        return config, None, None
    calls = measure_call_seconds(bundle.eps_fn, bundle.schedule, noise, cond, session.sharding,
                                 session.model_dtype, [1])
    return config, None, calls[B]


def _say_max_inputs(plan, B):
    """A call size whose output was not finite limits the windows: said, not only recorded as max_inputs. The
    planner cannot tell a process out of device memory (its shard answered with NaN on purpose, planner._spared)
    from a model whose own output is NaN at that size (an overflow at large batch): both are a call that did not
    work, so the windows that would make it are left out either way, and the user, who can tell, is told which
    size it was."""
    failed = f"a call of {plan.failed_inputs} inputs" if plan.failed_inputs else \
        f"a call of more than {plan.max_inputs} inputs"
    note(f"window auto: {failed} gave a non-finite output when the model was timed (out of device memory, or the "
         f"model's own NaN at that size); windows above {plan.max_inputs // B} (more than {plan.max_inputs} inputs "
         f"per call for {B} samples) are not considered")
