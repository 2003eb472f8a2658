"""The stop rule and the default form, measured on samples not used to design them.

    python benchmarks/stop_bench.py [--quick] [--out benchmarks/results/stop.json]

1. Stop against "same image" (T = 25, 50, 100; eta 0 and 0.5; window = order = T; 10 samples each): iterations to
   the stop, to the first iterate that is the sequential sample's image (<= 1 gray level; the Gaussian mixture:
   latent RMS <= 0.01 of the sequential x_0's std), their difference, and runs ending off. The default rule (the
   stop rule, tolerance 1e-4, settle 0.1) against the same without settling at x_0 (--settle 1, the default before
   it), the per-state rule the project had before that (--stop_tol 0, tolerance 3e-4) and the reference's
   (--stop_tol 0, tolerance 1e-3). Held-out samples, none of them used while the rule was designed
   (the design used class/prompt c with noise seed c, and mixture seeds 0-9):
      embedded DiT      class c with noise seed 100 + c, c = 0..9
      text-to-image     noise seed 100 + c, wordings the model was not trained on: "a digit <name>" (c even),
                        "handwritten digit <name>" (c odd)
      mixture           4x32x32, 10 components, std 0.1; mixture and noise seed 100 + s, s = 0..9
   --seed_base N moves every held-out seed from 100 + c to N + c (N >= 10: the design used 0..9), for more samples
   none of which was used in the design.
   --looser_tolerances adds the stop rule with looser per-state tolerances (tol1, tol2): they freeze states
   sooner, which saves iterations at small windows, and the table shows what they cost on these samples.
   --windows W [W ...] instead: T = 100, eta 0, at those windows, the default against the stop on E alone
   (--stop_image_tol 0), --block_tol 0 (each state tested alone while the window slides, the default before it),
   --settle 1 and the opt-in --slide_tol
   (docs/ALGORITHM.md, section 4): what each test while the window is short of x_0 saves, and what it costs.
2. The default (picard) form against the paper's (ddim): the mixture at T 25/50/100, m 2/3, seeds 0-4 (tolerance
   1e-3, per-state stop: the grid the form was judged on), the ratio of the worst iteration counts.
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

from benchmarks.convergence import check_distinct, check_out_file, check_seed_base, command_of, write_json  # noqa: E402
from models import digits  # noqa: E402
from models.adapters import DiTDenoiser, SDDenoiser, VAEDecoder  # noqa: E402
from models.gmm import GaussianMixtureEps  # noqa: E402
from models.sd import EMBEDDED_SD, encode, latent_shape, load_pipeline  # noqa: E402
from paratAA import dit_alphas_cumprod, dit_schedule, noise_from_seeds, pipeline_schedule  # noqa: E402
from paratAA import sample_sequential, solve  # noqa: E402
from runner.flags import home_path, make_parser  # noqa: E402
from runner.metrics import SAME_IMAGE, image_rms, latent_rms  # noqa: E402

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
RULES = {"default (stop rule, tol 1e-4)": {},
         "stop rule on the latent (before)": dict(stop_image_tol=0.0),
         "stop rule, settle 1 (before)": dict(settle=1.0),
         "per-state, tol 3e-4 (before)": dict(stop_tol=0.0, tol1=3e-4, tol2=3e-4, settle=1.0),
         "per-state, tol 1e-3 (reference)": dict(stop_tol=0.0, tol1=1e-3, tol2=1e-3, settle=1.0)}
# the stop rule with looser per-state tolerances (--looser_tolerances)
LOOSER = {"stop rule, tol1 1e-3, tol2 1e-3": dict(tol1=1e-3, tol2=1e-3),
          "stop rule, tol1 1e-4, tol2 3e-3": dict(tol1=1e-4, tol2=3e-3),
          "stop rule, tol1 1e-4, tol2 1e-3": dict(tol1=1e-4, tol2=1e-3)}
GMM_SAME = 0.01  # of the sequential x_0's std

OUT = "benchmarks/results/stop.json"  # --out's default


def problems(n, seed_base=100, device=torch.device("cpu")):
    """name -> (eps_fn, schedule(T, eta), noise(T), cond, distance(x0s, ref) -> (list, threshold), model dtype,
    image_fn: the decoded image in gray levels, for the stop rule as the scripts give it; None for the mixture).
    device: where the embedded denoisers run. Prompts are encoded and images decoded on the CPU whatever it is, so
    that only the denoiser differs between devices (the mixture's exact float64 model stays on the CPU)."""
    cpu = torch.device("cpu")
    dit = digits.load_embedded_dit().to(device)
    dit_decode = VAEDecoder(digits.load_embedded_vae(), cpu)
    pipe = load_pipeline(EMBEDDED_SD, cpu, torch.float32)
    sd_decode = VAEDecoder(pipe.vae, cpu)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    prompts = [f"a digit {NAMES[c]}" if c % 2 == 0 else f"handwritten digit {NAMES[c]}" for c in range(n)]
    seeds = range(seed_base, seed_base + n)
    mixtures = [GaussianMixtureEps.random(dit_alphas_cumprod(), (4, 32, 32), components=10, std=0.1, seed=s)
                for s in seeds]

    def images(decode):
        def distance(x0s, ref):
            imgs, target = decode(torch.stack(x0s)), decode(ref[None])[0]
            return [image_rms(img, target) for img in imgs], SAME_IMAGE
        return distance

    def gmm_eps(x, t, cond):  # sample b of the batch uses mixture cond[b]
        return torch.cat([mixtures[int(c)](x[i:i + 1], t[i:i + 1]) for i, c in enumerate(cond)])

    def latents(x0s, ref):
        return [latent_rms(x, ref) for x in x0s], GMM_SAME * float(ref.std())
    return {
        "embedded DiT": (DiTDenoiser(dit, 4.0), dit_schedule,
                         lambda T: noise_from_seeds(seeds, T, (4, 4, 4)).to(device), (torch.arange(n) % 10).to(device),
                         images(dit_decode), torch.float32, dit_decode.levels),
        "text-to-image": (SDDenoiser(pipe.unet.to(device), 5.0), lambda T, eta: pipeline_schedule(pipe, T, eta),
                          lambda T: noise_from_seeds(seeds, T, latent_shape(pipe, size, size)).to(device),
                          {k: v.to(device) for k, v in encode(pipe, prompts, "", cpu).items()},
                          images(sd_decode), torch.float32, sd_decode.levels),
        "Gaussian mixture": (gmm_eps, dit_schedule, lambda T: noise_from_seeds(seeds, T, (4, 32, 32)),
                             torch.arange(n), latents, torch.float64, None),
    }


def row(cells):
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def measure(eps, sched, noise, cond, distance, dtype, image, ref, kw):
    """Solve with the overrides kw; per sample: the stop, the first iterate that is the sequential sample ref's
    (None: never), the final difference over the threshold (above 1: the run ended off) and the evaluations."""
    res = solve(eps, sched, noise, cond, record_x0=True, model_dtype=dtype, image_fn=image, **kw)
    stops, sames, finals = [], [], []
    for b, h in enumerate(res.history):
        d, threshold = distance(h.x0, ref[b])
        stops.append(res.iterations[b])
        sames.append(next((k for k, v in enumerate(d) if v <= threshold), None))
        finals.append(d[-1] / threshold)
    return stops, sames, finals, res.evaluations


def outcome(stops, sames, finals, evals):
    """What both tables record per cell."""
    return {"stop": stops, "same": sames, "off": sum(f > 1 for f in finals), "max_final": max(finals),
            "evaluations": evals}


def same_cell(sames):
    """'median / max' of the same-image iterations over the samples that reach it; max 'never' if one does not."""
    reached = [b for b in sames if b is not None]
    return f"{statistics.median(reached):g} / {max(reached) if len(reached) == len(sames) else 'never'}"


def stop_table(steps, etas, n, rules, seed_base=100):
    out = {}
    row(["model", "T", "eta", "rule", "stop (median / max)", "same (median / max)",
         "stop - same (median / max; samples that reach it)",
         "runs ending off", "max final difference (x threshold)"])
    row(["---"] * 9)
    for name, (eps, schedule, noise_of, cond, distance, dtype, image) in problems(n, seed_base).items():
        for T in steps:
            for eta in etas:
                sched, noise = schedule(T, eta), noise_of(T)
                ref = sample_sequential(eps, sched, noise, cond, model_dtype=dtype)[:, 0]
                for rule, kw in rules.items():
                    stops, sames, finals, evals = measure(eps, sched, noise, cond, distance, dtype, image, ref, kw)
                    lag = [a - b for a, b in zip(stops, sames) if b is not None]
                    s = {**outcome(stops, sames, finals, evals), "lag_median": statistics.median(lag),
                         "lag_max": max(lag)}
                    out[f"{name} T={T} eta={eta} {rule}"] = s
                    row([name, T, eta, rule, f"{statistics.median(stops):g} / {max(stops)}",
                         same_cell(sames), f"{s['lag_median']:g} / {s['lag_max']}",
                         f"{s['off']} of {n}", f"{s['max_final']:.2f}"])
    return out


def window_table(windows, n, slide_tol, seed_base):
    """T = 100, eta 0, windows < T: the default against block_tol 0, settle 1 and slide_tol, per model and window."""
    out = {}
    rules = {"default": {}, "stop rule on the latent (before)": {"stop_image_tol": 0.0},
             "block_tol 0 (before)": {"block_tol": 0.0}, "settle 1": {"settle": 1.0},
             f"slide_tol {slide_tol:g}": {"slide_tol": slide_tol}}
    row(["model", "window", "rule", "stop (median / max / mean)", "same (median / max)", "runs ending off",
         "max final difference (x threshold)"])
    row(["---"] * 7)
    for name, (eps, schedule, noise_of, cond, distance, dtype, image) in problems(n, seed_base).items():
        sched, noise = schedule(100, 0.0), noise_of(100)
        ref = sample_sequential(eps, sched, noise, cond, model_dtype=dtype)[:, 0]
        for W in windows:
            for rule, kw in rules.items():
                stops, sames, finals, evals = measure(eps, sched, noise, cond, distance, dtype, image, ref,
                                                      dict(kw, window_size=W))
                out[f"{name} W={W} {rule}"] = s = outcome(stops, sames, finals, evals)
                row([name, W, rule, f"{statistics.median(stops):g} / {max(stops)} / {statistics.mean(stops):.1f}",
                     same_cell(sames),
                     f"{s['off']} of {n}", f"{s['max_final']:.2f}"])
    return out


def forms_table(steps, seeds):
    out = {}
    print("\nThe default (picard) form against the paper's (ddim), Gaussian mixture, tolerance 1e-3, per-state stop "
          "(settle 1), "
          f"seeds {seeds[0]}-{seeds[-1]}:\n")
    row(["T", "m", "picard (default): iterations", "ddim (paper): iterations", "max picard / max ddim"])
    row(["---"] * 5)
    for T in steps:
        for m in (2, 3):
            its = {}
            for form in ("picard", "ddim"):
                its[form] = []
                for s in seeds:
                    model = GaussianMixtureEps.random(dit_alphas_cumprod(), (4, 32, 32), components=10, std=0.1,
                                                      seed=s)
                    res = solve(model, dit_schedule(T), noise_from_seeds([1000 + s], T, (4, 32, 32)), memory_size=m,
                                equations=form, tol1=1e-3, tol2=1e-3, stop_tol=0.0, settle=1.0,
                                model_dtype=torch.float64)
                    its[form].append(res.iterations[0])
            ratio = max(its["picard"]) / max(its["ddim"])
            out[f"T={T} m={m}"] = {**its, "ratio": ratio}
            row([T, m, its["picard"], its["ddim"], f"{ratio:.2f}"])
    return out


def check_flags(args, n):
    """Every flag before any model is loaded: UsageError naming it."""
    check_seed_base("--seed_base", args.seed_base, n)
    if args.windows is not None:  # given: at least one window (an empty --windows is a slip, not the default tables)
        if not args.windows or not 1 <= min(args.windows) <= max(args.windows) <= 100:  # the table's T is 100
            raise UsageError(f"--windows must be one or more sizes in 1..100 (T), got {args.windows}")
        check_distinct(args.windows, "--windows")
    if not 0 < args.slide_tol < 1:
        raise UsageError(f"--slide_tol must be a number in (0, 1), got {args.slide_tol:g}")
    check_out_file(args.out, args=args)


def main(args):
    steps, etas, n = ([25], [0.0], 3) if args.quick else ([25, 50, 100], [0.0, 0.5], 10)
    check_flags(args, n)
    torch.set_grad_enabled(False)
    rules = {**RULES, **(LOOSER if args.looser_tolerances else {})}
    flags = ((" --quick" if args.quick else "") + (" --looser_tolerances" if args.looser_tolerances else "")
             + (f" --seed_base {args.seed_base}" if args.seed_base != 100 else ""))
    if args.windows:
        flags += " --windows " + " ".join(str(w) for w in args.windows) + f" --slide_tol {args.slide_tol:g}"
        write_json({"command": command_of("stop_bench.py", args, flags, OUT), "machine": args.machine,
                    "seed_base": args.seed_base, "T": 100, "eta": 0.0,
                    "windows": window_table(args.windows, n, args.slide_tol, args.seed_base)}, args.out)
        return
    report = {"command": command_of("stop_bench.py", args, flags, OUT),
              "machine": args.machine, "seed_base": args.seed_base,
              "stop": stop_table(steps, etas, n, rules, args.seed_base),
              "forms": forms_table(steps, [0, 1] if args.quick else [0, 1, 2, 3, 4])}
    write_json(report, args.out)


def parse_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="T = 25, eta 0, 3 samples: the smoke test")
    parser.add_argument("--looser_tolerances", action="store_true",
                        help="also the stop rule with looser per-state tolerances (what they save and cost)")
    parser.add_argument("--seed_base", type=int, default=100,
                        help="first held-out seed (noise, and the mixtures'): 100 + c by default")
    parser.add_argument("--windows", type=int, nargs="*", default=None,
                        help="T = 100 at these windows: the default against --block_tol 0, --settle 1 and --slide_tol "
                             "(no stop/forms tables)")
    parser.add_argument("--slide_tol", type=float, default=8e-3, help="with --windows: the slide tolerance tried")
    parser.add_argument("--out", type=home_path, default=OUT)
    parser.add_argument("--machine", default="2-core CPU (development container)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_error(main, parse_args())
