"""The one sampling loop of the three scripts: a bundle in, batches of samples solved, a run folder out.

A script checks its flags, builds a Bundle with a loader from models/ (models/bundles.py) and hands it here;
the loop never knows which model it runs.
"""
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from paratAA import Schedule, sample_sequential, solve
from paratAA.denoiser import take

from .rundir import create_run_dir, save_args
from .writer import RunWriter


@dataclass
class Bundle:
    """Everything the loop needs from a model.

    eps_fn(x, timesteps, cond) -> eps, guidance applied (the solver's only view of the model);
    decode(latents [N, *latent]) -> uint8 images [N, H, W, 3]."""
    eps_fn: Callable
    schedule: Schedule
    noise: torch.Tensor       # [S, T+1, *latent] float64 on the device (paratAA.noise)
    cond: object              # per-sample conditioning [S, ...]: a tensor, a dict of tensors, or None
    decode: Callable
    labels: list              # per sample, what it is conditioned on: {"class_label": 3} or {"prompt": "..."}
    info: dict = field(default_factory=dict)  # recorded in metrics.json (model, model_path, ...)


def open_run(args, session, prefix):
    """The run folder (main process; None elsewhere)."""
    return create_run_dir(args.output_path, prefix) if session.is_main else None


def sample_into(folder, bundle, args, config, session, script, init=None, variation_steps=None):
    """Solve every sample of the bundle; the main process writes folder (args.json, metrics.json, images, ...).

    Returns {"trajectory": [S, T+1, *latent], "iterations": [...], "seconds": sampling wall-clock}."""
    if not session.is_main:
        return sample_batches(bundle, args, config, session, init=init, variation_steps=variation_steps)
    save_args(args, folder)
    with RunWriter(folder, bundle.decode, args, config, script, bundle.labels, bundle.info,
                   session.world_size) as writer:
        return sample_batches(bundle, args, config, session, init=init, variation_steps=variation_steps,
                              writer=writer)


def sample_run(args, config, session, bundle, prefix, script):
    """The whole run of a one-bundle script: a new run folder, every sample solved and written, one line printed."""
    run_dir = open_run(args, session, prefix)
    result = sample_into(run_dir, bundle, args, config, session, script)
    if session.is_main:
        print(f"wrote {run_dir}: iterations per sample {result['iterations']}, sampling {result['seconds']:.2f} s")
    session.wait()
    return run_dir


def subfolder(run_dir, name):
    """A folder inside the run folder (main process; None elsewhere)."""
    if run_dir is None:
        return None
    path = os.path.join(run_dir, name)
    os.makedirs(path)
    return path


def sample_batches(bundle, args, config, session, init=None, variation_steps=None, writer=None):
    """Solve all samples in batches of args.batch_size; with args.compare_sequential the sequential reference too.

    init, variation_steps: warm start from an existing trajectory [S, T+1, *latent] (paratAA.solve).
    writer (main process): gets each batch as soon as it is solved."""
    noise, S = bundle.noise, bundle.noise.shape[0]
    out = {"trajectory": [], "iterations": [], "seconds": 0.0}
    progress = dict(disable=not session.is_main)
    with tqdm(total=S, desc="samples", leave=True, **progress) as bar:  # closed on errors too
        for start in range(0, S, args.batch_size):
            sl = slice(start, min(start + args.batch_size, S))
            c = take(bundle.cond, sl.start, sl.stop)
            first = init[sl] if init is not None else None
            with tqdm(total=args.timesteps if init is None else variation_steps, desc="iterations", leave=False,
                      **progress) as it_bar:
                t0 = time.perf_counter()
                res = solve(bundle.eps_fn, bundle.schedule, noise[sl], c, config, init=first,
                            variation_steps=variation_steps, model_dtype=session.model_dtype,
                            sharding=session.sharding, record_x0=True, callback=lambda it, bounds: it_bar.update(1))
                _sync(noise.device)
                seconds = time.perf_counter() - t0
            seq, seq_seconds = None, 0.0
            if args.compare_sequential:
                t0 = time.perf_counter()
                seq = sample_sequential(bundle.eps_fn, bundle.schedule, noise[sl], c, init=first,
                                        start=variation_steps, model_dtype=session.model_dtype,
                                        sharding=session.sharding)[:, 0]
                _sync(noise.device)
                seq_seconds = time.perf_counter() - t0
            out["seconds"] += seconds
            out["trajectory"].append(res.trajectory)
            out["iterations"] += res.iterations
            if writer is not None:
                writer.add_batch(start, res, seq, seconds, seq_seconds)
            bar.update(sl.stop - sl.start)
    out["trajectory"] = torch.cat(out["trajectory"])
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
