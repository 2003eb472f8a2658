"""Measuring methods side by side on one model: iterations to the stop and to "same image", distance, wall-clock.

"Same image": the decoded x_0 estimate differs from the decoded sequential sample by <= 1 gray level (RMS over
8-bit pixels). Every method sees the same noise and conditioning; the sequential reference runs in the same
process so that wall-clock ratios compare like with like.
"""
import statistics
import time

import numpy as np
import torch

from paratAA import sample_sequential, solve
from paratAA.cli import image_rms

SAME_IMAGE = 1.0  # gray levels


def methods_for(T, memories=(2, 3, 5)):
    """FP (order 1, m 1), FP+ (order T, m 1) and ParaTAA (order T, m in memories), window T."""
    out = {"FP": dict(order=1, memory_size=1), "FP+": dict(order=T, memory_size=1)}
    for m in memories:
        out[f"ParaTAA m={m}"] = dict(order=T, memory_size=m)
    return out


def sequential_reference(eps_fn, schedule, noise, cond, decode, model_dtype=torch.float32):
    t0 = time.perf_counter()
    x0 = sample_sequential(eps_fn, schedule, noise, cond, model_dtype=model_dtype)[:, 0]
    seconds = time.perf_counter() - t0
    return {"x0": x0, "images": decode(x0), "seconds": seconds}


def measure(eps_fn, schedule, noise, cond, decode, ref, model_dtype=torch.float32, classify=None, labels=None,
            **solver_kwargs):
    """One method on a batch of samples; per-sample iteration counts and the batch's wall-clock."""
    t0 = time.perf_counter()
    out = solve(eps_fn, schedule, noise, cond, model_dtype=model_dtype, record_x0=True, **solver_kwargs)
    seconds = time.perf_counter() - t0
    per = []
    for b, h in enumerate(out.history):
        imgs = decode(torch.stack(h.x0))                                        # [K+1, H, W, 3]
        rms = [image_rms(img, ref["images"][b]) for img in imgs]
        dist = [float((x - ref["x0"][b]).pow(2).mean().sqrt()) for x in h.x0]
        same = next((k for k, v in enumerate(rms) if v <= SAME_IMAGE), None)
        item = {"iterations": out.iterations[b], "same_image_at": same, "final_image_rms": rms[-1],
                "image_rms_history": rms, "distance_history": dist, "evaluations": out.evaluations[b]}
        if classify is not None:
            item["agreement_history"] = [bool(c == labels[b]) for c in classify(imgs)]
        per.append(item)
    return {"seconds": seconds, "samples": per}


def summarize(result, T):
    its = [s["iterations"] for s in result["samples"]]
    same = [s["same_image_at"] if s["same_image_at"] is not None else float("inf") for s in result["samples"]]
    return {"stop_median": statistics.median(its), "stop_max": max(its),
            "same_median": statistics.median(same), "same_max": max(same),
            "ended_off": sum(s["final_image_rms"] > SAME_IMAGE for s in result["samples"]),
            "max_final_rms": max(s["final_image_rms"] for s in result["samples"]),
            "evaluations_mean": float(np.mean([s["evaluations"] for s in result["samples"]])),
            "seconds": result["seconds"]}


def fmt(x):
    return "never" if x == float("inf") else (f"{x:g}" if isinstance(x, (int, float)) else str(x))
