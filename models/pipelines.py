"""ParaTAA on a diffusers pipeline already loaded in Python: the way a notebook user samples.

    from diffusers import StableDiffusionPipeline
    from models.pipelines import parallel_sample
    pipe = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5").to("cuda")
    out = parallel_sample(pipe, "a photo of an astronaut riding a horse", num_inference_steps=50)
    out.images[0].save("astronaut.png"); out.iterations, out.speed

The pipeline's own scheduler is read as DDIM (docs/ALGORITHM.md); the result equals sequential DDIM sampling with
the same noise, to the solver's tolerance (tolerance 0: to round-off).
"""
import time
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from paratAA import Sharding, SolverConfig, sample_sequential, solve
from paratAA.planner import plan_window, sync

from .bundles import pipeline_bundles
from .sd import network


@dataclass
class ParallelOutput:
    images: list              # PIL images (output_type "pil"), or uint8 arrays [H, W, 3] ("np")
    latents: torch.Tensor     # [N, *latent] float64, the final x_0 of each sample
    x_T: torch.Tensor         # [N, *latent], the initial noise (replays the run in diffusers)
    iterations: list          # per sample
    results: list             # per batch: paratAA.SolveResult (history: per-iteration residuals, boundary, x_0)
    config: SolverConfig      # the values used (the window chosen when window_size="auto")
    speed: dict = field(default_factory=dict)  # sampling seconds, and sequential seconds with compare_sequential


@torch.no_grad()
def parallel_sample(pipe, prompt, negative_prompt="", num_inference_steps=50, guidance_scale=7.5, eta=0.0,
                    num_images=1, seed=0, height=None, width=None, batch_size=None, output_type="pil",
                    compare_sequential=False, sharding=None, config=None, **solver):
    """Sample `num_images` images of `prompt` (a string or a list, cycled) with ParaTAA on `pipe`.

    solver: SolverConfig fields (window_size="auto" chooses the window from this device; default: T, the
    algorithm's iteration counts), or config=SolverConfig(...). batch_size: samples solved together (default all).
    compare_sequential: also run sequential DDIM with the same noise and time it (speed["sequential_seconds"]).
    """
    net = network(pipe)
    device = net.device
    size = net.config.sample_size * pipe.vae_scale_factor
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    (bundle,) = pipeline_bundles(pipe, [prompts], negative_prompt, guidance_scale, num_inference_steps, eta, seed,
                                 num_images, height or size, width or size, device)
    config = replace(config or SolverConfig(), **solver).resolve(num_inference_steps)
    dtype = net.dtype
    stream, B = bundle.noise(), batch_size or num_images
    latents, x_T, iterations, results, seconds, seq_seconds = [], [], [], [], 0.0, 0.0
    for start in range(0, num_images, B):
        stop = min(start + B, num_images)
        noise, cond = stream.take(stop - start).to(device), bundle.cond(start, stop)
        if config.window_size == "auto" and start == 0:  # measured once, for the first batch
            plan = plan_window(bundle.eps_fn, bundle.schedule, noise, cond, config, sharding or Sharding(), dtype,
                               solve=solve)
            config = replace(config, window_size=plan.window).resolve(num_inference_steps)
        t0 = time.perf_counter()
        res = solve(bundle.eps_fn, bundle.schedule, noise, cond, config, model_dtype=dtype, sharding=sharding,
                    record_x0=True)
        sync(device)
        seconds += time.perf_counter() - t0
        if compare_sequential:
            t0 = time.perf_counter()
            sample_sequential(bundle.eps_fn, bundle.schedule, noise, cond, model_dtype=dtype, sharding=sharding)
            sync(device)
            seq_seconds += time.perf_counter() - t0
        latents.append(res.samples.cpu())
        x_T.append(noise[:, -1].cpu())
        iterations += res.iterations
        results.append(res)
    latents = torch.cat(latents)
    images = bundle.decode(latents)                                                        # uint8 [N, H, W, 3]
    if output_type == "pil":
        images = [Image.fromarray(img) for img in images]
    speed = {"sampling_seconds": seconds}
    if compare_sequential:
        speed.update(sequential_seconds=seq_seconds, speedup=seq_seconds / seconds)
    return ParallelOutput(images=list(images), latents=latents, x_T=torch.cat(x_T), iterations=iterations,
                          results=results, config=config, speed=speed)


