"""The scripts' models as the loop sees them: loaders that build a runner.loop.Bundle from the checked flags.

    dit_bundle(args, session)                 class-conditional DiT (parallel_dit.py)
    dit_pipeline_bundle(pipe, labels, ...)    a DiTPipeline already loaded (models/pipelines.py:parallel_sample),
                                              its x_T drawn as the pipeline's __call__ draws it
    sd_bundles(args, session, prompt_sets)    Stable Diffusion, one bundle per set of prompts (cycled over the
                                              samples), all sharing one pipeline and the same noise
                                              (parallel_sd.py: one set; parallel_sd_winit.py: two)

Noise and labels come from one CPU generator seeded with --seed, identical on every rank; the noise is handed out
batch by batch with the values of a single draw (paratAA.NoiseStream).
"""
import functools

import torch

from paratAA import NoiseStream
from paratAA.schedule import is_flow
from runner.loop import Bundle

from . import flux, pixart
from .adapters import VAEDecoder
from .dit_source import LoadedDiT, pipeline_denoiser
from .sd import denoiser, encode, latent_shape, load_pipeline, pipeline_kind, sampled_size, schedule_of

def _stream_after(generator):
    """A factory of noise streams that all start where `generator` stands now."""
    state = generator.get_state()

    def fresh(num_samples, T, latent):
        g = torch.Generator()
        g.set_state(state)
        return NoiseStream(num_samples, T, latent, g)
    return fresh


def dit_bundle(args, session):
    dit = LoadedDiT(args, session.device, session.model_dtype)
    schedule, latent = dit.schedule(args.timesteps, args.eta), dit.latent
    scheduler = {**dit.scheduler, "timesteps": schedule.timesteps.tolist()}
    S = args.num_samples

    @functools.cache
    def draw():
        """(labels [S], noise stream factory), drawn on first use: after the loop has checked that S fits."""
        g = torch.Generator().manual_seed(args.seed)
        if args.class_labels:
            labels = torch.tensor([args.class_labels[i % len(args.class_labels)] for i in range(S)])
        else:  # drawn first, then the noise, from the same generator
            labels = torch.randint(0, args.num_classes, (S,), generator=g)
        return labels, _stream_after(g)

    decode = VAEDecoder(dit.vae, session.device, family=dit.family)
    return Bundle(eps_fn=dit.eps_fn, schedule=schedule,
                  num_samples=S, latent=latent, noise=lambda: draw()[1](S, args.timesteps, latent),
                  cond=lambda start, stop: draw()[0][start:stop].to(session.device),
                  label=lambda i: {"class_label": int(draw()[0][i])},
                  decode=decode, image=decode.levels, cond_bytes=8,
                  info={"model": args.model, "scheduler": scheduler})


def pipeline_bundles(pipe, prompt_sets, negative_prompt, cfg_scale, T, eta, seed, num_samples, height, width,
                     device, info=None, max_sequence_length=None, true_cfg_scale=None):
    """Bundles of an already-loaded Stable Diffusion, Flux or PixArt pipeline, one per list of prompts (sample i gets
    prompts[i % len(prompts)]), sharing one schedule and the same noise (drawn from `seed`). max_sequence_length:
    SD3's and Flux's T5 prompt length (None: the pipeline's default); true_cfg_scale: Flux's classifier-free
    guidance with the negative prompt (None: none). height x width: the images' size; PixArt samples its
    aspect-ratio bin (the latents' size) and resizes the images back to it."""
    eps_fn = denoiser(pipe, cfg_scale, 1.0 if true_cfg_scale is None else true_cfg_scale)
    schedule = schedule_of(pipe, T, eta, height, width)  # Flux's depends on the image size
    binned = pipeline_kind(pipe) in pixart.FAMILIES  # PixArt samples its aspect-ratio bin and resizes back
    finish = pixart.resize_back(height, width) if binned else None
    # SDXL's __call__ watermarks its decoded images where it was built with a watermarker (add_watermarker, by
    # default when the invisible-watermark package is installed); the images here are to be the same
    watermark = getattr(getattr(pipe, "watermark", None), "apply_watermark", None)
    if watermark is not None:
        finish = watermark if finish is None else lambda images, f=finish: watermark(f(images))
    height, width = sampled_size(pipe, height, width)  # what is sampled from here on
    # the latents unscaled as its __call__ does
    decode = VAEDecoder(pipe.vae, device, family=pipeline_kind(pipe), finish=finish)
    latent = latent_shape(pipe, height, width)
    noise = _stream_after(torch.Generator().manual_seed(seed))
    info = {**(info or {}), "negative_prompt": negative_prompt, "scheduler": _scheduler_info(pipe, height, width)}
    if binned:  # the latents' size, which the images are not
        info["sampled_size"] = [height, width]
    bundles = []
    for prompts in prompt_sets:
        # each distinct prompt is encoded once; a batch takes its rows, so batching never changes the embedding
        emb = encode(pipe, list(prompts), negative_prompt, device, (height, width),
                     max_sequence_length)                                                   # {k: [P, ...]}
        row_bytes = sum(v[0].numel() * v.element_size() for v in emb.values())

        def cond(start, stop, emb=emb, P=len(prompts)):
            rows = torch.arange(start, stop, device=device) % P
            return {k: v[rows] for k, v in emb.items()}

        bundles.append(Bundle(eps_fn=eps_fn, schedule=schedule, num_samples=num_samples, latent=latent,
                              noise=lambda: noise(num_samples, T, latent), cond=cond,
                              label=lambda i, prompts=prompts: {"prompt": prompts[i % len(prompts)]}, decode=decode,
                              image=decode.levels, cond_bytes=row_bytes, info=info))
    return bundles


def _scheduler_info(pipe, height, width):
    """What metrics.json records about a loaded pipeline's scheduler, and how it is read."""
    read_as = "Euler steps of the flow (paratAA.flow_schedule)" if is_flow(pipe.scheduler) \
        else "DDIMScheduler (paratAA.from_ddim_scheduler)"
    if pipeline_kind(pipe) == flux.FLUX:  # what FluxPipeline hands set_timesteps for this size, to replay the run
        mu = flux.mu_of(pipe.scheduler.config, flux.image_tokens(height, width, pipe.vae_scale_factor))
        read_as += f", sigmas linspace(1, 1/T, T), mu {mu!r}"
    return {"class": type(pipe.scheduler).__name__, "config": dict(pipe.scheduler.config), "read_as": read_as}


class _GivenStart:
    """A NoiseStream whose x_T (the last of each sample's T + 1 draws) are given, the rest taken from `steps`
    ([T, *latent] per sample): the same interface, take(n) -> [n, T+1, *latent] float64."""

    def __init__(self, x_T, steps):
        self.x_T, self.steps, self.given = x_T, steps, 0                              # x_T: [N, *latent]

    def take(self, n):
        x_T, self.given = self.x_T[self.given:self.given + n], self.given + n
        return torch.cat([self.steps.take(n), x_T[:, None].double()], dim=1)


def dit_pipeline_bundle(pipe, labels, cfg_scale, T, eta, seed, num_samples, height, width, device):
    """The bundle of an already-loaded DiTPipeline: sample i gets class labels[i % len(labels)] (ids), guided as
    DiTPipeline guides (models/dit_source.py:pipeline_denoiser), its scheduler read as DDIM.

    x_T is drawn as the pipeline's __call__ draws its latents from torch.Generator().manual_seed(seed): one
    randn_tensor of all samples [N, C, S, S] in the transformer's dtype, on the CPU, whatever the batches; so
    pipe(class_labels, generator=torch.Generator().manual_seed(seed)) starts from the same noise. Its loop has no
    eta: the per-step noise (eta > 0) is drawn from that generator after x_T."""
    from diffusers.utils.torch_utils import randn_tensor
    latent = latent_shape(pipe, height, width)
    labels = torch.tensor([labels[i % len(labels)] for i in range(num_samples)])                          # [N]

    @functools.cache
    def draw():
        """(x_T [N, *latent], stream factory of the steps' noise), on first use: after the caller's memory check."""
        g = torch.Generator().manual_seed(seed)
        x_T = randn_tensor((num_samples, *latent), generator=g, device=torch.device("cpu"),
                           dtype=pipe.transformer.dtype)
        return x_T, _stream_after(g)

    # the steps' noise, [T, *latent] per sample: a NoiseStream of T - 1 steps (it draws T + 1 a sample)
    decode = VAEDecoder(pipe.vae, device, family=pipeline_kind(pipe))
    return Bundle(eps_fn=pipeline_denoiser(pipe, cfg_scale), schedule=schedule_of(pipe, T, eta, height, width),
                  num_samples=num_samples, latent=latent,
                  noise=lambda: _GivenStart(draw()[0], draw()[1](num_samples, T - 1, latent)),
                  cond=lambda start, stop: labels[start:stop].to(device),
                  label=lambda i: {"class_label": int(labels[i])},
                  decode=decode, image=decode.levels, cond_bytes=8,
                  info={"scheduler": _scheduler_info(pipe, height, width)})


def sd_bundles(args, session, prompt_sets):
    """The SD scripts' bundles: the pipeline of --model_path, loaded on this process's device."""
    pipe = load_pipeline(args.model_path, session.device, session.model_dtype)
    return pipeline_bundles(pipe, prompt_sets, args.negative_prompt, args.cfg_scale, args.timesteps, args.eta,
                            args.seed, args.num_samples, args.height, args.width, session.device,
                            info={"model_path": args.model_path}, max_sequence_length=args.max_sequence_length,
                            true_cfg_scale=args.true_cfg_scale)
