"""The stop rule's tolerances and ratio, swept over many held-out samples with one solve per run.

    python benchmarks/stop_sweep.py [--quick] [--seed_bases 100,300,...] [--stop_tols 0.025,0.03,0.035]
                                    [--stop_ratios 0.35] [--stop_image_tols 1.2]
                                    [--out benchmarks/results/stop_sweep.json]

The runs of stop_bench.py (embedded DiT, text-to-image, Gaussian mixture; T = 25, 50, 100; eta 0 and 0.5; window =
order = T; 10 samples per seed base, same classes, wordings and seeds) are solved once each with the stop rule off,
recording per iteration the rule's estimate E, the distance of the x_0 estimate from the sequential sample and, for
the two image models, what the image rule (equation 7) reads: the update's change of the decoded image and of x_0.
The rule only ends a sample and changes no iterate but, rarely, the x_0 of the update the latent rule ends on (the
plain step where TAA's would go beyond STOP_STEP_RATIO plain ones: `paratAA.solver.stop_rule`), so where each
(stop_tol, stop_ratio, stop_image_tol) would have stopped every run, and but for that case on what image, follows
from that record: a grid of rules costs one solve per run instead of one per rule. stop_image_tol 0 is E alone
(equation 6) on every model; above 0 the image models also have the image test (equation 7), which also judges
every stop by E. Per rule: the
settings (10 samples each) whose median stop - same image is above 1, the same pooled over the seed bases, the runs
ending more than one gray level off (the mixture: 0.01 of the sequential x_0's std), the largest final difference
and the mean iterations. The JSON keeps every record, to replay other rules.
"""
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from runner.errors import UsageError, exit_on_error, exit_quietly_on_signals  # noqa: E402

if __name__ == "__main__":  # first: Ctrl-C while torch and the models import is one line, not a traceback
    exit_quietly_on_signals()

import torch  # noqa: E402

from benchmarks.convergence import check_distinct, check_out_file, command_of, seed_bases, write_json  # noqa: E402
from benchmarks.stop_bench import problems  # noqa: E402
from paratAA import SolverConfig, sample_sequential, solve  # noqa: E402
from paratAA.solver import image_estimate, image_test_due, stop_rule  # noqa: E402
from runner.flags import home_path, make_parser  # noqa: E402

OUT = "benchmarks/results/stop_sweep.json"  # --out's default


def update_changes(image, x0s):
    """Per iteration: RMS change of the image of x_0 in the update (image: the problem's image_fn) and RMS change
    of x_0 over std(x_0) before it, as the solver measures them for the image rule."""
    images = image(torch.stack(x0s))
    change = [float((images[k] - images[k - 1]).pow(2).mean().sqrt()) for k in range(1, len(x0s))]
    moved = [float((x0s[k] - x0s[k - 1]).pow(2).mean().sqrt() / max(float(x0s[k - 1].std()), 1e-12))
             for k in range(1, len(x0s))]
    return change, moved


def record(bases, steps, etas, n):
    """One solve per run with the stop rule off: per run its setting, E per iteration (nan while the window is
    short of x_0), the distance of the x_0 estimate before iteration 1 and after each one, over the threshold, and
    for the image models the image rule's inputs (update_changes)."""
    runs = []
    for base in bases:
        for name, (eps, schedule, noise_of, cond, distance, dtype, image) in problems(n, base).items():
            for T in steps:
                for eta in etas:
                    sched, noise = schedule(T, eta), noise_of(T)
                    ref = sample_sequential(eps, sched, noise, cond, model_dtype=dtype)[:, 0]
                    res = solve(eps, sched, noise, cond, record_x0=True, model_dtype=dtype, stop_tol=0.0)
                    for b, h in enumerate(res.history):
                        d, threshold = distance(h.x0, ref[b])
                        run = {"model": name, "T": T, "eta": eta, "seed_base": base, "seed": base + b,
                               "estimate": [float(e) for e in h.estimate],
                               "distance": [float(v / threshold) for v in d]}
                        if image is not None:
                            run["image_change"], run["moved"] = update_changes(image, h.x0)
                        runs.append(run)
            print(f"recorded seed base {base}: {name}", flush=True)
    return runs


def replay(run, stop_tol, stop_ratio, stop_image_tol=0.0):
    """The iteration the solver would have stopped this recorded run at under this rule (the run's last one if it
    never fires): E <= stop_tol; where stop_image_tol > 0 and the run has an image, the image test instead at every
    such iteration, and once before (equation 7)."""
    by_image = stop_image_tol > 0 and "image_change" in run
    tested = False  # the first image test was made
    previous = math.inf
    for k, e in enumerate(run["estimate"], 1):
        stop = stop_rule(e, previous, stop_tol, stop_ratio)
        if by_image and (stop or not tested and image_test_due(e, previous, stop_ratio)):
            tested = True
            stop = image_estimate(run["image_change"][k - 1], run["moved"][k - 1], e) <= stop_image_tol
        if stop:
            return k
        previous = math.inf if math.isnan(e) else e  # nan: the window was short of x_0
    return len(run["estimate"])


def judge(runs, stop_tol, stop_ratio, stop_image_tol=0.0):
    """Per setting (model, T, eta, seed base): stop - same image per run, runs off, largest final difference."""
    settings = {}
    for r in runs:
        stop = replay(r, stop_tol, stop_ratio, stop_image_tol)
        same = next((k for k, v in enumerate(r["distance"]) if v <= 1), None)
        s = settings.setdefault(f"{r['model']} T={r['T']} eta={r['eta']} seeds {r['seed_base']}+",
                                {"lag": [], "stop": [], "off": 0, "max_final": 0.0})
        s["stop"].append(stop)
        if same is not None:
            s["lag"].append(stop - same)
        s["off"] += r["distance"][stop] > 1
        s["max_final"] = max(s["max_final"], r["distance"][stop])
    stops = [k for s in settings.values() for k in s["stop"]]
    lags = {k: statistics.median(s["lag"]) for k, s in settings.items() if s["lag"]}
    slow = {k: lag for k, lag in lags.items() if lag > 1}
    pooled = {}  # the same settings over every seed base together
    for k, s in settings.items():
        pooled.setdefault(k.split(" seeds ")[0], []).extend(s["lag"])
    pooled_slow = {k: statistics.median(v) for k, v in pooled.items() if v and statistics.median(v) > 1}
    return {"stop_tol": stop_tol, "stop_ratio": stop_ratio, "stop_image_tol": stop_image_tol,
            "settings": len(settings), "lag_above_1": slow, "pooled_lag_above_1": pooled_slow,
            "runs": len(stops), "off": sum(s["off"] for s in settings.values()),
            "max_final": max(s["max_final"] for s in settings.values()), "mean_iterations": statistics.mean(stops)}


def number_list(text, flag, field):
    """A comma-separated list of finite positive numbers, each one the solver takes as its parameter `field`
    (SolverConfig's check: stop_tol 1 or more was replayed and written, a rule the solver refuses), or UsageError
    naming flag."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} must be numbers separated by commas, got {text!r}") from None
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise UsageError(f"{flag} must be finite numbers > 0, got {text!r}")
    for v in values:
        try:
            SolverConfig(**{field: v})
        except ValueError as e:
            raise UsageError(f"{flag}: {e}") from None
    check_distinct(values, flag)
    return values


def main(args):
    steps, etas, n = ([25], [0.0], 3) if args.quick else ([25, 50, 100], [0.0, 0.5], 10)
    bases = seed_bases(args.seed_bases, n)
    tols = number_list(args.stop_tols, "--stop_tols", "stop_tol")
    ratios = number_list(args.stop_ratios, "--stop_ratios", "stop_ratio")
    image_tols = [0.0] + number_list(args.stop_image_tols, "--stop_image_tols", "stop_image_tol")  # 0: the latent rule
    check_out_file(args.out, args=args)
    torch.set_grad_enabled(False)
    runs = record(bases, steps, etas, n)
    rules = [judge(runs, t, q, i) for i in image_tols for t in tols for q in ratios]
    print(f"\n{len(runs)} runs (seed bases {args.seed_bases}), one solve each with the stop rule off; per rule:\n")
    print("| stop_image_tol (0: latent rule) | stop_tol | stop_ratio | settings with median stop - same > 1 "
          "(largest) | the same, each setting over all seed bases | runs off | largest final difference | "
          "mean iterations |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rules:
        slow = f" ({max(r['lag_above_1'].values()):g})" if r["lag_above_1"] else ""
        pooled = ", ".join(f"{k}: {v:g}" for k, v in r["pooled_lag_above_1"].items()) or "none"
        print(f"| {r['stop_image_tol']:g} | {r['stop_tol']:g} | {r['stop_ratio']:g} | "
              f"{len(r['lag_above_1'])} of {r['settings']}{slow} | {pooled} "
              f"| {r['off']} of {r['runs']} | {r['max_final']:.2f} | {r['mean_iterations']:.3f} |", flush=True)
    print("\n(the settings, and every run's record, are in the JSON)")
    flags = (" --quick" if args.quick else "") + f" --seed_bases {args.seed_bases} --stop_tols {args.stop_tols}" \
        f" --stop_ratios {args.stop_ratios} --stop_image_tols {args.stop_image_tols}"
    write_json({"command": command_of("stop_sweep.py", args, flags, OUT), "machine": args.machine,
                "rules": rules, "runs": runs}, args.out)


def parse_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="T = 25, eta 0, 3 samples per seed base: the smoke test")
    parser.add_argument("--seed_bases", default="100,300,500,700,1100,1300,1500",
                        help="first seeds of the sample sets, comma-separated (>= 10: the design used 0..9)")
    parser.add_argument("--stop_tols", default="0.025,0.03,0.035", help="stop_tol values to replay, comma-separated")
    parser.add_argument("--stop_ratios", default="0.35", help="stop_ratio values to replay, comma-separated")
    parser.add_argument("--stop_image_tols", default="1.2",
                        help="stop_image_tol values to replay (besides 0, the latent rule), comma-separated")
    parser.add_argument("--out", type=home_path, default=OUT)
    parser.add_argument("--machine", default="2-core CPU (development container)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_error(main, parse_args())
