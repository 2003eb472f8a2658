"""How close a parallel sample is to the sequential one: in gray levels of the decoded image and in latent units.

"Same image": the decoded x_0 estimate differs from the decoded sequential sample by at most SAME_IMAGE gray
levels (RMS over 8-bit pixels). The run writer and the benchmarks both count iterations with it.
"""
import math

import numpy as np

SAME_IMAGE = 1.0  # gray levels


def image_rms(a, b):
    """RMS difference in 8-bit levels of two uint8 images."""
    return float(np.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def latent_rms(a, b):
    """RMS difference of two latents (torch tensors), in latent units."""
    return float((a.double().cpu() - b.double().cpu()).pow(2).mean().sqrt())


def same_image_at(image_rms_history):
    """Index of the first entry within SAME_IMAGE gray levels (entry 0 is the initial state), or None."""
    return next((k for k, v in enumerate(image_rms_history) if v <= SAME_IMAGE), None)


def same_image_summary(same):
    """The samples' iterations_to_same_image (None: never) -> {median, max, never, samples}. A sample that never got
    there counts as later than any iteration: the median of those that did alone came out earlier the more samples
    missed. median None: the median sample never got there; max None: some sample never did."""
    known = [v for v in same if v is not None]
    median = float(np.median([math.inf if v is None else v for v in same]))
    return {"median": median if math.isfinite(median) else None,
            "max": max(known) if len(known) == len(same) else None,
            "never": len(same) - len(known), "samples": len(same)}


def speed_summary(metrics, samples):
    """The lines a run prints at its end: iterations, window, time against sequential sampling, same image."""
    speed = metrics.get("speed") or {}
    its = [m["iterations"] for m in samples]
    plan = metrics.get("plan")
    how = (f"chosen for this hardware, predicted {speed.get('predicted_sampling_seconds', 0):.2f} s" if plan
           else "from the flags")
    lines = [f"ParaTAA: {len(its)} samples, iterations per sample {its} (window {metrics['window_size']}, {how})"]
    seq = speed.get("sequential_seconds")
    text = f"sampling {speed.get('sampling_seconds', 0):.2f} s"
    if seq:
        kind = "measured" if speed["sequential_measured"] else "estimated from the measured time per call"
        text += f"; sequential sampling {seq:.2f} s ({kind}); speed-up {speed['speedup']:.2f}x"
    unfinished = speed.get("unfinished")  # RunWriter.speed counts them
    if unfinished:  # a speed-up of samples that are not the sequential ones would mislead
        text += f" (for an unfinished run: --max_steps stopped {unfinished} of {len(its)} samples early)"
    lines.append(text)
    same = speed.get("same_image_at")
    if same and same["never"] == same["samples"]:  # e.g. --max_steps ended each before it got there
        lines.append(f"no sample reached the sequential sample's image ({same['never']} of {len(its)})")
    elif same:
        never = f"; {same['never']} of {len(its)} never did" if same.get("never") else ""
        median = f"after {same['median']:g} iterations" if same["median"] is not None else "never"
        lines.append(f"same image as sequential sampling {median} (median; max "
                     f"{same['max'] if same['max'] is not None else 'never'}{never})")
    return lines
