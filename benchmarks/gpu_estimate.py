"""GPU wall-clock of ParaTAA vs sequential DDIM, estimated from measured per-call GPU times and CPU iteration counts.

    python benchmarks/gpu_estimate.py [--gpu benchmarks/results/gpu_h200_windows.json] [--out ...]

No GPU needed: this is arithmetic on two measurements. From the GPU JSON (benchmarks/gpu_bench.py on a GPU): the
seconds of one batched call of DiT-XL/2 and of the SD v1.5 UNet per window size (fp16, guidance doubling the
batch), and the solver's seconds per iteration. From dit.json / sd.json (CPU): the iterations the embedded models
need, per window size, to the default stop. Then for a window W needing K iterations

    ParaTAA seconds = K * (call(W) + solver),     sequential seconds = T * call(1),

with call(W) interpolated linearly between the measured window sizes and extended along the last segment past
the largest, no size charged more than a larger one (paratAA.planner.never_above_a_larger), and each model's
solver time from its own runs where the report has them. Sequential sampling is charged only its
model calls, so the one-GPU speed-ups are, if anything, understated. The G-GPU column splits each call into
shards of ceil(W / G) steps and charges K * (call(ceil(W / G)) + solver): the all-gather of the model outputs is
NOT counted here, so that column is an upper bound (benchmarks/speed_bench.py's estimate counts it). The iteration
counts are the embedded models' (real checkpoints could not be downloaded), so this assumes DiT-XL/2 and SD v1.5
converge like them; the paper reports the same order of iterations for both.
"""
import math
import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.convergence import check_out_file, command_line, write_json  # noqa: E402
from benchmarks.speed_bench import read_gpu  # noqa: E402
from models.sd import read_json  # noqa: E402
from paratAA.planner import interpolate  # noqa: E402
from runner.errors import InputFileError, UsageError, exit_on_error  # noqa: E402
from runner.flags import home_path, make_parser, path_value  # noqa: E402


def call_seconds(per_call, W):
    """per_call {inputs: seconds} (one sample: inputs = window) at W: linear between the measured sizes, and past
    the largest along its last segment, as the planner reads a curve (np.interp held the value at 32 for every
    larger window: DiT-XL/2's call of 100 was charged 0.057 s where the same report measured 0.169 s)."""
    return interpolate(per_call, W)


def read_iterations(path, flag, script):
    """(T, {window: stop median}) of a CPU benchmark's report (script: the benchmark that writes it), or one line
    naming the flag and the file."""
    cpu = read_json(path, flag)
    if f"benchmarks/{script}" not in str(cpu.get("command", "")):  # python or accelerate launch
        raise InputFileError(f"{flag}: {path} is not a report of benchmarks/{script}")
    try:
        T = max(int(t) for t in cpu["methods"] if str(t).isdigit())
        sweep = {int(w): float(s["stop_median"]) for w, s in cpu["window_sweep"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise InputFileError(f"{flag}: {path} has no window sweep of benchmarks/{script} ({type(e).__name__}: "
                             f"{e})") from None
    if not sweep or not all(w >= 1 and 1 <= k <= T for w, k in sweep.items()):
        raise InputFileError(f"{flag}: {path}: its window sweep needs windows >= 1 and iterations in 1..{T}")
    return T, sweep


# More GPUs change nothing: a window of at most T <= 1000 steps splits into one step per GPU at most. A larger count
# is a slip (10**20 was taken and named a column of the JSON), and 4096 is past any machine these runs are for.
GPUS_MAX = 4096


def main(args):
    if not 1 <= args.gpus <= GPUS_MAX:
        raise UsageError(f"--gpus must be an integer in 1..{GPUS_MAX}, got {args.gpus}")
    check_out_file(args.out, args=args)
    gpu, solver, curves = read_gpu(args.gpu)
    inputs = {"DiT-XL/2 256": ("--dit", args.dit, "dit_bench.py"), "SD1.5 UNet 512": ("--sd", args.sd, "sd_bench.py")}
    sweeps = {name: read_iterations(path, flag, script) for name, (flag, path, script) in inputs.items()}
    report = {"command": command_line(), "gpu": args.gpu, "device": gpu["device"], "dtype": gpu["dtype"],
              "solver_seconds": solver, "models": {}}
    print(f"{gpu['device']}, {gpu['dtype']}: solver {', '.join(f'{v * 1e3:.1f}' for v in solver.values())} ms per "
          f"iteration (DiT, SD; medians of the GPU runs)\n")
    G = args.gpus
    print("| GPU model (iteration counts from) | T | window | iterations to the stop (median) | ParaTAA s | "
          f"sequential s | speed-up, 1 GPU | speed-up, {G} GPUs (no communication counted) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (T, sweep) in sweeps.items():
        path, per_call, solve_seconds = inputs[name][1], curves[name], solver[name]
        seq = T * call_seconds(per_call, 1)
        rows = {}
        for W, K in sorted(sweep.items()):
            para = K * (call_seconds(per_call, W) + solve_seconds)
            sharded = K * (call_seconds(per_call, math.ceil(W / G)) + solve_seconds)
            rows[W] = {"iterations": K, "paratAA_seconds": para, "sequential_seconds": seq, "speedup": seq / para,
                       f"speedup_{G}_gpus_upper_bound": seq / sharded}
            print(f"| {name} ({os.path.basename(path)}) | {T} | {W} | {K:g} | {para:.3f} | {seq:.3f} | "
                  f"{seq / para:.2f}x | {seq / sharded:.2f}x |")
        report["models"][name] = {"iterations_from": path, "T": T, "windows": rows}
    print()
    write_json(report, args.out)


def parse_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--gpu", type=path_value, default="benchmarks/results/gpu_h200_windows.json")
    parser.add_argument("--dit", type=path_value, default="benchmarks/results/dit.json",
                        help="iteration counts for DiT-XL/2")
    parser.add_argument("--sd", type=path_value, default="benchmarks/results/sd.json",
                        help="iteration counts for the SD UNet")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs sharing each call in the last column")
    parser.add_argument("--out", type=home_path, default="benchmarks/results/gpu_estimate.json")
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_error(main, parse_args())
