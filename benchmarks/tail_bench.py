"""The slow tail: iterations to the same image per held-out sample, for the default and a few variants of it.

    python benchmarks/tail_bench.py [--quick] [--seed_bases 100,300,500,700] [--out benchmarks/results/tail.json]

The held-out samples of stop_bench.py (embedded DiT and text-to-image, 10 per seed base), T = 100, eta 0, window =
T. Per variant: same-image iteration of every sample (the first iterate within one gray level of the sequential
sample's image), the stop, runs ending off. The medians hide the tail; this names the samples in it.
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from runner.errors import exit_on_error, exit_quietly_on_signals  # noqa: E402

if __name__ == "__main__":  # first: Ctrl-C while torch and the models import is one line, not a traceback
    exit_quietly_on_signals()

import torch  # noqa: E402

from benchmarks.convergence import check_out_file, command_of, seed_bases, write_json  # noqa: E402
from benchmarks.stop_bench import measure, problems  # noqa: E402
from paratAA import sample_sequential  # noqa: E402
from runner.flags import home_path, make_parser  # noqa: E402

# name: SolverConfig overrides
VARIANTS = {"default (picard, m = 3)": {}, "m = 2": dict(memory_size=2), "m = 1 (no TAA)": dict(memory_size=1),
            "ddim form (the paper's)": dict(equations="ddim")}
MODELS = ("embedded DiT", "text-to-image")

OUT = "benchmarks/results/tail.json"  # --out's default


def tail(bases, T, n):
    out = {v: {"same": [], "stop": [], "off": 0, "samples": []} for v in VARIANTS}
    for base in bases:
        for name, (eps, schedule, noise_of, cond, distance, dtype, image) in problems(n, base).items():
            if name not in MODELS:
                continue
            sched, noise = schedule(T, 0.0), noise_of(T)
            ref = sample_sequential(eps, sched, noise, cond, model_dtype=dtype)[:, 0]
            for v, kw in VARIANTS.items():
                stops, sames, finals, _ = measure(eps, sched, noise, cond, distance, dtype, image, ref, kw)
                out[v]["same"] += sames
                out[v]["stop"] += stops
                out[v]["off"] += sum(f > 1 for f in finals)
                out[v]["samples"] += [f"{name}, seed {base + b}" for b in range(len(stops))]
    return out


def main(args):
    T, n = (25, 3) if args.quick else (100, 10)
    bases = seed_bases(args.seed_bases, n)
    check_out_file(args.out, args=args)
    torch.set_grad_enabled(False)
    result = tail(bases, T, n)
    print(f"T = {T}, eta 0, window = T, seed bases {args.seed_bases}: same image (median / max / mean), the samples "
          f"at the max, stop (mean / max), runs off\n")
    print("| variant | same image | slowest | stop | runs off |")
    print("|---|---|---|---|---|")
    for v, r in result.items():
        same = [s if s is not None else float("inf") for s in r["same"]]
        worst = max(same)
        slowest = "; ".join(s for s, x in zip(r["samples"], same) if x == worst)
        r.update(median=statistics.median(same), max=worst, mean=statistics.mean(same))
        print(f"| {v} | {r['median']:g} / {worst:g} / {r['mean']:.2f} | {slowest} | "
              f"{statistics.mean(r['stop']):.2f} / {max(r['stop'])} | {r['off']} |", flush=True)
    flags = (" --quick" if args.quick else "") + f" --seed_bases {args.seed_bases}"
    write_json({"command": command_of("tail_bench.py", args, flags, OUT), "machine": args.machine, "T": T,
                "variants": result}, args.out)


def parse_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="T = 25, 3 samples per seed base: the smoke test")
    parser.add_argument("--seed_bases", default="100,300,500,700",
                        help="held-out seed bases, as stop_bench.py --seed_base (comma-separated)")
    parser.add_argument("--out", type=home_path, default=OUT)
    parser.add_argument("--machine", default="2-core CPU (development container)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_error(main, parse_args())
