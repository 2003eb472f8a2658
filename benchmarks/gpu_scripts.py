"""The scripts end to end on a GPU with the default flags: what a user launching them sees there.

    python benchmarks/gpu_scripts.py --out gpu_scripts.json      # on a GPU machine, about 3 minutes
    python benchmarks/gpu_scripts.py --smoke                     # tiny sizes on this CPU: checks the script runs

1. parallel_dit.py with a DiT-XL/2 256 checkpoint of random weights (a raw state dict `.pt`, as the public ones
   are) and a VAE folder in sd-vae-ft-ema's configuration (random weights), --fp16, default flags (window auto),
   --compare_sequential, 2 samples; then the same command again, which reads the model's cost curve from the cache
   instead of measuring it. Random weights make the iteration counts unlike a trained model's (see gpu_bench.py
   for the speed a trained model would get); what this shows is the run a user gets: the window the planner
   picks on this GPU, and the speed-up and sequential time every run prints.
2. The embedded DiT, text-to-image (SD layout) and flow-matching (SD3 layout) models through the scripts on the
   GPU, one with `accelerate launch`: every family's CUDA path, exit code 0.

Writes each run's exit code, last printed lines, and from its metrics.json the window, the iterations and the
speed block.
"""
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.convergence import check_out_file, write_json  # noqa: E402
from benchmarks.gpu_bench import check_gpu  # noqa: E402
from models.dit import DiT_models  # noqa: E402
from runner.errors import UsageError, exit_on_error  # noqa: E402
from runner.flags import home_path, make_parser  # noqa: E402

# stabilityai/sd-vae-ft-ema's config.json (the VAE of the public DiT checkpoints)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=2, norm_num_groups=32, sample_size=256, scaling_factor=0.18215)


def build_checkpoint(folder, smoke):
    """(flags naming a DiT checkpoint and VAE folder of random weights in the real layouts)."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    name, size = ("DiT-S/8", 64) if smoke else ("DiT-XL/2", 256)
    model = DiT_models[name](input_size=size // 8, num_classes=1000)
    for p in model.final_layer.parameters():  # adaLN-Zero makes a fresh model's output exactly 0
        p.data.normal_(0, 0.02)
    torch.save(model.state_dict(), os.path.join(folder, "dit.pt"))
    vae = dict(SD_VAE, block_out_channels=(32, 32, 32, 32), norm_num_groups=8) if smoke else SD_VAE
    AutoencoderKL(**vae).save_pretrained(os.path.join(folder, "vae"))
    return ["--model", name, "--image_size", str(size), "--model_path", os.path.join(folder, "dit.pt"),
            "--vae_path", os.path.join(folder, "vae")]


def run(name, argv, out_dir, env, timeout):
    """Run one command; its exit code, seconds, last lines and metrics.json summary."""
    t0 = time.perf_counter()
    command = " ".join(argv[1:] if argv[0] == sys.executable else argv)
    try:
        proc = subprocess.run(argv + ["--output_path", out_dir], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:  # recorded as a failed run; the runs after it still run
        print(f"{name}: timed out after {timeout} s (--timeout)")
        return {"command": command, "exit_code": "timeout", "seconds": time.perf_counter() - t0, "last_lines": []}
    row = {"command": command, "exit_code": proc.returncode, "seconds": time.perf_counter() - t0,
           "last_lines": [line for line in proc.stdout.splitlines() if line.strip()][-3:]}
    if proc.returncode:
        row["stderr"] = proc.stderr.splitlines()[-5:]
    runs = sorted(glob.glob(os.path.join(out_dir, "*", "metrics.json")), key=os.path.getmtime)
    if runs and proc.returncode == 0:
        with open(runs[-1]) as f:
            m = json.load(f)
        row.update(window=m.get("window_size"), window_chosen_by=m.get("window_chosen_by"),
                   iterations=[s["iterations"] for s in m["samples"]], speed=m.get("speed"),
                   plan_measured=(m.get("plan") or {}).get("measured"))
    print(f"{name}: exit {row['exit_code']}, {row['seconds']:.1f} s")
    for line in row["last_lines"] + row.get("stderr", []):
        print("   ", line)
    return row


def main(args):
    if args.timeout < 1:
        raise UsageError(f"--timeout must be >= 1 second, got {args.timeout}")
    if args.out is not None:
        check_out_file(args.out, args=args)
    check_gpu(args.smoke, "runs the scripts on DiT-XL/2-sized checkpoints")
    py = sys.executable
    report = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PARATAA_CACHE=os.path.join(tmp, "cache"), PYTHONUNBUFFERED="1")
        ckpt = build_checkpoint(tmp, args.smoke)
        fp16 = [] if args.smoke else ["--fp16"]
        out = os.path.join(tmp, "runs")
        common = ["--num_samples", "2", "--compare_sequential"] + (["--timesteps", "20"] if args.smoke else [])
        commands = {
            "DiT-XL/2 checkpoint, default flags": [py, "parallel_dit.py"] + ckpt + fp16 + common,
            "DiT-XL/2 checkpoint, second run (cached cost curve)": [py, "parallel_dit.py"] + ckpt + fp16 + common,
            "embedded DiT": [py, "parallel_dit.py"] + common,
            "embedded text-to-image (accelerate launch)": [py, "-m", "accelerate.commands.launch", "--num_processes",
                                                           "1", "--num_machines", "1", "--mixed_precision", "no",
                                                           "--dynamo_backend", "no", "parallel_sd.py"] + common,
            "embedded flow matching": [py, "parallel_sd.py", "--model_path", "models/embedded/flow"] + common,
        }
        for name, argv in commands.items():
            report["runs"][name] = run(name, argv, out, env, args.timeout)
            if args.out:  # after every run: a run stopped by its time limit keeps the ones before
                write_json(report, args.out)
    failed = [k for k, v in report["runs"].items() if v["exit_code"]]
    print("all runs exited 0" if not failed else f"failed: {failed}")
    return 1 if failed else 0


def parse_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny random checkpoint, on whatever device there is")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per run")
    parser.add_argument("--out", type=home_path, default=None)
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(exit_on_error(main, parse_args()))
