"""Text-to-image benchmark: FP, FP+ and ParaTAA against sequential DDIM, trade-offs, warm starts, ParaDiGMS.

    python benchmarks/sd_bench.py [--quick] [--out benchmarks/results/sd.json]            # the embedded model
    accelerate launch --num_processes 8 benchmarks/sd_bench.py --model_path stable-diffusion-v1-5 --fp16 \\
        --cfg_scale 7.5 --prompt "a photo of a cat" "a photo of a dog" --out results/sd15.json

Model flags as parallel_sd.py's. Ten samples (sample i: prompt i of the list, cycled, with noise seed i; the
embedded model's default prompts are "a handwritten digit <i>"), the pipeline's own scheduler read as DDIM,
parallel_sd.py's defaults. Tables as in dit_bench.py, then the warm start of parallel_sd_winit.py (iterations for
prompt2 against variation_steps; the embedded model: a similar and a dissimilar pair of digits; otherwise
consecutive pairs of the prompts), then diffusers' ParaDiGMS on the same model, noise and prompts.
"""
import os
import statistics
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.convergence import (Bench, bench_defaults, bench_parser, benchmark_steps, capped,  # noqa: E402
                                    check_bench_flags, fmt, measure, repo_relative, run_benchmark, save_report,
                                    sequential_reference, solve_on, summarize, timed)
from benchmarks.dit_bench import digit_classifier  # noqa: E402
from models.adapters import VAEDecoder, guides  # noqa: E402
from models.sd import (EMBEDDED_FLOW, EMBEDDED_SD, SD_CFG_SCALE, PromptList, add_sd_flags, blank,  # noqa: E402
                       check_folder, check_prompt_flags, check_size, denoiser, encode, latent_shape, load_pipeline,
                       family, schedule_of)
from paratAA import noise_from_seeds, sample_sequential  # noqa: E402
from paratAA.denoiser import take  # noqa: E402
from runner.errors import InputFileError, UsageError, exit_on_error  # noqa: E402
from runner.flags import note, path_value  # noqa: E402
from runner.launch import Session  # noqa: E402
from runner.metrics import SAME_IMAGE, image_rms  # noqa: E402

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PAIRS = {"similar (three -> eight)": (3, 8), "dissimilar (one -> zero)": (1, 0)}


def prompt(c):
    return f"a handwritten digit {NAMES[c]}"


DIGIT_PROMPTS = [prompt(c) for c in range(10)]


def add_model_flags(parser):
    """parallel_sd.py's model flags (the default is the embedded model), and a file of prompts."""
    parser.add_argument("--prompt", type=str, nargs="+", action=PromptList, default=None,
                        help="prompt(s), each quoted, or --prompt repeated; cycled over the samples (default for the "
                             "embedded model: 'a handwritten digit <i>' for sample i)")
    parser.add_argument("--prompt_file", type=path_value, default=None,
                        help="prompts, one per line (instead of --prompt)")
    add_sd_flags(parser)


def check_model_flags(args):
    """args.prompts: the prompts cycled over the samples; args.digits: whether the digit classifier applies."""
    if args.prompt and args.prompt_file:
        raise UsageError("give --prompt or --prompt_file, not both")
    if args.prompt_file:
        try:
            # utf-8-sig: a byte-order mark some editors write is not part of the first prompt; lines that say
            # nothing (blank, or only invisible characters) are skipped as blank lines are
            with open(args.prompt_file, encoding="utf-8-sig") as f:
                args.prompt = [line.strip() for line in f if not blank(line)]
        except OSError as e:
            raise InputFileError(f"--prompt_file: cannot read {args.prompt_file} ({e.strerror})") from None
        except UnicodeDecodeError as e:
            raise InputFileError(f"--prompt_file: {args.prompt_file} is not UTF-8 text (byte {e.start}: "
                                 f"{e.reason})") from None
        if not args.prompt:
            raise UsageError(f"--prompt_file {args.prompt_file} holds no prompt")
    embedded = args.model_path is None or os.path.abspath(args.model_path) in (EMBEDDED_SD, EMBEDDED_FLOW)
    if not args.prompt and not embedded:
        raise UsageError("--model_path other than the embedded model needs --prompt or --prompt_file")
    for p in args.prompt or []:
        if blank(p):
            raise UsageError("--prompt must not be empty")
    args.model_path = args.model_path or EMBEDDED_SD
    check_folder(args.model_path)
    check_prompt_flags(args, family(args.model_path))
    check_size(args, args.model_path)
    args.embedded = embedded
    args.digits = embedded and not args.prompt  # the samples are then the digits 0..9, cycled
    args.prompts = args.prompt or DIGIT_PROMPTS
    if args.prompt and args.num_samples is not None and len(args.prompt) > args.num_samples:
        # a caption file longer than the run is a way to pick the first prompts (sample_sets.py's 1000 of a file),
        # unlike the scripts' prompts, each asked for: said, not refused (the rest were dropped without a word)
        note(f"{len(args.prompt)} prompts given; the first {args.num_samples} (--num_samples) are sampled")


def sd_bench(args, session):
    """(Bench, pipeline) of the folder named by the flags (checked): sample i has prompt i (cycled), noise seed i."""
    pipe = load_pipeline(args.model_path, session.device, session.model_dtype)
    eps_fn = denoiser(pipe, args.cfg_scale, 1.0 if args.true_cfg_scale is None else args.true_cfg_scale)
    latent = latent_shape(pipe, args.height, args.width)
    S = args.num_samples
    prompts = [args.prompts[i % len(args.prompts)] for i in range(S)]

    def problem(T, indices):
        cond = encode(pipe, [prompts[i] for i in indices], args.negative_prompt, session.device, size(args),
                      args.max_sequence_length)
        labels = torch.tensor([i % 10 for i in indices]) if args.digits else None
        return noise_from_seeds(indices, T, latent).to(session.device), cond, labels

    title = ("embedded flow-matching text-to-image" if os.path.abspath(args.model_path) == EMBEDDED_FLOW else
             "embedded text-to-image" if args.embedded
             else f"SD {os.path.basename(os.path.normpath(args.model_path))} {args.height}x{args.width}")
    info = {"title": title, "model_path": repo_relative(args.model_path), "height": args.height, "width": args.width,
            "negative_prompt": args.negative_prompt, "labels": prompts}
    bench = Bench(title, eps_fn, VAEDecoder(pipe.vae, session.device),
                  lambda T, eta=0.0: schedule_of(pipe, T, eta, args.height, args.width), problem, S,
                  bench_defaults(args.cfg_scale),
                  session, digit_classifier() if args.digits else None, info)
    return bench, pipe


def size(args):
    """(height, width): SDXL's conditioning includes the image size."""
    return args.height, args.width


def warm_pairs(args):
    """name: (prompt1, prompt2). The embedded digits: PAIRS; otherwise consecutive pairs of the prompts."""
    if args.digits:
        return {name: (prompt(a), prompt(b)) for name, (a, b) in PAIRS.items()}
    p = args.prompts
    return {f"{p[i]} -> {p[i + 1]}": (p[i], p[i + 1]) for i in range(0, len(p) - 1, 2)}


def warm_start_table(bench, pipe, args, samples):
    T = benchmark_steps(args)[-1]
    schedule = bench.schedule(T)
    d = bench.defaults
    kw = dict(tol1=d["tol1"], tol2=d["tol2"], memory_size=d["memory_size"], equations=d["equations"])
    noise = noise_from_seeds(range(samples), T, latent_shape(pipe, args.height, args.width)).to(bench.session.device)
    table = {}
    pairs = warm_pairs(args)
    if not pairs:
        bench.say("\nWarm start: skipped (it needs two prompts)")
        return table
    bench.say(f"\nWarm start (parallel_sd_winit.py), T = {T}, ParaTAA at the scripts' defaults, {samples} seeds:\n")
    bench.row(["pair", "variation_steps", "prompt2 iterations, warm (median / max)", "cold start (median)",
               "same image as sequential from prompt1's state at (median / max)"])
    bench.row(["---"] * 5)
    for name, (a, b) in pairs.items():
        ca = encode(pipe, [a] * samples, args.negative_prompt, bench.session.device, size(args))
        cb = encode(pipe, [b] * samples, args.negative_prompt, bench.session.device, size(args))
        first = solve_on(bench, schedule, noise, ca, **kw)
        cold = solve_on(bench, schedule, noise, cb, **kw).iterations
        for V in capped([5, 25] if args.quick else [10, 20, 40, 60, 80, 100], T):
            ref = sequential_reference(bench, schedule, noise, cb, init=first.trajectory, start=V)
            s = summarize(measure(bench, schedule, noise, cb, ref, init=first.trajectory, variation_steps=V, **kw))
            s["cold_median"] = statistics.median(cold)  # as stop_median (an even count: the mean of the middle two)
            table[f"{name} V={V}"] = s
            bench.row([name, V, f"{fmt(s['stop_median'])} / {fmt(s['stop_max'])}", fmt(s["cold_median"]),
                       f"{fmt(s['same_median'])} / {fmt(s['same_max'])}"])
    return table


def paradigms_table(bench, pipe, args):
    """diffusers' StableDiffusionParadigmsPipeline + DDIMParallelScheduler on the same model, noise and prompts:
    batched UNet calls, evaluations and distance to our sequential DDIM, over its tolerance (window = T).
    Wall-clock (latents out, no decoding) is against sequential DDIM run one sample at a time, as ParaDiGMS runs;
    ParaTAA at the script's defaults is timed the same way, in the last row of each T. diffusers' pipeline cannot
    split its calls across a launch's processes: each process runs it whole (the same work), while our
    sequential sampler and ParaTAA share their calls out. diffusers has ParaDiGMS for SD 1.x and 2.x only."""
    if type(pipe).__name__ != "StableDiffusionPipeline":
        bench.say(f"\nParaDiGMS: skipped (diffusers has it for StableDiffusionPipeline only, not {type(pipe).__name__})")
        return {}
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
    d = bench.defaults
    cfg = d["cfg_scale"]
    solver_kw = {k: d[k] for k in ("tol1", "tol2", "memory_size", "equations")}
    guided = 2 if guides(cfg) else 1  # a guided evaluation is two UNet inputs; ParaTAA counts it once
    S, prompts = bench.num_samples, bench.info["labels"]
    table = {}
    bench.say("\nParaDiGMS (diffusers StableDiffusionParadigmsPipeline, DDIMParallelScheduler, window = T), per "
              "sample:\n")
    bench.row(["T", "tolerance", "batched calls (median / max)", "runs ending > 1 level off", "max final difference",
               "evaluations / sample", "wall-clock vs sequential"])
    bench.row(["---"] * 7)

    def one_at_a_time(T, label, run, ref, seq_seconds):
        """run(i) -> (latents [1, *latent], batched calls, evaluations) for sample i; one table row."""
        counts, evals, rms, seconds = [], [], [], 0.0
        for i in range(S):
            (lat, n_calls, n_evals), sec = timed(bench.session, lambda: run(i))
            seconds += sec
            counts.append(n_calls)
            evals.append(n_evals)
            rms.append(image_rms(bench.decode(lat.double())[0], ref["images"][i]))
        s = {"calls_median": float(np.median(counts)), "calls_max": max(counts),
             "ended_off": sum(r > SAME_IMAGE for r in rms), "max_final_rms": max(rms),
             "evaluations_mean": float(np.mean(evals)), "wall_clock_ratio": seconds / seq_seconds}
        bench.row([T, label, f"{s['calls_median']:g} / {s['calls_max']}", f"{s['ended_off']} of {S}",
                   f"{s['max_final_rms']:.2f}", f"{s['evaluations_mean']:.0f}", f"{s['wall_clock_ratio']:.2f}x"])
        return s

    for T in benchmark_steps(args):
        schedule = bench.schedule(T)
        noise, cond, _ = bench.problem(T, list(range(S)))
        ref = sequential_reference(bench, schedule, noise, cond)
        s = bench.session
        _, seq_seconds = timed(s, lambda: [sample_sequential(bench.eps_fn, schedule, noise[i:i + 1],
                                                             take(cond, i, i + 1), model_dtype=s.model_dtype,
                                                             sharding=s.sharding) for i in range(S)])

        def paradigms(i, tol):
            calls.update(calls=0, inputs=0)
            pipe.unet.forward = counted
            try:
                lat = para(prompts[i], height=args.height, width=args.width, num_inference_steps=T, parallel=T,
                           tolerance=tol, guidance_scale=cfg, negative_prompt=args.negative_prompt or None,
                           latents=noise[i:i + 1, T].to(pipe.unet.dtype), output_type="latent").images
            finally:
                del pipe.unet.forward  # back to the class's forward
            return lat, calls["calls"], calls["inputs"] // guided

        def paratAA(i):
            out = solve_on(bench, schedule, noise[i:i + 1], take(cond, i, i + 1), **solver_kw)
            return out.samples, out.iterations[0], out.evaluations[0]

        for tol in ([0.1, 0.01] if args.quick else [0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.001]):
            table[f"T={T} tol={tol:g}"] = one_at_a_time(T, f"{tol:g}", lambda i, tol=tol: paradigms(i, tol), ref,
                                                         seq_seconds)
        table[f"T={T} ParaTAA"] = one_at_a_time(T, "ParaTAA, defaults", paratAA, ref, seq_seconds)
    return table


def head_to_head(bench, report):
    """Iterations to the same image, side by side: ParaDiGMS at the loosest tolerance whose runs all end on the
    same image, FP+ in both forms and ParaTAA, all from this run."""
    bench.say("\nSame image, side by side (iterations = batched model calls, median / max over the samples):\n")
    bench.row(["T", "ParaDiGMS (loosest tolerance with 0 runs off)", "FP+ (ddim)", "FP+ (picard)",
               "ParaTAA m=3 (ddim)", "ParaTAA (defaults): same image", "ParaTAA (defaults): stop"])
    bench.row(["---"] * 7)
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
        bench.row([T, f"{para['calls_median']:g} / {para['calls_max']} (tolerance {tol:g})", *cells,
                   f"{fmt(taa['stop_median'])} / {fmt(taa['stop_max'])}" if taa else "-"])
    return out


def main(args):
    check_bench_flags(args)
    check_model_flags(args)
    session = Session(args.dist_timeout, args.fp16)
    bench, pipe = sd_bench(args, session)
    report = run_benchmark(bench, args)
    report["warm_start"] = warm_start_table(bench, pipe, args, 2 if args.quick else 5)
    report["paradigms"] = paradigms_table(bench, pipe, args)
    report["head_to_head"] = head_to_head(bench, report)
    save_report(report, bench, args.out)


def parse_args(argv=None):
    parser = bench_parser(__doc__, "benchmarks/results/sd.json", SD_CFG_SCALE, ablation=False)
    add_model_flags(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_error(main, parse_args())
