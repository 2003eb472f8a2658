"""The one sampling loop of the three scripts: a bundle in, batches of samples solved, a run folder out.

A script checks its flags, builds a Bundle with a loader from models/ (models/bundles.py) and hands it here; the
loop never knows which model it runs. It holds one batch of noise and conditioning at a time, and checks before
sampling that what the run will hold fits in memory.
"""
import contextlib
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from tqdm.auto import tqdm

from paratAA import NonFiniteModelOutput, Schedule, sample_sequential, solve
from paratAA.planner import sync
from paratAA.solver import state_bytes

from .errors import UsageError, one_line
from .metrics import speed_summary
from .planning import batch_call_seconds, plan_run
from .rundir import create_run_dir, missing_folders, save_args
from .writer import RECORD_BYTES, RunWriter


@dataclass
class Bundle:
    """Everything the loop needs from a model.

    eps_fn(x, timesteps, cond) -> eps, guidance applied (the solver's only view of the model);
    noise() -> a fresh paratAA.NoiseStream of num_samples samples [T+1, *latent] (the same values every time);
    cond(start, stop) -> the conditioning of samples start..stop-1 ([n, ...] tensor, dict of tensors, or None);
    label(i) -> what sample i is conditioned on, for metrics.json ({"class_label": 3} or {"prompt": "..."});
    decode(latents [N, *latent]) -> uint8 images [N, H, W, 3];
    image(latents [N, *latent]) -> float images in gray levels, unrounded: what the stop rule compares (solve's
    image_fn; None: it judges the latent)."""
    eps_fn: Callable
    schedule: Schedule
    num_samples: int
    latent: tuple
    noise: Callable
    cond: Callable
    label: Callable
    decode: Callable
    image: Callable = None
    cond_bytes: int = 0                       # bytes of one sample's conditioning
    info: dict = field(default_factory=dict)  # recorded in metrics.json (model, model_path, ...)


def check_fits(bundle, args, config, session, keep_trajectories=False):
    """UsageError naming the flags to lower when the run would not fit in memory, before anything is allocated.

    Per batch: the solver's state (paratAA.solver.state_bytes), the batch's noise and conditioning, on the device.
    Per run, in the main process: every sample's latents and record (and, for a warm start, every trajectory)."""
    T, D, S = bundle.schedule.num_steps, math.prod(bundle.latent), bundle.num_samples
    B = min(args.batch_size, S)
    if config.window_size == "auto":  # not chosen yet: the largest it can be
        config = replace(config, window_size=T).resolve(T)
    batch = state_bytes(config, T, D, B) + B * (8 * (T + 1) * D + bundle.cond_bytes)
    run = S * (4 * D + RECORD_BYTES) + (S * 8 * (T + 1) * D if keep_trajectories else 0)
    free_device, free_host = session.free_memory()
    gb = 2 ** 30
    if free_device is not None and batch > 0.9 * free_device:
        # the image size given sets the latent's: often the cause (SD at --height 8192), so named when given
        default = getattr(args, "_sizes_from_model", ())  # a size the model's config set (a huge sample_size)
        sizes = [f"--{name} {getattr(args, name)}" if name not in default else
                 f"{name} {getattr(args, name)} by the model's config" for name in ("height", "width", "image_size")
                 if getattr(args, name, None)]
        latent = "x".join(map(str, bundle.latent))
        raise UsageError(f"--batch_size {B} needs about {batch / gb:.1f} GB for the solver's state at --timesteps {T} "
                         f"and --memory_size {config.memory_size} with latents of {latent}"
                         f"{' (' + ', '.join(sizes) + ')' if sizes else ''} ({free_device / gb:.1f} GB free on "
                         f"{session.device}); lower --batch_size, --memory_size, --timesteps"
                         f"{' or the image size' if sizes else ''}")
    if free_host is not None and run > 0.9 * free_host:
        raise UsageError(f"--num_samples {S} needs about {run / gb:.1f} GB to hold the run's latents and records "
                         f"({free_host / gb:.1f} GB available); lower --num_samples (or split the run over seeds)")


@contextlib.contextmanager
def open_run(args, session, prefix):
    """The run folder (main process; None elsewhere). sample_into removes what it wrote when no sample finished;
    a run folder left empty by that (a warm start's prompt1/ and prompt2/ both removed) goes too, and so do the
    folders of --output_path that this run created and that are left empty."""
    created, _ = missing_folders(args.output_path)  # the deepest first
    run_dir = create_run_dir(args.output_path, prefix) if session.is_main else None
    try:
        yield run_dir
    except BaseException:
        if run_dir:
            for folder in [run_dir] + created:
                try:
                    os.rmdir(folder)  # only an empty one: a folder with anything in it stays
                except FileNotFoundError:  # sample_into removed the run folder with what it had written
                    continue
                except OSError:
                    break
        raise


def sample_run(args, config, session, bundle, prefix, script):
    """The whole run of a one-bundle script: checked to fit, a new run folder, every sample solved and written,
    what it gained printed."""
    check_fits(bundle, args, config, session)
    with open_run(args, session, prefix) as run_dir:
        result = sample_into(run_dir, bundle, args, config, session, script)
    if session.is_main:
        print(f"wrote {one_line(run_dir)}")  # a path may hold a line break: still one line
        print("\n".join(result["summary"]), flush=True)
    session.wait()
    return run_dir


def sample_into(folder, bundle, args, config, session, script, init=None, variation_steps=None,
                keep_trajectories=False, must_finish=None):
    """Solve every sample of the bundle; the main process writes folder (args.json, metrics.json, images, ...).

    Returns {"iterations": [...], "converged": [...], "seconds": sampling wall-clock, "trajectory": [S, T+1,
    *latent] when keep_trajectories (a warm start's first pass), "summary": lines saying what the run gained (main
    process)}. must_finish: why every sample must converge (check_can_finish), or None."""
    if not session.is_main:
        return sample_batches(bundle, args, config, session, init, variation_steps, None, keep_trajectories,
                              must_finish)
    save_args(args, folder)
    writer = None
    try:
        info = {**bundle.info, **({"variation_steps": variation_steps} if variation_steps else {})}  # a warm start
        with RunWriter(folder, bundle.decode, args, config, script, bundle.label, bundle.num_samples, info,
                       session.world_size) as writer:
            out = sample_batches(bundle, args, config, session, init, variation_steps, writer, keep_trajectories,
                                 must_finish)
    except BaseException:
        if writer is None or not writer.samples:  # nothing finished: args.json and a failed metrics.json would be
            shutil.rmtree(folder, ignore_errors=True)  # half-written output
        raise
    out["summary"] = speed_summary({**writer.metrics, "speed": writer.speed()}, writer.samples)
    return out


def check_can_finish(config, steps, why):
    """UsageError where --max_steps allows fewer iterations than the window needs to reach x_0: an iteration
    freezes at most a window of states, so `steps` of them take ceil(steps / window) at least. A warm start's first
    pass found this only after sampling prompt1 (its folder then kept)."""
    need = -(-steps // config.window_size)
    if config.max_iterations is not None and config.max_iterations < need:
        raise UsageError(f"--max_steps {config.max_steps} allows {config.max_iterations} iterations, fewer than the "
                         f"{need} that window {config.window_size} needs for {steps} steps: {why}; raise --max_steps "
                         f"or the window")


def subfolder(run_dir, name):
    """A folder inside the run folder (main process; None elsewhere)."""
    if run_dir is None:
        return None
    path = os.path.join(run_dir, name)
    os.makedirs(path)
    return path


def sample_batches(bundle, args, config, session, init=None, variation_steps=None, writer=None,
                   keep_trajectories=False, must_finish=None):
    """Solve all samples in batches of args.batch_size; with args.compare_sequential the sequential reference too.

    init, variation_steps: warm start from existing trajectories [S, T+1, *latent] (paratAA.solve).
    writer (main process): gets each batch as soon as it is solved."""
    S, device = bundle.num_samples, session.device
    steps = variation_steps or bundle.schedule.num_steps  # sequential sampling's model calls per batch
    stream = bundle.noise()
    out = {"trajectory": [], "iterations": [], "converged": [], "seconds": 0.0}
    call_seconds, plan = None, None
    progress = dict(disable=not session.is_main)
    with tqdm(total=S, desc="samples", leave=True, **progress) as bar:  # closed on errors too
        for start in range(0, S, args.batch_size):
            stop = min(start + args.batch_size, S)
            noise, cond = stream.take(stop - start).to(device), bundle.cond(start, stop)
            first = init[start:stop] if init is not None else None
            if start == 0:  # the window (auto: measured here) and the per-call time of sequential sampling
                config, plan, call_seconds = plan_run(bundle, args, config, session, noise, cond, variation_steps)
                if must_finish:  # the window is known from here (auto: just chosen), no sample solved yet
                    check_can_finish(config, steps, must_finish)
                if writer is not None:
                    writer.set_plan(config, plan, call_seconds)
                batch_call = call_seconds
            elif stop - start != args.batch_size:  # the last batch, of fewer samples: timed at its own size
                batch_call = batch_call_seconds(bundle, args, config, session, noise, cond,
                                                estimate=call_seconds is not None and not args.compare_sequential,
                                                steps=variation_steps)
                if writer is not None and batch_call is not None:
                    writer.set_last_batch_call(stop - start, batch_call)
            with tqdm(total=args.timesteps if init is None else variation_steps, desc="iterations", leave=False,
                      **progress) as it_bar:
                sync(device)
                t0 = time.perf_counter()
                try:
                    res = solve(bundle.eps_fn, bundle.schedule, noise, cond, config, init=first,
                                variation_steps=variation_steps, model_dtype=session.model_dtype,
                                sharding=session.sharding, record_x0=True, image_fn=bundle.image,
                                callback=lambda it, bounds: it_bar.update(1))
                except NonFiniteModelOutput as e:
                    raise NonFiniteModelOutput(f"{e}{_non_finite_hint(args)}") from None
                sync(device)
                seconds = time.perf_counter() - t0
            seq, seq_seconds = None, 0.0
            if args.compare_sequential:
                sync(device)
                t0 = time.perf_counter()
                seq = sample_sequential(bundle.eps_fn, bundle.schedule.solved(config.reference_quirks), noise, cond,
                                        init=first, start=variation_steps, model_dtype=session.model_dtype,
                                        sharding=session.sharding)[:, 0]
                sync(device)
                seq_seconds = time.perf_counter() - t0
            out["seconds"] += seconds
            if keep_trajectories:
                out["trajectory"].append(res.trajectory.cpu())
            out["iterations"] += res.iterations
            out["converged"] += res.converged
            if writer is not None:
                writer.add_batch(start, res, seq, seconds, seq_seconds,
                                 steps * batch_call if batch_call is not None else None, x_T=noise[:, -1],
                                 predicted=plan.predict(stop - start, None if start == 0 or batch_call is None
                                                        else (stop - start, batch_call)) if plan is not None else None)
                _say_unconverged(start, res, config)
            bar.update(stop - start)
    if keep_trajectories:
        out["trajectory"] = torch.cat(out["trajectory"])
    return out


def _non_finite_hint(args):
    """The flags that most often make a model's output overflow."""
    hints = []
    if abs(args.cfg_scale) > 50:
        hints.append(f"--cfg_scale {args.cfg_scale:g} is extreme: lower it")
    if args.fp16:
        hints.append("--fp16 can overflow: try without it")
    return f" ({'; '.join(hints)})" if hints else ""


def _say_unconverged(start, res, config):
    """--max_steps stopped a sample before it converged: say so on the terminal, not only in metrics.json."""
    T = res.trajectory.shape[1] - 1
    for j, h in enumerate(res.history):
        if not res.converged[j]:
            tqdm.write(f"sample {start + j}: --max_steps {config.max_steps} stopped it before it converged "
                       f"({h.boundary[-1]} of {T} states not final): it is not the sequential sample", file=sys.stderr)


