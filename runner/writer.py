"""The run writer: a run folder filled batch by batch, closed as complete, failed or interrupted.

metrics.json and latents.npz are rewritten after every batch, so an interrupted run keeps every finished sample
and says which ones finished. Used as a context manager:

    with RunWriter(run_dir, decode, args, config, script, labels) as writer:
        ... writer.add_batch(...) ...

On the way out it marks the run "complete", or "interrupted" (KeyboardInterrupt: SIGINT, SIGTERM) or "failed"
(any other exception), and appends (run_dir, finished samples) to the exception's `kept` list for the one-line
message (errors.py).
"""
import os

import numpy as np
import torch

from .metrics import image_rms, latent_rms, same_image_at
from .rundir import portable, save_json, save_npz, save_png, upscale


class RunWriter:
    """decode: latents [N, *latent] float64 -> uint8 [N, H, W, 3]; labels: a dict per sample (class_label or
    prompt); config: the resolved paratAA.SolverConfig; info: more entries for metrics.json."""

    def __init__(self, run_dir, decode, args, config, script, labels, info=None, world_size=1):
        self.run_dir, self.decode, self.labels = run_dir, decode, labels
        self.samples, self.latents, self.rows = [], [], []
        self.metrics = {"script": script, "world_size": world_size, "timesteps": args.timesteps,
                        **config.to_dict(), "eta": args.eta, "cfg_scale": args.cfg_scale,
                        "wall_clock_seconds": 0.0, "num_samples": len(labels),
                        **{k: portable(v) for k, v in (info or {}).items()}}
        if args.compare_sequential:
            self.metrics["sequential_wall_clock_seconds"] = 0.0

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None:
            self.flush("complete")
            return False
        self.flush("interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
        try:
            exc.kept = getattr(exc, "kept", []) + [(self.run_dir, len(self.samples))]
        except AttributeError:  # an exception type that takes no attributes: the folder is marked all the same
            pass
        return False

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
            m = {"index": i, **self.labels[i], "iterations": res.iterations[j],
                 "converged": bool(res.converged[j]), "model_evaluations": res.evaluations[j],
                 "residual_history": h.residual, "boundary_history": h.boundary, "taa_fallbacks": sum(h.fallbacks)}
            if seq is not None:
                m["sequential_distance_history"] = [latent_rms(x, seq[j]) for x in x0]
                m["image_rms_history"] = [image_rms(img, seq_imgs[j]) for img in imgs]
                m["iterations_to_same_image"] = same_image_at(m["image_rms_history"])
                m["final_image_rms"] = m["image_rms_history"][-1]
                save_png(seq_imgs[j], os.path.join(folder, "sequential.png"))
            self.samples.append(m)
            self.rows.append(imgs)
        self.latents.append(res.samples.to(torch.float32).cpu().numpy())
        self.metrics["wall_clock_seconds"] += seconds
        if seq is not None:
            self.metrics["sequential_wall_clock_seconds"] += seq_seconds
        self.flush(status="running")

    def flush(self, status):
        """status: running (more batches to come), complete, interrupted, or failed."""
        if self.latents:
            save_npz(os.path.join(self.run_dir, "latents.npz"), latents=np.concatenate(self.latents))
        if status != "running" and self.rows:
            write_grid(self.rows, os.path.join(self.run_dir, "grid.png"))
        save_json({**self.metrics, "status": status, "finished_samples": [m["index"] for m in self.samples],
                   "samples": self.samples}, os.path.join(self.run_dir, "metrics.json"))


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
