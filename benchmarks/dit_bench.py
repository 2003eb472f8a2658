"""Embedded DiT benchmark: FP, FP+ and ParaTAA against sequential DDIM, and the tolerance and window trade-offs.

    python benchmarks/dit_bench.py [--quick] [--out benchmarks/results/dit.json]

Ten samples (class c with noise seed c, c = 0..9), window = T, cfg 4, eta 0. For each T and method: iterations
to the stop rule and to "same image" (<= 1 gray level RMS from the decoded sequential sample), how many runs
ended more than 1 gray level off, classifier agreement, and the sampling wall-clock (decoding excluded) as a
ratio to sequential sampling in the same process. Then tolerance and window sweeps at T = 100.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.convergence import Bench, bench_args, bench_defaults, run_benchmark  # noqa: E402
from models import digits  # noqa: E402
from models.adapters import DiTDenoiser, VAEDecoder  # noqa: E402
from models.bundles import DIT_CFG_SCALE  # noqa: E402
from paratAA import dit_schedule, noise_from_seeds  # noqa: E402


def digit_classifier():
    clf = digits.train_digit_classifier()
    return lambda imgs: digits.classify_images(clf, torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1)


def main(args):
    torch.set_grad_enabled(False)
    defaults = bench_defaults(DIT_CFG_SCALE)
    model = digits.load_embedded_dit()
    latent = (model.in_channels,) + (model.x_embedder.img_size[0],) * 2
    classes = [0, 1] if args.quick else list(range(10))

    def problem(T):
        return noise_from_seeds(classes, T, latent), torch.tensor(classes), torch.tensor(classes)

    bench = Bench("DiT-Digits", DiTDenoiser(model, defaults["cfg_scale"]),
                  VAEDecoder(digits.load_embedded_vae(), torch.device("cpu")), digit_classifier(), dit_schedule,
                  problem, defaults)
    run_benchmark(bench, args.quick, "python benchmarks/dit_bench.py" + (" --quick" if args.quick else ""),
                  args.machine, args.out, len(classes))


if __name__ == "__main__":
    main(bench_args(__doc__, "benchmarks/results/dit.json"))
