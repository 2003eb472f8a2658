"""The benchmark scripts end to end: --quick on the embedded models (what `make bench-quick` runs), and on tiny
random models in the real checkpoint layouts under `accelerate launch` with 2 CPU processes, checked against a
1-process run of the same benchmark and against sampling done here."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from models.adapters import DiTDenoiser, VAEDecoder
from models.dit import DiT_models
from paratAA import dit_schedule, noise_from_seeds, sample_sequential
from tests.conftest import ROOT, free_port

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes share the 2 cores of the development machine


def bench(script, *flags, quick=True):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *(["--quick"] if quick else []),
                           *flags], cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def launch(script, *flags):
    """The script under accelerate launch, 2 CPU processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), os.path.join(ROOT, "benchmarks", script), *flags]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def read(path):
    with open(path) as f:
        return json.load(f)


def figures(tmp_path, dit=None, sd=None):
    """The figures of the reports given (a flag left out: that report is not drawn)."""
    named = [*(["--dit", str(dit)] if dit else []), *(["--sd", str(sd)] if sd else [])]
    bench("figures.py", *named, "--out_dir", str(tmp_path / "fig"))
    return {name[4] for name in os.listdir(tmp_path / "fig")}  # fig_<letter>_...


def test_benchmarks_quick(tmp_path):
    bench("solver_bench.py", "--out", str(tmp_path / "solver.json"))
    solver = read(tmp_path / "solver.json")
    row = solver["iterations"][0]
    # what the table was measured on is recorded (--quick's sizes and seeds are not the full run's)
    assert solver["iterations_setup"]["latent"] == [4, 8, 8] and solver["iterations_setup"]["seeds"] == [0]
    assert solver["torch_threads"] >= 1
    assert row["ParaTAA m=3"]["median"] < row["FP"]["median"]
    assert solver["overhead"]["overhead_fraction"] > 0 and solver["memory"]["persistent_state_mb"] > 0
    out = bench("dit_bench.py", "--out", str(tmp_path / "dit.json"))
    assert "| 25 | ParaTAA m=3 |" in out and "| 25 | FP+ (ddim) |" in out and "skipped" not in out
    bench("sd_bench.py", "--out", str(tmp_path / "sd.json"))
    dit, sd = read(tmp_path / "dit.json"), read(tmp_path / "sd.json")
    assert sd["warm_start"] and dit["ablation"]["cells"] and dit["classifier"]
    # figure (b)'s images: one sample's decoded estimates per method, iteration 0 first
    with np.load(tmp_path / dit["evolution"]["file"]) as z:
        first = z[dit["evolution"]["arrays"]["FP"]]
    assert first.dtype == np.uint8 and first.shape[1:] == (8, 8, 3) and len(first) > 1
    assert figures(tmp_path, tmp_path / "dit.json", tmp_path / "sd.json") == set("abcdef")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_estimate.py"), "--dit",
                           str(tmp_path / "dit.json"), "--sd", str(tmp_path / "sd.json"), "--out",
                           str(tmp_path / "gpu.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    estimate = read(tmp_path / "gpu.json")
    assert estimate["command"].startswith("python benchmarks/gpu_estimate.py --dit ")  # it had none
    est = estimate["models"]
    row = est["DiT-XL/2 256"]["windows"]["25"]
    # it uses the iteration counts it names, and no estimate beats T / iterations: a batched call of W inputs
    # never costs less than a call of one, and the solver's time comes on top
    assert row["iterations"] == dit["window_sweep"]["25"]["stop_median"]
    assert 0 < row["speedup"] < 25 / row["iterations"]
    # sample sets of the embedded DiT, with the digit classifier's agreement per method and per iteration
    bench("sample_sets.py", "dit", "--quick", "--iterations", "1", "3", "--out_dir", str(tmp_path / "sets"),
          quick=False)
    sets = read(tmp_path / "sets" / "sample_sets.json")["sets"]
    assert sets["sequential"]["agreement"] >= 0.5  # 4 samples of the classes 0..3
    for name, s in sets.items():
        if name != "sequential":
            assert s["same_image"] is not None and set(s["per_iteration"]) == {"1", "3"}
            assert all(v["agreement"] is not None for v in s["per_iteration"].values())


def same_counts(one, two):
    """Every iteration count of two benchmark reports (per sample, sweeps, ablation) is the same."""
    assert one["methods"].keys() == two["methods"].keys()
    for T, block in one["methods"].items():
        for name, m in block.items():
            if isinstance(m, dict):
                for a, b in zip(m.get("samples", []), two["methods"][T][name].get("samples", [])):
                    assert (a["iterations"], a["same_image_at"]) == (b["iterations"], b["same_image_at"]), (T, name)
                assert m["summary"]["stop_median"] == two["methods"][T][name]["summary"]["stop_median"]
    for section in ("tolerance_sweep", "window_sweep", "warm_start"):
        for key, s in one.get(section, {}).items():
            assert (s["stop_median"], s["same_median"]) == (two[section][key]["stop_median"],
                                                            two[section][key]["same_median"]), (section, key)
    for key, s in one.get("ablation", {}).get("cells", {}).items():
        assert s["same_median"] == two["ablation"]["cells"][key]["same_median"], key


def check_launch(out, one, two):
    """Only the main process printed and wrote; each process evaluated about half of the model inputs that one
    process evaluates alone (shards of a call differ by one input at most)."""
    assert out.count("| T | method |") == 1 and out.count("wrote ") == 1
    assert two["world_size"] == 2 and two["command"].startswith("accelerate launch --num_processes 2")
    assert "classifier agreement: skipped" in out and not two["classifier"]
    alone, shared = one["model_inputs_per_process"], two["model_inputs_per_process"]
    assert alone["most"] == alone["fewest"]
    assert 0.4 * alone["most"] < shared["fewest"] <= shared["most"] < 0.6 * alone["most"]


def check_sets(folder, shape):
    """sample_sets.json names an .npz per set: uint8 [N, H, W, 3] under arr_0, as FID tools read it."""
    index = read(folder / "sample_sets.json")
    for name, s in index["sets"].items():
        files = [s["file"]] + [v["file"] for v in s.get("per_iteration", {}).values()]
        for f in files:
            with np.load(folder / f) as z:
                assert z.files == ["arr_0"] and z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == shape, f
    assert not [f for f in os.listdir(folder) if f.endswith(".part")]
    return index


@pytest.fixture(scope="module")
def tiny_dit(tmp_path_factory):
    """A random DiT-S/2 raw state dict (.pt) with 1000 classes, as the public checkpoints, and a tiny VAE folder
    (one block: factor 1, so --image_size 8). Its input_size is 8, not the public 32: a window call of the quick
    benchmark then takes milliseconds instead of seconds on 2 CPU cores; the layout and the loading path are the
    same."""
    from diffusers import AutoencoderKL
    d = tmp_path_factory.mktemp("dit")
    torch.manual_seed(0)
    model = DiT_models["DiT-S/2"](input_size=8, num_classes=1000)
    for p in model.final_layer.parameters():  # zero-initialised: the model would predict eps = 0
        p.data.normal_(0, 0.02)
    torch.save(model.state_dict(), d / "dit.pt")
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8, layers_per_block=1)
    vae.save_pretrained(d / "vae")
    return d, model.eval(), vae.eval()


def test_dit_bench_checkpoint_two_processes(tmp_path, tiny_dit):
    d, model, vae = tiny_dit
    flags = ["--quick", "--timesteps", "6", "--model", "DiT-S/2", "--image_size", "8", "--model_path",
             str(d / "dit.pt"), "--vae_path", str(d / "vae"), "--class_labels", "207", "360"]
    bench("dit_bench.py", *flags, "--out", str(tmp_path / "one.json"), quick=False)
    out = launch("dit_bench.py", *flags, "--out", str(tmp_path / "two.json"))
    one, two = read(tmp_path / "one.json"), read(tmp_path / "two.json")
    check_launch(out, one, two)
    assert set(two["methods"]["6"]) >= {"FP", "FP+ (ddim)", "FP+ (picard)", "ParaTAA m=3", "ParaTAA m=3 (ddim)"}
    assert two["model"]["labels"] == [207, 360] and two["window_sweep"] and two["ablation"]["cells"]
    same_counts(one, two)
    assert figures(tmp_path, dit=tmp_path / "two.json") == set("abcdf")  # (e) is the text-to-image warm start

    launch("sample_sets.py", "dit", *flags, "--num_samples", "3", "--batch_size", "2", "--iterations", "2",
           "--out_dir", str(tmp_path / "sets"))
    index = check_sets(tmp_path / "sets", (3, 8, 8, 3))
    assert index["world_size"] == 2 and index["sets"]["sequential"]["agreement"] is None
    # the sequential set is what sequential DDIM gives here, on one process (sample i: label i cycled, seed i)
    x0 = sample_sequential(DiTDenoiser(model, 4.0), dit_schedule(6), noise_from_seeds(range(3), 6, (4, 8, 8)),
                           torch.tensor([207, 360, 207]))[:, 0]
    with np.load(tmp_path / "sets" / "sequential.npz") as z:
        diff = np.abs(z["arr_0"].astype(int) - VAEDecoder(vae, torch.device("cpu"))(x0).astype(int))
    assert diff.max() <= 1  # one gray level: the sharded model calls round differently


def test_sd_bench_folder_two_processes(tmp_path, tiny_sd):
    flags = ["--quick", "--timesteps", "6", "--model_path", tiny_sd, "--prompt", "a red cube", "--prompt",
             "a blue ball"]
    bench("sd_bench.py", *flags, "--ablation", "--out", str(tmp_path / "one.json"), quick=False)
    out = launch("sd_bench.py", *flags, "--ablation", "--out", str(tmp_path / "two.json"))
    one, two = read(tmp_path / "one.json"), read(tmp_path / "two.json")
    check_launch(out, one, two)
    assert two["model"]["labels"] == ["a red cube", "a blue ball"]
    assert {k.rsplit(" V=", 1)[0] for k in two["warm_start"]} == {"a red cube -> a blue ball"}
    assert "T=6 ParaTAA" in two["paradigms"] and two["ablation"]["cells"]
    same_counts(one, two)
    assert figures(tmp_path, sd=tmp_path / "two.json") == set("abcdef")

    launch("sample_sets.py", "sd", *flags, "--num_samples", "3", "--batch_size", "2", "--iterations", "2",
           "--out_dir", str(tmp_path / "sets"))
    index = check_sets(tmp_path / "sets", (3, 16, 16, 3))
    assert index["model"]["labels"] == ["a red cube", "a blue ball", "a red cube"]  # what a CLIP score reads


def test_stop_benchmark_refuses_the_design_seeds(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "stop_bench.py"), "--seed_base", "5",
                           "--out", str(tmp_path / "stop.json")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=ENV)
    assert proc.returncode != 0 and "--seed_base" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "stop.json").exists()


def test_stop_sweep_replays_what_the_solver_does(tmp_path):
    """The sweep records each run once with the stop rule off and replays rules on the record: for rules that
    stop at different iterations, the replayed stop and the image it ends on are what solve() gives with that rule."""
    from benchmarks.stop_bench import problems
    from benchmarks.stop_sweep import replay
    from paratAA import solve
    bench("stop_sweep.py", "--seed_bases", "200", "--stop_tols", "0.01,0.2", "--stop_ratios", "0.2,1",
          "--out", str(tmp_path / "sweep.json"))
    sweep = read(tmp_path / "sweep.json")
    # 3 models x 3 samples; 2 x 2 rules, on the latent and (stop_image_tol 1.2) on the image
    assert len(sweep["runs"]) == 9 and len(sweep["rules"]) == 8
    assert [r["stop_image_tol"] for r in sweep["rules"]] == [0.0] * 4 + [1.2] * 4
    # (stop_tol, stop_ratio, stop_image_tol); the third stops later than the second: its ratio binds
    # (0.2, 1.0, 1e-9): an image test no update passes, which holds back every stop by E as well
    rules = ((0.01, 0.2, 0.0), (0.2, 1.0, 0.0), (0.2, 0.2, 0.0), (0.025, 0.35, 0.0), (0.025, 0.35, 1.2),
             (0.025, 0.35, 1e3), (0.2, 1.0, 1e-9))
    stops = {rule: [] for rule in rules}
    for name, (eps, schedule, noise_of, cond, distance, dtype, image) in problems(3, 200).items():
        runs = [r for r in sweep["runs"] if r["model"] == name]
        assert all(("image_change" in r) == (image is not None) for r in runs)
        sched, noise = schedule(25, 0.0), noise_of(25)
        ref = sample_sequential(eps, sched, noise, cond, model_dtype=dtype)[:, 0]
        for tol, ratio, image_tol in rules:
            res = solve(eps, sched, noise, cond, record_x0=True, model_dtype=dtype, stop_tol=tol, stop_ratio=ratio,
                        stop_image_tol=image_tol, image_fn=image)
            for b, r in enumerate(runs):
                k = replay(r, tol, ratio, image_tol)
                d, threshold = distance([res.samples[b]], ref[b])
                assert res.iterations[b] == k, (name, b, tol, image_tol)
                assert d[0] / threshold == pytest.approx(r["distance"][k], rel=1e-6, abs=1e-9), (name, b, tol)
                stops[tol, ratio, image_tol].append(k)
    # the rules stop at different iterations, or the check would prove little: the latent ones, and the image test
    # (one that passes whatever the image stops earlier than E alone)
    assert len({tuple(stops[rule]) for rule in rules[:3]}) == 3, stops
    assert stops[0.025, 0.35, 1e3] != stops[0.025, 0.35, 0.0], stops
    held = [(a, b) for a, b in zip(stops[0.2, 1.0, 0.0], stops[0.2, 1.0, 1e-9]) if a != b]
    assert held and all(b > a for a, b in held), stops  # on the image models only: the mixture has no image


def test_tail_benchmark_quick(tmp_path):
    """Every held-out sample reaches the sequential image under every variant, and the default's stop leaves none
    of them off it."""
    bench("tail_bench.py", "--seed_bases", "200", "--out", str(tmp_path / "tail.json"))
    tail = read(tmp_path / "tail.json")
    # the command repeats the run, --out included (it was left out: a rerun wrote over the default tail.json)
    assert tail["command"] == f"python benchmarks/tail_bench.py --out {tmp_path / 'tail.json'} --quick --seed_bases 200"
    for name, v in tail["variants"].items():
        assert len(v["same"]) == 6 and None not in v["same"], name  # 3 DiT and 3 text-to-image samples
    default = tail["variants"]["default (picard, m = 3)"]
    assert default["off"] == 0
    for bad in ("5", "a,b"):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "tail_bench.py"), "--seed_bases", bad,
                               "--out", str(tmp_path / "bad.json")], cwd=ROOT, capture_output=True, text=True,
                              timeout=600, env=ENV)
        assert proc.returncode != 0 and "--seed_bases" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "bad.json").exists()


def test_slide_tolerance_benchmark_quick(tmp_path):
    """The window table: the default against --slide_tol at a small window; the option never costs iterations."""
    bench("stop_bench.py", "--seed_base", "200", "--windows", "8", "--out", str(tmp_path / "win.json"))
    win = read(tmp_path / "win.json")
    assert win["command"].endswith("--windows 8 --slide_tol 0.008")
    for model in ("embedded DiT", "text-to-image", "Gaussian mixture"):
        base, slide = win["windows"][f"{model} W=8 default"], win["windows"][f"{model} W=8 slide_tol 0.008"]
        assert len(base["stop"]) == 3 and base["off"] == 0, model
        assert max(slide["stop"]) <= max(base["stop"]), model


def test_settle_benchmark_quick(tmp_path):
    """settle_gpu.py on this CPU: seed 1300's "a digit zero" at window T ends on the sequential image with the
    default and off it with --settle 1, after the same iterations."""
    bench("settle_gpu.py", "--out", str(tmp_path / "settle.json"))
    rows = {(r["model"], r["variant"]): r for r in read(tmp_path / "settle.json")["rows"]}
    assert len(rows) == 4 and all(r["window"] == 100 and len(r["iterations"]) == 2 for r in rows.values())
    default, plain = rows["text-to-image", "settle 0.1 (default)"], rows["text-to-image", "settle 1 (plain)"]
    assert default["off"] == 0 < plain["off"] and default["iterations"] == plain["iterations"]
    assert default["evaluations"] >= plain["evaluations"]  # the tighter test keeps states in the window longer


def test_stop_and_speed_benchmarks_quick(tmp_path):
    """The stop rule's benchmark (held-out samples) and the speed benchmark run and say what they promise."""
    bench("stop_bench.py", "--out", str(tmp_path / "stop.json"))
    stop = read(tmp_path / "stop.json")
    assert stop["seed_base"] == 100 and "--seed_base" not in stop["command"]
    for model in ("embedded DiT", "text-to-image", "Gaussian mixture"):
        ours = stop["stop"][f"{model} T=25 eta=0.0 default (stop rule, tol 1e-4)"]
        before = stop["stop"][f"{model} T=25 eta=0.0 per-state, tol 3e-4 (before)"]
        assert ours["lag_median"] <= 1 and ours["off"] == 0 and ours["lag_median"] <= before["lag_median"], model
    assert all(v["ratio"] <= 1.0 for v in stop["forms"].values())
    bench("speed_bench.py", "--out", str(tmp_path / "speed.json"))
    speed = read(tmp_path / "speed.json")
    for block in speed["cpu"].values():
        assert block["methods"]["auto"]["window"] == block["plan"]["window"]
        assert block["methods"]["sequential"]["iterations"] == speed["T"]
    for model in speed["gpu_estimate"]["models"].values():
        one = model["1 GPUs"]
        T = speed["gpu_estimate"]["T"]
        assert 0 < one["speedup"] <= T / one["iterations"] + 1e-9  # no estimate beats T / iterations


def test_gpu_benchmarks_smoke(tmp_path):
    """The two GPU scripts at tiny sizes on this CPU: every section of gpu_bench.py, and gpu_scripts.py's runs of the
    three scripts (a DiT checkpoint and VAE folder in the real layouts, run twice: the second reads the cache)."""
    bench("gpu_bench.py", "--smoke", "--families", "--out", str(tmp_path / "gpu.json"), quick=False)
    gpu = read(tmp_path / "gpu.json")
    for name, row in gpu["default_flags"].items():
        assert row["window"] == row["plan"]["window"] and 1 <= row["window"] <= row["T"], name
        assert row["predicted_iterations_K"]["iterations"] <= row["T"]
    assert {"SDXL UNet 64", "SD3-medium MMDiT 64"} <= set(gpu["per_call"])
    bench("gpu_scripts.py", "--smoke", "--out", str(tmp_path / "scripts.json"), quick=False)
    runs = read(tmp_path / "scripts.json")["runs"]
    assert all(r["exit_code"] == 0 and r["speed"]["speedup"] > 0 for r in runs.values())
    first, second = (runs[k] for k in ("DiT-XL/2 checkpoint, default flags",
                                       "DiT-XL/2 checkpoint, second run (cached cost curve)"))
    assert first["plan_measured"] is True and second["plan_measured"] is False
    assert first["window"] == second["window"] and first["iterations"] == second["iterations"]


def test_figure_b_draws_every_stored_iteration_and_no_repeats():
    """The benches store the estimate before iteration 1 and after iterations 1 .. 20 (21 images); figure (b)
    drew the first 20, and a method that stopped at 6 repeated its last image in the columns after it."""
    from benchmarks.figures import evolution_cells
    columns, drawn = evolution_cells([21, 7, 0])
    assert columns == 21 and [list(r) for r in drawn] == [list(range(21)), list(range(7)), []]
    columns, drawn = evolution_cells([21, 7], 12)  # --quick
    assert columns == 12 and [list(r) for r in drawn] == [list(range(12)), list(range(7))]
