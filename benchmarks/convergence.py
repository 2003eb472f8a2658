"""The engine of dit_bench.py and sd_bench.py: methods side by side on one model, their trade-offs, the report.

Per method: iterations to the stop rule and to "same image" (the decoded x_0 estimate differs from the decoded
sequential sample by <= 1 gray level, RMS over 8-bit pixels), distance, evaluations, wall-clock. Every method
sees the same noise and conditioning; the sequential reference runs in the same process(es) so that wall-clock
ratios compare like with like.

Under `accelerate launch` every process runs this same code in lockstep: each model call is split across the
processes (session.sharding), every process gets the gathered result, and only the main process prints and
writes. Wall-clock is measured between barriers, so it spans the slowest process; the main process's is reported.
"""
import argparse
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from paratAA import SolverConfig, sample_sequential, solve
from paratAA.equations import FORMS
from paratAA.planner import sync
from runner.errors import UsageError
from runner.flags import DIST_TIMEOUT_MAX, SEED_MAX, finite_flag, home_path, make_parser
from runner.metrics import SAME_IMAGE, image_rms, latent_rms, same_image_at
from runner.rundir import REPO_ROOT, check_output_path, save_json, write_atomic

EVOLUTION_ITERATIONS = 20  # figure (b) shows the estimates after iterations 0..20 at most
NO_CLASSIFIER = "classifier agreement: skipped (the digit classifier exists only for the embedded digits models)"


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


@dataclass
class Bench:
    """One model as the benchmarks see it, built from a script's model flags (dit_bench.py, sd_bench.py).

    eps_fn(x, timesteps, cond) -> eps; decode(latents [N, *latent]) -> uint8 images [N, H, W, 3];
    schedule(T, eta=0.0) -> paratAA.Schedule; problem(T, indices) -> (noise [n, T+1, *latent] on the device,
    conditioning of those samples, their labels [n] for the classifier or None); classify(images) -> labels [n],
    None where there is no classifier (only the embedded digits models have one); session: runner.launch.Session."""
    name: str
    eps_fn: Callable
    decode: Callable
    schedule: Callable
    problem: Callable
    num_samples: int
    defaults: dict
    session: object
    classify: Optional[Callable] = None
    info: dict = field(default_factory=dict)  # what the JSON records about the model (title, paths, labels)

    def __post_init__(self):
        self.eps_fn = CountedEps(self.eps_fn)

    def say(self, text=""):
        if self.session.is_main:
            print(text, flush=True)

    def row(self, cells):
        self.say("| " + " | ".join(str(c) for c in cells) + " |")


class CountedEps:
    """eps_fn, counting the inputs this process evaluates (a guided pair is one input): the record of the
    sharding, since a launch's processes each evaluate only their share of every call."""

    def __init__(self, eps_fn):
        self.eps_fn, self.inputs = eps_fn, 0

    def __call__(self, x, timesteps, cond):
        self.inputs += x.shape[0]
        return self.eps_fn(x, timesteps, cond)


def inputs_per_process(bench):
    """Model inputs evaluated by the busiest and the idlest process (collective: every process calls it)."""
    sharding, n = bench.session.sharding, bench.eps_fn.inputs
    return {"most": int(sharding.max(n)), "fewest": int(sharding.min(n))}


def is_flow_schedule(schedule):
    """Euler steps of a flow (a = 1 and no noise at every step): its two forms of the equations coincide."""
    return bool((schedule.a == 1).all() and (schedule.c == 0).all() and schedule.timesteps.is_floating_point())


def bench_defaults(cfg_scale):
    """What a script uses by default (SolverConfig's defaults) with the guidance scale of the run, so that the
    tables report what users get."""
    return {**SolverConfig().to_dict(), "cfg_scale": cfg_scale}


def repo_relative(path):
    """Paths inside the repository (the embedded models) recorded relative to it, not as this machine's."""
    full = os.path.abspath(path)
    return os.path.relpath(full, REPO_ROOT) if full.startswith(REPO_ROOT + os.sep) else path


def command_of(script, args, flags, default_out):
    """The command a reader repeats to get this report: the script, --out where it is not the default, and flags
    (the settings as run). The commands named every setting but --out, so that repeating the one of
    stop_seed300.json wrote over stop.json."""
    out = "" if args.out in (None, default_out) else f" --out {shlex.quote(repo_relative(args.out))}"
    return f"python benchmarks/{script}{out}{flags}"


def timed(session, fn):
    """(fn(), seconds) between barriers: in a launch of several processes it spans the slowest one."""
    session.wait()
    t0 = time.perf_counter()
    out = fn()
    sync(session.device)
    session.wait()
    return out, time.perf_counter() - t0


def sequential_reference(bench, schedule, noise, cond, **kwargs):
    """Sequential DDIM (kwargs: init, start for a warm start's reference): x_0, decoded images, seconds."""
    s = bench.session
    traj, seconds = timed(s, lambda: sample_sequential(bench.eps_fn, schedule, noise, cond, model_dtype=s.model_dtype,
                                                       sharding=s.sharding, **kwargs))
    x0 = traj[:, 0]
    return {"x0": x0, "images": bench.decode(x0), "seconds": seconds}


def solve_on(bench, schedule, noise, cond, **solver_kwargs):
    """paratAA.solve on the bench's model, its calls split across the launch's processes, the stop judged on the
    decoded image as the scripts judge it."""
    s = bench.session
    return solve(bench.eps_fn, schedule, noise, cond, model_dtype=s.model_dtype, sharding=s.sharding,
                 image_fn=bench.decode.levels, **solver_kwargs)


def measure(bench, schedule, noise, cond, ref, labels=None, keep=None, **solver_kwargs):
    """One method on a batch of samples: per-sample iteration counts and, after every iteration, the distance to
    the sequential sample (and classifier agreement when labels are given); the batch's wall-clock.
    keep: index of a sample whose decoded estimates (iterations 0..EVOLUTION_ITERATIONS) are returned too."""
    out, seconds = timed(bench.session, lambda: solve_on(bench, schedule, noise, cond, record_x0=True,
                                                         **solver_kwargs))
    per, kept = [], None
    for b, h in enumerate(out.history):
        imgs = bench.decode(torch.stack(h.x0))                                  # [K+1, H, W, 3]
        rms = [image_rms(img, ref["images"][b]) for img in imgs]
        dist = [latent_rms(x, ref["x0"][b]) for x in h.x0]
        item = {"iterations": out.iterations[b], "same_image_at": same_image_at(rms), "final_image_rms": rms[-1],
                "image_rms_history": rms, "distance_history": dist, "evaluations": out.evaluations[b]}
        if bench.classify is not None and labels is not None:
            item["agreement_history"] = [bool(c == labels[b]) for c in bench.classify(imgs)]
        if b == keep:
            kept = imgs[:EVOLUTION_ITERATIONS + 1]
        per.append(item)
    return {"seconds": seconds, "samples": per, "images": kept}


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


def capped(values, T):
    """Sizes (windows, orders, variation steps) above T act as T: each once, in order."""
    return sorted({min(v, T) for v in values})


def benchmark_steps(args):
    """The T of the method tables, ascending: the sweeps and the ablation run at the last, the largest (what
    gpu_estimate.py and figure (c) take them to be; given as --timesteps 8 4 they ran at 4)."""
    return sorted(args.timesteps) if args.timesteps else ([25] if args.quick else [25, 50, 100])


def run_benchmark(bench, args):
    """Method table for each T, eta 0.5 rows, tolerance and window sweeps and the order x memory ablation at the
    largest T; prints markdown (main process) and returns the report (written by save_report)."""
    d = bench.defaults
    tol, m_default, form = d["tol1"], d["memory_size"], d["equations"]
    steps = benchmark_steps(args)
    memories = (3,) if args.quick else (2, 3, 5)
    S = bench.num_samples
    keep = min(args.evolution_sample, S - 1)
    report = {"command": command_line(bench.session), "machine": args.machine,
              "world_size": bench.session.world_size, "model": bench.info, "samples": S,
              "defaults": {k: d[k] for k in ("tol1", "tol2", "cfg_scale", "memory_size", "equations")},
              "classifier": bench.classify is not None, "methods": {}, "tolerance_sweep": {}, "window_sweep": {}}
    if bench.classify is None:
        bench.say(NO_CLASSIFIER + "\n")
    indices = list(range(S))

    def agreement(images, labels):
        if bench.classify is None:
            return None
        return float((bench.classify(images).numpy() == labels.numpy()).mean())

    def method_row(row_label, name, kw, T, schedule, noise, cond, labels, ref, keep=None):
        res = measure(bench, schedule, noise, cond, ref, labels=None if labels is None else labels.numpy(),
                      keep=keep, tol1=tol, tol2=tol, window_size=T, **kw)
        s = summarize(res)
        s["wall_clock_ratio"] = res["seconds"] / ref["seconds"]
        s["agreement"] = (float(np.mean([x["agreement_history"][-1] for x in res["samples"]]))
                          if bench.classify is not None else None)
        bench.row([row_label, name, f"{fmt(s['stop_median'])} / {fmt(s['stop_max'])}",
                   f"{fmt(s['same_median'])} / {fmt(s['same_max'])}",
                   f"{s['ended_off']} of {S} (max {s['max_final_rms']:.2f})", f"{s['evaluations_mean']:.0f}",
                   _agreement_cell(s["agreement"]), f"{s['wall_clock_ratio']:.2f}x"])
        return {"summary": s, "samples": res["samples"], **kw}, res["images"]

    bench.row(["T", "method", "stops at (median / max)", "same image at (median / max)", "runs ending > 1 level off",
               "evaluations / sample", "classifier agreement", "wall-clock vs sequential"])
    bench.row(["---"] * 8)
    evolution = {}
    for T in steps:
        schedule = bench.schedule(T)
        noise, cond, labels = bench.problem(T, indices)
        ref = sequential_reference(bench, schedule, noise, cond)
        seq_agree = agreement(ref["images"], labels)
        report["methods"][T] = {"sequential_seconds": ref["seconds"], "sequential_agreement": seq_agree}
        bench.row([T, "sequential", T, "-", "-", T, _agreement_cell(seq_agree), "1.00x"])
        for name, kw in methods_for(T, memories, form).items():
            report["methods"][T][name], images = method_row(T, name, kw, T, schedule, noise, cond, labels, ref,
                                                            keep if T == steps[-1] else None)
            if images is not None:
                evolution[name] = images
    T = steps[-1]
    report["evolution"] = {"T": T, "sample": keep, "label": bench.info["labels"][keep], "images": evolution}
    eta = 0.5  # one stochastic-sampler row: the per-step noise is drawn once and shared by every method
    noise, cond, labels = bench.problem(T, indices)
    if not is_flow_schedule(bench.schedule(T)):  # flow matching's Euler steps add no noise: no eta rows
        schedule = bench.schedule(T, eta)
        ref = sequential_reference(bench, schedule, noise, cond)
        report["methods"][f"{T} eta={eta}"] = {}
        for name, kw in methods_for(T, (m_default,), form).items():
            if name != "FP":  # T iterations, as at eta 0
                result, _ = method_row(f"{T}, eta {eta}", name, kw, T, schedule, noise, cond, labels, ref)
                report["methods"][f"{T} eta={eta}"][name] = {"summary": result["summary"]}
    schedule = bench.schedule(T)
    ref = sequential_reference(bench, schedule, noise, cond)
    bench.say(f"\nTolerance sweep, ParaTAA, T = window = order = {T}, {form} form:\n")
    bench.row(["m", "tol1 = tol2", "stops at (median / max)", "runs ending > 1 level off",
               "same image at (median / max)"])
    bench.row(["---"] * 5)
    for m in memories:
        for t in ([1e-3, tol] if args.quick else [1e-3, 3e-4, 1e-4]):
            s = summarize(measure(bench, schedule, noise, cond, ref, tol1=t, tol2=t, memory_size=m, equations=form))
            report["tolerance_sweep"][f"m={m} tol={t:g}"] = s
            bench.row([m, f"{t:g}", f"{fmt(s['stop_median'])} / {fmt(s['stop_max'])}",
                       f"{s['ended_off']} of {S} (max {s['max_final_rms']:.2f})",
                       f"{fmt(s['same_median'])} / {fmt(s['same_max'])}"])
    bench.say(f"\nWindow size, T = {T}, ParaTAA m = {m_default}, order = window, {form} form, default tolerance:\n")
    bench.row(["window", "stops at (median / max)", "same image at (median / max)", "evaluations / sample"])
    bench.row(["---"] * 4)
    for W in capped([5, 25] if args.quick else [4, 8, 16, 25, 32, 50, 100], T):
        s = summarize(measure(bench, schedule, noise, cond, ref, tol1=tol, tol2=tol, window_size=W,
                              memory_size=m_default, equations=form))
        report["window_sweep"][W] = s
        bench.row([W, f"{fmt(s['stop_median'])} / {fmt(s['stop_max'])}",
                   f"{fmt(s['same_median'])} / {fmt(s['same_max'])}", f"{s['evaluations_mean']:.0f}"])
    if args.ablation:
        report["ablation"] = ablation(bench, args.quick, T, schedule, noise, cond, ref, tol)
    return report


def ablation(bench, quick, T, schedule, noise, cond, ref, tol):
    """Iterations to the same image and to the stop over order x memory_size, in both forms (window = T)."""
    orders = capped([1, 4, T] if quick else [1, 4, 16, T], T)
    memories = [1, 3] if quick else [1, 2, 3, 5]
    forms = ("picard", "ddim")
    cells = {}
    bench.say(f"\nAblation, T = window = {T}: iterations to the same image / to the stop (median), over order and "
              f"memory size:\n")
    bench.row(["form", "memory_size", *[f"order {k}" for k in orders]])
    bench.row(["---"] * (2 + len(orders)))
    for form in forms:
        for m in memories:
            for k in orders:
                if k == 1 and form != forms[0]:  # order 1 is the same equation in both forms
                    s = cells[f"{forms[0]} order=1 m={m}"]
                else:
                    s = summarize(measure(bench, schedule, noise, cond, ref, order=k, memory_size=m, equations=form,
                                          tol1=tol, tol2=tol))
                cells[f"{form} order={k} m={m}"] = s
            bench.row([form, m, *[f"{fmt(cells[f'{form} order={k} m={m}']['same_median'])} / "
                                  f"{fmt(cells[f'{form} order={k} m={m}']['stop_median'])}" for k in orders]])
    return {"T": T, "orders": orders, "memories": memories, "forms": list(forms), "cells": cells}


def _agreement_cell(value):
    return "-" if value is None else f"{value:.2f}"


def command_line(session=None):
    """How this run was started, every flag given, as a command a reader can repeat (session: a launch's)."""
    argv = [os.path.relpath(sys.argv[0], REPO_ROOT) if os.path.isabs(sys.argv[0]) else sys.argv[0], *sys.argv[1:]]
    several = session is not None and session.world_size > 1
    launch = f"accelerate launch --num_processes {session.world_size} " if several else "python "
    return launch + shlex.join(argv)


def save_report(report, bench, out_path):
    """The main process writes the JSON, and the per-iteration images of figure (b) beside it as
    <out>.evolution.npz (uint8 [K+1, H, W, 3] per method, keys m0, m1, ... named in the JSON)."""
    report = {**report, "model_inputs_per_process": inputs_per_process(bench)}
    if not bench.session.is_main:
        return
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    evo = report.get("evolution")
    if evo and evo.get("images"):
        side = evolution_path(out_path)
        keys = {name: f"m{i}" for i, name in enumerate(evo["images"])}
        write_atomic(side, lambda p: np.savez_compressed(p, **{keys[n]: imgs for n, imgs in evo["images"].items()}))
        report["evolution"] = {**{k: v for k, v in evo.items() if k != "images"},
                               "file": os.path.basename(side), "arrays": keys}
    write_json(report, out_path)


def write_json(report, out_path):
    """A benchmark's report, to the path its --out names (folders created), written whole or not at all: an
    interrupt mid-write (reports reach megabytes) left a truncated file where the previous report was."""
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    save_json(report, out_path, default=str)
    print(f"wrote {out_path}", flush=True)


def bench_parser(description, default_out, cfg_scale, ablation):
    """The flags every model benchmark has; the script adds its model flags (those of the script it measures)."""
    parser = make_parser(description)
    g = parser.add_argument_group("benchmark")
    g.add_argument("--quick", action="store_true", help="small sizes, for the smoke test")
    g.add_argument("--out", type=home_path, default=default_out,
                   help="the JSON written (and <out>.evolution.npz beside it)")
    g.add_argument("--machine", default="2-core CPU (development container)", help="recorded in the JSON")
    g.add_argument("--timesteps", type=int, nargs="+", default=None,
                   help="values of T measured (default: 25 50 100; --quick: 25); sweeps run at the last")
    g.add_argument("--num_samples", type=int, default=None, help="samples per method (default 10; --quick: 2)")
    g.add_argument("--evolution_sample", type=int, default=3,
                   help="the sample whose per-iteration images figure (b) shows (capped at the last sample)")
    g.add_argument("--cfg_scale", type=float, default=cfg_scale, help="classifier-free guidance scale")
    g.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=ablation,
                   help=f"order x memory_size ablation at the largest T (default: {'on' if ablation else 'off'}; "
                        f"--no-ablation turns it off)")
    add_launch_flags(g)
    return parser


def add_launch_flags(group):
    group.add_argument("--fp16", action="store_true", help="run the model in float16 (solver state stays float64)")
    group.add_argument("--dist_timeout", type=float, default=1800.0,
                       help="seconds a process waits for the others in a collective")


def check_bench_flags(args):
    """Positive sizes, and --num_samples filled in (10; --quick: 2). UsageError naming the flag."""
    for T in args.timesteps or []:
        if not 2 <= T <= 1000:
            raise UsageError(f"--timesteps must be in 2..1000, got {T}")
    check_distinct(args.timesteps or [], "--timesteps")
    check_run_flags(args)
    check_out_file(args.out, args=args)
    # the images beside it are written first: a folder of that name failed the run at its end, the report unwritten
    check_out_file(evolution_path(args.out), f"--out's {os.path.basename(evolution_path(args.out))} beside it",
                   args)
    if args.num_samples is None:
        args.num_samples = 2 if args.quick else 10
    if args.num_samples < 1 or args.evolution_sample < 0:
        raise UsageError("--num_samples must be >= 1 and --evolution_sample >= 0")


def check_run_flags(args):
    """--cfg_scale and --dist_timeout checked as the scripts check them (runner/flags.py)."""
    finite_flag(args, "cfg_scale")
    finite_flag(args, "dist_timeout", 1.0, DIST_TIMEOUT_MAX)


def check_distinct(values, flag):
    """A value given twice would be computed twice and recorded once under its name: a typo, refused."""
    if len(set(values)) < len(values):
        raise UsageError(f"{flag} must not repeat a value, got {' '.join(str(v) for v in values)}")


def check_seed_base(flag, base, n):
    """Held-out seeds base .. base + n - 1: past 0..9 (they designed the rules) and all torch generator seeds."""
    if not 10 <= base <= SEED_MAX - (n - 1):
        raise UsageError(f"{flag} must be in 10..{SEED_MAX - (n - 1)} (seeds 0-9 designed the rules, and its {n} "
                         f"seeds must be at most {SEED_MAX}), got {base}")


def seed_bases(text, n, flag="--seed_bases"):
    """A comma-separated list of held-out seed bases of n seeds each, distinct: the list, or UsageError naming
    flag."""
    try:
        bases = [int(b) for b in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} must be integers separated by commas, got {text!r}") from None
    for base in bases:
        check_seed_base(flag, base, n)
    check_distinct(bases, flag)
    return bases


def check_out_dir(path, flag):
    """A folder this run creates or writes into, checked before any work as the scripts check --output_path."""
    try:
        check_output_path(path)
    except UsageError as e:
        raise UsageError(str(e).replace("--output_path", flag)) from None


# the files a benchmark reads, by flag: --out naming one of them wrote the report over it (gpu_estimate.py --out
# naming its --dit report: exit 0, and the next run refused the file)
READ_FLAGS = ("gpu", "dit", "sd", "prompt_file", "model_path", "vae_path")


def check_out_file(path, flag="--out", args=None):
    """A file this run writes at its end (the folders above it created), checked before any work: a long run
    is never lost to an unusable path, nor writes over a file it reads (args: the flags naming those)."""
    if not path or not path.strip():
        raise UsageError(f"{flag} must not be empty")
    if os.path.isdir(path) or path.endswith(os.sep):
        raise UsageError(f"{flag} must name a file, not a folder: {path}")
    if os.path.lexists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"{flag} is not writable: {path}")
    for name in READ_FLAGS:
        read = getattr(args, name, None)
        if isinstance(read, str) and read.strip() and os.path.realpath(read) == os.path.realpath(path):
            raise UsageError(f"{flag} {path} is the file --{name} names, which this run reads: name another file")
    check_out_dir(os.path.dirname(path) or ".", f"the folder of {flag}")


def evolution_path(out):
    """The file of figure (b)'s images that a report at out names beside it."""
    return os.path.splitext(out)[0] + ".evolution.npz"
