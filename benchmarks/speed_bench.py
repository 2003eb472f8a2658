"""Speed a user gets with the default flags: sampling wall-clock against sequential sampling in the same process.

    python benchmarks/speed_bench.py [--quick] [--out benchmarks/results/speed.json]

1. This machine (CPU here): (a) one embedded text-to-image sample, (b) a batch of 10 embedded DiT samples, T = 100,
   cfg as the scripts; ParaTAA with window auto (the planner: paratAA/planner.py) and with every fixed window
   1, 2, 4, ..., T, against sequential DDIM of the same batch. Each time is the min and median of --repeats runs,
   alternating the methods; the thread count is stated. "auto" is timed with its cost curves already measured
   (what a second run gets from the cache); the first run's measurement is reported apart.
2. One and eight GPUs, estimated: the per-call seconds measured on one GPU by benchmarks/gpu_bench.py
   (benchmarks/results/gpu_h100.json: the cost curves its planner measured for DiT-XL/2 256 and the SD v1.5 UNet
   512, fp16, guidance doubling the batch) and the iteration counts of equation (5) (fitted on the embedded models,
   part 1), combined as the planner combines them. The one-GPU row is an estimate beside gpu_bench's measured
   end-to-end time of the same setting. Eight GPUs: each call split into shards of ceil(W / 8) inputs, plus an
   all-gather of the window's float64 outputs over NVLink (300 GB/s) or PCIe 4.0 (25 GB/s), 10 us per ring step.
"""
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from runner.errors import InputFileError, UsageError, exit_on_error, exit_quietly_on_signals  # noqa: E402

if __name__ == "__main__":  # first: Ctrl-C while torch and the models import is one line, not a traceback
    exit_quietly_on_signals()

import torch  # noqa: E402

from benchmarks.convergence import check_out_file, command_line, write_json  # noqa: E402
from models import digits  # noqa: E402
from models.adapters import DiTDenoiser, SDDenoiser, VAEDecoder  # noqa: E402
from models.dit_source import DIT_CFG_SCALE  # noqa: E402
from models.sd import EMBEDDED_SD, SD_CFG_SCALE, encode, latent_shape, load_pipeline, read_json  # noqa: E402
from paratAA import SolverConfig, Sharding, dit_schedule, noise_from_seeds, pipeline_schedule  # noqa: E402
from paratAA import sample_sequential, solve  # noqa: E402
from paratAA.planner import candidate_windows, choose, interpolate, never_above_a_larger, plan_window  # noqa: E402
from runner.flags import home_path, make_parser, path_value  # noqa: E402
from runner.launch import HOST_PAD, keep_freed_memory  # noqa: E402

NVLINK, PCIE, HOP = 300e9, 25e9, 10e-6  # bytes/s, bytes/s, seconds per ring step
GPU_MODELS = {"DiT-XL/2 256": 4 * 32 * 32, "SD1.5 UNet 512": 4 * 64 * 64}  # name: latent size D


def problems(T, quick):
    """(name, eps_fn, schedule, noise, cond, image_fn) of the two CPU settings: image_fn, the decode the scripts give
    the stop rule's image test."""
    pipe = load_pipeline(EMBEDDED_SD, torch.device("cpu"), torch.float32)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    t2i = ("text-to-image, 1 sample", SDDenoiser(pipe.unet, SD_CFG_SCALE), pipeline_schedule(pipe, T),
           noise_from_seeds([7], T, latent_shape(pipe, size, size)),
           encode(pipe, ["a handwritten digit seven"], "", torch.device("cpu")),
           VAEDecoder(pipe.vae, torch.device("cpu")).levels)
    n = 4 if quick else 10
    dit = ("DiT, batch of 10" if not quick else f"DiT, batch of {n}", DiTDenoiser(digits.load_embedded_dit(),
           DIT_CFG_SCALE), dit_schedule(T), noise_from_seeds(range(n), T, (4, 4, 4)), torch.arange(n) % 10,
           VAEDecoder(digits.load_embedded_vae(), torch.device("cpu")).levels)
    return [t2i, dit]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def cpu_table(T, repeats, quick):
    rows = {}
    print(f"CPU, {torch.get_num_threads()} threads, T = {T}, min / median of {repeats} runs (seconds)\n")
    print("| setting | method | window | iterations (max over samples) | seconds (min / median) | vs sequential |")
    print("|---|---|---|---|---|---|")
    for name, eps, schedule, noise, cond, image in problems(T, quick):
        config = SolverConfig()
        t_plan, plan = timed(lambda: plan_window(eps, schedule, noise, cond, config, Sharding(), torch.float32,
                                                 solve=solve))
        methods = {"sequential": None, "auto": plan.window, **{f"window {w}": w for w in candidate_windows(T)}}
        times = {k: [] for k in methods}
        iterations = {}
        for _ in range(repeats):  # alternate the methods: a slow moment of the machine hits all of them
            for label, W in methods.items():
                if W is None:
                    seconds, _ = timed(lambda: sample_sequential(eps, schedule, noise, cond))
                else:
                    seconds, out = timed(lambda: solve(eps, schedule, noise, cond, config, window_size=W,
                                                       image_fn=image))
                    iterations[label] = max(out.iterations)
                times[label].append(seconds)
        seq = statistics.median(times["sequential"])
        block = {"planning_seconds": t_plan, "plan": plan.to_dict(), "methods": {}}
        for label, W in methods.items():
            t_min, t_med = min(times[label]), statistics.median(times[label])
            block["methods"][label] = {"window": W, "iterations": iterations.get(label, T), "seconds_min": t_min,
                                       "seconds_median": t_med, "ratio_to_sequential": t_med / seq,
                                       "speedup": seq / t_med}
            print(f"| {name} | {label} | {W or 1} | {iterations.get(label, T)} | {t_min:.3f} / {t_med:.3f} | "
                  f"{seq / t_med:.2f}x faster |" if label != "sequential" else
                  f"| {name} | sequential | - | {T} | {t_min:.3f} / {t_med:.3f} | 1.00x |", flush=True)
        fixed = [v["seconds_median"] for k, v in block["methods"].items() if k.startswith("window")]
        block["auto_vs_best_fixed"] = block["methods"]["auto"]["seconds_median"] / min(fixed)
        print(f"| {name} | planner: window {plan.window}, predicted {plan.predicted_seconds:.3f} s (sequential "
              f"{plan.predicted_sequential_seconds:.3f} s); auto / best fixed window = "
              f"{block['auto_vs_best_fixed']:.2f}; measuring took {t_plan:.2f} s once | | | | |")
        rows[name] = block
    return rows


def allgather_seconds(n_inputs, D, G, bandwidth):
    """Ring all-gather of n_inputs float64 latents of D values among G processes."""
    if G == 1:
        return 0.0
    total = 8 * n_inputs * D
    return (G - 1) * HOP + total * (G - 1) / G / bandwidth


def read_gpu(path):
    """benchmarks/gpu_bench.py's JSON, read before any work: (the report, the solver's seconds per iteration per
    model, the per-call curves {model: {inputs: seconds}}), or InputFileError naming the file and what is wrong."""
    gpu = read_json(path, "--gpu")
    try:
        # each model's solver time from its own runs where the report has them (SD's: sd_paratAA), else the DiT's
        solver = {name: float(statistics.median(r["solver_per_iteration"] for r in gpu[runs].values()))
                  for name, runs in zip(GPU_MODELS, ("paratAA", "sd_paratAA" if "sd_paratAA" in gpu else "paratAA"))}
        # the planner's own curve where the GPU run has one (measured warm, right before its runs), else the table
        curves = {name: {int(k): float(v) for k, v in (gpu.get("default_flags", {}).get(name, {}).get("plan", {})
                                                       .get("call_seconds") or gpu["per_call"][name]).items()}
                  for name in GPU_MODELS}
        _ = gpu["device"], gpu["dtype"]  # named in the table
    except KeyError as e:
        raise InputFileError(f"--gpu: {path} has no {e} (not a report of benchmarks/gpu_bench.py)") from None
    except (AttributeError, TypeError, ValueError, statistics.StatisticsError) as e:
        raise InputFileError(f"--gpu: {path} is not a report of benchmarks/gpu_bench.py ({type(e).__name__}: "
                             f"{e})") from None
    times = list(solver.values()) + [v for c in curves.values() for v in c.values()]
    if not all(c and min(c) >= 1 for c in curves.values()) or not all(0 <= t < math.inf for t in times) \
            or not all(v > 0 for c in curves.values() for v in c.values()):
        raise InputFileError(f"--gpu: {path}: the per-call curves need window sizes >= 1 and finite seconds > 0 (the "
                             f"solver's >= 0)")
    # no size dearer than a larger one, as the planner reads its own: an H200 run's planner timed SD's call of 1 at
    # 0.0496 s and of 2 at 0.0294 s (its table: 0.0279 s), and the estimates charged sequential sampling 1.5x too much
    return gpu, solver, {name: never_above_a_larger(c) for name, c in curves.items()}


def gpu_table(gpu_json, gpu, solvers, curves):
    """The planner's choice and predicted speed-up on 1 and 8 GPUs for the committed per-call curves (solvers: each
    model's solver seconds per iteration)."""
    T = 100
    out = {"source": gpu_json, "device": gpu["device"], "dtype": gpu["dtype"], "solver_seconds": solvers, "T": T,
           "interconnect": {"nvlink_bytes_per_s": NVLINK, "pcie_bytes_per_s": PCIE, "seconds_per_ring_step": HOP},
           "models": {}}
    print(f"\nGPU, estimated from {os.path.basename(gpu_json)} ({gpu['device']}, {gpu['dtype']}), T = {T}, one sample; "
          f"the solver {', '.join(f'{v * 1e3:.1f}' for v in solvers.values())} ms per iteration\n")
    print("| model | GPUs | interconnect | window chosen | iterations (equation 5) | seconds | sequential seconds | "
          "speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for name, D in GPU_MODELS.items():
        calls = curves[name]
        out["models"][name] = {}
        for G, link, bw in ((1, "-", NVLINK), (8, "NVLink", NVLINK), (8, "PCIe 4.0", PCIE)):
            # a call of n inputs split over G GPUs costs a call of ceil(n / G), plus the gather of all n outputs
            curve = {n: interpolate(calls, math.ceil(n / G)) + allgather_seconds(n, D, G, bw) for n in range(1, T + 1)}
            plan = choose(T, 1, curve, {1: solvers[name], T: solvers[name]})
            seq = T * interpolate(calls, 1)
            key = f"{G} GPUs" + (f" {link}" if G > 1 else "")
            out["models"][name][key] = {"window": plan.window, "iterations": plan.predicted_iterations,
                                        "seconds": plan.predicted_seconds, "sequential_seconds": seq,
                                        "speedup": seq / plan.predicted_seconds}
            print(f"| {name} | {G} | {link} | {plan.window} | {plan.predicted_iterations:.1f} | "
                  f"{plan.predicted_seconds:.3f} | {seq:.3f} | {seq / plan.predicted_seconds:.2f}x (estimate) |")
    return out


def main(args):
    if args.repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {args.repeats}")
    check_out_file(args.out, args=args)
    gpu = read_gpu(args.gpu)  # before the CPU table: a bad file must not cost its minutes
    torch.set_grad_enabled(False)
    # as the scripts' CPU processes do (runner.launch.Session): the times are those a run of the scripts gets
    pad = 0 if args.malloc_as_is or not keep_freed_memory() else HOST_PAD
    T = 25 if args.quick else 100
    report = {"command": command_line(), "machine": args.machine, "threads": torch.get_num_threads(), "T": T,
              "host_pad_bytes": pad,
              "cpu": cpu_table(T, 1 if args.quick else args.repeats, args.quick)}
    report["gpu_estimate"] = gpu_table(args.gpu, *gpu)
    write_json(report, args.out)


def parse_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="T = 25, one repeat, for the smoke test")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--malloc_as_is", action="store_true",
                        help="leave the C library's malloc as it is; by default it keeps freed memory, as the scripts' "
                             "CPU processes do (runner/launch.py: keep_freed_memory)")
    parser.add_argument("--gpu", type=path_value, default="benchmarks/results/gpu_h100.json")
    parser.add_argument("--out", type=home_path, default="benchmarks/results/speed.json")
    parser.add_argument("--machine", default="2-core CPU (development container)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_error(main, parse_args())
