"""parallel_dit.py end to end: the embedded model, processes, checkpoint formats, fp16, and the quality bar."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import parallel_dit
from models import digits
from models.adapters import DiTDenoiser, VAEDecoder
from models.dit import DiT_models
from paratAA import dit_schedule, sample_sequential
from tests.conftest import ROOT, free_port, read_latents as latents, script_noise


def run(out, *flags):
    run_dir = parallel_dit.main(parallel_dit.parse_args(["--output_path", str(out), *flags]))
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return run_dir, json.load(f)


def test_embedded_defaults_and_layout(tmp_path):
    run_dir, m = run(tmp_path, "--timesteps", "25", "--num_samples", "2", "--class_labels", "3", "8")
    assert sorted(os.listdir(run_dir)) == ["args.json", "grid.png", "latents.npz", "metrics.json", "sample_0",
                                           "sample_1"]
    for key in ("script", "world_size", "timesteps", "window_size", "order", "memory_size", "eta",
                "wall_clock_seconds"):
        assert key in m
    assert m["script"] == "parallel_dit" and m["world_size"] == 1 and m["window_chosen_by"] == "planner"
    assert 1 <= m["window_size"] == m["plan"]["window"] == m["order"] <= 25  # the default: chosen for this machine
    assert latents(run_dir).shape == (2, 4, 4, 4)
    for i, s in enumerate(m["samples"]):
        assert s["class_label"] == [3, 8][i] and s["converged"]
        assert len(s["residual_history"]) == s["iterations"] <= 25
        files = os.listdir(os.path.join(run_dir, f"sample_{i}"))
        assert sorted(files) == sorted(f"step_{k}.png" for k in range(s["iterations"] + 1))
    with open(os.path.join(run_dir, "args.json")) as f:
        recorded = json.load(f)
    assert recorded["timesteps"] == 25
    # the embedded defaults are recorded relative to the repository, not as this machine's absolute path
    assert recorded["model_path"] == os.path.join("models", "embedded", "dit_digits.safetensors")


def test_tolerance_zero_equals_sequential(tmp_path):
    T = 20
    run_dir, m = run(tmp_path, "--timesteps", str(T), "--num_samples", "3", "--batch_size", "3", "--class_labels",
                     "1", "4", "7", "--tol1", "0", "--tol2", "0", "--eta", "0.5", "--compare_sequential")
    model = digits.load_embedded_dit()
    noise = script_noise(0, 3, T, (4, 4, 4))
    ref = sample_sequential(DiTDenoiser(model, 4.0), dit_schedule(T, 0.5), noise, torch.tensor([1, 4, 7]))[:, 0]
    assert np.abs(latents(run_dir) - ref.float().numpy()).max() < 1e-4
    for s in m["samples"]:
        assert s["final_image_rms"] <= 1.0 and s["sequential_distance_history"][-1] < 1e-4


def test_a_guidance_scale_below_1_is_no_guidance_and_said(tmp_path, capsys):
    """As DiT's sample.py and diffusers' pipelines: guidance only above 1 (u + s (c - u) at 0.5 sampled halfway to the
    unconditional model, without a word)."""
    # a fixed window: "auto" may choose another one in each run, and another window is another round-off
    flags = ["--timesteps", "10", "--window_size", "10", "--num_samples", "2", "--batch_size", "2", "--class_labels",
             "2", "6", "--tol1", "0", "--tol2", "0"]
    below, _ = run(tmp_path / "below", *flags, "--cfg_scale", "0.5")
    assert "--cfg_scale 0.5 is below 1: guidance is off" in capsys.readouterr().err
    off, _ = run(tmp_path / "off", *flags, "--cfg_scale", "1")
    assert "guidance is off" not in capsys.readouterr().err
    model = digits.load_embedded_dit()
    ref = sample_sequential(DiTDenoiser(model, 1.0), dit_schedule(10), script_noise(0, 2, 10, (4, 4, 4)),
                            torch.tensor([2, 6]))[:, 0]
    np.testing.assert_array_equal(latents(below), latents(off))
    assert np.abs(latents(below) - ref.float().numpy()).max() < 1e-4


def test_one_and_two_processes_give_the_same_latents(tmp_path):
    flags = ["--timesteps", "30", "--window_size", "30", "--num_samples", "3", "--batch_size", "2", "--eta", "0.3",
             "--seed", "5"]
    one, _ = run(tmp_path / "one", *flags)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), os.path.join(ROOT, "parallel_dit.py"), *flags, "--output_path", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (two,) = [os.path.join(tmp_path / "two", d) for d in os.listdir(tmp_path / "two")]
    with open(os.path.join(two, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["world_size"] == 2
    # the image stop rule decided on the main process's value (the ranks would hang if they disagreed)
    assert any(m["stopped_by"] == "stop rule" and any(g is not None for g in m["stop_image_history"])
               for m in metrics["samples"])
    assert np.abs(latents(one) - latents(two)).max() < 1e-5


@pytest.fixture(scope="module")
def dit_s2_files(tmp_path_factory):
    """A random DiT-S/2 (32x32 latents, as the public 256x256 checkpoint) in the three checkpoint formats, and a
    tiny VAE folder of one block (factor 1: --image_size 32)."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = DiT_models["DiT-S/2"](input_size=32, num_classes=1000)
    for p in model.final_layer.parameters():  # non-zero output, so that loading the wrong weights would show
        p.data.normal_(0, 0.02)
    state = model.state_dict()
    torch.save(state, d / "raw.pt")
    torch.save({"model": state, "ema": state, "opt": {}, "args": None}, d / "train.pt")
    save_file(state, str(d / "weights.safetensors"))
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8, layers_per_block=1)
    vae.save_pretrained(d / "vae")
    return d, model.eval()


@pytest.mark.parametrize("name", ["raw.pt", "train.pt", "weights.safetensors"])
def test_checkpoint_formats_load_through_model_path(tmp_path, dit_s2_files, name):
    d, model = dit_s2_files
    T = 3
    run_dir, m = run(tmp_path, "--model", "DiT-S/2", "--image_size", "32", "--model_path", str(d / name),
                     "--vae_path", str(d / "vae"), "--timesteps", str(T), "--num_samples", "1", "--class_labels",
                     "207", "--tol1", "0", "--tol2", "0")
    noise = script_noise(0, 1, T, (4, 32, 32))
    ref = sample_sequential(DiTDenoiser(model, 4.0), dit_schedule(T), noise, torch.tensor([207]))[:, 0]
    # a random DiT drives the latents to hundreds: compare relative to that scale
    np.testing.assert_allclose(latents(run_dir), ref.float().numpy(), rtol=1e-5, atol=1e-4)
    assert m["model"] == "DiT-S/2"


def test_a_checkpoint_with_a_vae_of_another_factor(tmp_path):
    """A registry DiT under a VAE of factor 2 (the embedded one): --image_size 16 is an 8x8 latent, sampled as
    sequential DDIM does and decoded at 16x16 (it was divided by 8: a 2x2 latent, refused by the weights)."""
    from models.checkpoints import load_vae
    torch.manual_seed(0)
    model = DiT_models["DiT-S/8"](input_size=8, num_classes=10)
    for p in model.final_layer.parameters():
        p.data.normal_(0, 0.02)
    torch.save(model.state_dict(), tmp_path / "s8.pt")
    T = 3
    run_dir, m = run(tmp_path / "o", "--model", "DiT-S/8", "--image_size", "16", "--num_classes", "10",
                     "--model_path", str(tmp_path / "s8.pt"), "--vae_path", digits.VAE_DIR, "--timesteps", str(T),
                     "--num_samples", "1", "--class_labels", "7", "--tol1", "0", "--tol2", "0")
    ref = sample_sequential(DiTDenoiser(model.eval(), 4.0), dit_schedule(T), script_noise(0, 1, T, (4, 8, 8)),
                            torch.tensor([7]))[:, 0]
    np.testing.assert_allclose(latents(run_dir), ref.float().numpy(), rtol=1e-5, atol=1e-4)
    image = VAEDecoder(load_vae(digits.VAE_DIR, torch.device("cpu"), torch.float32), torch.device("cpu"))(ref.float())
    with open(os.path.join(run_dir, "args.json")) as f:
        assert image.shape[1:3] == (16, 16) and json.load(f)["image_size"] == 16


def test_fp16_runs(tmp_path):
    run_dir, m = run(tmp_path, "--timesteps", "25", "--num_samples", "2", "--fp16", "--class_labels", "2", "5")
    full, _ = run(tmp_path / "fp32", "--timesteps", "25", "--num_samples", "2", "--class_labels", "2", "5")
    x16, x32 = latents(run_dir), latents(full)
    assert np.isfinite(x16).all() and np.abs(x16 - x32).max() < 0.1


def test_quality_bar_sequential_and_paratAA(tmp_path):
    """>= 90% of 100 samples (10 per class, DDIM 50 steps, cfg 4) classified as the class they were drawn for."""
    labels = [str(c) for c in range(10)]
    run_dir, m = run(tmp_path, "--timesteps", "50", "--num_samples", "100", "--batch_size", "100",
                     "--class_labels", *labels)
    model, vae = digits.load_embedded_dit(), digits.load_embedded_vae()
    clf = digits.train_digit_classifier()
    decode = VAEDecoder(vae, torch.device("cpu"))
    target = torch.arange(100) % 10

    def agreement(lat):
        imgs = torch.from_numpy(decode(torch.as_tensor(lat))).permute(0, 3, 1, 2).float() / 127.5 - 1
        return float((digits.classify_images(clf, imgs) == target).float().mean())

    seq = sample_sequential(DiTDenoiser(model, 4.0), dit_schedule(50), script_noise(0, 100, 50, (4, 4, 4)), target)
    assert agreement(seq[:, 0]) >= 0.9
    assert agreement(latents(run_dir)) >= 0.9


