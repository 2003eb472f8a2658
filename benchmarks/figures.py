"""The paper's figures on the embedded models, from the benchmark JSON plus two small runs.

    python benchmarks/figures.py [--quick]      # after dit_bench.py and sd_bench.py

(a) distance to the sequential sample vs iteration, one curve per method      -> fig_a_distance.png
(b) image evolution: decoded x_0 estimate per iteration, FP / FP+ / ParaTAA   -> fig_b_evolution.png
(c) window size: iterations and model evaluations vs window_size             -> fig_c_window.png
(d) ablation over order and memory size (iterations to the same image)        -> fig_d_ablation.png
(e) warm start: iterations vs variation_steps                                 -> fig_e_warm_start.png
(f) quality vs iteration: classifier agreement after k iterations             -> fig_f_quality.png
"""
import argparse
import json
import os
import sys

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.convergence import measure, sequential_reference, summarize  # noqa: E402
from models import digits  # noqa: E402
from models.adapters import DiTDenoiser, VAEDecoder  # noqa: E402
from paratAA import dit_schedule, noise_from_seeds, solve  # noqa: E402
from runner.rundir import upscale  # noqa: E402

# curves drawn: both forms of the equations (see paratAA/equations.py) for FP+ and ParaTAA at m = 3
METHODS = ["FP", "FP+ (ddim)", "FP+ (picard)", "ParaTAA m=3 (ddim)", "ParaTAA m=3"]
STYLE = {"FP": ("tab:gray", "-"), "FP+ (ddim)": ("tab:blue", "--"), "FP+ (picard)": ("tab:blue", "-"),
         "ParaTAA m=3 (ddim)": ("tab:red", "--"), "ParaTAA m=3": ("tab:red", "-")}


def padded_median(histories):
    n = max(len(h) for h in histories)
    return np.median(np.array([h + [h[-1]] * (n - len(h)) for h in histories], dtype=float), axis=0)


def fig_curves(results, key, path, ylabel, log=True, mean=False):
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, (title, res) in zip(axes[0], results.items()):
        T = max(int(t) for t in res["methods"] if t.isdigit())  # the largest T benchmarked (eta 0)
        block = res["methods"][str(T)]
        for name in METHODS:
            if name in block:
                hs = [[float(v) for v in s[key]] for s in block[name]["samples"]]
                y = (np.mean([h + [h[-1]] * (max(map(len, hs)) - len(h)) for h in hs], axis=0) if mean
                     else padded_median(hs))
                color, ls = STYLE[name]
                label = name if name.endswith(")") or name == "FP" else name + " (picard)"
                ax.plot(np.arange(len(y)), y, label=label, marker=".", color=color, ls=ls)
        ax.set_title(f"{title}, T = {T}")
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_window(results, path):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for title, res in results.items():
        ws = sorted(int(w) for w in res["window_sweep"])
        rows = [res["window_sweep"][str(w)] for w in ws]
        axes[0].plot(ws, [r["stop_median"] for r in rows], marker="o", label=f"{title}: stop")
        axes[0].plot(ws, [r["same_median"] for r in rows], marker="x", ls="--", label=f"{title}: same image")
        axes[1].plot(ws, [r["evaluations_mean"] for r in rows], marker="o", label=title)
    axes[0].set_ylabel("iterations (median)")
    axes[1].set_ylabel("model evaluations per sample")
    for ax in axes:
        ax.set_xlabel("window_size (largest T benchmarked)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_warm(sd, path):
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    pairs = {}
    for key, s in sd["warm_start"].items():
        name, v = key.rsplit(" V=", 1)
        pairs.setdefault(name, []).append((int(v), s["stop_median"], s["cold_median"]))
    for name, rows in pairs.items():
        rows.sort()
        ax.plot([r[0] for r in rows], [r[1] for r in rows], marker="o", label=f"warm: {name}")
        ax.plot([r[0] for r in rows], [r[2] for r in rows], ls=":", label=f"cold start: {name}")
    ax.set_xlabel("variation_steps")
    ax.set_ylabel("prompt2 iterations (median)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def dit_setup():
    model = digits.load_embedded_dit()
    return DiTDenoiser(model, 4.0), VAEDecoder(digits.load_embedded_vae(), torch.device("cpu"))


def fig_evolution(path, T, columns):
    eps, decode = dit_setup()
    noise = noise_from_seeds([3], T, (4, 4, 4))
    label = torch.tensor([3])
    rows = []
    names = {"FP": dict(order=1, memory_size=1)}
    for form in ("ddim", "picard"):
        names[f"FP+ ({form})"] = dict(order=T, memory_size=1, equations=form)
        names[f"ParaTAA ({form})"] = dict(order=T, memory_size=3, equations=form)
    for name, kw in names.items():
        out = solve(eps, dit_schedule(T), noise, label, record_x0=True, tol1=3e-4, tol2=3e-4, **kw)
        imgs = decode(torch.stack(out.history[0].x0[:columns]))
        rows.append((name, imgs))
    fig, axes = plt.subplots(len(rows), columns, figsize=(columns * 0.6, len(rows) * 0.8))
    for r, (name, imgs) in enumerate(rows):
        for k in range(columns):
            ax = axes[r, k]
            ax.imshow(upscale(imgs[min(k, len(imgs) - 1)]), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if k == 0:
                ax.set_ylabel(name, fontsize=5)
            if r == 0:
                ax.set_title(str(k), fontsize=6)
    fig.suptitle(f"decoded x_0 estimate after iteration k (class 3, T = {T})", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_ablation(path, T, quick):
    """One heat map per form of the equations: iterations to the same image over order x memory_size."""
    eps, decode = dit_setup()
    classes = [0, 1] if quick else list(range(10))
    noise = noise_from_seeds(classes, T, (4, 4, 4))
    labels = torch.tensor(classes)
    ref = sequential_reference(eps, dit_schedule(T), noise, labels, decode)
    orders = [1, 4, T] if quick else [1, 4, 16, T]
    memories = [1, 3] if quick else [1, 2, 3, 5]
    forms = ("picard", "ddim")
    fig, axes = plt.subplots(1, len(forms), figsize=(2 + 1.6 * len(orders), 0.9 + 0.6 * len(memories)))
    table = {}
    for ax, form in zip(axes, forms):
        grid = np.zeros((len(memories), len(orders)))
        for i, m in enumerate(memories):
            for j, k in enumerate(orders):
                if k == 1 and form != forms[0]:  # order 1 is the same equation in both forms
                    s = table[f"{forms[0]} order=1 m={m}"]
                else:
                    s = summarize(measure(eps, dit_schedule(T), noise, labels, decode, ref, order=k, memory_size=m,
                                          equations=form, tol1=3e-4, tol2=3e-4))
                grid[i, j] = s["same_median"]
                table[f"{form} order={k} m={m}"] = s
        im = ax.imshow(grid, cmap="viridis_r", vmin=0, vmax=T)
        ax.set_xticks(range(len(orders)), [str(o) for o in orders])
        ax.set_yticks(range(len(memories)), [str(m) for m in memories])
        ax.set_xlabel("order")
        ax.set_ylabel("memory_size")
        for i in range(len(memories)):
            for j in range(len(orders)):
                ax.text(j, i, f"{grid[i, j]:g}", ha="center", va="center", color="w", fontsize=7)
        ax.set_title(f"{form} form", fontsize=8)
    fig.suptitle(f"iterations to the same image (median), embedded DiT, T = window = {T}", fontsize=8)
    fig.colorbar(im, ax=list(axes))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return table


def main(args):
    torch.set_grad_enabled(False)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(args.dit) as f:
        dit = json.load(f)
    results = {"embedded DiT": dit}
    sd = None
    if os.path.exists(args.sd):
        with open(args.sd) as f:
            sd = json.load(f)
        results["embedded text-to-image"] = sd
    out = lambda name: os.path.join(args.out_dir, name)  # noqa: E731
    fig_curves(results, "distance_history", out("fig_a_distance.png"), "RMS latent distance to sequential")
    fig_evolution(out("fig_b_evolution.png"), 25 if args.quick else 100, 12 if args.quick else 20)
    fig_window(results, out("fig_c_window.png"))
    ablation = fig_ablation(out("fig_d_ablation.png"), 25 if args.quick else 100, args.quick)
    if sd is not None and "warm_start" in sd:
        fig_warm(sd, out("fig_e_warm_start.png"))
    fig_curves(results, "agreement_history", out("fig_f_quality.png"), "classifier agreement", log=False,
               mean=True)
    with open(out("ablation.json"), "w") as f:
        json.dump(ablation, f, indent=1)
    print(f"wrote figures to {args.out_dir}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dit", default="benchmarks/results/dit.json")
    parser.add_argument("--sd", default="benchmarks/results/sd.json")
    parser.add_argument("--out_dir", default="benchmarks/figures")
    main(parser.parse_args())
