"""Shared helpers of the test suite: small closed-form problems, ports, run folders, a tiny SD pipeline."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from models.gmm import GaussianMixtureEps
from paratAA import dit_alphas_cumprod, dit_schedule, draw_noise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gmm_problem(T, batch=1, latent=(4, 8, 8), eta=0.0, seed=0, components=10, std=0.1):
    """A nonlinear model with an exact float64 noise prediction, its schedule and the per-step noise."""
    schedule = dit_schedule(T, eta)
    model = GaussianMixtureEps.random(dit_alphas_cumprod(), latent, components=components, std=std,
                                      seed=seed)
    noise = draw_noise(batch, T, latent, torch.Generator().manual_seed(1000 + seed))
    return model, schedule, noise


def script_noise(seed, n, T, latent):
    """The scripts' draw when no random labels come first: noise from one CPU generator seeded with --seed."""
    return draw_noise(n, T, latent, torch.Generator().manual_seed(seed))


def rms(a, b):
    return float((a - b).pow(2).mean().sqrt())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_latents(run_dir):
    return np.load(os.path.join(run_dir, "latents.npz"))["latents"]


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return json.load(f)


def run_two_processes(script, flags, out, timeout=600):
    """The run folder of `script` (a file at the repository's root) launched as two CPU processes with flags under
    out (torch.distributed.run on a free port), for comparison with one process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, script), *flags, "--output_path", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=timeout)
    return only_run(out)


def assert_processes_agree(flags, tmp_path):
    """parallel_sd.py with flags (no --output_path) run in this process and as two processes: the same latents. Each
    process runs the model on half the batch: float32 kernels of another batch size round differently (on some
    CPUs), which the iteration carries to ~1e-6 of the latent's size (tiny SDXL's reach ~30)."""
    import parallel_sd
    one = parallel_sd.main(parallel_sd.parse_args([*flags, "--output_path", str(tmp_path / "one")]))
    two = run_two_processes("parallel_sd.py", flags, tmp_path / "two")
    assert read_metrics(two)["world_size"] == 2
    a, b = read_latents(one), read_latents(two)
    assert np.abs(a - b).max() < 1e-5 * max(1.0, np.abs(a).max())


def folder_variant(folder, root, name, edit):
    """A copy of the model folder under root/name, changed by edit(copy): a broken or unusual variant."""
    import shutil
    copy = os.path.join(root, name)
    shutil.copytree(folder, copy)
    edit(copy)
    return copy


def edit_json(path, **values):
    """Set keys of a JSON file (a config) in place."""
    with open(path) as f:
        config = json.load(f)
    config.update(values)
    with open(path, "w") as f:
        json.dump(config, f)


def only_run(out):
    """The single run folder created under out."""
    (d,) = os.listdir(out)
    return os.path.join(out, d)


@pytest.fixture(scope="session", autouse=True)
def cost_curve_cache(tmp_path_factory):
    """The window planner's cache (window_size auto) in a folder of the test session, never the user's; the scripts
    run as subprocesses inherit it."""
    os.environ["PARATAA_CACHE"] = str(tmp_path_factory.mktemp("paratAA_cache"))


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A tiny random pipeline in the Stable Diffusion v1.5 folder layout."""
    from tests.tiny_models import build_tiny_sd
    return build_tiny_sd(str(tmp_path_factory.mktemp("tiny_sd")))
