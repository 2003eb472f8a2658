"""Stable Diffusion (v1.5 layout, local diffusers folder) sampled in parallel with ParaTAA.

    python parallel_sd.py --prompt "a handwritten digit seven"          # the embedded digits model
    accelerate launch --num_processes 8 parallel_sd.py --model_path stable-diffusion-v1-5 --fp16 \\
        --prompt "a photo of an astronaut riding a horse"

The scheduler is the pipeline's own, read as DDIM (SD v1.5 keeps alphas_cumprod[0] after the last step).
"""
import argparse

import torch

from models.adapters import SDDenoiser, VAEDecoder
from models.sd import EMBEDDED_SD, check_folder, check_size, encode, latent_shape, load_pipeline
from paratAA import Sharding, pipeline_schedule
from paratAA.cli import (RunWriter, UsageError, add_solver_arguments, check_solver_arguments, create_run_dir,
                         exit_on_error, make_accelerator, sample_batches, save_args)

DEFAULT_PROMPT = "a handwritten digit seven"


def add_model_arguments(parser):
    g = parser.add_argument_group("model")
    g.add_argument("--model_path", type=str, default=None,
                   help="local diffusers Stable Diffusion folder (default: the embedded digits model)")
    g.add_argument("--negative_prompt", type=str, default="", help="prompt of the unconditional guidance branch")
    g.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    g.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")


def check_model_arguments(args, prompts):
    for flag, p in prompts:
        if not p or not p.strip():
            raise UsageError(f"{flag} must not be empty")
    check_solver_arguments(args, 1000)
    args.model_path = args.model_path or EMBEDDED_SD
    check_folder(args.model_path)
    check_size(args, args.model_path)


class Setup:
    """Everything both SD scripts load: accelerator, pipeline, denoiser, schedule, decoder."""

    def __init__(self, args):
        self.accelerator = make_accelerator(args)
        self.device, self.is_main = self.accelerator.device, self.accelerator.is_main_process
        torch.set_grad_enabled(False)
        self.dtype = torch.float16 if args.fp16 else torch.float32
        self.pipe = load_pipeline(args.model_path, self.device, self.dtype)
        self.eps_fn = SDDenoiser(self.pipe.unet, args.cfg_scale)
        self.schedule = pipeline_schedule(self.pipe, args.timesteps, args.eta)
        self.decode = VAEDecoder(self.pipe.vae, self.device)
        self.sharding = Sharding.from_accelerator(self.accelerator)
        self.latent = latent_shape(self.pipe, args.height, args.width)

    def noise(self, args):
        """Per-step noise from one CPU generator: identical on every rank."""
        g = torch.Generator().manual_seed(args.seed)
        return torch.randn((args.num_samples, args.timesteps + 1) + self.latent, generator=g,
                           dtype=torch.float64).to(self.device)

    def conditioning(self, prompts, args):
        return encode(self.pipe, prompts, args.negative_prompt, self.device)

    def writer(self, run_dir, args, script, prompts):
        """The run folder's writer (main process only): the scripts' shared layout, one prompt per sample."""
        if not self.is_main:
            return None
        save_args(args, run_dir)
        return RunWriter(run_dir, self.decode, args, script, [{"prompt": p} for p in prompts],
                         extra_metrics={"model_path": args.model_path, "negative_prompt": args.negative_prompt},
                         world_size=self.accelerator.num_processes)


def main(args):
    check_model_arguments(args, [("--prompt", p) for p in args.prompt])  # all flags before any model is loaded
    s = Setup(args)
    prompts = [args.prompt[i % len(args.prompt)] for i in range(args.num_samples)]
    run_dir = create_run_dir(args.output_path, "SD") if s.is_main else None
    writer = s.writer(run_dir, args, "parallel_sd", prompts)
    result = sample_batches(s.eps_fn, s.schedule, s.noise(args), s.conditioning(prompts, args), args, s.sharding,
                            s.dtype, s.is_main, writer=writer)
    if s.is_main:
        writer.close()
        print(f"wrote {run_dir}: iterations per sample {result['iterations']}, sampling {result['seconds']:.2f} s")
    s.accelerator.wait_for_everyone()
    return run_dir


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_solver_arguments(parser, cfg_scale=5.0)
    parser.add_argument("--prompt", type=str, nargs="+", default=[DEFAULT_PROMPT],
                        help="prompt(s), repeated cyclically over the samples")
    add_model_arguments(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_error(main, parse_args())
