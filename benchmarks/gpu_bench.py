"""GPU benchmark: what parallel sampling buys on one GPU, with random weights (no downloads there either).

    python benchmarks/gpu_bench.py --out gpu.json            # on a GPU machine, < 8 minutes
    python benchmarks/gpu_bench.py --smoke                   # tiny models on the CPU, checks the script runs

1. Seconds per batched model call vs window size (1, 8, 16, 32, 64, 100; guidance doubles the batch) for
   DiT-XL/2 at 256x256 and the Stable Diffusion v1.5 UNet at 512x512, fp16.
2. Wall-clock of ParaTAA (T = 100, m = 3, order = window, a fixed number K of iterations) against sequential
   DDIM (T = 100 calls of batch 1 x 2) with DiT-XL/2, for the iteration counts K measured on the embedded
   models, and with the SD v1.5 UNet for a range of K at window 8; the solver's own time per iteration beside
   the model's.
3. Peak GPU memory of the solver's state at T = 100, m = 3, 4x64x64 latents (a free model).
4. Default flags end to end (window auto): for DiT-XL/2 and the SD v1.5 UNet the planner measures the model here
   and picks the window; ParaTAA then runs (a) with the default stop rule on these random weights, and (b) for
   K = ceil(K(W)) iterations, the count the planner's equation (5) predicts for a trained model (fitted on the
   embedded models, whose measured counts at each window are in BENCHMARKS.md); each against sequential DDIM in
   the same process. (b) is the speed-up a trained model of this size would get; (a) shows the stop rule's cost.
5. With --families: the per-call curves of SDXL's UNet and an SD3-medium-sized MMDiT at 1024 px (windows 1-16).

    python benchmarks/gpu_bench.py --families --out gpu.json     # all four, < 8 minutes on one H100/H200
"""
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.convergence import check_out_file, write_json  # noqa: E402
from models.adapters import DiTDenoiser, SDDenoiser  # noqa: E402
from models.dit import DiT_models  # noqa: E402
from paratAA import (SolverConfig, dit_schedule, draw_noise, from_ddim_scheduler, noise_from_seeds,  # noqa: E402
                     sample_sequential, solve)
from paratAA.planner import predicted_iterations, sync  # noqa: E402
from runner.errors import UsageError, exit_on_error  # noqa: E402
from runner.flags import home_path, make_parser  # noqa: E402

# the public configurations of SDXL's UNet (1024 px: 128x128 latents) and SD3-medium's MMDiT (16-channel latents)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                                        "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
SD3_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                       num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                       pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def time_call(fn, device, repeats):
    for _ in range(2):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def randomize_output(model):
    # DiT's adaLN-Zero init makes a random model output exactly 0; give the last layer weights
    for p in model.final_layer.parameters():
        p.data.normal_(0, 0.02)
    return model


def build(args, device, dtype):
    if args.smoke:
        dit = randomize_output(DiT_models["DiT-S/8"](input_size=8, num_classes=1000))
        unet_cfg = dict(SD15_UNET, sample_size=8, block_out_channels=(32, 64, 64, 64), cross_attention_dim=32,
                        layers_per_block=1)
        text = (77, 32)
    else:
        with torch.device(device):
            dit = randomize_output(DiT_models["DiT-XL/2"](input_size=32, num_classes=1000))
        unet_cfg, text = SD15_UNET, (77, 768)
    from diffusers import UNet2DConditionModel
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_cfg)
    return dit.to(device, dtype).eval(), unet.to(device, dtype).eval(), text


@torch.no_grad()
def family_curves(args, device, dtype, windows, repeats):
    """Seconds per batched call (guidance doubling the batch) of SDXL's UNet at 1024 px and an SD3-medium-sized
    MMDiT at 1024 px, random weights: the cost curves the window planner would measure for them."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel
    from models.adapters import SD3Denoiser, SDXLDenoiser
    xl, sd3 = dict(SDXL_UNET), dict(SD3_TRANSFORMER)
    if args.smoke:  # the same architectures, tiny
        xl.update(sample_size=8, block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 1),
                  attention_head_dim=(2, 4, 4), cross_attention_dim=64, addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=6 * 8 + 32, layers_per_block=1)
        sd3.update(sample_size=8, num_layers=1, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                   caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=8)
    out = {}
    with torch.device(device):
        unet = UNet2DConditionModel(**xl).to(dtype).eval()
    text, pooled = xl["cross_attention_dim"], xl["projection_class_embeddings_input_dim"] - 6 * xl[
        "addition_time_embed_dim"]
    eps = SDXLDenoiser(unet, 5.0)
    name = f"SDXL UNet {xl['sample_size'] * 8}"
    out[name] = {}
    for W in windows:
        x = torch.randn((W, 4, xl["sample_size"], xl["sample_size"]), device=device, dtype=dtype)
        t = torch.randint(0, 1000, (W,), device=device)
        cond = {k: torch.randn(W, 77, text, device=device, dtype=dtype) for k in ("cond", "uncond")}
        cond.update({k: torch.randn(W, pooled, device=device, dtype=dtype) for k in ("pooled", "uncond_pooled")})
        cond.update({k: torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * W, device=device, dtype=dtype)
                     for k in ("time_ids", "uncond_time_ids")})
        out[name][W] = time_call(lambda: eps(x, t, cond), device, repeats)
        print(f"| {name} | {W} | {out[name][W]:.4f} |", flush=True)
    del unet
    with torch.device(device):
        mmdit = SD3Transformer2DModel(**sd3).to(dtype).eval()
    eps = SD3Denoiser(mmdit, 5.0)
    name = f"SD3-medium MMDiT {sd3['sample_size'] * 8}"
    out[name] = {}
    for W in windows:
        x = torch.randn((W, sd3["in_channels"], sd3["sample_size"], sd3["sample_size"]), device=device, dtype=dtype)
        t = torch.rand(W, device=device) * 1000
        cond = {k: torch.randn(W, 154, sd3["joint_attention_dim"], device=device, dtype=dtype)
                for k in ("cond", "uncond")}
        cond.update({k: torch.randn(W, sd3["pooled_projection_dim"], device=device, dtype=dtype)
                     for k in ("pooled", "uncond_pooled")})
        out[name][W] = time_call(lambda: eps(x, t, cond), device, repeats)
        print(f"| {name} | {W} | {out[name][W]:.4f} |", flush=True)
    return out


def sd15_schedule(T):
    """SD v1.5's DDIM schedule (its scheduler config: scaled-linear betas 0.00085 .. 0.012, leading spacing)."""
    from diffusers import DDIMScheduler
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return from_ddim_scheduler(scheduler, T)


@torch.no_grad()
def default_flags(name, eps, schedule, latent, cond, device, dtype):
    """Sequential DDIM, then ParaTAA with window auto (the scripts' default): the planner's curve and choice, the
    run with the default stop, and the run of K(W) iterations (equation (5)), one sample."""
    T = schedule.num_steps
    noise = noise_from_seeds([0], T, latent).to(device)
    seq = time_call(lambda: sample_sequential(eps, schedule, noise, cond, model_dtype=dtype), device, 2)
    sync(device)
    t0 = time.perf_counter()
    auto = solve(eps, schedule, noise, cond, SolverConfig(window_size="auto"), model_dtype=dtype)
    sync(device)
    first = time.perf_counter() - t0  # planning (measuring the curves) and solving
    plan = auto.plan
    W = plan.window
    config = SolverConfig(window_size=W)
    solve(eps, schedule, noise, cond, config, model_dtype=dtype, max_steps=2)  # warm-up at this window
    sync(device)
    t0 = time.perf_counter()
    stopped = solve(eps, schedule, noise, cond, config, model_dtype=dtype)
    sync(device)
    t_stop = time.perf_counter() - t0
    K = min(T, math.ceil(predicted_iterations(T, W)))
    sync(device)
    t0 = time.perf_counter()
    fixed = solve(eps, schedule, noise, cond, config, model_dtype=dtype, tol1=0.0, tol2=0.0, max_steps=K)
    sync(device)
    t_fixed = time.perf_counter() - t0
    row = {"T": T, "sequential_seconds": seq, "plan": plan.to_dict(), "first_run_seconds_with_planning": first,
           "window": W, "order": stopped.config.order,
           "default_stop": {"iterations": stopped.iterations[0], "seconds": t_stop, "speedup": seq / t_stop},
           "predicted_iterations_K": {"iterations": fixed.iterations[0], "seconds": t_fixed,
                                      "speedup": seq / t_fixed}}
    print(f"| {name} | {seq:.3f} | {W} | {plan.to_dict()['predicted_speedup']:.2f}x | {first:.2f} | "
          f"{stopped.iterations[0]}: {t_stop:.3f} s = {seq / t_stop:.2f}x | "
          f"{fixed.iterations[0]}: {t_fixed:.3f} s = {seq / t_fixed:.2f}x |", flush=True)
    return row


@torch.no_grad()
def fixed_runs(name, eps, schedule, noise, cond, runs, device, dtype):
    """Sequential DDIM, then ParaTAA for fixed (window, K iterations) pairs (tolerance 0: exactly K iterations,
    whatever these random weights do): wall-clock, speed-up, and the solver's and the model's time per iteration
    (the model timed between device syncs)."""
    model_time = [0.0]

    def timed(x, tt, c):
        sync(device)
        t0 = time.perf_counter()
        out = eps(x, tt, c)
        sync(device)
        model_time[0] += time.perf_counter() - t0
        return out

    seq = time_call(lambda: sample_sequential(eps, schedule, noise, cond, model_dtype=dtype), device, 1)
    print(f"\n{name}: sequential DDIM, T = {schedule.num_steps}: {seq:.3f} s\n")
    print("| window | iterations K | ParaTAA s | speed-up | solver s/iteration | model s/iteration |")
    print("|---|---|---|---|---|---|")
    solve(timed, schedule, noise, cond, memory_size=3, max_steps=2, model_dtype=dtype)  # warm-up
    rows = {}
    for W, K in runs:
        model_time[0] = 0.0
        sync(device)
        t0 = time.perf_counter()
        out = solve(timed, schedule, noise, cond, window_size=W, memory_size=3, tol1=0, tol2=0, max_steps=K,
                    model_dtype=dtype)
        sync(device)
        total = time.perf_counter() - t0
        k = out.iterations[0]
        row = {"window": W, "iterations": k, "seconds": total, "speedup": seq / total,
               "solver_per_iteration": (total - model_time[0]) / k, "model_per_iteration": model_time[0] / k}
        rows[f"W={W} K={K}"] = row
        print(f"| {W} | {k} | {total:.3f} | {row['speedup']:.2f}x | {row['solver_per_iteration']:.4f} | "
              f"{row['model_per_iteration']:.4f} |", flush=True)
    return seq, rows


def save(report, path):
    if path:  # after every section: a run stopped by its time limit keeps what it measured
        write_json(report, path)


def window_pairs(values, flag):
    """WINDOW:ITERATIONS pairs, each in 1..100 (T), or UsageError naming the flag: read before minutes of GPU time,
    not after them."""
    try:
        pairs = [tuple(int(v) for v in r.split(":")) for r in values]
    except ValueError:
        pairs = []
    if len(pairs) != len(values) or not all(len(p) == 2 and 1 <= min(p) and max(p) <= 100 for p in pairs):
        raise UsageError(f"{flag} must be WINDOW:ITERATIONS pairs of integers in 1..100, got {' '.join(values)}")
    return pairs


# The sizes of a GPU run: --smoke times tiny models at its own fixed sizes (it checks that the script runs), so one
# of these given beside it would be ignored (--smoke --repeats 3 timed every call twice): refused instead. Left out,
# they take these defaults.
GPU_RUN_FLAGS = {"repeats": 10, "iterations": [6, 8], "window_runs": ["4:41", "8:24", "16:14", "32:10"],
                 "sd_window_runs": ["4:41", "6:28", "8:18", "8:20", "8:22", "8:24", "12:16"]}


def check_flags(args):
    """Every flag before any model is built (UsageError naming it); the pairs parsed into args."""
    given = [f"--{name}" for name in GPU_RUN_FLAGS if getattr(args, name) is not None]
    if args.smoke and given:
        raise UsageError(f"{' and '.join(given)} cannot be used with --smoke, which times tiny models at fixed sizes "
                         f"(it only checks that the script runs)")
    for name, default in GPU_RUN_FLAGS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {args.repeats}")
    if not all(1 <= k <= 100 for k in args.iterations):
        raise UsageError(f"--iterations must be counts in 1..100 (T), got {' '.join(map(str, args.iterations))}")
    args.window_runs = window_pairs(args.window_runs, "--window_runs")
    args.sd_window_runs = window_pairs(args.sd_window_runs, "--sd_window_runs")
    if args.out is not None:
        check_out_file(args.out, args=args)
    check_gpu(args.smoke, "times DiT-XL/2 and the SD v1.5 UNet at full size")


def check_gpu(smoke, what):
    """UsageError where no GPU is visible and --smoke is not given: on a CPU the full-size run took minutes per call
    and its report said "cpu (smoke)" for a run that was not one."""
    if not smoke and not torch.cuda.is_available():
        raise UsageError(f"no GPU is visible (torch.cuda.is_available() is false), and this script {what} on one; "
                         f"--smoke runs tiny models on this machine")


@torch.no_grad()
def main(args):
    check_flags(args)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    dit, unet, (L, E) = build(args, device, dtype)
    dit_eps, unet_eps = DiTDenoiser(dit, 4.0), SDDenoiser(unet, 7.5)
    dit_latent = (4, dit.x_embedder.img_size[0], dit.x_embedder.img_size[0])
    sd_latent = (4, unet.config.sample_size, unet.config.sample_size)
    windows = [1, 8] if args.smoke else [1, 8, 16, 32, 64, 100]
    repeats = 2 if args.smoke else args.repeats
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)",
              "dtype": str(dtype), "torch": torch.__version__, "per_call": {"DiT-XL/2 256": {}, "SD1.5 UNet 512": {}}}
    print(f"device: {report['device']}, {dtype}")
    print("| window | DiT-XL/2 s/call (batch 2W) | SD v1.5 UNet s/call (batch 2W) |\n|---|---|---|")
    for W in windows:
        t = torch.randint(0, 1000, (W,), device=device)
        x = torch.randn((W,) + dit_latent, device=device, dtype=dtype)
        y = torch.randint(0, 1000, (W,), device=device)
        a = time_call(lambda: dit_eps(x, t, y), device, repeats)
        xs = torch.randn((W,) + sd_latent, device=device, dtype=dtype)
        cond = {"cond": torch.randn(W, L, E, device=device, dtype=dtype),
                "uncond": torch.randn(W, L, E, device=device, dtype=dtype)}
        b = time_call(lambda: unet_eps(xs, t, cond), device, repeats)
        report["per_call"]["DiT-XL/2 256"][W] = a
        report["per_call"]["SD1.5 UNet 512"][W] = b
        print(f"| {W} | {a:.4f} | {b:.4f} |", flush=True)
    save(report, args.out)

    # default flags: the planner's choice and the end-to-end times, both models, one sample
    T = 20 if args.smoke else 100
    print("\n| model | sequential s | window chosen | predicted speed-up | first run s (planning included) | "
          "default stop: iterations, s | K(W) iterations, s |\n|---|---|---|---|---|---|---|")
    report["default_flags"] = {}
    y = torch.tensor([207], device=device)
    report["default_flags"]["DiT-XL/2 256"] = default_flags("DiT-XL/2 256", dit_eps, dit_schedule(T), dit_latent, y,
                                                            device, dtype)
    text = {"cond": torch.randn(1, L, E, device=device, dtype=dtype),
            "uncond": torch.randn(1, L, E, device=device, dtype=dtype)}
    report["default_flags"]["SD1.5 UNet 512"] = default_flags("SD1.5 UNet 512", unet_eps, sd15_schedule(T),
                                                              sd_latent, text, device, dtype)
    save(report, args.out)

    # ParaTAA vs sequential with the real solver on the GPU, fixed iteration counts: DiT-XL/2, then the SD UNet
    runs = [(T, K) for K in ([2, 4] if args.smoke else args.iterations)]
    runs += [] if args.smoke else args.window_runs
    report["sequential_seconds_T100"], report["paratAA"] = fixed_runs(
        "DiT-XL/2 256", dit_eps, dit_schedule(T), noise_from_seeds([0], T, dit_latent).to(device), y, runs,
        device, dtype)
    runs = [(4, 3), (8, 2)] if args.smoke else args.sd_window_runs
    report["sd_sequential_seconds_T100"], report["sd_paratAA"] = fixed_runs(
        "SD1.5 UNet 512", unet_eps, sd15_schedule(T), noise_from_seeds([0], T, sd_latent).to(device), text, runs,
        device, dtype)
    save(report, args.out)

    if device.type == "cuda":  # the solver's own memory at SD size
        del dit, unet
        torch.cuda.empty_cache()
        noise = draw_noise(1, 100, (4, 64, 64)).to(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        solve(lambda x, tt, c: 1e-3 * x, dit_schedule(100), noise, memory_size=3, tol1=0, tol2=0, max_steps=8)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
        report["solver_peak_memory_mb_T100_m3_4x64x64"] = peak
        print(f"\nsolver peak GPU memory, T = 100, m = 3, 4x64x64 latents: {peak:.0f} MB (noise tensor excluded)")
    save(report, args.out)
    if args.families:  # last: the largest models
        print("\n| model | window | s/call (batch 2W) |\n|---|---|---|")
        report["per_call"].update(family_curves(args, device, dtype, [1, 2] if args.smoke else [1, 2, 4, 8, 16],
                                                repeats))
        save(report, args.out)


def parse_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU")
    # None: not given (GPU_RUN_FLAGS has the defaults), so that check_flags can refuse one given with --smoke
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per measurement (default 10; not with --smoke)")
    parser.add_argument("--families", action="store_true",
                        help="also the per-call curves of SDXL's UNet and an SD3-medium-sized MMDiT at 1024 px")
    parser.add_argument("--iterations", type=int, nargs="+", default=None,
                        help="iteration counts at window = T (the embedded DiT's median / max stop at T = 100; "
                             "default 6 8; not with --smoke)")
    parser.add_argument("--window_runs", nargs="*", default=None,
                        help="WINDOW:ITERATIONS pairs: the iterations the embedded DiT needed at that window "
                             "(median stop, BENCHMARKS.md window table; default 4:41 8:24 16:14 32:10; not with "
                             "--smoke)")
    parser.add_argument("--sd_window_runs", nargs="*", default=None,
                        help="WINDOW:ITERATIONS pairs timed with the SD v1.5 UNet (a range of K at window 8: the "
                             "speed-up for whichever count a trained model needs; default 4:41 6:28 8:18 8:20 8:22 "
                             "8:24 12:16; not with --smoke)")
    parser.add_argument("--out", type=home_path, default=None)
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_error(main, parse_args())
