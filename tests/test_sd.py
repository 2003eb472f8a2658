"""parallel_sd.py and parallel_sd_winit.py end to end on a tiny random pipeline in the SD v1.5 folder layout."""
import json
import os

import numpy as np
import pytest
import torch

import parallel_sd
import parallel_sd_winit
from runner.errors import UsageError
from tests.conftest import read_latents as latents, run_two_processes


def run_sd(folder, out, *flags):
    run_dir = parallel_sd.main(parallel_sd.parse_args(["--model_path", folder, "--output_path", str(out), *flags]))
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return run_dir, json.load(f)


def diffusers_ddim(folder, prompt, T, eta, seed, num_samples, cfg):
    """Independent reference: diffusers' own DDIMScheduler.step loop with the pipeline's components."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(T)
    cond, uncond = pipe.encode_prompt([prompt] * num_samples, "cpu", 1, True, negative_prompt=[""] * num_samples)
    latent = (4, 8, 8)
    noise = torch.randn((num_samples, T + 1) + latent, generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float64).float()  # the scripts' noise: x_T = noise[:, T], step s uses noise[:, s]
    x = noise[:, T]
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            s = T - 1 - i
            out = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            e_u, e_c = out.chunk(2)
            eps = e_u + cfg * (e_c - e_u)
            x = sched.step(eps, t, x, eta=eta if s > 0 else 0.0, variance_noise=noise[:, s]).prev_sample
    return x.numpy()


@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_tolerance_zero_equals_diffusers_ddim(tiny_sd, tmp_path, eta):
    T = 12
    run_dir, m = run_sd(tiny_sd, tmp_path, "--timesteps", str(T), "--eta", str(eta), "--tol1", "0", "--tol2", "0",
                        "--num_samples", "2", "--batch_size", "2", "--prompt", "a handwritten digit four",
                        "--cfg_scale", "3", "--compare_sequential")
    ref = diffusers_ddim(tiny_sd, "a handwritten digit four", T, eta, 0, 2, 3.0)
    assert np.abs(latents(run_dir) - ref).max() < 1e-4
    assert m["script"] == "parallel_sd" and m["eta"] == eta
    for s in m["samples"]:
        assert s["converged"] and s["iterations"] <= T
        assert s["sequential_distance_history"][-1] < 1e-5 and s["final_image_rms"] <= 1.0


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_other_prediction_types_equal_diffusers_ddim(tmp_path, prediction_type):
    """SD 2.x 768 predicts v; some models predict the sample. Each is turned into the solver's noise prediction
    exactly as diffusers' DDIM step reads it: tolerance 0 equals diffusers' own loop on the same folder."""
    from tests.tiny_models import build_tiny_sd
    folder = build_tiny_sd(str(tmp_path / "model"), seed=1, prediction_type=prediction_type)
    T = 10
    run_dir, m = run_sd(folder, tmp_path / "out", "--timesteps", str(T), "--tol1", "0", "--tol2", "0",
                        "--num_samples", "2", "--batch_size", "2", "--prompt", "a handwritten digit four",
                        "--cfg_scale", "3")
    ref = diffusers_ddim(folder, "a handwritten digit four", T, 0.0, 0, 2, 3.0)
    ours = latents(run_dir)
    assert np.isfinite(ref).all()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_default_run_layout(tiny_sd, tmp_path):
    run_dir, m = run_sd(tiny_sd, tmp_path, "--timesteps", "20", "--num_samples", "3", "--batch_size", "2",
                        "--prompt", "a handwritten digit one", "a handwritten digit two")
    assert sorted(os.listdir(run_dir)) == ["args.json", "grid.png", "latents.npz", "metrics.json", "sample_0",
                                           "sample_1", "sample_2"]
    assert latents(run_dir).shape == (3, 4, 8, 8)
    assert [s["prompt"] for s in m["samples"]] == ["a handwritten digit one", "a handwritten digit two",
                                                   "a handwritten digit one"]
    for i, s in enumerate(m["samples"]):
        steps = sorted(os.listdir(os.path.join(run_dir, f"sample_{i}")))
        assert steps == sorted(f"step_{k}.png" for k in range(s["iterations"] + 1))
        assert len(s["residual_history"]) == s["iterations"]
        assert s["model_evaluations"] >= s["iterations"]


def test_two_processes_match_one(tiny_sd, tmp_path):
    flags = ["--model_path", tiny_sd, "--timesteps", "16", "--window_size", "16", "--num_samples", "2", "--batch_size",
             "2", "--eta", "0.3"]
    one, _ = run_sd(tiny_sd, tmp_path / "one", *flags[2:])
    two = run_two_processes("parallel_sd.py", flags, tmp_path / "two", timeout=300)
    with open(os.path.join(two, "metrics.json")) as f:
        m2 = json.load(f)
    assert m2["world_size"] == 2
    assert np.abs(latents(one) - latents(two)).max() < 1e-5


def run_winit(folder, out, *flags):
    run_dir = parallel_sd_winit.main(parallel_sd_winit.parse_args(
        ["--model_path", folder, "--output_path", str(out), *flags]))
    metrics = {}
    for name in ("prompt1", "prompt2"):
        with open(os.path.join(run_dir, name, "metrics.json")) as f:
            metrics[name] = json.load(f)
    return run_dir, metrics


def test_warm_start_equals_sequential_from_prompt1_state(tiny_sd, tmp_path):
    T, V = 16, 6
    run_dir, m = run_winit(tiny_sd, tmp_path, "--timesteps", str(T), "--variation_steps", str(V), "--tol1", "0",
                           "--tol2", "0", "--compare_sequential", "--num_samples", "2", "--batch_size", "2")
    assert sorted(os.listdir(run_dir)) == ["prompt1", "prompt2"]
    for name in ("prompt1", "prompt2"):
        assert sorted(os.listdir(os.path.join(run_dir, name)))[:4] == ["args.json", "grid.png", "latents.npz",
                                                                        "metrics.json"]
        assert m[name]["script"] == "parallel_sd_winit"
    for s in m["prompt2"]["samples"]:
        assert s["iterations"] <= V
        assert s["sequential_distance_history"][-1] < 1e-4


def test_warm_start_needs_fewer_iterations_than_a_cold_start(tiny_sd, tmp_path):
    flags = ["--timesteps", "30", "--window_size", "30", "--num_samples", "2", "--batch_size", "2", "--seed", "3"]
    _, m = run_winit(tiny_sd, tmp_path / "w", *flags, "--variation_steps", "10", "--prompt1",
                     "a handwritten digit one", "--prompt2", "a handwritten digit seven")
    _, cold = run_sd(tiny_sd, tmp_path / "c", *flags, "--prompt", "a handwritten digit seven")
    warm_iters = [s["iterations"] for s in m["prompt2"]["samples"]]
    cold_iters = [s["iterations"] for s in cold["samples"]]
    assert all(w < c for w, c in zip(warm_iters, cold_iters)), (warm_iters, cold_iters)


def test_variation_steps_T_equals_a_cold_start(tiny_sd, tmp_path):
    flags = ["--timesteps", "12", "--tol1", "0", "--tol2", "0", "--num_samples", "2", "--batch_size", "2"]
    run_dir, _ = run_winit(tiny_sd, tmp_path / "w", *flags, "--variation_steps", "12", "--prompt2",
                           "a handwritten digit seven")
    cold_dir, _ = run_sd(tiny_sd, tmp_path / "c", *flags, "--prompt", "a handwritten digit seven")
    assert np.abs(latents(os.path.join(run_dir, "prompt2")) - latents(cold_dir)).max() < 1e-4


NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def test_embedded_quality_bar_sequential_and_paratAA(tmp_path):
    """>= 80% of 100 samples (10 per prompt "a handwritten digit <name>", DDIM 50) show the prompted digit."""
    from models import digits
    from models.adapters import SDDenoiser, VAEDecoder
    from models.sd import EMBEDDED_SD, encode, load_pipeline
    from paratAA import pipeline_schedule, sample_sequential
    prompts = [f"a handwritten digit {n}" for n in NAMES]
    run_dir = parallel_sd.main(parallel_sd.parse_args(
        ["--output_path", str(tmp_path), "--timesteps", "50", "--num_samples", "100", "--batch_size", "100",
         "--prompt", *prompts]))
    with open(os.path.join(run_dir, "metrics.json")) as f:
        cfg = json.load(f)["cfg_scale"]
    pipe = load_pipeline(EMBEDDED_SD, torch.device("cpu"), torch.float32)
    decode = VAEDecoder(pipe.vae, torch.device("cpu"))
    clf = digits.train_digit_classifier()
    target = torch.arange(100) % 10

    def agreement(lat):
        imgs = torch.from_numpy(decode(torch.as_tensor(lat))).permute(0, 3, 1, 2).float() / 127.5 - 1
        return float((digits.classify_images(clf, imgs) == target).float().mean())

    noise = torch.randn((100, 51, 4, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cond = encode(pipe, [prompts[i % 10] for i in range(100)], "", torch.device("cpu"))
    seq = sample_sequential(SDDenoiser(pipe.unet, cfg), pipeline_schedule(pipe, 50), noise, cond)[:, 0]
    assert agreement(seq) >= 0.8
    assert agreement(latents(run_dir)) >= 0.8


def test_a_warm_start_says_what_each_pass_gained(tiny_sd, tmp_path, capsys):
    """Like every run, both passes end with their iterations, time against sequential sampling (prompt2's: its
    last variation_steps steps) and same-image iteration; prompt2's metrics.json records the warm start."""
    _, m = run_winit(tiny_sd, tmp_path, "--timesteps", "12", "--variation_steps", "5", "--num_samples", "1",
                     "--compare_sequential")
    out = capsys.readouterr().out
    assert "prompt1, from scratch:" in out and "(the last 5 of 12 steps)" in out
    assert out.count("speed-up") == 2 and out.count("same image as sequential sampling after") == 2, out
    assert m["prompt2"]["variation_steps"] == 5 and "variation_steps" not in m["prompt1"]
    assert m["prompt2"]["speed"]["sequential_measured"] and m["prompt2"]["speed"]["speedup"] > 0


def test_a_warm_start_from_a_prompt1_cut_short_is_refused(tiny_sd, tmp_path, capsys):
    """--max_steps cut prompt1 short, its unreached states held zeros, and prompt2, solved from them, reported
    converged and 'same image as sequential' (its reference started from them too): 3.5 off the real warm start."""
    flags = ["--model_path", tiny_sd, "--output_path", str(tmp_path), "--timesteps", "20", "--window_size", "2",
             "--variation_steps", "3", "--num_samples", "1"]
    # 12 iterations at window 2: enough to reach x_0 (10 at least), not to converge there
    with pytest.raises(UsageError, match=r"--max_steps 12 stopped prompt1 before it converged \(sample 0\)"):
        parallel_sd_winit.main(parallel_sd_winit.parse_args(flags + ["--max_steps", "12"]))
    (run,) = os.listdir(tmp_path)
    assert os.listdir(tmp_path / run) == ["prompt1"]  # what finished is kept, prompt2 never started
    # a cap that prompt1 meets converged is no reason to refuse
    run_dir = parallel_sd_winit.main(parallel_sd_winit.parse_args(flags + ["--max_steps", "20"]))
    assert sorted(os.listdir(run_dir)) == ["prompt1", "prompt2"]


def test_the_paper_mode_warm_starts_from_a_prompt1_cut_short_as_the_reference(tiny_sd, tmp_path, capsys):
    """The reference's script solves prompt2 from whatever trajectory --max_steps left (its example run capped
    prompt1 at 20): its command with --preset paper was refused after prompt1. It now goes on, with a note."""
    capsys.readouterr()
    run_dir = parallel_sd_winit.main(parallel_sd_winit.parse_args([
        "--model_path", tiny_sd, "--output_path", str(tmp_path), "--preset", "paper", "--timesteps", "20",
        "--variation_steps", "5", "--max_steps", "3"]))
    assert sorted(os.listdir(run_dir)) == ["prompt1", "prompt2"]
    m = [json.load(open(os.path.join(run_dir, p, "metrics.json"))) for p in ("prompt1", "prompt2")]
    assert m[0]["samples"][0]["converged"] is False and m[0]["samples"][0]["iterations"] == 2  # the reference's count
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line and "prompt1" in line]
    assert len(notes) == 1 and "--max_steps 3 stopped prompt1" in notes[0] and "reference" in notes[0], notes


def test_a_warm_starts_window_is_chosen_for_the_steps_it_solves(tiny_sd, tmp_path):
    """prompt2 re-solves variation_steps of the T steps: the planner chose its window, and predicted its time, for a
    full T-step solve (a prediction 5x the time it took, for 10 of 100 steps)."""
    _, m = run_winit(tiny_sd, tmp_path, "--timesteps", "60", "--variation_steps", "6", "--num_samples", "1")
    plan = m["prompt2"]["plan"]
    assert 1 <= plan["window"] <= 6 and plan["predicted_iterations"] <= 6
    one_call = {int(k): v for k, v in plan["call_seconds"].items()}[1]  # one state of the one sample
    # 6 calls of one state, in this run's time when the curve came from prompt1's cache entry (curve_scale)
    assert plan["predicted_sequential_seconds"] == pytest.approx(6 * one_call * plan["curve_scale"])
    assert plan["predicted_sequential_seconds"] == pytest.approx(6 * m["prompt2"]["per_call_seconds"])


def test_fp16_runs_the_denoiser_in_float16_and_decodes_in_float32():
    """--fp16 is the model's precision; the VAE decodes in float32 where its config asks (force_upcast, as SD 1.x and
    SDXL's do), as diffusers' pipelines and the reference's SD scripts decode: SDXL's VAE overflows in float16."""
    from models.sd import EMBEDDED_SD, load_pipeline
    pipe = load_pipeline(EMBEDDED_SD, torch.device("cpu"), torch.float16)
    assert pipe.vae.config.force_upcast
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float32


def test_a_scheduler_whose_extra_package_is_missing_is_judged_by_its_config():
    """Without torchsde diffusers' DPMSolverSDEScheduler is a placeholder taking (*args, **kwargs): its betas
    (scaled_linear, SD 1.x / SDXL) were refused as 'noise levels from no beta schedule'."""
    from models.sd import scheduler_problem
    config = dict(_class_name="DPMSolverSDEScheduler", num_train_timesteps=1000, beta_start=0.00085,
                  beta_end=0.012, beta_schedule="scaled_linear")
    assert scheduler_problem(config, "StableDiffusionPipeline") is None
    assert "no beta schedule" in scheduler_problem({"_class_name": "KarrasVeScheduler"}, "StableDiffusionPipeline")
