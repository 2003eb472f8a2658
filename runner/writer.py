"""The run writer: a run folder filled batch by batch, closed as complete, failed or interrupted.

metrics.json and latents.npz are rewritten after every batch, so an interrupted run keeps every finished sample
and says which ones finished. Used as a context manager:

    with RunWriter(run_dir, decode, args, config, script, label, num_samples) as writer:
        ... writer.add_batch(...) ...

On the way out it marks the run "complete", or "interrupted" (KeyboardInterrupt: SIGINT, SIGTERM) or "failed"
(any other exception), and appends (run_dir, finished samples) to the exception's `kept` list for the one-line
message (errors.py).

A live run also says it is alive: metrics.json holds the writing process's pid and host, and "heartbeat" (seconds
since the epoch) rewritten every HEARTBEAT seconds. A run whose status is still "running" but whose heartbeat is
older than a few HEARTBEAT intervals was killed (SIGKILL, a lost machine): README, "Output layout".
"""
import os
import socket
import threading
import time

import numpy as np
import torch

from .metrics import image_rms, latent_rms, same_image_at
from .rundir import portable, save_json, save_npz, save_png, upscale

HEARTBEAT = 10.0     # seconds between heartbeats of a live run
GRID_SAMPLES = 32    # grid.png shows the first samples only (every sample has its own folder of images)
RECORD_BYTES = 4096  # what one sample's record in metrics.json holds in memory, at most (for the memory check)


class RunWriter:
    """decode: latents [N, *latent] float64 -> uint8 [N, H, W, 3]; label(i): a dict for sample i (class_label or
    prompt); config: the resolved paratAA.SolverConfig; info: more entries for metrics.json."""

    def __init__(self, run_dir, decode, args, config, script, label, num_samples, info=None, world_size=1):
        self.run_dir, self.decode, self.label = run_dir, decode, label
        self.samples, self.latents, self.rows = [], [], []
        self.metrics = {"script": script, "world_size": world_size, "timesteps": args.timesteps,
                        **config.to_dict(), "eta": args.eta, "cfg_scale": args.cfg_scale,
                        "wall_clock_seconds": 0.0, "num_samples": num_samples,
                        **{k: portable(v) for k, v in (info or {}).items()},
                        "pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
                        "heartbeat_seconds": HEARTBEAT}
        if args.compare_sequential:
            self.metrics["sequential_wall_clock_seconds"] = 0.0
        self.status = "running"
        self._lock = threading.RLock()  # the main thread may re-enter it when a signal interrupts a flush
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)

    def __enter__(self):
        self.flush("running")
        self._beat.start()
        return self

    def __exit__(self, kind, exc, tb):
        self._stop.set()
        self._beat.join()
        if exc is None:
            self.flush("complete")
            return False
        self.flush("interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
        try:
            exc.kept = getattr(exc, "kept", []) + [(self.run_dir, len(self.samples))]
        except AttributeError:  # an exception type that takes no attributes: the folder is marked all the same
            pass
        return False

    def _heartbeat(self):
        while not self._stop.wait(HEARTBEAT):
            with self._lock:
                self._write_metrics()

    def add_batch(self, start, res, seq, seconds, seq_seconds):
        """res: the batch's SolveResult (record_x0), seq: its sequential x_0 [B, *latent] or None."""
        seq_imgs = self.decode(seq) if seq is not None else None
        for j, h in enumerate(res.history):
            i = start + j
            x0 = torch.stack(h.x0)                                               # [K+1, *latent]
            imgs = self.decode(x0)                                               # [K+1, H, W, 3]
            folder = os.path.join(self.run_dir, f"sample_{i}")
            os.makedirs(folder, exist_ok=True)
            for k, img in enumerate(imgs):
                save_png(img, os.path.join(folder, f"step_{k}.png"))
            m = {"index": i, **self.label(i), "iterations": res.iterations[j],
                 "converged": bool(res.converged[j]), "model_evaluations": res.evaluations[j],
                 "residual_history": h.residual, "boundary_history": h.boundary, "taa_fallbacks": sum(h.fallbacks)}
            if seq is not None:
                m["sequential_distance_history"] = [latent_rms(x, seq[j]) for x in x0]
                m["image_rms_history"] = [image_rms(img, seq_imgs[j]) for img in imgs]
                m["iterations_to_same_image"] = same_image_at(m["image_rms_history"])
                m["final_image_rms"] = m["image_rms_history"][-1]
                save_png(seq_imgs[j], os.path.join(folder, "sequential.png"))
            with self._lock:
                self.samples.append(m)
                if i < GRID_SAMPLES:
                    self.rows.append(imgs)
        with self._lock:
            self.latents.append(res.samples.to(torch.float32).cpu().numpy())
            self.metrics["wall_clock_seconds"] += seconds
            if seq is not None:
                self.metrics["sequential_wall_clock_seconds"] += seq_seconds
        self.flush("running")

    def flush(self, status):
        """status: running (more batches to come), complete, interrupted, or failed."""
        with self._lock:
            self.status = status
            if self.latents:
                save_npz(os.path.join(self.run_dir, "latents.npz"), latents=np.concatenate(self.latents))
            if status != "running" and self.rows:
                write_grid(self.rows, os.path.join(self.run_dir, "grid.png"))
            self._write_metrics()

    def _write_metrics(self):
        save_json({**self.metrics, "status": self.status, "heartbeat": round(time.time(), 3),
                   "finished_samples": [m["index"] for m in self.samples], "samples": self.samples},
                  os.path.join(self.run_dir, "metrics.json"))


def _now():
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write_grid(rows, path):
    """One row per sample, one column per iteration (short rows padded with their final image)."""
    cols = max(len(r) for r in rows)
    rows = [np.stack([upscale(img) for img in r]) for r in rows]  # tiny tiles upscaled before composing
    h, w = rows[0].shape[1:3]
    grid = np.full((len(rows) * (h + 1) - 1, cols * (w + 1) - 1, 3), 255, dtype=np.uint8)
    for i, r in enumerate(rows):
        for k in range(cols):
            grid[i * (h + 1):i * (h + 1) + h, k * (w + 1):k * (w + 1) + w] = r[min(k, len(r) - 1)]
    save_png(grid, path)
