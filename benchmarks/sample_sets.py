"""Sample sets for the paper's quality numbers (FID / IS for DiT, CLIP score for SD): per method, the final
decoded images of N samples, and optionally those after iteration k, each as an .npz of uint8 [N, H, W, 3] under
key "arr_0" (the layout DiT's sample_ddp.py writes and standard FID tools read).

    python benchmarks/sample_sets.py dit [--quick] [--num_samples 100] [--iterations 1 2 3] [--out_dir DIR]
    accelerate launch --num_processes 8 benchmarks/sample_sets.py dit --model DiT-XL/2 --image_size 256 \\
        --model_path DiT-XL-2-256x256.pt --vae_path sd-vae-ft-ema --fp16 --num_samples 10000 --batch_size 25 \\
        --class_labels $(seq 0 999) --iterations 2 4 6 8 10 --out_dir results/dit_xl2_sets
    accelerate launch --num_processes 8 benchmarks/sample_sets.py sd --model_path stable-diffusion-v1-5 --fp16 \\
        --cfg_scale 7.5 --prompt_file captions.txt --num_samples 1000 --out_dir results/sd15_sets

Model flags as dit_bench.py's (dit) and sd_bench.py's (sd): sample i has class / prompt i of the list, cycled,
and noise seed i; window = order = T and the scripts' solver defaults. In --out_dir:

    sequential.npz, <method>.npz, <method>_iter<k>.npz     uint8 [N, H, W, 3] under "arr_0"
    sample_sets.json    (or --summary) per set: its file, iterations (median / max), evaluations per sample,
                        the fraction of samples at the sequential image (<= 1 gray level RMS) and their mean
                        distance to it in gray levels, the digit-classifier agreement (embedded models only);
                        the samples' labels or prompts (what a CLIP score compares the images with)

Under `accelerate launch` every model call is split across the processes; the main process decodes and writes.
Each set is filled on disk batch by batch (a .npy memory map) and zipped into its .npz at the end, so no process
holds a whole set in memory (10,000 images of 256x256 take 2 GB of disk per set).
"""
import contextlib
import os
import re
import statistics
import sys
import zipfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import dit_bench, sd_bench  # noqa: E402
from benchmarks.convergence import (NO_CLASSIFIER, add_launch_flags, check_distinct, check_out_dir,  # noqa: E402
                                    check_out_file, check_run_flags, command_line, inputs_per_process, methods_for,
                                    solve_on)
from models.dit_source import DIT_CFG_SCALE  # noqa: E402
from models.sd import SD_CFG_SCALE  # noqa: E402
from paratAA import SolverConfig, sample_sequential  # noqa: E402
from runner.errors import UsageError, exit_on_error  # noqa: E402
from runner.flags import at_least_flag, home_path, make_parser  # noqa: E402
from runner.launch import Session  # noqa: E402
from runner.metrics import SAME_IMAGE, image_rms  # noqa: E402
from runner.rundir import missing_folders, save_json  # noqa: E402

FAMILIES = {"dit": (dit_bench, DIT_CFG_SCALE, lambda args, session: dit_bench.dit_bench(args, session)),
            "sd": (sd_bench, SD_CFG_SCALE, lambda args, session: sd_bench.sd_bench(args, session)[0])}


def slug(name):
    """A method's name as a file name: "FP+ (ddim)" -> fp_plus_ddim, "ParaTAA m=3" -> parataa_m_3."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower().replace("+", "_plus")).strip("_")


class ImageSet:
    """uint8 images [N, H, W, 3] written batch by batch into a .npy on disk, then stored as arr_0.npy in an .npz
    (exactly what np.savez writes), without the set ever being in memory. Also its quality against the sequential
    images and the labels, accumulated batch by batch."""

    def __init__(self, folder, name, num_samples):
        self.path = os.path.join(folder, name + ".npz")
        self.npy = os.path.join(folder, f".{name}.npy.part")
        self.N, self.array, self.closed = num_samples, None, False
        self.same, self.rms, self.agree = [], [], []

    def put(self, start, images, reference=None, predicted=None, labels=None):
        if self.array is None:
            self.array = np.lib.format.open_memmap(self.npy, mode="w+", dtype=np.uint8,
                                                   shape=(self.N,) + images.shape[1:])
        self.array[start:start + len(images)] = images
        if reference is not None:
            rms = [image_rms(a, b) for a, b in zip(images, reference)]
            self.rms += rms
            self.same += [r <= SAME_IMAGE for r in rms]
        if predicted is not None:
            self.agree += [bool(p == y) for p, y in zip(predicted, labels)]

    def close(self):
        self.array.flush()
        shape = list(self.array.shape)
        del self.array
        tmp = self.path + ".part"
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            z.write(self.npy, "arr_0.npy")
        os.replace(tmp, self.path)
        self.closed = True
        os.remove(self.npy)
        return {"file": os.path.basename(self.path), "shape": shape,
                "same_image": float(np.mean(self.same)) if self.same else None,
                "mean_image_rms": float(np.mean(self.rms)) if self.rms else None,
                "agreement": float(np.mean(self.agree)) if self.agree else None}

    def discard(self):
        """A run that does not finish leaves none of its files: its summary, which names them, is never written."""
        self.array = None  # the memory map closes with its last reference
        for path in [self.npy, self.path + ".part"] + [self.path] * self.closed:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def check_flags(args, names):
    defaults = dict(zip(("num_samples", "batch_size", "timesteps"), (4, 2, 25) if args.quick else (100, 10, 100)))
    for name, value in defaults.items():  # only a flag not given takes its default (0 is a bad value, not none)
        if getattr(args, name) is None:
            setattr(args, name, value)
    at_least_flag(args, "num_samples", 1)
    at_least_flag(args, "batch_size", 1)
    if not 2 <= args.timesteps <= 1000:
        raise UsageError(f"--timesteps must be in 2..1000, got {args.timesteps}")
    check_run_flags(args)
    check_out_dir(args.out_dir, "--out_dir")
    if args.summary is not None:
        check_out_file(args.summary, "--summary", args)
    args.methods = args.methods or [n for n in names if n != "FP"]  # FP takes T iterations: only on request
    for name in args.methods:
        if name not in names:
            raise UsageError(f"--methods: {name!r} is not one of {', '.join(repr(n) for n in names)}")
    for k in args.iterations:
        if not 1 <= k <= args.timesteps:
            raise UsageError(f"--iterations must be in 1..{args.timesteps}, got {k}")
    check_distinct(args.methods, "--methods")
    check_distinct(args.iterations, "--iterations")
    if args.summary is not None:
        check_summary_apart(args)


def set_names(args):
    """The sets this run writes, each as <out_dir>/<name>.npz: the sequential one, then per method its final set and
    one per --iterations value."""
    return ["sequential"] + [slug(n) + suffix for n in args.methods
                             for suffix in [""] + [f"_iter{k}" for k in args.iterations]]


def check_summary_apart(args):
    """--summary naming a file this run writes in --out_dir (a set's .npz, or the temporary files it is filled in)
    wrote the summary JSON over that set, exit 0; naming --out_dir itself, or a folder above it, failed at the end,
    after all the sampling. Real paths compared: ./s/../s/sequential.npz or a symlink to it is the same file."""
    summary, out_dir = os.path.realpath(args.summary), os.path.realpath(args.out_dir)
    if summary == out_dir or out_dir.startswith(summary.rstrip(os.sep) + os.sep):
        raise UsageError(f"--summary {args.summary} is --out_dir {args.out_dir} or a folder above it: name a file "
                         f"apart from the sets")
    for name in set_names(args):
        for written in (f"{name}.npz", f"{name}.npz.part", f".{name}.npy.part"):  # ImageSet's files
            if summary == os.path.join(out_dir, written):
                raise UsageError(f"--summary {args.summary} is {written}, a file this run writes in --out_dir "
                                 f"{args.out_dir}: name a file apart from the sets")


def method_names():
    """The methods of the scripts' defaults (the names do not depend on T)."""
    d = SolverConfig()
    return list(methods_for(1, (d.memory_size,), d.equations))


def main(args):
    module, _, build = FAMILIES[args.family]
    check_flags(args, method_names())
    module.check_model_flags(args)
    created, _ = missing_folders(args.out_dir)  # the folders this run creates, deepest first
    sets = {}
    try:
        sample(args, build, sets)
    except BaseException:  # failed or interrupted: remove what this run wrote, and only that
        for image_set in sets.values():
            image_set.discard()
        for folder in created:
            with contextlib.suppress(OSError):  # a folder that holds anything else stays
                os.rmdir(folder)
        raise


def sample(args, build, sets):
    """Every set into sets (name: ImageSet), then the summary."""
    session = Session(args.dist_timeout, args.fp16)
    bench = build(args, session)
    T, N, B = args.timesteps, bench.num_samples, args.batch_size
    d = bench.defaults
    table = methods_for(T, (d["memory_size"],), d["equations"])
    schedule = bench.schedule(T)
    main_process = session.is_main
    runs = {name: {"iterations": [], "evaluations": []} for name in args.methods}
    if main_process:
        os.makedirs(args.out_dir, exist_ok=True)
        sets.update({name: ImageSet(args.out_dir, name, N) for name in set_names(args)})
        if bench.classify is None:
            print(NO_CLASSIFIER, flush=True)
    for start in range(0, N, B):
        indices = list(range(start, min(start + B, N)))
        noise, cond, labels = bench.problem(T, indices)
        seq = sample_sequential(bench.eps_fn, schedule, noise, cond, model_dtype=session.model_dtype,
                                sharding=session.sharding)[:, 0]
        reference = bench.decode(seq) if main_process else None

        def put(name, latents):
            """Decode (main process only) into the set; quality against the sequential images and the labels."""
            images = bench.decode(latents)
            predicted = bench.classify(images).numpy() if bench.classify and labels is not None else None
            sets[name].put(start, images, None if name == "sequential" else reference, predicted,
                           None if labels is None else labels.numpy())

        if main_process:
            put("sequential", seq)
        for name in args.methods:
            out = solve_on(bench, schedule, noise, cond, record_x0=bool(args.iterations), window_size=T,
                           tol1=d["tol1"], tol2=d["tol2"], **table[name])
            runs[name]["iterations"] += out.iterations
            runs[name]["evaluations"] += out.evaluations
            if main_process:
                put(slug(name), out.samples)
                for k in args.iterations:  # after iteration k; a sample stopped earlier keeps its final estimate
                    put(f"{slug(name)}_iter{k}", torch.stack([h.x0[min(k, len(h.x0) - 1)] for h in out.history]))
        if main_process:
            print(f"samples {indices[-1] + 1} / {N}", flush=True)
    inputs = inputs_per_process(bench)
    if main_process:
        write_report(args, session, bench, sets, runs, inputs)


def write_report(args, session, bench, sets, runs, inputs):
    report = {"command": command_line(session), "world_size": session.world_size, "model_inputs_per_process": inputs,
              "model": bench.info,
              "T": args.timesteps, "num_samples": bench.num_samples, "batch_size": args.batch_size,
              "defaults": {k: bench.defaults[k] for k in ("tol1", "tol2", "cfg_scale", "memory_size", "equations")},
              "classifier": bench.classify is not None, "sets": {"sequential": sets["sequential"].close()}}
    rows = [("sequential", args.timesteps, args.timesteps, report["sets"]["sequential"])]
    for name, run in runs.items():
        entry = {**sets[slug(name)].close(), "iterations_median": statistics.median(run["iterations"]),
                 "iterations_max": max(run["iterations"]), "evaluations_mean": float(np.mean(run["evaluations"])),
                 "per_iteration": {k: sets[f"{slug(name)}_iter{k}"].close() for k in args.iterations}}
        report["sets"][name] = entry
        its = f"{entry['iterations_median']:g} / {entry['iterations_max']}"
        rows.append((name, its, f"{entry['evaluations_mean']:.0f}", entry))
        rows += [(f"{name}, after iteration {k}", "-", "-", v) for k, v in entry["per_iteration"].items()]
    report["out_dir"] = args.out_dir  # where the files it names are
    path = args.summary or os.path.join(args.out_dir, "sample_sets.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_json(report, path)  # whole or not at all
    cell = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    print(f"\nSample sets, T = {args.timesteps}, {bench.num_samples} samples ({bench.info['title']}):\n")
    print("| set | iterations (median / max) | evaluations / sample | at the sequential image | mean distance to "
          "it (gray levels) | classifier agreement | file |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, its, evals, s in rows:
        print(f"| {name} | {its} | {evals} | {cell(s['same_image'], '.2f')} | {cell(s['mean_image_rms'], '.2f')} | "
              f"{cell(s['agreement'], '.2f')} | {s['file']} |")
    print(f"\nwrote {path}", flush=True)


def parse_args(argv=None):
    parser = make_parser(__doc__)
    families = parser.add_subparsers(dest="family", required=True, metavar="{dit,sd}")
    for family, (module, cfg_scale, _) in FAMILIES.items():
        p = families.add_parser(family, help=f"the model flags of {module.__name__.split('.')[-1]}.py")
        g = p.add_argument_group("sample sets")
        g.add_argument("--quick", action="store_true", help="4 samples in batches of 2, T = 25 (the smoke test)")
        g.add_argument("--num_samples", type=int, default=None, help="samples per set (default 100)")
        g.add_argument("--batch_size", type=int, default=None, help="samples solved together (default 10)")
        g.add_argument("--timesteps", type=int, default=None, help="DDIM steps T (default 100)")
        g.add_argument("--cfg_scale", type=float, default=cfg_scale, help="classifier-free guidance scale")
        g.add_argument("--methods", nargs="+", default=None,
                       help=f"methods, each quoted (default: all of {', '.join(method_names())} but FP); the "
                            f"sequential set is always written")
        g.add_argument("--iterations", type=int, nargs="+", default=[],
                       help="also write each method's set after these iterations")
        g.add_argument("--out_dir", type=home_path, default=f"benchmarks/results/tmp/sample_sets_{family}",
                       help="the sets")
        g.add_argument("--summary", type=home_path, default=None,
                       help="the JSON index (default: <out_dir>/sample_sets.json)")
        add_launch_flags(g)
        module.add_model_flags(p)
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_error(main, parse_args())
