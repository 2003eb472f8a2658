"""Embedded DiT benchmark: FP, FP+ and ParaTAA against sequential DDIM, and the tolerance trade-off.

    python benchmarks/dit_bench.py [--quick] [--out benchmarks/results/dit.json]

Ten samples (class c with noise seed c, c = 0..9), window = T, cfg 4, eta 0. For each T and method: iterations
to the stop rule and to "same image" (<= 1 gray level RMS from the decoded sequential sample), how many runs
ended more than 1 gray level off, and the sampling wall-clock (decoding excluded) as a ratio to sequential
sampling in the same process. Then a tolerance sweep at T = 100 for ParaTAA.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.convergence import fmt, measure, methods_for, sequential_reference, summarize  # noqa: E402
from models import digits  # noqa: E402
from models.adapters import DiTDenoiser, VAEDecoder  # noqa: E402
from paratAA import dit_schedule  # noqa: E402
from paratAA.cli import add_solver_arguments  # noqa: E402


def script_defaults():
    """The solver defaults parallel_dit.py uses, so the table reports what users get."""
    p = argparse.ArgumentParser()
    add_solver_arguments(p)
    return vars(p.parse_args([]))


def problem(T, classes, latent):
    noise = torch.stack([torch.randn((T + 1,) + latent, generator=torch.Generator().manual_seed(c),
                                     dtype=torch.float64) for c in classes])
    return noise, torch.tensor(classes)


def main(args):
    torch.set_grad_enabled(False)
    defaults = script_defaults()
    tol = defaults["tol1"]
    model = digits.load_embedded_dit()
    eps_fn = DiTDenoiser(model, defaults["cfg_scale"])
    decode = VAEDecoder(digits.load_embedded_vae(), torch.device("cpu"))
    clf = digits.train_digit_classifier()
    classify = lambda imgs: digits.classify_images(clf, torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1)  # noqa: E731
    latent = (model.in_channels,) + (model.x_embedder.img_size[0],) * 2
    classes = [0, 1] if args.quick else list(range(10))
    steps = [25] if args.quick else [25, 50, 100]
    memories = (3,) if args.quick else (2, 3, 5)
    report = {"command": "python benchmarks/dit_bench.py" + (" --quick" if args.quick else ""),
              "machine": args.machine, "defaults": {"tol1": tol, "tol2": defaults["tol2"],
                                                    "cfg_scale": defaults["cfg_scale"],
                                                    "memory_size": defaults["memory_size"]},
              "samples": len(classes), "methods": {}, "tolerance_sweep": {}}
    print(f"| T | method | stops at (median / max) | same image at (median / max) | runs ending > 1 level off "
          f"| evaluations / sample | wall-clock vs sequential |")
    print("|---|---|---|---|---|---|---|")
    for T in steps:
        schedule = dit_schedule(T)
        noise, labels = problem(T, classes, latent)
        ref = sequential_reference(eps_fn, schedule, noise, labels, decode)
        report["methods"][T] = {"sequential_seconds": ref["seconds"],
                                "sequential_agreement": float((classify(ref["images"]) == labels.numpy()).mean())}
        for name, kw in methods_for(T, memories).items():
            res = measure(eps_fn, schedule, noise, labels, decode, ref, tol1=tol, tol2=tol, window_size=T,
                          classify=classify, labels=labels.numpy(), **kw)
            s = summarize(res, T)
            s["wall_clock_ratio"] = res["seconds"] / ref["seconds"]
            report["methods"][T][name] = {"summary": s, "samples": res["samples"], **kw}
            print(f"| {T} | {name} | {fmt(s['stop_median'])} / {fmt(s['stop_max'])} | {fmt(s['same_median'])} / "
                  f"{fmt(s['same_max'])} | {s['ended_off']} of {len(classes)} (max {s['max_final_rms']:.2f}) | "
                  f"{s['evaluations_mean']:.0f} | {s['wall_clock_ratio']:.2f}x |", flush=True)
    T = steps[-1]
    schedule = dit_schedule(T)
    noise, labels = problem(T, classes, latent)
    ref = sequential_reference(eps_fn, schedule, noise, labels, decode)
    print(f"\nTolerance sweep, T = window = order = {T}:\n")
    print("| m | tol1 = tol2 | stops at (median / max) | runs ending > 1 level off | same image at (median / max) |")
    print("|---|---|---|---|---|")
    for m in memories:
        for t in ([1e-3, tol] if args.quick else [1e-3, 3e-4, 1e-4]):
            res = measure(eps_fn, schedule, noise, labels, decode, ref, tol1=t, tol2=t, memory_size=m)
            s = summarize(res, T)
            report["tolerance_sweep"][f"m={m} tol={t:g}"] = s
            print(f"| {m} | {t:g} | {fmt(s['stop_median'])} / {fmt(s['stop_max'])} | {s['ended_off']} of "
                  f"{len(classes)} (max {s['max_final_rms']:.2f}) | {fmt(s['same_median'])} / {fmt(s['same_max'])} |",
                  flush=True)
    print(f"\nWindow size, T = {T}, ParaTAA m = {defaults['memory_size']}, order = window, default tolerance:\n")
    print("| window | stops at (median / max) | same image at (median / max) | evaluations / sample |")
    print("|---|---|---|---|")
    report["window_sweep"] = {}
    for W in ([5, 25] if args.quick else [4, 8, 16, 25, 32, 50, 100]):
        res = measure(eps_fn, schedule, noise, labels, decode, ref, tol1=tol, tol2=tol, window_size=W,
                      memory_size=defaults["memory_size"])
        s = summarize(res, T)
        report["window_sweep"][W] = s
        print(f"| {W} | {fmt(s['stop_median'])} / {fmt(s['stop_max'])} | {fmt(s['same_median'])} / "
              f"{fmt(s['same_max'])} | {s['evaluations_mean']:.0f} |", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/dit.json")
    parser.add_argument("--machine", default="2-core CPU (development container)")
    main(parser.parse_args())
