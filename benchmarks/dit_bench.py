"""DiT benchmark: FP, FP+ and ParaTAA against sequential DDIM, the tolerance and window trade-offs, the ablation.

    python benchmarks/dit_bench.py [--quick] [--out benchmarks/results/dit.json]          # the embedded model
    accelerate launch --num_processes 8 benchmarks/dit_bench.py --model DiT-XL/2 --image_size 256 \\
        --model_path DiT-XL-2-256x256.pt --vae_path sd-vae-ft-ema --fp16 --out results/dit_xl2.json

Model flags as parallel_dit.py's. Ten samples (sample i: class --class_labels[i], cycled, default class i, noise
seed i), window = T, cfg 4, eta 0. For each T and method: iterations to the stop rule and to "same image" (<= 1
gray level RMS from the decoded sequential sample), how many runs ended more than 1 gray level off, classifier
agreement (embedded model only), and the sampling wall-clock (decoding excluded) as a ratio to sequential sampling
in the same launch. Then tolerance and window sweeps and the order x memory ablation at the largest T, and the
per-iteration images of one sample (figure (b)) beside the JSON.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.convergence import (Bench, bench_defaults, bench_parser, check_bench_flags, repo_relative,  # noqa: E402
                                    run_benchmark, save_report)
from models import digits  # noqa: E402
from models.adapters import VAEDecoder  # noqa: E402
from models.dit_source import DIT_CFG_SCALE, EMBEDDED_DIT, LoadedDiT, add_dit_flags, check_dit_flags  # noqa: E402
from paratAA import noise_from_seeds  # noqa: E402
from runner.errors import UsageError, exit_on_error  # noqa: E402
from runner.launch import Session  # noqa: E402


def digit_classifier():
    clf = digits.train_digit_classifier()
    return lambda imgs: digits.classify_images(clf, torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1)


def add_model_flags(parser):
    """parallel_dit.py's model flags (models/dit_source.py); here sample i defaults to class i."""
    add_dit_flags(parser, labels_help="labels of the samples, cycled (default: sample i gets class i)")


def check_model_flags(args):
    """The model flags and the labels' count (--num_samples filled in): the interface sample_sets.py expects of a
    family's bench module, which checked the model flags alone and sampled the first --num_samples labels without
    a word."""
    check_dit_flags(args)
    check_labels(args)


def dit_bench(args, session):
    """The Bench of the DiT named by the flags (checked): sample i has class labels[i] and noise seed i."""
    dit = LoadedDiT(args, session.device, session.model_dtype)
    latent = dit.latent
    S = args.num_samples
    cycle = args.class_labels or list(range(args.num_classes))
    labels = [cycle[i % len(cycle)] for i in range(S)]
    embedded = args.model == EMBEDDED_DIT

    def problem(T, indices):
        y = torch.tensor([labels[i] for i in indices])
        return noise_from_seeds(indices, T, latent).to(session.device), y.to(session.device), y

    title = "embedded DiT" if embedded else f"{args.model} {args.image_size}x{args.image_size}"
    info = {"title": title, "model": args.model, "model_path": repo_relative(args.model_path),
            "vae_path": repo_relative(args.vae_path), "image_size": args.image_size, "num_classes": args.num_classes,
            "labels": labels}
    return Bench(title, dit.eps_fn, VAEDecoder(dit.vae, session.device), dit.schedule, problem,
                 S, bench_defaults(args.cfg_scale), session, digit_classifier() if embedded else None, info)


def check_labels(args):
    """UsageError for more --class_labels than samples (--num_samples filled in): the last ones were never used, as
    parallel_dit.py refuses them."""
    if args.class_labels and len(args.class_labels) > args.num_samples:
        raise UsageError(f"--class_labels gives {len(args.class_labels)} labels for --num_samples {args.num_samples}: "
                         f"the last {len(args.class_labels) - args.num_samples} would be ignored")


def main(args):
    check_bench_flags(args)
    check_model_flags(args)
    session = Session(args.dist_timeout, args.fp16)
    bench = dit_bench(args, session)
    save_report(run_benchmark(bench, args), bench, args.out)


def parse_args(argv=None):
    parser = bench_parser(__doc__, "benchmarks/results/dit.json", DIT_CFG_SCALE, ablation=True)
    add_model_flags(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_error(main, parse_args())
