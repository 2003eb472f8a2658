"""ParaTAA on a diffusers pipeline already loaded in Python: the way a notebook user samples.

    from diffusers import StableDiffusionPipeline
    from models.pipelines import parallel_sample
    pipe = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5").to("cuda")
    out = parallel_sample(pipe, "a photo of an astronaut riding a horse", num_inference_steps=50)
    out.images[0].save("astronaut.png"); out.iterations, out.speed

The class-conditional DiTPipeline takes class_labels (ids, or names of pipe.labels) in place of a prompt:

    from diffusers import DiTPipeline
    pipe = DiTPipeline.from_pretrained("facebook/DiT-XL-2-256").to("cuda")
    out = parallel_sample(pipe, class_labels=["golden retriever", 88], num_images=2, seed=33)

and draws x_T as its own __call__ does, so that pipe(class_labels=..., generator=torch.Generator().manual_seed(33))
is the sequential result.

The pipeline's own scheduler is read as DDIM (docs/ALGORITHM.md), a flow-matching one (SD3, Flux) as its Euler steps;
the result equals the pipeline's sequential loop with the same noise, to the solver's tolerance (tolerance 0: to
round-off). The families share the solve (sample_bundle); each builds its runner.loop.Bundle in models/bundles.py.
"""
import inspect
import math
import numbers
import time
import warnings
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
from PIL import Image

from paratAA import NonFiniteModelOutput, Sharding, SolverConfig, sample_sequential, solve
from paratAA.config import is_integer
from paratAA.planner import measure_call_seconds, plan_window, sync, warm_up
from runner.launch import host_memory_available

from . import flux, pixart
from .adapters import guides
from .bundles import dit_pipeline_bundle, pipeline_bundles
from .sd import (DIT_PIPELINE, MAX_T5_TOKENS, T5_FAMILIES, T5_NAMES, binned_size_problem, network, patch_of,
                 pipeline_kind, pipeline_problem, pixels_per_cell, read_as_ddim, sample_pixels, schedule_of,
                 undecodable, wrong_size)


@dataclass
class ParallelOutput:
    images: list              # PIL images (output_type "pil"), or uint8 arrays [H, W, 3] ("np")
    latents: torch.Tensor     # [N, *latent] float64, the final x_0 of each sample
    x_T: torch.Tensor         # [N, *latent] float64, the initial noise: pipe(latents=x_T.to(pipe.dtype)) replays it
                              # (Flux: packed first, as the pipeline's _pack_latents packs it; DiT, which takes no
                              # latents: the pipeline's own draw for the seed)
    iterations: list          # per sample
    results: list             # per batch: paratAA.SolveResult (history: per-iteration residuals, boundary, x_0)
    config: SolverConfig      # the values used (the window chosen when window_size="auto")
    # sampling_seconds, sequential_seconds (measured with compare_sequential, else estimated: T x the time of one
    # call of one state per sample, per batch), sequential_measured, speedup, unfinished (samples max_steps stopped
    # before they converged: their speed-up is not one to the sequential sampler's image), and with window_size
    # "auto" predicted_sampling_seconds (the plan's prediction for every batch; plan.predicted_seconds: the first's)
    speed: dict = field(default_factory=dict)
    plan: object = None       # window_size="auto": the planner's paratAA.planner.Plan (curve, choice, prediction)
    # per image, as the pipeline's own output names it: whether its safety checker flagged the image (then black, as
    # __call__ makes it; latents are left as sampled); None where the pipeline has no safety checker
    nsfw_content_detected: list = None


@torch.no_grad()
def parallel_sample(pipe, prompt=None, negative_prompt=None, num_inference_steps=None, guidance_scale=None, eta=0.0,
                    num_images=1, seed=0, height=None, width=None, batch_size=None, output_type="pil",
                    compare_sequential=False, sharding=None, config=None, max_sequence_length=None,
                    true_cfg_scale=1.0, class_labels=None, **solver):
    """Sample `num_images` images of `prompt` (a string or a list, cycled) with ParaTAA on `pipe`; for a DiTPipeline
    of `class_labels` instead.

    solver: SolverConfig fields (window_size="auto" chooses the window from this device; default: T, the
    algorithm's iteration counts), or config=SolverConfig(...). batch_size: samples solved together (default all).
    compare_sequential: also run sequential DDIM with the same noise and time it (speed["sequential_seconds"];
    without it that time is estimated, speed["sequential_measured"] False).
    num_inference_steps, guidance_scale: default the pipeline's own __call__'s (SD 1.x/2.x: 50 and 7.5, SDXL: 50
    and 5, SD3: 28 and 7, Flux: 28 and 3.5, PixArt: 20 and 4.5), so that leaving them out here and there samples
    the same image.
    guidance_scale: guidance only above 1, as the pipeline's own __call__ (0 is no guidance, e.g. for SDXL-Turbo).
    For a FluxPipeline it is FLUX.1-dev's distilled guidance, an input of the network taken as it is
    (FLUX.1-schnell ignores it), with no unconditional pass.
    negative_prompt: as __call__ takes it: None is the pipeline's default (SDXL: zero embeddings), "" the empty
    prompt encoded (PixArt's default is "", as its __call__'s). For Flux only with true_cfg_scale > 1.
    true_cfg_scale: Flux only, as FluxPipeline's __call__: classifier-free guidance away from negative_prompt (a
    second pass per state), which it applies only when both are given; one without the other is refused here.
    max_sequence_length: SD3, Flux and PixArt, the T5 prompt's length as __call__ takes it (None: its default, SD3
    256, Flux 512, PixArt-Alpha 120, PixArt-Sigma 300).
    height, width: PixArt samples the aspect-ratio bin nearest them and resizes the images back, as its __call__
    does with use_resolution_binning (its default); latents and x_T are the bin's size.
    eta > 0: the last step adds no noise here (DDIM's x_0, as the reference), where diffusers' DDIMScheduler adds
    eta sigma_0 noise to it when the scheduler's final alpha is not 1 (set_alpha_to_one false, SD v1.5: a standard
    deviation of 0.02 eta on the latent); the other steps' noise is the pipeline's.

    A DiTPipeline (class-conditional) takes class_labels in place of a prompt: class ids, or label names as
    pipe.get_label_ids takes them (pipe.labels), one or a list, cycled over the images. It samples its transformer's
    own size only, with DiTPipeline's defaults (guidance 4, 50 steps) and guidance (all latent channels, its null
    class). x_T is the pipeline's own draw: pipe(class_labels=labels, generator=torch.Generator().manual_seed(seed),
    num_inference_steps=T, guidance_scale=g) is the sequential result this equals, however batch_size splits the
    images. Its loop has no eta (0); with eta > 0 the steps' noise comes from that generator after x_T.
    prompt, negative_prompt, max_sequence_length and true_cfg_scale are refused for it, class_labels for the others.
    """
    problem = pipeline_problem(pipe)
    if problem:
        raise ValueError(f"pipe {problem}")
    # before anything else: prompt=None beside prompt_embeds was refused for its prompt, as if none had been meant
    check_call_only_arguments(pipe, solver)
    kind = pipeline_kind(pipe)
    is_flux = kind == flux.FLUX
    # left out: the pipeline's own __call__'s defaults (fixed ones, 7.5 and 50, sampled SDXL at guidance 7.5, not
    # its 5, and SD3 at 50 steps and 7.5, not its 28 and 7: not the image pipe(prompt) makes)
    if guidance_scale is None:
        guidance_scale = call_default(pipe, "guidance_scale", flux.GUIDANCE_SCALE if is_flux else 7.5)
    if num_inference_steps is None:
        num_inference_steps = call_default(pipe, "num_inference_steps", 50)
    net = network(pipe)
    # where the network runs. With CPU offload (enable_model_cpu_offload) its weights sit on the CPU between calls
    # and the pipeline's hooks move them and the inputs to the GPU: ask the pipeline, as its __call__ does (the
    # states on the CPU met predictions on the GPU)
    device = pipe._execution_device if net.device.type in ("cpu", "meta") else net.device
    if is_flux and (height is None or width is None):  # FluxPipeline's own default size (its transformer has none)
        cells = getattr(pipe, "default_sample_size", flux.DEFAULT_CELLS) * pixels_per_cell(pipe)
        height, width = cells if height is None else height, cells if width is None else width
    if height is None or width is None:  # the network's size, as __call__; a network may have none (given sizes do)
        if net.config.get("sample_size") is None:
            raise ValueError(f"height and width must be given: pipe's {type(net).__name__} config has no sample_size "
                             f"(the default size)")
        default_height, default_width = sample_pixels(net.config.sample_size, pixels_per_cell(pipe))
        height, width = default_height if height is None else height, default_width if width is None else width
    # the prompts, or a DiTPipeline's class ids
    conditions = check_arguments(pipe, prompt, negative_prompt, guidance_scale, num_inference_steps, num_images, seed,
                                 height, width, batch_size, output_type, compare_sequential, eta, max_sequence_length,
                                 true_cfg_scale, sharding, class_labels)
    said = read_as_ddim(type(pipe.scheduler).__name__, "pipe.scheduler")
    if said:  # the scripts say it on the terminal
        warnings.warn(said, stacklevel=3)  # the caller's line (1: here, 2: torch.no_grad's wrapper)
    # numpy integers pass the checks; the generator and the sizes want Python's
    num_images, seed, height, width = int(num_images), int(seed), int(height), int(width)
    num_inference_steps = int(num_inference_steps)
    batch_size = None if batch_size is None else int(batch_size)
    config = SolverConfig.with_overrides(config, solver, "parallel_sample")
    if kind == DIT_PIPELINE:
        bundle = dit_pipeline_bundle(pipe, conditions, guidance_scale, num_inference_steps, eta, seed, num_images,
                                     height, width, device)
    else:
        (bundle,) = pipeline_bundles(pipe, [conditions], negative_prompt, guidance_scale, num_inference_steps, eta,
                                     seed, num_images, height, width, device,
                                     max_sequence_length=max_sequence_length, true_cfg_scale=true_cfg_scale)
    try:
        return sample_bundle(bundle, config, batch_size, output_type, compare_sequential, sharding, net.dtype, device,
                             screen=safety_screen(pipe, device))
    except NonFiniteModelOutput as e:  # as the scripts say it (runner.loop): the argument that most often causes it
        extreme = [f"{name} {value:g}" for name, value in (("guidance_scale", guidance_scale),
                                                            ("true_cfg_scale", true_cfg_scale)) if abs(value) > 50]
        if not extreme:
            raise
        raise NonFiniteModelOutput(f"{e} ({' and '.join(extreme)} {'is' if len(extreme) == 1 else 'are'} extreme: "
                                   f"lower it)") from None


def sample_bundle(bundle, config, batch_size, output_type, compare_sequential, sharding, dtype, device, screen=None):
    """parallel_sample's run of a pipeline's bundle (runner.loop.Bundle) with checked arguments: its samples solved
    batch by batch (the window planned on the first, each new batch size warmed up first), timed, decoded.
    screen: the pipeline's safety checker on the decoded images (safety_screen), or None."""
    num_images, T = bundle.num_samples, bundle.schedule.num_steps
    config = config.resolve(T)
    stream, B = bundle.noise(), batch_size or num_images
    batch_bytes = min(B, num_images) * (T + 1) * math.prod(bundle.latent) * 8  # float64 noise
    host = host_memory_available()
    if host is not None and batch_bytes > host:  # torch's allocation error would name neither argument
        raise ValueError(f"num_images {num_images} in batches of {min(B, num_images)} needs "
                         f"{batch_bytes / 2 ** 30:.1f} GiB of noise per batch alone ({host / 2 ** 30:.1f} GiB "
                         f"available); lower batch_size")
    latents, x_T, iterations, results, seconds, seq_seconds, plan = [], [], [], [], 0.0, 0.0, None
    predicted = 0.0  # window auto: the plan's prediction of every batch, as the scripts' predicted_sampling_seconds
    for start in range(0, num_images, B):
        stop = min(start + B, num_images)
        noise, cond = stream.take(stop - start).to(device), bundle.cond(start, stop)
        if config.window_size == "auto" and start == 0:  # measured once, for the first batch
            plan = plan_window(bundle.eps_fn, bundle.schedule, noise, cond, config, sharding or Sharding(), dtype,
                               solve=solve)
            config = replace(config, window_size=plan.window).resolve(T)
        if start == 0 or stop - start != B:  # the first batch, and a smaller last one: warmed up at its sizes
            # (without it the first solve paid the device's first-call costs and the sequential run after it did
            # not: window 1, which is sequential sampling, reported 0.25x for a model whose first call cost 0.3 s)
            warm_up(bundle.eps_fn, bundle.schedule, noise, cond, sharding or Sharding(), dtype,
                    [min(config.window_size, T)] + ([1] if compare_sequential else []))
            if not compare_sequential:  # the estimate's unit, as the scripts': one state per sample, timed warm
                per_call = measure_call_seconds(bundle.eps_fn, bundle.schedule, noise, cond, sharding or Sharding(),
                                                dtype, [1])[stop - start]
        if plan is not None:  # a smaller last batch at its own timed call of one state per sample, as the scripts
            predicted += plan.predict(stop - start, (stop - start, per_call) if start and not compare_sequential
                                      and stop - start != B else None)
        sync(device)
        t0 = time.perf_counter()
        res = solve(bundle.eps_fn, bundle.schedule, noise, cond, config, model_dtype=dtype, sharding=sharding,
                    record_x0=True, image_fn=bundle.image)
        sync(device)
        seconds += time.perf_counter() - t0
        if compare_sequential:
            sync(device)
            t0 = time.perf_counter()
            sample_sequential(bundle.eps_fn, bundle.schedule, noise, cond, model_dtype=dtype, sharding=sharding)
            sync(device)
            seq_seconds += time.perf_counter() - t0
        else:  # sequential sampling of this batch: T calls of one state per sample
            seq_seconds += T * per_call
        latents.append(res.samples.cpu())
        x_T.append(noise[:, -1].cpu())
        iterations += res.iterations
        results.append(res)
    stopped = [i for i, done in enumerate(c for res in results for c in res.converged) if not done]
    if stopped:  # the scripts say it on the terminal; the image is not the sequential sampler's
        # the caller's line (1: here, 2: parallel_sample, 3: torch.no_grad's wrapper)
        warnings.warn(f"max_steps {config.max_steps} stopped {len(stopped)} of {num_images} samples "
                      f"({', '.join(map(str, stopped))}) before they converged: their images are not the sequential "
                      f"sampler's (out.results[b].converged)", stacklevel=4)
    latents = torch.cat(latents)
    images = bundle.decode(latents)                                                        # uint8 [N, H, W, 3]
    flagged = None
    if screen is not None:
        images, flagged = screen(images)
    if output_type == "pil":
        images = [Image.fromarray(img) for img in images]
    # what the run gained, as the scripts say it: sequential sampling measured (compare_sequential) or estimated
    speed = {"sampling_seconds": seconds, "sequential_seconds": seq_seconds,
             "sequential_measured": bool(compare_sequential), "speedup": seq_seconds / seconds,
             "unfinished": len(stopped)}
    if plan is not None:  # plan.predicted_seconds is the first batch's
        speed["predicted_sampling_seconds"] = predicted
    return ParallelOutput(images=list(images), latents=latents, x_T=torch.cat(x_T), iterations=iterations,
                          results=results, config=config, speed=speed, plan=plan, nsfw_content_detected=flagged)


def safety_screen(pipe, device):
    """The pipeline's safety checker (StableDiffusionPipeline loaded with one, as from_pretrained loads SD v1.x by
    default) as its __call__ applies it: uint8 images [N, H, W, 3] -> (the images, a flagged one black; the flags per
    image). None where it has none. Without it a flagged image came back as sampled where pipe(...) returns it
    black, and nothing said so."""
    if getattr(pipe, "safety_checker", None) is None or not hasattr(pipe, "run_safety_checker"):
        return None
    if getattr(pipe, "feature_extractor", None) is None:  # checked before sampling: it would fail after it
        raise ValueError("pipe has a safety_checker but no feature_extractor, which its __call__ needs for it: set "
                         "pipe.safety_checker = None, or give it its feature_extractor")
    # __call__ hands it its prompt embeddings' dtype: the text encoder's (the denoiser's without one)
    encoder = getattr(pipe, "text_encoder", None)
    dtype = encoder.dtype if encoder is not None else network(pipe).dtype

    def screen(images):
        flags = []
        for start in range(0, len(images), 16):  # chunks, as the VAE decodes
            # floats in [0, 1]: run_safety_checker quantises them back to these uint8 pixels for its feature extractor
            part = images[start:start + 16].astype(np.float32) / 255
            _, flagged = pipe.run_safety_checker(part, device, dtype)
            flags += [bool(f) for f in flagged]
        images = images.copy()
        images[np.array(flags, dtype=bool)] = 0  # what __call__ makes of a flagged image: not denormalised, black
        return images, flags
    return screen


# replacements for arguments of the pipelines' own __call__ that parallel_sample does not take
CALL_ONLY = {"generator": "the noise comes from seed (pipe(latents=out.x_T) replays it)",
             "latents": "the initial noise comes from seed (out.x_T; pipe(latents=out.x_T) replays it)",
             "num_images_per_prompt": "give num_images (the prompts are cycled over the images)",
             "return_dict": "it returns a ParallelOutput",
             "prompt_embeds": "give the prompt as text", "negative_prompt_embeds": "give negative_prompt as text",
             **dict.fromkeys(["callback", "callback_steps", "callback_on_step_end"],
                             "the solver's iterations are not the pipeline's steps")}


def check_call_only_arguments(pipe, solver):
    """TypeError naming an argument of the pipeline's own __call__ (generator, latents, num_images_per_prompt,
    prompt_embeds, guidance_rescale, ...) given to parallel_sample, which does not take it: they reached **solver and
    were refused as "unknown solver parameters ... (see paratAA.SolverConfig)", a list that never has them."""
    parameters = inspect.signature(type(pipe).__call__).parameters
    own = {n for n, p in parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} - {"self"}
    # a **kwargs of __call__ takes the deprecated ones (SD's callback); DiTPipeline's takes no prompt_embeds
    if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        own |= set(CALL_ONLY)
    solver_fields = {f.name for f in fields(SolverConfig)}
    for name in solver:
        if name not in solver_fields and name in own:
            hint = CALL_ONLY.get(name, "it samples what __call__ does with that argument left out")
            raise TypeError(f"{name} is an argument of {type(pipe).__name__}.__call__ that parallel_sample does not "
                            f"take: {hint}")


def call_default(pipe, name, fallback):
    """The default of argument `name` of the pipeline's own __call__ (that of its class, which a subclass may
    change), or fallback where it has none that is a number."""
    parameter = inspect.signature(type(pipe).__call__).parameters.get(name)
    default = None if parameter is None else parameter.default
    return default if isinstance(default, numbers.Real) and not isinstance(default, bool) else fallback


def check_arguments(pipe, prompt, negative_prompt, guidance_scale, num_inference_steps, num_images, seed, height,
                    width, batch_size, output_type, compare_sequential=False, eta=0.0, max_sequence_length=None,
                    true_cfg_scale=1.0, sharding=None, class_labels=None):
    """parallel_sample's own arguments, before anything is encoded or drawn: the list of prompts (a DiTPipeline: of
    class ids), or ValueError / TypeError naming the argument (as the scripts' flags are checked). eta is checked by
    the schedule, the solver's parameters by SolverConfig."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real) \
            or not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    kind = pipeline_kind(pipe)
    cfg = network(pipe).config
    if kind == DIT_PIPELINE:
        conditions, what = check_class_labels(pipe, class_labels, prompt, negative_prompt, max_sequence_length,
                                              true_cfg_scale), "class_labels"
        # DiTPipeline's __call__ takes no size: its latents are the transformer's sample_size, always
        own = sample_pixels(cfg.sample_size, pixels_per_cell(pipe))
        for name, value, size in zip(("height", "width"), (height, width), own):
            if isinstance(value, bool) or value != size:
                raise ValueError(f"{name} must be {size} for a DiTPipeline (the only size it samples: its "
                                 f"transformer's sample_size {cfg.sample_size} x VAE factor {pixels_per_cell(pipe)}), "
                                 f"got {value!r}")
    else:
        conditions, what = check_prompts(pipe, prompt, negative_prompt, guidance_scale, max_sequence_length,
                                         true_cfg_scale, class_labels), "prompts"
        if kind in pixart.FAMILIES:  # any size, resized back from the aspect-ratio bin it samples
            problem = binned_size_problem(kind, cfg.sample_size, height, width, pixels_per_cell(pipe),
                                          patch_of(kind, cfg), cfg.get("pos_embed_max_size"))
            if problem:
                raise ValueError(f"{problem[0]} {problem[1]}")
        else:
            for name, value in (("height", height), ("width", width)):
                problem = wrong_size(value, pixels_per_cell(pipe), patch_of(kind, cfg), cfg.get("pos_embed_max_size"))
                if problem:
                    raise ValueError(f"{name} must be {problem}")
    # the schedule's own checks (the steps against the scheduler's spacing, eta), named as called here; the sizes
    # first (above), which Flux's schedule reads
    schedule_of(pipe, num_inference_steps, eta, height, width, "num_inference_steps")
    if not is_integer(num_images) or num_images < 1:
        raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}")
    if len(conditions) > num_images:  # cycled over the images: the rest would never be sampled
        raise ValueError(f"{len(conditions)} {what} for num_images = {num_images}: the last "
                         f"{len(conditions) - num_images} would be ignored")
    if not isinstance(compare_sequential, bool):
        raise TypeError(f"compare_sequential must be True or False, got {compare_sequential!r}")
    # anything else failed at the first model call, after the prompts were encoded, in an AttributeError ('str'
    # object has no attribute 'evaluate') naming no argument
    if sharding is not None and not isinstance(sharding, Sharding):
        raise TypeError(f"sharding must be a paratAA.Sharding or None, got {sharding!r}")
    if not is_integer(seed) or not 0 <= seed < 2 ** 64:  # what a generator takes
        raise ValueError(f"seed must be an integer in 0..{2 ** 64 - 1}, got {seed!r}")
    if batch_size is not None and (not is_integer(batch_size) or batch_size < 1):
        raise ValueError(f"batch_size must be an integer >= 1 or None (all images together), got {batch_size!r}")
    if not isinstance(output_type, str) or output_type not in ("pil", "np"):
        raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")
    return conditions


def check_prompts(pipe, prompt, negative_prompt, guidance_scale, max_sequence_length, true_cfg_scale, class_labels):
    """A text-to-image pipeline's conditioning arguments: the list of prompts, or ValueError / TypeError naming the
    argument."""
    if class_labels is not None:
        raise ValueError(f"class_labels are a DiTPipeline's conditioning; a {type(pipe).__name__} takes a prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise TypeError(f"negative_prompt must be a string or None, got {negative_prompt!r}")
    for name, texts in (("prompt", prompts), ("negative_prompt", [negative_prompt or ""])):
        if any(undecodable(p) for p in texts):
            raise ValueError(f"{name} holds characters that are not text (lone surrogates, e.g. bytes decoded with "
                             f"errors='surrogateescape'), got {texts!r}")
    kind = pipeline_kind(pipe)
    is_flux = kind == flux.FLUX
    if max_sequence_length is not None and kind not in T5_FAMILIES:
        raise ValueError(f"max_sequence_length is the T5 prompt's length ({T5_NAMES}); "
                         f"pipe is a {type(pipe).__name__}")
    if max_sequence_length is not None and (not is_integer(max_sequence_length)
                                            or not 1 <= max_sequence_length <= MAX_T5_TOKENS):
        raise ValueError(f"max_sequence_length must be an integer in 1..{MAX_T5_TOKENS} (the pipelines' limit), got "
                         f"{max_sequence_length!r}")
    if is_flux:  # its guidance_scale is a distilled input of the network; true_cfg_scale guides with negative_prompt
        problem = flux.true_cfg_problem(true_cfg_scale, negative_prompt, "true_cfg_scale", "negative_prompt")
        if problem:
            raise ValueError(problem)
    elif true_cfg_scale != 1.0:
        raise ValueError(f"true_cfg_scale is FluxPipeline's classifier-free guidance; for a {type(pipe).__name__} it "
                         f"is guidance_scale")
    # it only enters guidance's unconditional branch; "" is a prompt too (encoded, not the pipeline's default)
    elif negative_prompt is not None and not guides(guidance_scale):
        raise ValueError(f"negative_prompt has no effect without guidance (guidance_scale {guidance_scale:g} <= 1)")
    return list(prompts)


def check_class_labels(pipe, class_labels, prompt, negative_prompt, max_sequence_length, true_cfg_scale):
    """A DiTPipeline's conditioning arguments: the list of class ids (names read as pipe.get_label_ids reads them),
    or ValueError / TypeError naming the argument; the text pipelines' arguments refused, naming them."""
    for name, given in (("prompt", prompt is not None), ("negative_prompt", negative_prompt is not None),
                        ("max_sequence_length", max_sequence_length is not None),
                        ("true_cfg_scale", true_cfg_scale != 1.0)):
        if given:  # DiTPipeline's __call__ has none of them: the image would silently not be what was asked
            raise ValueError(f"{name} is for the text-to-image pipelines; a DiTPipeline is conditioned on "
                             f"class_labels (and guided away from its null class)")
    if class_labels is None:  # DiTPipeline's __call__ requires them too
        raise ValueError("class_labels must be given for a DiTPipeline: class ids, or names of pipe.labels")
    labels = [class_labels] if isinstance(class_labels, (str, numbers.Integral)) else class_labels
    if not isinstance(labels, (list, tuple)) or not labels \
            or not all(is_integer(c) or isinstance(c, str) for c in labels):  # bools and floats too
        raise TypeError(f"class_labels must be a class id, a label name or a non-empty list of them, got "
                        f"{class_labels!r}")
    names = getattr(pipe, "labels", None) or {}
    unknown = [c for c in labels if isinstance(c, str) and c not in names]
    if unknown:  # get_label_ids would list every name, a thousand for ImageNet's
        raise ValueError(f"class_labels: {unknown[0]!r} is not a name in pipe.labels ("
                         + (f"{len(names)} names, e.g. {next(iter(names))!r})" if names else
                            "empty: the pipeline was built without id2label; give class ids)"))
    ids = [int(c) if is_integer(c) else int(pipe.get_label_ids([c])[0]) for c in labels]
    classes = network(pipe).config.num_embeds_ada_norm  # the next row is the null class
    wrong = [c for c in ids if not 0 <= c < classes]
    if wrong:
        raise ValueError(f"class_labels must be in 0..{classes - 1} (the transformer's num_embeds_ada_norm), got "
                         f"{wrong[0]}")
    return ids
