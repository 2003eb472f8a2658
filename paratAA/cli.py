"""What the three scripts share around the solver: solver flags and their checks, the run folder, the sampling
loop over batches of samples, and the output layout. The model stays in the scripts (as eps_fn and decode).

Run folder layout:
    args.json  metrics.json  latents.npz (key "latents", [num_samples, C, H, W])  grid.png
    sample_<i>/step_<k>.png   (decoded x_0 estimate after iteration k; k = 0 is the initial state)
"""
import io
import json
import math
import os
import secrets
import signal
import sys
import time
import zipfile

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .denoiser import NonFiniteModelOutput, take
from .equations import check_form
from .sequential import sample_sequential
from .solver import solve


class UsageError(Exception):
    """A bad flag value: one line, exit code 2."""


class InputFileError(Exception):
    """A missing or unusable file or folder: one line, exit code 1."""


def _terminate(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def exit_on_error(main, argv_args):
    """Run main(args); turn our expected errors into one line on stderr and an exit code (no traceback).

    SIGINT and SIGTERM stop the run: run folders keep every finished sample and metrics.json says which
    (status "interrupted"), and the process exits with 130."""
    prog = os.path.basename(sys.argv[0])
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)  # also when a non-interactive shell started us with SIGINT ignored
    try:
        return main(argv_args)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except InputFileError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except NonFiniteModelOutput as e:
        kept = [w.interrupt("failed") for w in list(RunWriter.open_writers)]
        where = "".join(f"; {n} finished samples kept in {d}" for d, n in kept)
        print(f"{prog}: error: {e}{where}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        saved = [w.interrupt() for w in list(RunWriter.open_writers)]
        where = "; ".join(f"{n} finished samples kept in {d}" for d, n in saved) or "nothing written"
        print(f"{prog}: interrupted ({where})", file=sys.stderr)
        sys.exit(130)


def make_accelerator(args):
    """Accelerator on the GPUs, or on CPU processes when there are none; a bounded wait on dead peers."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs
    wait = InitProcessGroupKwargs(timeout=timedelta(seconds=args.dist_timeout))
    return Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[wait])


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
    g.add_argument("--equations", type=str, default="picard",
                   help="form of the order-k equations: picard (sum of drifts, fewer iterations) or ddim (the "
                        "paper's DDIM composition); same solution either way, see paratAA/equations.py")
    g.add_argument("--memory_size", type=int, default=memory_size,
                   help="TAA memory m: iterates kept per state (1: plain fixed-point iteration; 2-5 recommended)")
    g.add_argument("--tol1", type=float, default=tol, help="absolute tolerance on the RMS residual of a state")
    g.add_argument("--tol2", type=float, default=tol, help="tolerance relative to the step's noise level sigma")
    g.add_argument("--max_steps", type=int, default=None, help="maximum number of iterations (default: none; T suffice)")
    g.add_argument("--compare_sequential", action="store_true",
                   help="also sample sequentially and record the distance to it after every iteration")
    g.add_argument("--output_path", type=str, default="output", help="run folders are created under this folder")
    g.add_argument("--fp16", action="store_true", help="run the model in float16")
    g.add_argument("--dist_timeout", type=float, default=300.0,
                   help="seconds a process waits for the others in a collective before giving up")
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
    _finite(args, "dist_timeout", 1.0)
    try:
        check_form(args.equations)
    except ValueError as e:  # the solver's own message, named as the flag
        raise UsageError(f"--{e}") from None
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
                   variation_steps=None, writer=None):
    """Solve all samples in batches of args.batch_size; optionally the sequential reference too.

    noise: [S, T+1, *latent]; cond: per-sample conditioning [S, ...] (tensor, dict of tensors, or None).
    writer (main process): a RunWriter that gets each batch as soon as it is solved.
    Returns {"trajectory": [S, T+1, *latent], "iterations": [...], "seconds": sampling wall-clock}."""
    S = noise.shape[0]
    out = {"trajectory": [], "iterations": [], "seconds": 0.0}
    with tqdm(total=S, desc="samples", disable=not is_main, leave=True) as bar:  # closed on errors too
        for start in range(0, S, args.batch_size):
            sl = slice(start, min(start + args.batch_size, S))
            c = take(cond, sl.start, sl.stop)
            first = init[sl] if init is not None else None
            with tqdm(total=args.timesteps if init is None else variation_steps, desc="iterations",
                      disable=not is_main, leave=False) as it_bar:
                t0 = time.perf_counter()
                res = solve(eps_fn, schedule, noise[sl], c, window_size=args.window_size, order=args.order,
                            equations=args.equations,
                            memory_size=args.memory_size, tol1=args.tol1, tol2=args.tol2, max_steps=args.max_steps,
                            init=first, variation_steps=variation_steps, model_dtype=model_dtype, sharding=sharding,
                            record_x0=True, callback=lambda it, bounds: it_bar.update(1))
                _sync(noise.device)
                seconds = time.perf_counter() - t0
            seq, seq_seconds = None, 0.0
            if args.compare_sequential:
                t0 = time.perf_counter()
                seq = sample_sequential(eps_fn, schedule, noise[sl], c, init=first, start=variation_steps,
                                        model_dtype=model_dtype, sharding=sharding)[:, 0]
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


def save_npz(path, **arrays):
    """Like np.savez, but byte-identical for identical arrays (fixed zip timestamps)."""
    def write(p):
        with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_STORED) as z:
            for name, arr in arrays.items():
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
                z.writestr(zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())
    _atomic(path, write)


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def portable(value):
    """Paths inside this repository (the embedded defaults) are recorded relative to it, never as this
    machine's absolute path."""
    if isinstance(value, str) and os.path.isabs(value) and value.startswith(REPO_ROOT + os.sep):
        return os.path.relpath(value, REPO_ROOT)
    return value


def save_args(args, run_dir):
    save_json({k: portable(v) for k, v in vars(args).items()}, os.path.join(run_dir, "args.json"))


class RunWriter:
    """Writes a run folder batch by batch (main process): metrics.json and latents.npz are rewritten after every
    batch, so an interrupted run keeps every finished sample and says which ones finished.

    decode: latents [N, *latent] float64 -> uint8 [N, H, W, 3]; per_sample: a dict per sample (label, prompt)."""

    open_writers = []  # flushed as "interrupted" by exit_on_error

    def __init__(self, run_dir, decode, args, script, per_sample, extra_metrics=None, world_size=1):
        self.run_dir, self.decode, self.per_sample = run_dir, decode, per_sample
        RunWriter.open_writers.append(self)
        self.samples, self.latents, self.rows = [], [], []
        self.metrics = {"script": script, "world_size": world_size, "timesteps": args.timesteps,
                        "window_size": args.window_size, "order": args.order, "equations": args.equations,
                        "memory_size": args.memory_size,
                        "eta": args.eta, "cfg_scale": args.cfg_scale, "tol1": args.tol1, "tol2": args.tol2,
                        "wall_clock_seconds": 0.0, "num_samples": len(per_sample),
                        **{k: portable(v) for k, v in (extra_metrics or {}).items()}}
        if args.compare_sequential:
            self.metrics["sequential_wall_clock_seconds"] = 0.0

    def add_batch(self, start, res, seq, seconds, seq_seconds):
        seq_imgs = self.decode(seq) if seq is not None else None
        for j, h in enumerate(res.history):
            i = start + j
            x0 = torch.stack(h.x0)                                               # [K+1, *latent]
            imgs = self.decode(x0)                                               # [K+1, H, W, 3]
            folder = os.path.join(self.run_dir, f"sample_{i}")
            os.makedirs(folder, exist_ok=True)
            for k, img in enumerate(imgs):
                save_png(img, os.path.join(folder, f"step_{k}.png"))
            m = {"index": i, **self.per_sample[i], "iterations": res.iterations[j],
                 "converged": bool(res.converged[j]), "model_evaluations": res.evaluations[j],
                 "residual_history": h.residual, "boundary_history": h.boundary, "taa_fallbacks": sum(h.fallbacks)}
            if seq is not None:
                m["sequential_distance_history"] = [float((x - seq[j].cpu()).pow(2).mean().sqrt()) for x in x0]
                m["image_rms_history"] = [image_rms(img, seq_imgs[j]) for img in imgs]
                m["iterations_to_same_image"] = next((k for k, v in enumerate(m["image_rms_history"]) if v <= 1.0),
                                                     None)
                m["final_image_rms"] = m["image_rms_history"][-1]
                save_png(seq_imgs[j], os.path.join(folder, "sequential.png"))
            self.samples.append(m)
            self.rows.append(imgs)
        self.latents.append(res.samples.to(torch.float32).cpu().numpy())
        self.metrics["wall_clock_seconds"] += seconds
        if seq is not None:
            self.metrics["sequential_wall_clock_seconds"] += seq_seconds
        self.flush(status="running")

    def close(self):
        RunWriter.open_writers.remove(self)
        return self.flush("complete")

    def interrupt(self, status="interrupted"):
        RunWriter.open_writers.remove(self)
        self.flush(status)
        return self.run_dir, len(self.samples)

    def flush(self, status):
        """status: running (more batches to come), complete, interrupted, or failed (non-finite model output)."""
        if self.latents:
            save_npz(os.path.join(self.run_dir, "latents.npz"), latents=np.concatenate(self.latents))
        if status != "running" and self.rows:
            _write_grid(self.rows, os.path.join(self.run_dir, "grid.png"))
        save_json({**self.metrics, "status": status, "finished_samples": [m["index"] for m in self.samples],
                   "samples": self.samples}, os.path.join(self.run_dir, "metrics.json"))
        return self.metrics


def _write_grid(rows, path):
    """One row per sample, one column per iteration (short rows padded with their final image)."""
    cols = max(len(r) for r in rows)
    rows = [np.stack([_display(img) for img in r]) for r in rows]  # tiny tiles upscaled before composing
    h, w = rows[0].shape[1:3]
    grid = np.full((len(rows) * (h + 1) - 1, cols * (w + 1) - 1, 3), 255, dtype=np.uint8)
    for i, r in enumerate(rows):
        for k in range(cols):
            grid[i * (h + 1):i * (h + 1) + h, k * (w + 1):k * (w + 1) + w] = r[min(k, len(r) - 1)]
    save_png(grid, path)
