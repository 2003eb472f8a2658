"""The scripts' models as the loop sees them: loaders that build a runner.loop.Bundle from the checked flags.

    dit_bundle(args, session)                  class-conditional DiT (parallel_dit.py)
    sd_bundles(args, session, prompt_lists)    Stable Diffusion, one bundle per prompt list sharing the noise
                                               (parallel_sd.py: one list; parallel_sd_winit.py: two)
"""
import torch

from paratAA import dit_schedule, draw_noise, pipeline_schedule
from runner.loop import Bundle

from .adapters import DiTDenoiser, SDDenoiser, VAEDecoder
from .checkpoints import DIT_WEIGHTS_URL, load_into, load_state_dict, load_vae, require_file
from .dit import DiT_models
from .sd import encode, latent_shape, load_pipeline

EMBEDDED_DIT = "DiT-Digits"
DIT_CFG_SCALE = 4.0  # the default guidance of parallel_dit.py (the reference's)


def load_dit(args, device, dtype):
    """The DiT named by --model with --model_path's weights, in eval mode."""
    if args.model == EMBEDDED_DIT:
        from . import digits
        kwargs = {k: v for k, v in digits.load_embedded_config().items() if k not in ("model", "training")}
    else:
        kwargs = dict(input_size=args.image_size // 8, num_classes=args.num_classes)
    hint = ("the embedded weights ship with the repository in models/embedded" if args.model == EMBEDDED_DIT else
            "public DiT-XL/2 weights: " + DIT_WEIGHTS_URL.format(name=f"DiT-XL-2-{args.image_size}x{args.image_size}.pt"))
    require_file(args.model_path, "--model_path", hint)
    model = DiT_models[args.model](**kwargs)
    load_into(model, load_state_dict(args.model_path), args.model_path)
    return model.to(device=device, dtype=dtype).eval()


def dit_bundle(args, session):
    model = load_dit(args, session.device, session.model_dtype)
    vae = load_vae(args.vae_path, session.device, torch.float32)
    # labels and noise from one CPU generator: identical on every rank
    g = torch.Generator().manual_seed(args.seed)
    if args.class_labels:
        labels = torch.tensor([args.class_labels[i % len(args.class_labels)] for i in range(args.num_samples)])
    else:
        labels = torch.randint(0, args.num_classes, (args.num_samples,), generator=g)
    latent = (model.in_channels, model.x_embedder.img_size[0], model.x_embedder.img_size[1])
    noise = draw_noise(args.num_samples, args.timesteps, latent, g)
    return Bundle(eps_fn=DiTDenoiser(model, args.cfg_scale), schedule=dit_schedule(args.timesteps, args.eta),
                  noise=noise.to(session.device), cond=labels.to(session.device),
                  decode=VAEDecoder(vae, session.device), labels=[{"class_label": int(c)} for c in labels],
                  info={"model": args.model})


def sd_bundles(args, session, prompt_lists):
    """One bundle per list of per-sample prompts; one pipeline, one schedule and one noise tensor for all."""
    pipe = load_pipeline(args.model_path, session.device, session.model_dtype)
    eps_fn = SDDenoiser(pipe.unet, args.cfg_scale)
    schedule = pipeline_schedule(pipe, args.timesteps, args.eta)
    decode = VAEDecoder(pipe.vae, session.device)
    # per-step noise from one CPU generator: identical on every rank
    noise = draw_noise(args.num_samples, args.timesteps, latent_shape(pipe, args.height, args.width),
                       torch.Generator().manual_seed(args.seed)).to(session.device)
    info = {"model_path": args.model_path, "negative_prompt": args.negative_prompt}
    return [Bundle(eps_fn=eps_fn, schedule=schedule, noise=noise,
                   cond=encode(pipe, prompts, args.negative_prompt, session.device), decode=decode,
                   labels=[{"prompt": p} for p in prompts], info=info) for prompts in prompt_lists]
