"""GPU wall-clock of ParaTAA vs sequential DDIM, estimated from measured per-call GPU times and CPU iteration counts.

    python benchmarks/gpu_estimate.py [--gpu benchmarks/results/gpu_h200_windows.json] [--out ...]

No GPU needed: this is arithmetic on two measurements. From the GPU JSON (benchmarks/gpu_bench.py on a GPU): the
seconds of one batched call of DiT-XL/2 and of the SD v1.5 UNet per window size (fp16, guidance doubling the
batch), and the solver's seconds per iteration. From dit.json / sd.json (CPU): the iterations the embedded models
need, per window size, to the default stop. Then for a window W needing K iterations

    ParaTAA seconds = K * (call(W) + solver),     sequential seconds = T * call(1),

with call(W) interpolated linearly between the measured window sizes. Sequential sampling is charged only its
model calls, so the one-GPU speed-ups are, if anything, understated. The G-GPU column splits each call into
shards of ceil(W / G) steps and charges K * (call(ceil(W / G)) + solver): the all-gather of the model outputs is
NOT counted here, so that column is an upper bound (benchmarks/speed_bench.py's estimate counts it). The iteration
counts are the embedded models' (real checkpoints could not be downloaded), so this assumes DiT-XL/2 and SD v1.5
converge like them; the paper reports the same order of iterations for both.
"""
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.convergence import check_out_file, write_json  # noqa: E402
from models.sd import read_json  # noqa: E402
from runner.errors import exit_on_error  # noqa: E402
from runner.flags import make_parser  # noqa: E402


def call_seconds(per_call, W):
    ws = sorted(int(w) for w in per_call)
    return float(np.interp(W, ws, [per_call[str(w)] for w in ws]))


def main(args):
    check_out_file(args.out)
    gpu = read_json(args.gpu, "--gpu")
    solver = float(np.median([r["solver_per_iteration"] for r in gpu["paratAA"].values()]))
    report = {"gpu": args.gpu, "device": gpu["device"], "dtype": gpu["dtype"], "solver_seconds": solver, "models": {}}
    print(f"{gpu['device']}, {gpu['dtype']}: solver {solver * 1e3:.1f} ms per iteration (median of the GPU runs)\n")
    G = args.gpus
    print("| GPU model (iteration counts from) | T | window | iterations to the stop (median) | ParaTAA s | "
          f"sequential s | speed-up, 1 GPU | speed-up, {G} GPUs (no communication counted) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (flag, path) in {"DiT-XL/2 256": ("--dit", args.dit), "SD1.5 UNet 512": ("--sd", args.sd)}.items():
        cpu = read_json(path, flag)
        T = max(int(t) for t in cpu["methods"] if str(t).isdigit())
        per_call = gpu["per_call"][name]
        seq = T * call_seconds(per_call, 1)
        rows = {}
        for W, s in sorted(cpu["window_sweep"].items(), key=lambda kv: int(kv[0])):
            K = s["stop_median"]
            para = K * (call_seconds(per_call, int(W)) + solver)
            sharded = K * (call_seconds(per_call, math.ceil(int(W) / G)) + solver)
            rows[W] = {"iterations": K, "paratAA_seconds": para, "sequential_seconds": seq, "speedup": seq / para,
                       f"speedup_{G}_gpus_upper_bound": seq / sharded}
            print(f"| {name} ({os.path.basename(path)}) | {T} | {W} | {K:g} | {para:.3f} | {seq:.3f} | "
                  f"{seq / para:.2f}x | {seq / sharded:.2f}x |")
        report["models"][name] = {"iterations_from": path, "T": T, "windows": rows}
    print()
    write_json(report, args.out)


if __name__ == "__main__":
    parser = make_parser(__doc__)
    parser.add_argument("--gpu", default="benchmarks/results/gpu_h200_windows.json")
    parser.add_argument("--dit", default="benchmarks/results/dit.json", help="iteration counts for DiT-XL/2")
    parser.add_argument("--sd", default="benchmarks/results/sd.json", help="iteration counts for the SD UNet")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs sharing each call in the last column")
    parser.add_argument("--out", default="benchmarks/results/gpu_estimate.json")
    exit_on_error(main, parser.parse_args())
