"""Every bad flag or file: one line on stderr naming it, exit 2 (flags) or 1 (files), no traceback, no run folder."""
import os
import subprocess
import sys

import pytest
import torch

import parallel_dit
import parallel_sd
import parallel_sd_winit
from runner.errors import exit_on_error
from tests.conftest import ROOT
from tests.tiny_sd import build_tiny_sd


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    from models.dit import DiT_models
    state = DiT_models["DiT-S/8"](input_size=4, num_classes=10).state_dict()  # another architecture
    torch.save(state, d / "other_arch.pt")
    good = open(os.path.join(ROOT, "models", "embedded", "dit_digits.safetensors"), "rb").read()
    (d / "truncated.safetensors").write_bytes(good[: len(good) // 3])
    (d / "notes.pt").write_text("not a checkpoint")
    (d / "a_file").write_text("x")
    (d / "empty_dir").mkdir()
    build_tiny_sd(str(d / "sd"))
    build_tiny_sd(str(d / "sd_no_unet"))
    import shutil
    shutil.rmtree(d / "sd_no_unet" / "unet")
    return d


def check(module, argv, code, words, tmp_path, capsys):
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as e:
        exit_on_error(module.main, module.parse_args(argv + ["--output_path", str(out)]))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == code
    assert len(err) == 1 and "Traceback" not in err[0], err
    for w in words:
        assert w in err[0], (w, err[0])
    assert not out.exists() or not os.listdir(out), "no run folder may be created"


DIT_FLAGS = [
    (["--timesteps", "0"], ["--timesteps", "0"]),
    (["--timesteps", "1001"], ["--timesteps", "1001"]),
    (["--window_size", "0"], ["--window_size", "0"]),
    (["--order", "0"], ["--order", "0"]),
    (["--window_size", "4", "--order", "5"], ["--order", "5"]),
    (["--memory_size", "0"], ["--memory_size", "0"]),
    (["--tol1", "-0.001"], ["--tol1", "-0.001"]),
    (["--tol2", "-1"], ["--tol2", "-1"]),
    (["--eta", "-0.5"], ["--eta", "-0.5"]),
    (["--cfg_scale", "nan"], ["--cfg_scale", "nan"]),
    (["--cfg_scale", "inf"], ["--cfg_scale", "inf"]),
    (["--num_samples", "0"], ["--num_samples", "0"]),
    (["--batch_size", "0"], ["--batch_size", "0"]),
    (["--max_steps", "0"], ["--max_steps", "0"]),
    (["--equations", "euler"], ["--equations", "euler"]),
    (["--class_labels", "3", "10"], ["--class_labels", "10"]),
    (["--class_labels", "-1"], ["--class_labels", "-1"]),
    (["--model", "DiT-Q/3"], ["--model", "DiT-Q/3"]),
    (["--model", "DiT-XL/2", "--image_size", "300", "--model_path", "x.pt", "--vae_path", "v"], ["--image_size"]),
    (["--model", "DiT-XL/2"], ["--model_path", "--vae_path"]),
]


@pytest.mark.parametrize("argv, words", DIT_FLAGS)
def test_dit_bad_flag(argv, words, tmp_path, capsys):
    check(parallel_dit, argv, 2, words, tmp_path, capsys)


def test_dit_unwritable_output_path(files, capsys):
    with pytest.raises(SystemExit) as e:
        exit_on_error(parallel_dit.main, parallel_dit.parse_args(["--output_path", str(files / "a_file" / "runs")]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--output_path" in err[0]


@pytest.mark.parametrize("flag, name, words", [
    ("--model_path", "missing.pt", ["--model_path", "not found", "missing.pt"]),
    ("--model_path", "empty_dir", ["--model_path", "folder"]),
    ("--model_path", "truncated.safetensors", ["--model_path", "truncated.safetensors", "cannot read"]),
    ("--model_path", "notes.pt", ["--model_path", "notes.pt", "cannot read"]),
    ("--model_path", "other_arch.pt", ["--model_path", "other_arch.pt", "does not fit", "shape"]),
    ("--vae_path", "empty_dir", ["--vae_path", "empty_dir", "config.json"]),
    ("--vae_path", "a_file", ["--vae_path", "a_file", "file"]),
    ("--vae_path", "missing_vae", ["--vae_path", "not found"]),
])
def test_dit_bad_file(files, flag, name, words, tmp_path, capsys):
    check(parallel_dit, [flag, str(files / name), "--timesteps", "5"], 1, words, tmp_path, capsys)


@pytest.mark.parametrize("argv, code, words", [
    (["--prompt", ""], 2, ["--prompt"]),
    (["--prompt", "a", "   "], 2, ["--prompt"]),
    (["--height", "13"], 2, ["--height", "13"]),
    (["--width", "0"], 2, ["--width", "0"]),
    (["--timesteps", "-3"], 2, ["--timesteps", "-3"]),
    (["--memory_size", "0"], 2, ["--memory_size", "0"]),
])
def test_sd_bad_flag(files, argv, code, words, tmp_path, capsys):
    check(parallel_sd, ["--model_path", str(files / "sd")] + argv, code, words, tmp_path, capsys)


@pytest.mark.parametrize("name, words", [
    ("missing_sd", ["--model_path", "not found"]),
    ("a_file", ["--model_path", "file"]),
    ("empty_dir", ["--model_path", "model_index.json"]),
    ("sd_no_unet", ["--model_path", "unet"]),
])
def test_sd_bad_folder(files, name, words, tmp_path, capsys):
    check(parallel_sd, ["--model_path", str(files / name)], 1, words, tmp_path, capsys)


@pytest.mark.parametrize("argv, words", [
    (["--variation_steps", "0"], ["--variation_steps", "0"]),
    (["--timesteps", "20", "--variation_steps", "21"], ["--variation_steps", "21"]),
    (["--prompt2", " "], ["--prompt2"]),
    (["--prompt1", ""], ["--prompt1"]),
])
def test_winit_bad_flag(files, argv, words, tmp_path, capsys):
    check(parallel_sd_winit, ["--model_path", str(files / "sd")] + argv, 2, words, tmp_path, capsys)


@pytest.mark.parametrize("script, argv, code", [
    ("parallel_dit.py", ["--window_size", "0"], 2),
    ("parallel_sd.py", ["--model_path", "no/such/folder"], 1),
])
def test_real_process_prints_one_line_and_exits(script, argv, code, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv, "--output_path", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code and len(lines) == 1 and lines[0].startswith(f"{script}: error: "), proc.stderr
    assert not (tmp_path / "o").exists()


def test_non_finite_model_output_is_one_line_and_writes_no_image(files, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    state = load_file(os.path.join(ROOT, "models", "embedded", "dit_digits.safetensors"))
    state["final_layer.linear.bias"][:] = float("nan")
    save_file(state, str(files / "nan.safetensors"))
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as e:
        exit_on_error(parallel_dit.main, parallel_dit.parse_args(
            ["--model_path", str(files / "nan.safetensors"), "--timesteps", "10", "--output_path", str(out)]))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]  # the rest is the progress bars
    assert e.value.code == 1 and len(errors) == 1 and "Traceback" not in err
    assert "non-finite noise prediction at iteration 1, sample 0, step" in errors[0]
    (run_dir,) = os.listdir(out)
    assert not [f for _, _, fs in os.walk(out / run_dir) for f in fs if f.endswith(".png")]
    import json
    with open(out / run_dir / "metrics.json") as f:
        assert json.load(f)["status"] == "failed"


def test_runs_started_in_the_same_second_never_share_a_folder(tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    from runner.rundir import create_run_dir
    with ThreadPoolExecutor(8) as pool:
        dirs = list(pool.map(lambda _: create_run_dir(str(tmp_path), "DiT"), range(64)))
    assert len(set(dirs)) == 64 and all(os.path.isdir(d) for d in dirs)


class _RunsCode:
    """Unpickling this object would run a shell command that creates a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["top", "inside_state_dict"])
def test_a_checkpoint_never_runs_code(tmp_path, where):
    marker = tmp_path / "code_ran"
    state = {"pos_embed": torch.zeros(1)}
    if where == "top":
        obj = {"model": state, "payload": _RunsCode(marker)}
    else:
        obj = {**state, "blocks.0.attn.qkv.weight": _RunsCode(marker)}
    torch.save(obj, tmp_path / "crafted.pt")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "parallel_dit.py"), "--model_path",
                           str(tmp_path / "crafted.pt"), "--timesteps", "5", "--output_path", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert not marker.exists(), "unpickling the checkpoint ran code"
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "crafted.pt" in lines[0] and "--model_path" in lines[0] and "safetensors" in lines[0]
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")


def test_a_dit_training_checkpoint_with_its_args_still_loads(tmp_path):
    import argparse
    from models.checkpoints import load_state_dict
    state = {"pos_embed": torch.ones(2)}
    torch.save({"model": state, "ema": state, "opt": {}, "args": argparse.Namespace(model="DiT-XL/2", lr=1e-4)},
               tmp_path / "train.pt")
    assert torch.equal(load_state_dict(str(tmp_path / "train.pt"))["pos_embed"], state["pos_embed"])
