"""Embedded text-to-image benchmark: FP, FP+ and ParaTAA against sequential DDIM, trade-offs, and warm starts.

    python benchmarks/sd_bench.py [--quick] [--out benchmarks/results/sd.json]

Ten samples, prompt "a handwritten digit <c>" with noise seed c (c = 0..9), the pipeline's own scheduler read
as DDIM, parallel_sd.py's defaults. Tables as in dit_bench.py, then the warm start of parallel_sd_winit.py:
iterations for prompt2 against variation_steps, for a similar and a dissimilar pair of digits.
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.convergence import (Bench, _row, bench_args, bench_defaults, fmt, measure,  # noqa: E402
                                    run_benchmark, sequential_reference, summarize)
from benchmarks.dit_bench import digit_classifier  # noqa: E402
from models.adapters import SDDenoiser, VAEDecoder  # noqa: E402
from models.sd import EMBEDDED_SD, SD_CFG_SCALE, encode, latent_shape, load_pipeline  # noqa: E402
from paratAA import noise_from_seeds, pipeline_schedule, sample_sequential, solve  # noqa: E402
from paratAA.denoiser import take  # noqa: E402
from runner.metrics import SAME_IMAGE, image_rms  # noqa: E402

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PAIRS = {"similar (three -> eight)": (3, 8), "dissimilar (one -> zero)": (1, 0)}


def prompt(c):
    return f"a handwritten digit {NAMES[c]}"


def warm_start_table(bench, pipe, defaults, quick, samples):
    T = 25 if quick else 100
    schedule = bench.schedule(T)
    kw = dict(tol1=defaults["tol1"], tol2=defaults["tol2"], memory_size=defaults["memory_size"],
              equations=defaults["equations"])
    latent = latent_shape(pipe, pipe.unet.config.sample_size * pipe.vae_scale_factor,
                          pipe.unet.config.sample_size * pipe.vae_scale_factor)
    noise = noise_from_seeds(range(samples), T, latent)
    table = {}
    print(f"\nWarm start (parallel_sd_winit.py), T = {T}, ParaTAA at the scripts' defaults, {samples} seeds:\n")
    _row(["pair", "variation_steps", "prompt2 iterations, warm (median / max)", "cold start (median)",
          "same image as sequential from prompt1's state at (median / max)"])
    _row(["---"] * 5)
    for name, (a, b) in PAIRS.items():
        ca = encode(pipe, [prompt(a)] * samples, "", pipe.device)
        cb = encode(pipe, [prompt(b)] * samples, "", pipe.device)
        first = solve(bench.eps_fn, schedule, noise, ca, **kw)
        cold = solve(bench.eps_fn, schedule, noise, cb, **kw).iterations
        for V in ([5, 25] if quick else [10, 20, 40, 60, 80, 100]):
            ref_traj = sample_sequential(bench.eps_fn, schedule, noise, cb, init=first.trajectory, start=V)
            ref = {"x0": ref_traj[:, 0], "images": bench.decode(ref_traj[:, 0])}
            s = summarize(measure(bench.eps_fn, schedule, noise, cb, bench.decode, ref, init=first.trajectory,
                                  variation_steps=V, **kw))
            s["cold_median"] = sorted(cold)[len(cold) // 2]
            table[f"{name} V={V}"] = s
            _row([name, V, f"{fmt(s['stop_median'])} / {fmt(s['stop_max'])}", fmt(s["cold_median"]),
                  f"{fmt(s['same_median'])} / {fmt(s['same_max'])}"])
    return table


def paradigms_table(bench, pipe, problem, defaults, quick, samples):
    """diffusers' StableDiffusionParadigmsPipeline + DDIMParallelScheduler on the same model, noise and prompts:
    batched UNet calls, evaluations and distance to our sequential DDIM, over its tolerance (window = T).
    Wall-clock (latents out, no decoding) is against sequential DDIM run one sample at a time, as ParaDiGMS runs;
    ParaTAA at the script's defaults is timed the same way, in the last row of each T."""
    import time
    from diffusers import DDIMParallelScheduler, StableDiffusionParadigmsPipeline
    para = StableDiffusionParadigmsPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                            unet=pipe.unet, scheduler=DDIMParallelScheduler.from_config(
                                                pipe.scheduler.config), safety_checker=None,
                                            feature_extractor=None, requires_safety_checker=False)
    para.set_progress_bar_config(disable=True)
    # every batched call goes through unet.forward (the pipeline uses wrapped_unet, by default the same UNet,
    # for windows of more than 3 steps and unet for the rest): count calls and inputs there
    calls = {"calls": 0, "inputs": 0}
    forward = pipe.unet.forward

    def counted(x, *a, **k):
        calls["calls"] += 1
        calls["inputs"] += x.shape[0]
        return forward(x, *a, **k)
    cfg = defaults["cfg_scale"]
    solver_kw = {k: defaults[k] for k in ("tol1", "tol2", "memory_size", "equations")}
    guided = 2 if cfg != 1 else 1  # a guided evaluation is two UNet inputs; ParaTAA counts it once
    table = {}
    print("\nParaDiGMS (diffusers StableDiffusionParadigmsPipeline, DDIMParallelScheduler, window = T), per sample:\n")
    _row(["T", "tolerance", "batched calls (median / max)", "runs ending > 1 level off", "max final difference",
          "evaluations / sample", "wall-clock vs sequential"])
    _row(["---"] * 7)
    def one_at_a_time(T, label, run, ref, seq_seconds):
        """run(i) -> (latents [1, *latent], batched calls, evaluations) for sample i; one table row."""
        counts, evals, rms, seconds = [], [], [], 0.0
        for i in range(samples):
            t0 = time.perf_counter()
            lat, n_calls, n_evals = run(i)
            seconds += time.perf_counter() - t0
            counts.append(n_calls)
            evals.append(n_evals)
            rms.append(image_rms(bench.decode(lat.double())[0], ref["images"][i]))
        s = {"calls_median": float(np.median(counts)), "calls_max": max(counts),
             "ended_off": sum(r > SAME_IMAGE for r in rms), "max_final_rms": max(rms),
             "evaluations_mean": float(np.mean(evals)), "wall_clock_ratio": seconds / seq_seconds}
        _row([T, label, f"{s['calls_median']:g} / {s['calls_max']}", f"{s['ended_off']} of {samples}",
              f"{s['max_final_rms']:.2f}", f"{s['evaluations_mean']:.0f}", f"{s['wall_clock_ratio']:.2f}x"])
        return s

    for T in ([25] if quick else [25, 50, 100]):
        noise, _, labels = problem(T)
        cond = encode(pipe, [prompt(int(c)) for c in labels], "", pipe.device)
        ref = sequential_reference(bench.eps_fn, bench.schedule(T), noise, cond, bench.decode)
        t0 = time.perf_counter()
        for i in range(samples):
            sample_sequential(bench.eps_fn, bench.schedule(T), noise[i:i + 1], take(cond, i, i + 1))
        seq_seconds = time.perf_counter() - t0

        def paradigms(i, tol):
            calls.update(calls=0, inputs=0)
            pipe.unet.forward = counted
            try:
                lat = para(prompt(int(labels[i])), num_inference_steps=T, parallel=T, tolerance=tol,
                           guidance_scale=cfg, latents=noise[i:i + 1, T].float(), output_type="latent").images
            finally:
                del pipe.unet.forward  # back to the class's forward
            return lat, calls["calls"], calls["inputs"] // guided

        def paratAA(i):
            out = solve(bench.eps_fn, bench.schedule(T), noise[i:i + 1], take(cond, i, i + 1), **solver_kw)
            return out.samples, out.iterations[0], out.evaluations[0]

        for tol in ([0.1, 0.01] if quick else [0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.001]):
            table[f"T={T} tol={tol:g}"] = one_at_a_time(T, f"{tol:g}", lambda i, tol=tol: paradigms(i, tol), ref,
                                                         seq_seconds)
        table[f"T={T} ParaTAA"] = one_at_a_time(T, "ParaTAA, defaults", paratAA, ref, seq_seconds)
    return table


def head_to_head(report):
    """Iterations to the same image, side by side: ParaDiGMS at the loosest tolerance whose runs all end on the
    same image, FP+ in both forms and ParaTAA, all from this run."""
    print("\nSame image, side by side (iterations = batched model calls, median / max over the samples):\n")
    _row(["T", "ParaDiGMS (loosest tolerance with 0 runs off)", "FP+ (ddim)", "FP+ (picard)",
          "ParaTAA m=3 (ddim)", "ParaTAA (defaults): same image", "ParaTAA (defaults): stop"])
    _row(["---"] * 7)
    out = {}
    m = report["defaults"]["memory_size"]
    for T, block in report["methods"].items():
        if not str(T).isdigit():
            continue
        ok = [(float(k.split("tol=")[1]), v) for k, v in report["paradigms"].items()
              if k.startswith(f"T={T} tol=") and v["ended_off"] == 0]
        if not ok:
            continue
        tol, para = max(ok, key=lambda kv: kv[0])
        same = {name: block[name]["summary"] for name in ("FP+ (ddim)", "FP+ (picard)", "ParaTAA m=3 (ddim)",
                                                            f"ParaTAA m={m}") if name in block}
        taa = same.get(f"ParaTAA m={m}")
        out[T] = {"paradigms_tolerance": tol, "paradigms_calls_median": para["calls_median"],
                  "paradigms_calls_max": para["calls_max"],
                  **{name: [v["same_median"], v["same_max"]] for name, v in same.items()}}
        cells = [f"{fmt(v['same_median'])} / {fmt(v['same_max'])}" if v else "-"
                 for v in (same.get("FP+ (ddim)"), same.get("FP+ (picard)"), same.get("ParaTAA m=3 (ddim)"), taa)]
        _row([T, f"{para['calls_median']:g} / {para['calls_max']} (tolerance {tol:g})", *cells,
              f"{fmt(taa['stop_median'])} / {fmt(taa['stop_max'])}" if taa else "-"])
    return out


def main(args):
    torch.set_grad_enabled(False)
    defaults = bench_defaults(SD_CFG_SCALE)
    pipe = load_pipeline(EMBEDDED_SD, torch.device("cpu"), torch.float32)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    latent = latent_shape(pipe, size, size)
    classes = [0, 1] if args.quick else list(range(10))

    def problem(T):
        return noise_from_seeds(classes, T, latent), encode(pipe, [prompt(c) for c in classes], "", pipe.device), torch.tensor(classes)

    bench = Bench("text2img", SDDenoiser(pipe.unet, defaults["cfg_scale"]), VAEDecoder(pipe.vae, pipe.device),
                  digit_classifier(), lambda T, eta=0.0: pipeline_schedule(pipe, T, eta), problem, defaults)
    command = "python benchmarks/sd_bench.py" + (" --quick" if args.quick else "")
    report = run_benchmark(bench, args.quick, command, args.machine, args.out, len(classes))
    report["warm_start"] = warm_start_table(bench, pipe, defaults, args.quick, 2 if args.quick else 5)
    report["paradigms"] = paradigms_table(bench, pipe, problem, defaults, args.quick, len(classes))
    report["head_to_head"] = head_to_head(report)
    import json
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(bench_args(__doc__, "benchmarks/results/sd.json"))
