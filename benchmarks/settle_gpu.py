"""The settle test where the model has a round-off floor: the embedded models on a GPU (float32, and the TF32
convolutions torch allows there by default), the default (settle 0.1) against --settle 1.

    python benchmarks/settle_gpu.py --out settle_gpu.json      # on a GPU machine, under a minute
    python benchmarks/settle_gpu.py --quick                    # this CPU: checks the script runs

T = 100, eta 0, windows 100, 32 and 8, 10 samples per seed set (stop_bench.problems: classes and prompts as there),
noise seed bases 1300 (it holds the sample the plain test ends off on the CPU), 1900 and 1910. The sequential sample
is computed on the same device. Per row: iterations per sample, mean evaluations, runs ending more than one gray
level off and the largest final difference (x the threshold). What it answers: whether the tighter test, which asks
a residual that still halves to go below settle x the tolerance, costs iterations where residuals cannot go that low.
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.convergence import check_out_file, command_of, write_json  # noqa: E402
from benchmarks.stop_bench import measure, problems  # noqa: E402
from paratAA import sample_sequential  # noqa: E402
from runner.errors import exit_on_error  # noqa: E402
from runner.flags import home_path, make_parser  # noqa: E402

VARIANTS = {"settle 0.1 (default)": {}, "settle 1 (plain)": {"settle": 1.0}}


def main(args):
    if args.out is not None:
        check_out_file(args.out, args=args)
    torch.set_grad_enabled(False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n, bases, windows = (2, [1300], [100]) if args.quick else (10, [1300, 1900, 1910], [100, 32, 8])
    report = {"command": command_of("settle_gpu.py", args, " --quick" if args.quick else "", None),
              "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "T": 100, "eta": 0.0,
              "rows": []}
    for name in ["text-to-image", "embedded DiT"]:
        for base in bases:
            eps, schedule, noise_of, cond, distance, dtype, image = problems(n, base, device)[name]
            sched, noise = schedule(100, 0.0), noise_of(100)
            ref = sample_sequential(eps, sched, noise, cond, model_dtype=dtype)[:, 0]
            for W in windows:
                for variant, kw in VARIANTS.items():
                    t0 = time.perf_counter()
                    stops, sames, finals, evals = measure(eps, sched, noise, cond, distance, dtype, image, ref,
                                                          dict(kw, window_size=W))
                    r = dict(model=name, seed_base=base, window=W, variant=variant, iterations=stops,
                             evaluations=statistics.mean(evals), same=sames, final_over_threshold=finals,
                             off=sum(f > 1 for f in finals), seconds=time.perf_counter() - t0)
                    report["rows"].append(r)
                    print(f"{name} seeds {base}+ W={W} {variant}: iterations {stops}, off {r['off']} "
                          f"(max {max(finals):.2f})", flush=True)
                    if args.out:  # after every row: a run stopped by its time limit keeps the rows before
                        write_json(report, args.out)
    return report


def parse_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="2 samples, one seed set, window 100")
    parser.add_argument("--out", type=home_path, default=None)
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_error(main, parse_args())
