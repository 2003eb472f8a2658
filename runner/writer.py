"""The run writer: a run folder filled batch by batch, closed as complete, failed or interrupted.

metrics.json and latents.npz are rewritten after every batch, so an interrupted run keeps every finished sample
and says which ones finished. Used as a context manager:

    with RunWriter(run_dir, decode, args, config, script, label, num_samples) as writer:
        ... writer.add_batch(...) ...

On the way out it marks the run "complete", or "interrupted" (KeyboardInterrupt: SIGINT, SIGTERM) or "failed"
(any other exception), and, when some samples finished, appends (run_dir, finished samples) to the exception's
`kept` list for the one-line message (errors.py).

A live run also says it is alive: metrics.json holds the writing process's pid and host, and "heartbeat" (seconds
since the epoch) rewritten every HEARTBEAT seconds. A run whose status is still "running" but whose heartbeat is
older than a few HEARTBEAT intervals was killed (SIGKILL, a lost machine): README, "Output layout".
"""
import math
import os
import shutil
from collections import namedtuple
import socket
import threading
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .errors import OutputError, add_kept, cannot_write, signals_held
from .metrics import image_rms, latent_rms, same_image_at, same_image_summary
from .rundir import portable, save_json, save_npz, save_png, upscale

FINAL, STOP, CUT, EMPTY, INK = (0, 150, 60), (210, 30, 30), (235, 140, 0), (232, 232, 232), (20, 20, 20)  # grid
MAX_TILE, LABEL_CHARS = 128, 32  # grid tile size (pixels) and row label length (characters)

HEARTBEAT = 10.0     # seconds between heartbeats of a live run
INDEXING = {  # how metrics.json's per-iteration lists are indexed
    "residual_history, boundary_history, stop_estimate_history, stop_image_history":
        "entry k is iteration k + 1 (one entry per iteration; the stop estimate is null before the window reaches x_0, "
        "the image estimate where the stop rule did not decode the image)",
    "image_rms_history, sequential_distance_history, sample_<i>/step_<k>.png":
        "entry k is the x_0 estimate after iteration k; entry 0 is the initial state (before iteration 1)",
    "iterations_to_same_image": "the first k of image_rms_history within 1 gray level (0: already the initial state)",
}
# a finished sample, appended whole once its folder is written: its metrics.json record, latent [1, *latent],
# x_T [1, *latent] or None, grid row or None
Finished = namedtuple("Finished", "record latent x_T row")
GRID_SAMPLES = 32    # grid.png shows the first samples only (every sample has its own folder of images)
RECORD_BYTES = 4096  # what one sample's record in metrics.json holds in memory, at most (for the memory check)


class RunWriter:
    """decode: latents [N, *latent] float64 -> uint8 [N, H, W, 3]; label(i): a dict for sample i (class_label or
    prompt); config: the resolved paratAA.SolverConfig; info: more entries for metrics.json."""

    def __init__(self, run_dir, decode, args, config, script, label, num_samples, info=None, world_size=1):
        self.run_dir, self.decode, self.label = run_dir, decode, label
        # one Finished per sample, so that metrics.json, latents.npz and grid.png always list the same samples
        self.finished = []
        self.metrics = {"script": script, "world_size": world_size, "timesteps": args.timesteps,
                        **config.to_dict(), "eta": args.eta, "cfg_scale": args.cfg_scale,
                        "wall_clock_seconds": 0.0, "num_samples": num_samples,
                        **{k: portable(v) for k, v in (info or {}).items()},
                        "pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
                        "heartbeat_seconds": HEARTBEAT}
        if args.compare_sequential:
            self.metrics["sequential_wall_clock_seconds"] = 0.0
        self.metrics["indexing"] = INDEXING
        self.sequential_estimate = 0.0  # seconds sequential sampling would have taken (per-call time x calls)
        self.batches = 0
        self.predicted = 0.0  # the plan's predicted seconds of the batches so far, each at its own size
        self.status = "running"
        self._lock = threading.RLock()  # the main thread may re-enter it when a signal interrupts a flush
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)

    def __enter__(self):
        self.flush("running")
        self._beat.start()
        return self

    @property
    def samples(self):
        """metrics.json's record of each finished sample."""
        return [f.record for f in self.finished]

    def __exit__(self, kind, exc, tb):
        self._stop.set()
        self._beat.join()
        status = "complete" if exc is None else "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        failure = None
        with signals_held():  # the last files are written whatever the terminal does meanwhile
            try:
                self.flush(status)
            except OutputError as e:  # a full disk: the samples written before stay, metrics.json says it failed
                failure = e
                self.status = "failed"
                try:
                    self._write_metrics()
                except OutputError:
                    pass
        error = exc if exc is not None else failure  # the first cause is the one said
        if error is not None and self.samples:  # a folder that finished nothing is removed (loop.sample_into)
            add_kept(error, self.run_dir, len(self.samples))
        if exc is None and failure is not None:
            raise failure
        return False

    def _heartbeat(self):
        while not self._stop.wait(HEARTBEAT):
            with self._lock:
                try:
                    self._write_metrics()
                except OutputError:  # a full disk: the main thread's next write says it
                    pass

    def set_plan(self, config, plan, call_seconds):
        """The window used (chosen by the planner when --window_size auto) and the measured seconds of one model
        call of one state per sample (None when --compare_sequential measures sequential sampling instead)."""
        with self._lock:
            self.metrics.update(config.to_dict())
            self.metrics["window_chosen_by"] = "planner" if plan is not None else "flags"
            self.metrics["plan"] = plan.to_dict() if plan is not None else None
            self.metrics["per_call_seconds"] = call_seconds

    def set_last_batch_call(self, samples, call_seconds):
        """The last batch holds fewer samples than the others: its per-call time, measured at its size."""
        with self._lock:
            self.metrics["last_batch_per_call_seconds"] = {"samples": samples, "seconds": call_seconds}

    def add_batch(self, start, res, seq, seconds, seq_seconds, seq_estimate=None, x_T=None, predicted=None):
        """res: the batch's SolveResult (record_x0), seq: its sequential x_0 [B, *latent] or None;
        seq_estimate: what sequential sampling of the batch would take, from the measured per-call time;
        predicted: the plan's prediction of the batch's sampling time (Plan.predict), window auto;
        x_T: the batch's initial noise [B, *latent] (kept in latents.npz, to replay a run in diffusers)."""
        seq_imgs = self.decode(seq) if seq is not None else None
        for j, h in enumerate(res.history):
            i = start + j
            x0 = torch.stack(h.x0)                                               # [K+1, *latent]
            imgs = self.decode(x0)                                               # [K+1, H, W, 3]
            m = {"index": i, **self.label(i), "iterations": res.iterations[j],
                 "converged": bool(res.converged[j]), "model_evaluations": res.evaluations[j],
                 "residual_history": h.residual, "boundary_history": h.boundary, "taa_fallbacks": sum(h.fallbacks),
                 "stopped_by": "stop rule" if h.stopped else "boundary" if res.converged[j] else "max_steps",
                 "stop_estimate_history": [None if math.isnan(v) else v for v in h.estimate],
                 "stop_image_history": [v if math.isfinite(v) else None for v in h.image_estimate]}
            if seq is not None:
                m["sequential_distance_history"] = [latent_rms(x, seq[j]) for x in x0]
                m["image_rms_history"] = [image_rms(img, seq_imgs[j]) for img in imgs]
                m["iterations_to_same_image"] = same_image_at(m["image_rms_history"])
                m["final_image_rms"] = m["image_rms_history"][-1]
                final = m["iterations_to_same_image"]
            else:  # without the sequential sample: the first image within 1 gray level of the sample's own last,
                # where that last is final (one --max_steps cut short would be marked at its last column, as if done)
                final = same_image_at([image_rms(img, imgs[-1]) for img in imgs]) if res.converged[j] else None
            self._write_folder(i, imgs, seq_imgs[j] if seq is not None else None)
            self.finished.append(Finished(  # one append: a signal never splits a sample's entry
                m, res.samples[j:j + 1].to(torch.float32).cpu().numpy(),
                None if x_T is None else x_T[j:j + 1].to(torch.float32).cpu().numpy(),
                (imgs, _row_label(i, self.label(i)), final, m["stopped_by"] == "max_steps")
                if i < GRID_SAMPLES else None))
        with self._lock:
            self.metrics["wall_clock_seconds"] += seconds
            self.sequential_estimate += seq_estimate or 0.0
            self.predicted += predicted or 0.0
            self.batches += 1
            if seq is not None:
                self.metrics["sequential_wall_clock_seconds"] += seq_seconds
        self.flush("running")

    def _write_folder(self, i, imgs, sequential):
        """sample_<i>/: the x_0 estimate after every iteration, and the sequential sample. A sample interrupted
        while its folder is written leaves no folder: it is not finished."""
        folder = os.path.join(self.run_dir, f"sample_{i}")
        try:
            os.makedirs(folder, exist_ok=True)
            for k, img in enumerate(imgs):
                save_png(img, os.path.join(folder, f"step_{k}.png"))
            if sequential is not None:
                save_png(sequential, os.path.join(folder, "sequential.png"))
        except BaseException as e:
            shutil.rmtree(folder, ignore_errors=True)
            if isinstance(e, OSError):  # makedirs on a full disk
                raise cannot_write(folder, e) from None
            raise

    def flush(self, status):
        """status: running (more batches to come), complete, interrupted, or failed."""
        with self._lock:
            self.status = status
            done = list(self.finished)  # the samples finished now, the same in every file written below
            if done:
                arrays = {"latents": np.concatenate([f.latent for f in done])}
                if all(f.x_T is not None for f in done):
                    arrays["x_T"] = np.concatenate([f.x_T for f in done])
                save_npz(os.path.join(self.run_dir, "latents.npz"), **arrays)
            rows = [f.row for f in done if f.row is not None]
            if status != "running" and rows:
                reference = "the sequential sample" if "sequential_wall_clock_seconds" in self.metrics else \
                    "the sample's last"
                save_png(draw_grid(rows, reference), os.path.join(self.run_dir, "grid.png"))
            self._write_metrics(done)

    def speed(self, samples=None):
        """What the run gained: sampling time against sequential sampling (measured or estimated)."""
        wall = self.metrics["wall_clock_seconds"]
        measured = self.metrics.get("sequential_wall_clock_seconds")
        out = {"sampling_seconds": wall, "batches": self.batches}
        if measured is not None:
            out.update(sequential_seconds=measured, sequential_measured=True,
                       sequential="measured (--compare_sequential)")
        elif self.sequential_estimate:
            out.update(sequential_seconds=self.sequential_estimate, sequential_measured=False,
                       sequential="estimated: model calls x measured seconds per call (per_call_seconds; a "
                                  "smaller last batch: last_batch_per_call_seconds)")
        if out.get("sequential_seconds") and wall > 0:
            out["speedup"] = out["sequential_seconds"] / wall
        # samples --max_steps stopped before they converged: the speed-up is not one to the sequential image (the
        # terminal line says so; metrics.json said it only per sample)
        out["unfinished"] = sum(1 for m in (self.samples if samples is None else samples) if not m["converged"])
        plan = self.metrics.get("plan")
        if plan:
            out["predicted_sampling_seconds"] = self.predicted  # the plan's predicted_seconds is its first batch's
        same = [m["iterations_to_same_image"] for m in (self.samples if samples is None else samples)
                if "iterations_to_same_image" in m]
        if same:
            out["same_image_at"] = same_image_summary(same)
        return out

    def _write_metrics(self, done=None):
        samples = [f.record for f in (self.finished if done is None else done)]
        save_json({**self.metrics, "speed": self.speed(samples), "status": self.status,
                   "heartbeat": round(time.time(), 3),
                   "finished_samples": [m["index"] for m in samples], "samples": samples},
                  os.path.join(self.run_dir, "metrics.json"))


def _now():
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _row_label(i, label):
    """One line (a prompt's newlines and tabs drawn as spaces), at most LABEL_CHARS characters."""
    text = label.get("prompt") or (f"class {label['class_label']}" if "class_label" in label else "")
    text = " ".join(f"{i}: {text}".split())
    return text if len(text) <= LABEL_CHARS else text[:LABEL_CHARS - 3] + "..."


def _tile(img):
    """Tiny images (the 8x8 digits) upscaled to >= 64 px, large ones shown at most MAX_TILE px (each sample's own
    folder has them full size)."""
    im = Image.fromarray(upscale(img))
    if max(im.size) > MAX_TILE:
        k = MAX_TILE / max(im.size)
        im = im.resize((max(1, round(im.size[0] * k)), max(1, round(im.size[1] * k))), Image.BILINEAR)
    return im


def _font():
    """DejaVu Sans (matplotlib, a requirement, ships it): Pillow's own font has no accented or non-Latin letters
    (a prompt's "é" drew as a box) and at its default size a space about a pixel wide ("digitseven")."""
    try:
        import matplotlib
        return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf"), 11)
    except (ImportError, OSError):
        return ImageFont.load_default(size=12)


def draw_grid(rows, reference):
    """grid.png: one labelled row per sample, one column per iteration (column k: the x_0 estimate after iteration
    k; 0 is the initial state). A green frame marks the first image within 1 gray level of `reference`, a red one
    the iteration the sample stopped at, an orange one instead where --max_steps cut it short before it converged
    (a red frame read as a finished sample); a sample that stopped earlier than others leaves its later cells empty.

    rows: [(images [K+1] uint8 [H, W, 3], label text, index of the first final image or None, cut short)].
    Returns a uint8 array [H, W, 3]."""
    font = _font()
    tiles = [[_tile(img) for img in imgs] for imgs, _, _, _ in rows]
    tw, th = tiles[0][0].size
    cols = max(len(r) for r in tiles)
    pad, head, foot = 4, 16, 34
    stopped = "red: the iteration the sample stopped at" + \
        ("; orange: where --max_steps cut it short, not converged" if any(cut for *_, cut in rows) else "")
    notes = (f"column k: the x_0 estimate after iteration k (0: the initial state). green: the first image within 1 "
             f"gray level of {reference}", stopped)
    label_w = 12 + math.ceil(max(font.getlength(text) for _, text, _, _ in rows))
    width = max(label_w + cols * (tw + pad) + pad, 8 + math.ceil(max(font.getlength(n) for n in notes)))
    grid = Image.new("RGB", (width, head + len(rows) * (th + pad) + pad + foot), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for k in range(cols):
        draw.text((label_w + k * (tw + pad) + pad + (tw - font.getlength(str(k))) // 2, 1), str(k), fill=INK,
                  font=font)
    for i, (row, (_, text, final, cut)) in enumerate(zip(tiles, rows)):
        y = head + i * (th + pad) + pad
        draw.text((4, y + th // 2 - 6), text, fill=INK, font=font)
        for k in range(cols):
            x = label_w + k * (tw + pad) + pad
            if k < len(row):
                grid.paste(row[k], (x, y))
            else:  # the sample had stopped
                draw.rectangle([x, y, x + tw - 1, y + th - 1], fill=EMPTY)
        for k, colour, inset in ((len(row) - 1, CUT if cut else STOP, -2), (final, FINAL, 0)):
            if k is not None:
                x = label_w + k * (tw + pad) + pad
                draw.rectangle([x + inset, y + inset, x + tw - 1 - inset, y + th - 1 - inset], outline=colour, width=2)
    y = grid.size[1] - foot + 3
    draw.text((4, y), notes[0], fill=FINAL, font=font)
    draw.text((4, y + 15), notes[1], fill=STOP, font=font)
    return np.asarray(grid)
