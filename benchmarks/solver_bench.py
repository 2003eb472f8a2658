"""Solver benchmark: iteration counts on the closed-form model, per-iteration overhead, memory of the state.

    python benchmarks/solver_bench.py [--quick] [--out benchmarks/results/solver.json]

1. Iterations to the default stop (tol 1e-3, window = T) on a 4x32x32 mixture of 10 well-separated Gaussians,
   T in {25, 50, 100}: FP (order 1, m 1), FP+ (order T, m 1), ParaTAA (order T, m 2 and 3), FP+ and ParaTAA in
   both forms of the equations (paratAA/equations.py; no suffix: the default, picard); median over seeds.
2. Overhead: time per iteration spent outside the model call, against the model call, at T = window = 100
   with the embedded DiT (cfg 4) -- or a random DiT-S/2-sized model when the embedded one is missing; five
   solves after an untimed one.
3. Memory: growth of peak RSS while solving T = 100, m = 3, 4x64x64 latents with a free model (a fresh
   process), and the bytes of the solver's persistent buffers.
"""
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.convergence import check_out_file, command_of, write_json  # noqa: E402
from models.gmm import GaussianMixtureEps  # noqa: E402
from paratAA import dit_alphas_cumprod, dit_schedule, draw_noise, noise_from_seeds, solve  # noqa: E402
from runner.errors import exit_on_error  # noqa: E402
from runner.flags import home_path, make_parser  # noqa: E402

TOL = 1e-3  # tol1 = tol2: the reference's default, for comparison with its counts (FACTS.md); its test: settle 1
# name: (order (None: T), memory_size, form of the equations)
METHODS = {"FP": (1, 1, "picard"), "FP+ (ddim)": (None, 1, "ddim"), "FP+ (picard)": (None, 1, "picard"),
           "ParaTAA m=2 (ddim)": (None, 2, "ddim"), "ParaTAA m=3 (ddim)": (None, 3, "ddim"),
           "ParaTAA m=2": (None, 2, "picard"), "ParaTAA m=3": (None, 3, "picard")}

OUT = "benchmarks/results/solver.json"  # --out's default


def iteration_table(steps, seeds, latent):
    rows = []
    ac = dit_alphas_cumprod()
    for T in steps:
        schedule = dit_schedule(T)
        row = {"T": T}
        for name, (order, m, form) in METHODS.items():
            counts = []
            for seed in seeds:
                model = GaussianMixtureEps.random(ac, latent, components=10, std=0.1, seed=seed)
                noise = noise_from_seeds([seed], T, latent)
                out = solve(model, schedule, noise, order=order or T, memory_size=m, equations=form,
                            tol1=TOL, tol2=TOL, settle=1.0, model_dtype=torch.float64)
                counts.append(out.iterations[0])
            row[name] = {"median": statistics.median(counts), "all": counts}
        rows.append(row)
        print(f"T={T:4d}  " + "  ".join(f"{k}: {v['median']:5.1f}" for k, v in row.items() if k != "T"), flush=True)
    return rows


def overhead(T, repeats):
    from models.adapters import DiTDenoiser
    from models.dit import DiT_models
    try:
        from models.digits import load_embedded_dit
        model, name = load_embedded_dit(torch.device("cpu"), torch.float32), "embedded DiT-Digits"
    except Exception as e:  # the embedded weights are not there yet
        print(f"(embedded model unavailable: {e}; using a random DiT-S/2)")
        model, name = DiT_models["DiT-S/2"](input_size=8, num_classes=10).eval(), "random DiT-S/2 (8x8 latent)"
    latent = (model.in_channels,) + (model.x_embedder.img_size[0],) * 2
    eps = DiTDenoiser(model, cfg_scale=4.0)
    model_seconds = []

    def timed(x, t, c):
        t0 = time.perf_counter()
        out = eps(x, t, c)
        model_seconds.append(time.perf_counter() - t0)
        return out

    schedule = dit_schedule(T)
    # one untimed solve first: the first in a process also pays one-time costs (the first batched products and
    # solves load their kernels), which are not a per-iteration overhead
    solve(eps, schedule, noise_from_seeds([repeats], T, latent), torch.tensor([0]), memory_size=3, tol1=TOL, tol2=TOL)
    totals, iters = [], []
    for seed in range(repeats):
        noise = noise_from_seeds([seed], T, latent)
        t0 = time.perf_counter()
        out = solve(timed, schedule, noise, torch.tensor([seed % 10]), memory_size=3, tol1=TOL, tol2=TOL)
        totals.append(time.perf_counter() - t0)
        iters.append(out.iterations[0])
    model_time, total = sum(model_seconds), sum(totals)
    per_iter_model = model_time / sum(iters)
    per_iter_solver = (total - model_time) / sum(iters)
    res = {"model": name, "T": T, "window": T, "iterations": iters,
           "model_call_seconds": per_iter_model, "solver_seconds_per_iteration": per_iter_solver,
           "overhead_fraction": per_iter_solver / per_iter_model}
    print(f"overhead ({name}, T = window = {T}): model call {per_iter_model * 1e3:.1f} ms, solver "
          f"{per_iter_solver * 1e3:.2f} ms per iteration = {100 * res['overhead_fraction']:.1f}%", flush=True)
    return res


def _memory_child(T, m, latent):
    def free_model(x, t, c):  # costs nothing, so that only the solver's allocations count
        return torch.zeros_like(x) + 1e-3 * x
    import threading
    page = os.sysconf("SC_PAGE_SIZE")

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    noise = draw_noise(1, T, latent)
    schedule = dit_schedule(T)
    before, peak, done = rss(), [0], threading.Event()

    def poll():  # ru_maxrss would include the import peak; sample the resident size instead
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)

    thread = threading.Thread(target=poll)
    thread.start()
    solve(free_model, schedule, noise, memory_size=m, tol1=0, tol2=0, max_steps=8)
    done.set()
    thread.join()
    print(json.dumps({"peak_rss_growth_mb": (peak[0] - before) / 2 ** 20}))


def memory(T, m, latent):
    D = 1
    for d in latent:
        D *= d
    persistent = 8 * D * ((T + 1) + 2 * m * T)  # X, then the last x, r and m - 1 differences of each per state
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import solver_bench; solver_bench._memory_child({T}, {m}, {latent!r})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res.update({"T": T, "memory_size": m, "latent": list(latent), "persistent_state_mb": persistent / 2 ** 20})
    print(f"memory (T = {T}, m = {m}, latent {'x'.join(map(str, latent))}): persistent state "
          f"{res['persistent_state_mb']:.0f} MB, peak RSS growth while solving {res['peak_rss_growth_mb']:.0f} MB",
          flush=True)
    return res


def main(args):
    check_out_file(args.out, args=args)
    # every core, whatever OMP_NUM_THREADS says: the overhead is the solver's share of an iteration at the machine's
    # full speed (recorded below, as the sizes are: --quick's differ)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    quick = args.quick
    steps, seeds, latent = ([25], [0], (4, 8, 8)) if quick else ([25, 50, 100], [0, 1, 2], (4, 32, 32))
    result = {"machine": args.machine, "command": command_of("solver_bench.py", args, " --quick" if quick else "", OUT),
              "torch_threads": torch.get_num_threads(),
              "iterations_setup": {"model": "mixture of 10 Gaussians (std 0.1), one per seed", "latent": list(latent),
                                   "seeds": seeds, "tol1 = tol2": TOL, "window = order": "T"}}
    result["iterations"] = iteration_table(steps, seeds, latent)
    result["overhead"] = overhead(25 if quick else 100, 1 if quick else 5)
    result["memory"] = memory(100, 3, (4, 16, 16) if quick else (4, 64, 64))
    write_json(result, args.out)


def parse_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for the smoke test")
    parser.add_argument("--out", type=home_path, default=OUT)
    parser.add_argument("--machine", default="2-core CPU (development container)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_error(main, parse_args())
