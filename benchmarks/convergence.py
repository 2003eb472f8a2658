"""Measuring methods side by side on one model: iterations to the stop and to "same image", distance, wall-clock.

"Same image": the decoded x_0 estimate differs from the decoded sequential sample by <= 1 gray level (RMS over
8-bit pixels). Every method sees the same noise and conditioning; the sequential reference runs in the same
process so that wall-clock ratios compare like with like.
"""
import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from paratAA import SolverConfig, sample_sequential, solve
from paratAA.equations import FORMS
from runner.metrics import SAME_IMAGE, image_rms, latent_rms, same_image_at


def methods_for(T, memories=(2, 3, 5), default="picard"):
    """Window T. FP (order 1, m 1; both forms of the equations coincide at order 1), FP+ (order T, m 1) in both
    forms, ParaTAA (order T, m in memories) in the default form and, at m = 3, in the other one."""
    other = FORMS[1 - FORMS.index(default)]
    out = {"FP": dict(order=1, memory_size=1)}
    for form in FORMS:
        out[f"FP+ ({form})"] = dict(order=T, memory_size=1, equations=form)
    for m in memories:
        out[f"ParaTAA m={m}"] = dict(order=T, memory_size=m, equations=default)
    out[f"ParaTAA m=3 ({other})"] = dict(order=T, memory_size=3, equations=other)
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
        dist = [latent_rms(x, ref["x0"][b]) for x in h.x0]
        same = same_image_at(rms)
        item = {"iterations": out.iterations[b], "same_image_at": same, "final_image_rms": rms[-1],
                "image_rms_history": rms, "distance_history": dist, "evaluations": out.evaluations[b]}
        if classify is not None:
            item["agreement_history"] = [bool(c == labels[b]) for c in classify(imgs)]
        per.append(item)
    return {"seconds": seconds, "samples": per}


def summarize(result):
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


class Bench:
    """What a model benchmark provides: eps_fn, decode, classify(images) -> labels, schedule(T), problem(T) ->
    (noise [S, T+1, ...], cond, labels [S]), and the script's solver defaults."""

    def __init__(self, name, eps_fn, decode, classify, schedule, problem, defaults):
        self.name, self.eps_fn, self.decode, self.classify = name, eps_fn, decode, classify
        self.schedule, self.problem, self.defaults = schedule, problem, defaults


def bench_defaults(cfg_scale):
    """What a script uses by default (SolverConfig's defaults and the model's guidance scale), so that the tables
    report what users get."""
    return {**SolverConfig().to_dict(), "cfg_scale": cfg_scale}


def _row(cells):
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def run_benchmark(bench, quick, command, machine, out_path, samples):
    """Method table for each T, tolerance sweep and window sweep at the largest T; prints markdown, writes JSON."""
    d = bench.defaults
    tol, m_default, form = d["tol1"], d["memory_size"], d["equations"]
    steps = [25] if quick else [25, 50, 100]
    memories = (3,) if quick else (2, 3, 5)
    report = {"command": command, "machine": machine, "samples": samples,
              "defaults": {k: d[k] for k in ("tol1", "tol2", "cfg_scale", "memory_size", "equations")},
              "methods": {}, "tolerance_sweep": {}, "window_sweep": {}}

    def agreement(images, labels):
        return float((bench.classify(images).numpy() == labels.numpy()).mean())

    def method_row(row_label, name, kw, T, schedule, noise, cond, labels, ref):
        res = measure(bench.eps_fn, schedule, noise, cond, bench.decode, ref, tol1=tol, tol2=tol, window_size=T,
                      classify=bench.classify, labels=labels.numpy(), **kw)
        s = summarize(res)
        s["wall_clock_ratio"] = res["seconds"] / ref["seconds"]
        s["agreement"] = float(np.mean([x["agreement_history"][-1] for x in res["samples"]]))
        _row([row_label, name, f"{fmt(s['stop_median'])} / {fmt(s['stop_max'])}",
              f"{fmt(s['same_median'])} / {fmt(s['same_max'])}",
              f"{s['ended_off']} of {samples} (max {s['max_final_rms']:.2f})", f"{s['evaluations_mean']:.0f}",
              f"{s['agreement']:.2f}", f"{s['wall_clock_ratio']:.2f}x"])
        return {"summary": s, "samples": res["samples"], **kw}

    _row(["T", "method", "stops at (median / max)", "same image at (median / max)", "runs ending > 1 level off",
          "evaluations / sample", "classifier agreement", "wall-clock vs sequential"])
    _row(["---"] * 8)
    for T in steps:
        schedule = bench.schedule(T)
        noise, cond, labels = bench.problem(T)
        ref = sequential_reference(bench.eps_fn, schedule, noise, cond, bench.decode)
        seq_agree = agreement(ref["images"], labels)
        report["methods"][T] = {"sequential_seconds": ref["seconds"], "sequential_agreement": seq_agree}
        _row([T, "sequential", T, "-", "-", T, f"{seq_agree:.2f}", "1.00x"])
        for name, kw in methods_for(T, memories, form).items():
            report["methods"][T][name] = method_row(T, name, kw, T, schedule, noise, cond, labels, ref)
    T = steps[-1]
    eta = 0.5  # one stochastic-sampler row: the per-step noise is drawn once and shared by every method
    schedule = bench.schedule(T, eta)
    noise, cond, labels = bench.problem(T)
    ref = sequential_reference(bench.eps_fn, schedule, noise, cond, bench.decode)
    report["methods"][f"{T} eta={eta}"] = {}
    for name, kw in methods_for(T, (m_default,), form).items():
        if name != "FP":  # T iterations, as at eta 0
            result = method_row(f"{T}, eta {eta}", name, kw, T, schedule, noise, cond, labels, ref)
            report["methods"][f"{T} eta={eta}"][name] = {"summary": result["summary"]}
    schedule = bench.schedule(T)
    ref = sequential_reference(bench.eps_fn, schedule, noise, cond, bench.decode)
    print(f"\nTolerance sweep, ParaTAA, T = window = order = {T}, {form} form:\n")
    _row(["m", "tol1 = tol2", "stops at (median / max)", "runs ending > 1 level off", "same image at (median / max)"])
    _row(["---"] * 5)
    for m in memories:
        for t in ([1e-3, tol] if quick else [1e-3, 3e-4, 1e-4]):
            s = summarize(measure(bench.eps_fn, schedule, noise, cond, bench.decode, ref, tol1=t, tol2=t,
                                  memory_size=m, equations=form))
            report["tolerance_sweep"][f"m={m} tol={t:g}"] = s
            _row([m, f"{t:g}", f"{fmt(s['stop_median'])} / {fmt(s['stop_max'])}",
                  f"{s['ended_off']} of {samples} (max {s['max_final_rms']:.2f})",
                  f"{fmt(s['same_median'])} / {fmt(s['same_max'])}"])
    print(f"\nWindow size, T = {T}, ParaTAA m = {m_default}, order = window, {form} form, default tolerance:\n")
    _row(["window", "stops at (median / max)", "same image at (median / max)", "evaluations / sample"])
    _row(["---"] * 4)
    for W in ([5, 25] if quick else [4, 8, 16, 25, 32, 50, 100]):
        s = summarize(measure(bench.eps_fn, schedule, noise, cond, bench.decode, ref, tol1=tol, tol2=tol,
                              window_size=W, memory_size=m_default, equations=form))
        report["window_sweep"][W] = s
        _row([W, f"{fmt(s['stop_median'])} / {fmt(s['stop_max'])}", f"{fmt(s['same_median'])} / {fmt(s['same_max'])}",
              f"{s['evaluations_mean']:.0f}"])
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"wrote {out_path}")
    return report


def bench_args(description, default_out):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes, for the smoke test")
    parser.add_argument("--out", default=default_out)
    parser.add_argument("--machine", default="2-core CPU (development container)")
    return parser.parse_args()
