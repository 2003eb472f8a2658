"""Class-conditional DiT sampled in parallel with ParaTAA.

    python parallel_dit.py                                   # the embedded digits model, CPU, no downloads
    accelerate launch --num_processes 8 parallel_dit.py --model DiT-XL/2 --image_size 256 \\
        --model_path DiT-XL-2-256x256.pt --vae_path sd-vae-ft-ema --fp16

Each iteration evaluates the DiT at the window of every sample in one batch, split across the processes.
"""
import argparse

import torch

from models.adapters import DiTDenoiser, VAEDecoder
from models.checkpoints import DIT_WEIGHTS_URL, VAE_SOURCE, load_into, load_state_dict, load_vae, require_file
from models.dit import DiT_models
from paratAA import Sharding, dit_schedule
from paratAA.cli import (RunWriter, UsageError, add_solver_arguments, check_solver_arguments, create_run_dir,
                         exit_on_error, make_accelerator, sample_batches, save_args)

EMBEDDED = "DiT-Digits"


def check_arguments(args):
    if args.model not in DiT_models:
        raise UsageError(f"--model must be one of {', '.join(DiT_models)}, got {args.model!r}")
    if args.model == EMBEDDED:
        from models import digits
        embedded = digits.load_embedded_config()
        args.model_path = args.model_path or digits.DIT_WEIGHTS
        args.vae_path = args.vae_path or digits.VAE_DIR
        args.num_classes = embedded["num_classes"]
    else:
        if args.image_size not in (256, 512):
            raise UsageError(f"--image_size must be 256 or 512 for a DiT checkpoint, got {args.image_size}")
        if not args.model_path or not args.vae_path:
            raise UsageError(f"--model {args.model} needs --model_path (a DiT checkpoint) and --vae_path ({VAE_SOURCE})")
    check_solver_arguments(args, 1000)
    if args.num_classes < 1:
        raise UsageError(f"--num_classes must be >= 1, got {args.num_classes}")
    for c in args.class_labels or []:
        if not 0 <= c < args.num_classes:
            raise UsageError(f"--class_labels must be in 0..{args.num_classes - 1}, got {c}")


def load_model(args, device, dtype):
    if args.model == EMBEDDED:
        from models import digits
        kwargs = {k: v for k, v in digits.load_embedded_config().items() if k not in ("model", "training")}
    else:
        kwargs = dict(input_size=args.image_size // 8, num_classes=args.num_classes)
    hint = ("the embedded weights ship with the repository in models/embedded" if args.model == EMBEDDED else
            "public DiT-XL/2 weights: " + DIT_WEIGHTS_URL.format(name=f"DiT-XL-2-{args.image_size}x{args.image_size}.pt"))
    require_file(args.model_path, "--model_path", hint)
    model = DiT_models[args.model](**kwargs)
    load_into(model, load_state_dict(args.model_path), args.model_path)
    return model.to(device=device, dtype=dtype).eval()


def main(args):
    check_arguments(args)  # every flag is checked before anything is loaded
    accelerator = make_accelerator(args)
    device, is_main = accelerator.device, accelerator.is_main_process
    torch.set_grad_enabled(False)
    dtype = torch.float16 if args.fp16 else torch.float32
    model = load_model(args, device, dtype)
    vae = load_vae(args.vae_path, device, torch.float32)
    eps_fn = DiTDenoiser(model, args.cfg_scale)
    schedule = dit_schedule(args.timesteps, args.eta)

    # labels and noise from one CPU generator: identical on every rank
    g = torch.Generator().manual_seed(args.seed)
    if args.class_labels:
        labels = torch.tensor([args.class_labels[i % len(args.class_labels)] for i in range(args.num_samples)])
    else:
        labels = torch.randint(0, args.num_classes, (args.num_samples,), generator=g)
    latent = (model.in_channels, model.x_embedder.img_size[0], model.x_embedder.img_size[1])
    noise = torch.randn((args.num_samples, args.timesteps + 1) + latent, generator=g, dtype=torch.float64)

    run_dir, writer = None, None
    if is_main:
        run_dir = create_run_dir(args.output_path, "DiT")
        save_args(args, run_dir)
        writer = RunWriter(run_dir, VAEDecoder(vae, device), args, "parallel_dit",
                           [{"class_label": int(c)} for c in labels], extra_metrics={"model": args.model},
                           world_size=accelerator.num_processes)
    result = sample_batches(eps_fn, schedule, noise.to(device), labels.to(device), args,
                            Sharding.from_accelerator(accelerator), dtype, is_main, writer=writer)
    if is_main:
        writer.close()
        print(f"wrote {run_dir}: iterations per sample {result['iterations']}, sampling {result['seconds']:.2f} s")
    accelerator.wait_for_everyone()
    return run_dir


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_solver_arguments(parser)
    g = parser.add_argument_group("model")
    g.add_argument("--model", type=str, default=EMBEDDED, help=f"DiT registry name (default: the embedded {EMBEDDED})")
    g.add_argument("--model_path", type=str, default=None,
                   help="DiT weights: raw state dict .pt, training checkpoint with 'ema'/'model', or .safetensors")
    g.add_argument("--vae_path", type=str, default=None, help="local diffusers AutoencoderKL folder")
    g.add_argument("--image_size", type=int, default=256, help="256 or 512 for the public DiT-XL/2 checkpoints")
    g.add_argument("--num_classes", type=int, default=1000, help="classes of the checkpoint (the embedded model: 10)")
    g.add_argument("--class_labels", type=int, nargs="+", default=None,
                   help="labels of the samples, repeated cyclically (default: random from the seed)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_error(main, parse_args())
