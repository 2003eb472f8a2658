"""What the three scripts share around the solver: solver flags and their checks, the run folder, the sampling
loop over batches of samples, and the output layout. The model stays in the scripts (as eps_fn and decode).

Run folder layout:
    args.json  metrics.json  latents.npz (key "latents", [num_samples, C, H, W])  grid.png
    sample_<i>/step_<k>.png   (decoded x_0 estimate after iteration k; k = 0 is the initial state)
"""
import json
import math
import os
import secrets
import sys
import time

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .sequential import sample_sequential
from .solver import solve


class UsageError(Exception):
    """A bad flag value: one line, exit code 2."""


class InputFileError(Exception):
    """A missing or unusable file or folder: one line, exit code 1."""


def exit_on_error(main, argv_args):
    """Run main(args); turn our expected errors into one line on stderr and an exit code (no traceback)."""
    prog = os.path.basename(sys.argv[0])
    try:
        return main(argv_args)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except InputFileError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(1)


# ----------------------------------------------------------------------------------------------- flags
def add_solver_arguments(parser, cfg_scale=4.0, memory_size=3, tol=3e-4):
    g = parser.add_argument_group("sampling and ParaTAA")
    g.add_argument("--timesteps", type=int, default=100, help="number of DDIM steps T")
    g.add_argument("--cfg_scale", type=float, default=cfg_scale, help="classifier-free guidance scale (1: none)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 is the ODE sampler, > 0 the SDE sampler")
    g.add_argument("--seed", type=int, default=0, help="seed of the labels and the per-step noise")
    g.add_argument("--num_samples", type=int, default=10, help="number of samples to generate")
    g.add_argument("--batch_size", type=int, default=1, help="samples solved together (one model call each iteration)")
    g.add_argument("--window_size", type=int, default=None, help="states evaluated per iteration (default: T)")
    g.add_argument("--order", type=int, default=None, help="order of the nonlinear equations (default: window_size)")
    g.add_argument("--memory_size", type=int, default=memory_size,
                   help="TAA memory m: iterates kept per state (1: plain fixed-point iteration; 2-5 recommended)")
    g.add_argument("--tol1", type=float, default=tol, help="absolute tolerance on the RMS residual of a state")
    g.add_argument("--tol2", type=float, default=tol, help="tolerance relative to the step's noise level sigma")
    g.add_argument("--max_steps", type=int, default=None, help="maximum number of iterations (default: none; T suffice)")
    g.add_argument("--compare_sequential", action="store_true",
                   help="also sample sequentially and record the distance to it after every iteration")
    g.add_argument("--output_path", type=str, default="output", help="run folders are created under this folder")
    g.add_argument("--fp16", action="store_true", help="run the model in float16")
    return g


def _positive_int(args, name, low=1, high=None):
    v = getattr(args, name)
    if v is None:
        return
    if v < low or (high is not None and v > high):
        span = f"in {low}..{high}" if high is not None else f">= {low}"
        raise UsageError(f"--{name} must be {span}, got {v}")


def _finite(args, name, low=None):
    v = getattr(args, name)
    if not math.isfinite(v) or (low is not None and v < low):
        raise UsageError(f"--{name} must be a finite number" + (f" >= {low}" if low is not None else "") + f", got {v}")


def check_solver_arguments(args, num_train_timesteps):
    """Check every solver flag before anything is loaded; fills in the window_size and order defaults."""
    _positive_int(args, "timesteps", 1, num_train_timesteps)
    for name in ("num_samples", "batch_size", "window_size", "order", "memory_size", "max_steps"):
        _positive_int(args, name)
    for name in ("eta", "tol1", "tol2"):
        _finite(args, name, 0.0)
    _finite(args, "cfg_scale")
    args.window_size = args.window_size or args.timesteps
    args.order = args.order or args.window_size
    if args.order > args.window_size:
        raise UsageError(f"--order must be <= --window_size ({args.window_size}), got {args.order}")
    check_output_path(args.output_path)


def check_output_path(path):
    """Fail before sampling if run folders cannot be created under path."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or (os.path.exists(path) and not os.path.isdir(path)):
        raise UsageError(f"--output_path is not a folder: {path}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--output_path is not writable: {path}")


def create_run_dir(output_path, prefix):
    """A new folder <prefix>-<date>-<time>-<random>: two runs started in the same second never share one."""
    os.makedirs(output_path, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    while True:
        path = os.path.join(output_path, f"{prefix}-{stamp}-{secrets.token_hex(3)}")
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            continue


# --------------------------------------------------------------------------------------------- sampling
def sample_batches(eps_fn, schedule, noise, cond, args, sharding, model_dtype, is_main, init=None,
                   variation_steps=None):
    """Solve all samples in batches of args.batch_size; optionally the sequential reference too.

    noise: [S, T+1, *latent]; cond: per-sample conditioning [S, ...] (tensor, dict of tensors, or None).
    Returns a dict with the SolveResults' pieces per sample and the wall-clock (decoding excluded)."""
    S = noise.shape[0]
    out = {"samples": [], "trajectory": [], "history": [], "iterations": [], "converged": [], "evaluations": [],
           "sequential": [], "seconds": 0.0, "sequential_seconds": 0.0}
    bar = tqdm(total=S, desc="samples", disable=not is_main, leave=True)
    for start in range(0, S, args.batch_size):
        sl = slice(start, min(start + args.batch_size, S))
        c = _slice(cond, sl)
        it_bar = tqdm(total=args.timesteps if init is None else variation_steps, desc="iterations",
                      disable=not is_main, leave=False)
        first = init[sl] if init is not None else None
        progress = lambda it, bounds: it_bar.update(1)  # noqa: E731
        t0 = time.perf_counter()
        res = solve(eps_fn, schedule, noise[sl], c, window_size=args.window_size, order=args.order,
                    memory_size=args.memory_size, tol1=args.tol1, tol2=args.tol2, max_steps=args.max_steps,
                    init=first, variation_steps=variation_steps, model_dtype=model_dtype, sharding=sharding,
                    record_x0=True, callback=progress)
        _sync(noise.device)
        out["seconds"] += time.perf_counter() - t0
        it_bar.close()
        for key in ("iterations", "converged", "evaluations", "history"):
            out[key] += list(getattr(res, key))
        out["samples"].append(res.samples)
        out["trajectory"].append(res.trajectory)
        if args.compare_sequential:
            t0 = time.perf_counter()
            seq = sample_sequential(eps_fn, schedule, noise[sl], c, init=first, start=variation_steps,
                                    model_dtype=model_dtype, sharding=sharding)
            _sync(noise.device)
            out["sequential_seconds"] += time.perf_counter() - t0
            out["sequential"].append(seq[:, 0])
        bar.update(sl.stop - sl.start)
    bar.close()
    for key in ("samples", "trajectory", "sequential"):
        out[key] = torch.cat(out[key]) if out[key] else None
    return out


def _slice(cond, sl):
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: _slice(v, sl) for k, v in cond.items()}
    return cond[sl]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- outputs
def image_rms(a, b):
    """RMS difference in 8-bit levels of two uint8 images."""
    return float(np.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def _display(img, min_side=64):
    """Integer nearest upscaling so that tiny images (the 8x8 digits) can be looked at."""
    k = max(1, -(-min_side // min(img.shape[:2])))
    return img.repeat(k, 0).repeat(k, 1) if k > 1 else img


def _atomic(path, write):
    """write(tmp_path) then rename: an interrupted run never leaves a half-written file under the real name."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"
    write(tmp)
    os.replace(tmp, path)


def save_png(img, path):
    _atomic(path, lambda p: Image.fromarray(_display(img)).save(p))


def save_json(obj, path):
    def write(p):
        with open(p, "w") as f:
            json.dump(obj, f, indent=1)
    _atomic(path, write)


def write_run(run_dir, result, decode, args, script, extra_metrics=None, per_sample=None, world_size=1):
    """Decode and write everything of a run. decode: latents [N, *latent] float64 -> uint8 [N, H, W, 3]."""
    S = len(result["iterations"])
    same = None
    if result["sequential"] is not None:
        seq_imgs = decode(result["sequential"])
    rows, samples = [], []
    for i in range(S):
        h = result["history"][i]
        x0 = torch.stack(h.x0)                                                   # [K+1, *latent]
        imgs = decode(x0)                                                        # [K+1, H, W, 3]
        folder = os.path.join(run_dir, f"sample_{i}")
        os.makedirs(folder, exist_ok=True)
        for k, img in enumerate(imgs):
            save_png(img, os.path.join(folder, f"step_{k}.png"))
        rows.append(imgs)
        m = {"iterations": result["iterations"][i], "converged": bool(result["converged"][i]),
             "model_evaluations": result["evaluations"][i], "residual_history": h.residual,
             "boundary_history": h.boundary, "taa_fallbacks": sum(h.fallbacks)}
        if per_sample is not None:
            m.update(per_sample[i])
        if result["sequential"] is not None:
            ref = result["sequential"][i]
            m["sequential_distance_history"] = [float((x - ref).pow(2).mean().sqrt()) for x in x0]
            m["image_rms_history"] = [image_rms(img, seq_imgs[i]) for img in imgs]
            same = next((k for k, v in enumerate(m["image_rms_history"]) if v <= 1.0), None)
            m["iterations_to_same_image"] = same
            m["final_image_rms"] = m["image_rms_history"][-1]
            save_png(seq_imgs[i], os.path.join(folder, "sequential.png"))
        samples.append(m)
    _write_grid(rows, os.path.join(run_dir, "grid.png"))
    latents = result["samples"].to(torch.float32).cpu().numpy()
    _atomic(os.path.join(run_dir, "latents.npz"), lambda p: np.savez(p, latents=latents))
    metrics = {"script": script, "world_size": world_size, "timesteps": args.timesteps,
               "window_size": args.window_size, "order": args.order, "memory_size": args.memory_size,
               "eta": args.eta, "cfg_scale": args.cfg_scale, "tol1": args.tol1, "tol2": args.tol2,
               "wall_clock_seconds": result["seconds"], "num_samples": S, "samples": samples}
    if result["sequential"] is not None:
        metrics["sequential_wall_clock_seconds"] = result["sequential_seconds"]
    metrics.update(extra_metrics or {})
    save_json(metrics, os.path.join(run_dir, "metrics.json"))
    return metrics


def _write_grid(rows, path):
    """One row per sample, one column per iteration (short rows padded with their final image)."""
    cols = max(len(r) for r in rows)
    h, w = rows[0].shape[1:3]
    grid = np.full((len(rows) * (h + 1) - 1, cols * (w + 1) - 1, 3), 255, dtype=np.uint8)
    for i, r in enumerate(rows):
        for k in range(cols):
            grid[i * (h + 1):i * (h + 1) + h, k * (w + 1):k * (w + 1) + w] = r[min(k, len(r) - 1)]
    save_png(grid, path)


def save_args(args, run_dir):
    save_json(vars(args), os.path.join(run_dir, "args.json"))
