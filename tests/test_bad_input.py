"""Every bad flag or file: one line on stderr naming it, exit 2 (flags) or 1 (files), no traceback, no run folder."""
import json
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
from tests.tiny_models import build_tiny_sd


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
    # a failure during sampling comes after the progress bars: they are not messages
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.strip() and "%|" not in line and not line.endswith("\x1b[A")]
    assert e.value.code == code
    assert len(err) == 1 and "Traceback" not in err[0], err
    for w in words:
        assert w in err[0], (w, err[0])
    assert not out.exists(), "no run folder may be created, nor the --output_path folder the run made for it"


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
    (["--preset", "paper", "--max_steps", "1"], ["--max_steps", "reference_quirks", "no model call"]),
    (["--equations", "euler"], ["--equations", "euler"]),
    (["--class_labels", "3", "10"], ["--class_labels", "10"]),
    (["--class_labels", "-1"], ["--class_labels", "-1"]),
    (["--model", "DiT-Q/3"], ["--model", "DiT-Q/3"]),
    (["--model", "DiT-XL/2", "--image_size", "300", "--model_path", "x.pt", "--vae_path", "v"], ["--image_size"]),
    (["--model", "DiT-XL/2"], ["--model_path", "--vae_path"]),
    # blank: an unset shell variable ("$MODEL") quietly sampled the embedded model before
    (["--model_path", ""], ["--model_path", "must not be empty"]),
    (["--vae_path", " "], ["--vae_path", "must not be empty"]),
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
    ("--model_path", "sd", ["--model_path", "not a diffusers DiTPipeline", "StableDiffusionPipeline", "parallel_sd.py"]),
    ("--model_path", "truncated.safetensors", ["--model_path", "truncated.safetensors", "cannot read"]),
    ("--model_path", "notes.pt", ["--model_path", "notes.pt", "cannot read"]),
    ("--model_path", "other_arch.pt", ["--model_path", "other_arch.pt", "does not fit", "shape", "--model DiT-XL/2"]),
    ("--vae_path", "empty_dir", ["--vae_path", "empty_dir", "config.json"]),
    ("--vae_path", "a_file", ["--vae_path", "a_file", "file"]),
    ("--vae_path", "missing_vae", ["--vae_path", "not found"]),
])
def test_dit_bad_file(files, flag, name, words, tmp_path, capsys):
    check(parallel_dit, [flag, str(files / name), "--timesteps", "5"], 1, words, tmp_path, capsys)


@pytest.mark.parametrize("argv, code, words", [
    (["--prompt", ""], 2, ["--prompt"]),
    (["--prompt", "a", "   "], 2, ["--prompt"]),
    (["--prompt", "\u200b"], 2, ["--prompt", "empty"]),                  # a zero-width space: invisible
    (["--height", "13"], 2, ["--height", "13"]),
    (["--width", "0"], 2, ["--width", "0"]),
    (["--timesteps", "-3"], 2, ["--timesteps", "-3"]),
    (["--memory_size", "0"], 2, ["--memory_size", "0"]),
    (["--model_path", ""], 2, ["--model_path", "must not be empty"]),  # the last --model_path counts
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
    (["--prompt1", "\U0001f642"], ["--prompt1", "none of its characters"]),
    (["--model_path", "  "], ["--model_path", "must not be empty"]),
    (["--timesteps", "10", "--cfg_scale", "0.5", "--variation_steps", "11"], ["--variation_steps", "11"]),
    # fewer iterations than the window needs to reach x_0: refused before prompt1 is sampled (it was refused after,
    # its folder kept)
    (["--timesteps", "10", "--variation_steps", "5", "--max_steps", "3", "--window_size", "2"],
     ["--max_steps 3", "the 5 that window 2 needs", "warm start"]),
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
    # nothing finished: no run folder is left (one of only args.json and a failed metrics.json is half-written)
    assert not out.exists(), os.listdir(out)  # nor the --output_path folder the run made for it


def test_a_failure_after_finished_samples_keeps_them(tmp_path, capsys):
    """The second batch's model output is NaN: the first batch's samples stay, the folder says failed."""
    import json
    from runner import loop
    real, calls = loop.solve, []

    def second_batch_fails(eps_fn, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            def broken(x, t, c):
                return torch.full_like(x, float("nan"))
            return real(broken, *a, **k)
        return real(eps_fn, *a, **k)
    out = tmp_path / "runs"
    try:
        loop.solve = second_batch_fails
        with pytest.raises(SystemExit) as e:
            exit_on_error(parallel_dit.main, parallel_dit.parse_args(
                ["--timesteps", "10", "--num_samples", "2", "--batch_size", "1", "--window_size", "10",
                 "--output_path", str(out)]))
    finally:
        loop.solve = real
    assert e.value.code == 1
    assert "1 finished samples kept in" in capsys.readouterr().err
    (run_dir,) = os.listdir(out)
    with open(out / run_dir / "metrics.json") as f:
        m = json.load(f)
    assert m["status"] == "failed" and m["finished_samples"] == [0]


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
    torch.save({"model": state, "ema": {}}, tmp_path / "no_ema.pt")  # an empty "ema" hid the model's weights
    assert torch.equal(load_state_dict(str(tmp_path / "no_ema.pt"))["pos_embed"], state["pos_embed"])


def test_wrapped_and_misnamed_checkpoints_load_as_the_plain_one(tmp_path):
    """A state dict saved from a DDP / DataParallel ("module.") or torch.compile ("_orig_mod.") model, and a
    safetensors file named .pt (or a hub cache blob without a suffix), hold the same weights; before, the first were
    "62 missing, 62 unexpected keys" and the second an unpickling error."""
    from safetensors.torch import save_file
    from models.checkpoints import load_state_dict
    state = {"pos_embed": torch.ones(2), "x_embedder.proj.weight": torch.arange(6.0).reshape(2, 3)}
    torch.save({"ema": {f"module._orig_mod.{k}": v for k, v in state.items()}, "opt": {}}, tmp_path / "ddp.pt")
    save_file({f"_orig_mod.{k}": v for k, v in state.items()}, str(tmp_path / "compiled.pt"))
    save_file(state, str(tmp_path / "blob"))
    for name in ("ddp.pt", "compiled.pt", "blob"):
        loaded = load_state_dict(str(tmp_path / name))
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items()), name
    partly = {"module.pos_embed": torch.ones(2), "x_embedder.proj.weight": torch.ones(1)}  # not one wrapper: kept
    torch.save(partly, tmp_path / "partly.pt")
    assert load_state_dict(str(tmp_path / "partly.pt")).keys() == partly.keys()


def test_a_checkpoint_of_another_size_or_class_count_names_the_flags():
    """A DiT checkpoint for another image size or class count was refused naming only a tensor's shape."""
    import argparse
    from models.dit_source import implied_flags
    model = argparse.Namespace(patch_size=2, in_channels=4)
    state = {"pos_embed": torch.zeros(1, 256, 8), "y_embedder.embedding_table.weight": torch.zeros(1001, 8),
             "final_layer.linear.weight": torch.zeros(32, 8)}  # 2 x 2 patches x 8: noise and variance
    def flags(image_size, num_classes, vae_path=None):  # no VAE folder: SD's factor 8
        return argparse.Namespace(image_size=image_size, num_classes=num_classes, vae_path=vae_path)
    assert implied_flags(state, model, flags(512, 10)) == "--image_size 256 --num_classes 1000"
    assert implied_flags(state, model, flags(256, 1000)) == ""
    # the size is the patches' pixels through --vae_path's VAE: the embedded one has factor 2
    assert implied_flags(state, model, flags(256, 1000, os.path.join(ROOT, "models", "embedded", "vae"))) == \
        "--image_size 64"
    state["final_layer.linear.weight"] = torch.zeros(16, 8)
    assert "learn_sigma=False" in implied_flags(state, model, flags(256, 1000))


def test_a_tilde_in_a_path_flag_is_the_home_folder(monkeypatch, tmp_path):
    """--output_path=~/runs: the shell leaves a ~ after "=" as it is, and the run went to a folder named "~"."""
    import parallel_sd
    monkeypatch.setenv("HOME", str(tmp_path))
    args = parallel_sd.parse_args(["--output_path=~/runs", "--model_path=~/sd"])
    assert args.output_path == str(tmp_path / "runs") and args.model_path == str(tmp_path / "sd")



def test_a_tilde_in_the_cache_variable_is_the_home_folder(monkeypatch, tmp_path):
    """PARATAA_CACHE="~/cache" (quoted, or from a .env file or a container's ENV: no shell expands it) made a folder
    named "~" in the working directory and kept the cost curves there."""
    from runner.planning import cache_path
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PARATAA_CACHE", "~/cache")
    assert cache_path() == str(tmp_path / "cache" / "cost_curves.json")
    monkeypatch.delenv("PARATAA_CACHE")
    assert cache_path() == str(tmp_path / ".cache" / "paratAA" / "cost_curves.json")


def test_a_note_is_said_where_an_error_would_be(monkeypatch, capsys):
    """RANK set but empty is rank 0 for errors (errors.rank); notes tested RANK == "0" and were never said."""
    from runner.flags import note
    monkeypatch.setenv("WORLD_SIZE", "2")
    for value, said in (("", True), ("0", True), ("1", False)):
        monkeypatch.setenv("RANK", value)
        note("a note")
        assert ("note: a note" in capsys.readouterr().err) == said, value

# ------------------------------------------------------------------------- beyond the first list (issue: trust)
MORE_DIT_FLAGS = [
    (["--seed", str(2 ** 70)], 2, ["--seed", str(2 ** 70)]),
    (["--seed", "-1"], 2, ["--seed", "-1"]),
    (["--dist_timeout", "1e300"], 2, ["--dist_timeout"]),
    (["--eta", "1.5"], 2, ["--eta", "1.5"]),
    (["--timesteps", "abc"], 2, ["--timesteps", "abc"]),
    (["--timestep", "10"], 2, ["unrecognized arguments", "--timestep"]),  # no abbreviations
    (["--window", "10"], 2, ["unrecognized arguments", "--window"]),
    (["--image_size", "512"], 2, ["--image_size", "512", "embedded"]),  # ignored by the embedded model: refused
    (["--num_classes", "5"], 2, ["--num_classes", "5"]),
    (["--class_labels", "1", "2", "3", "--num_samples", "2"], 2, ["--class_labels", "--num_samples"]),
    (["--model", "DiT-XL/2", "--num_classes", "2000000", "--model_path", "x.pt", "--vae_path", "v"], 2,
     ["--num_classes", "2000000"]),
    (["--model", "DiT-S/2", "--image_size", "24", "--model_path", "x.pt", "--vae_path", "v"], 2,
     ["--image_size", "24", "3x3", "multiple of 16"]),  # patches that do not tile the latent
    (["--num_samples", "100000000", "--batch_size", "64"], 2, ["--num_samples", "GB"]),  # checked, not allocated
    (["--timesteps", "1000", "--memory_size", "1000", "--batch_size", "100000", "--num_samples", "100000"], 2,
     ["--batch_size", "--memory_size", "GB"]),
    # a note on one flag, then a refusal by a later check: the refusal alone (the note came first, two lines)
    (["--num_samples", "1", "--cfg_scale", "0.5", "--class_labels", "1", "2"], 2, ["--class_labels"]),
    (["--num_samples", "1", "--batch_size", "4", "--cfg_scale", "nan"], 2, ["--cfg_scale", "nan"]),
    (["--timesteps", "10", "--memory_size", "50", "--model", "DiT-XL/2", "--model_path", "/nonexistent.pt",
      "--vae_path", "/nonexistent"], 1, ["--model_path", "file not found"]),
]


@pytest.mark.parametrize("argv, code, words", MORE_DIT_FLAGS)
def test_dit_more_bad_flags(argv, code, words, tmp_path, capsys):
    check(parallel_dit, argv, code, words, tmp_path, capsys)


@pytest.mark.parametrize("make", ["empty", "dangling_link"])
def test_unusable_output_path(tmp_path, capsys, make):
    path = ""
    if make == "dangling_link":
        os.symlink(tmp_path / "nowhere", tmp_path / "link")
        path = str(tmp_path / "link" / "runs")
    with pytest.raises(SystemExit) as e:
        exit_on_error(parallel_dit.main, parallel_dit.parse_args(["--timesteps", "5", "--output_path", path]))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(err) == 1 and "--output_path" in err[0], err
    assert os.listdir(tmp_path) == ([] if make == "empty" else ["link"])


@pytest.fixture(scope="module")
def bad_folders(tmp_path_factory):
    """Tiny SD folders, each broken in one way."""
    import json
    import shutil
    d = tmp_path_factory.mktemp("bad_sd")
    good = build_tiny_sd(str(d / "good"))

    def variant(name, edit):
        shutil.copytree(good, d / name)
        edit(d / name)
        return str(d / name)

    def rewrite(path, change):
        with open(path) as f:
            config = json.load(f)
        change(config)
        with open(path, "w") as f:
            json.dump(config, f)

    return {
        "unet_not_json": variant("unet_not_json", lambda p: (p / "unet" / "config.json").write_text("{not json")),
        "vae_without_key": variant("vae_without_key", lambda p: rewrite(
            p / "vae" / "config.json", lambda c: c.pop("block_out_channels"))),
        "flux_fill": variant("flux_fill", lambda p: rewrite(
            p / "model_index.json", lambda c: c.update(_class_name="FluxFillPipeline"))),
        # an SD folder labelled as Flux's text-to-image pipeline: it has none of Flux's parts
        "flux_labelled": variant("flux_labelled", lambda p: rewrite(
            p / "model_index.json", lambda c: c.update(_class_name="FluxPipeline"))),
        "sdxl_missing_encoder": variant("sdxl_missing_encoder", lambda p: rewrite(
            p / "model_index.json", lambda c: c.update(_class_name="StableDiffusionXLPipeline"))),
        "custom_code": variant("custom_code", lambda p: rewrite(
            p / "model_index.json", lambda c: c.update(unet=["my_module", "MyUNet"]))),
        # (clip_sample is reset to false by StableDiffusionPipeline itself: an SD folder with it samples; the Python
        # API refuses a scheduler set to clip after loading, tests/test_pipelines.py)
        "thresholding": variant("thresholding", lambda p: rewrite(
            p / "scheduler" / "scheduler_config.json", lambda c: c.update(thresholding=True))),
        "flow_prediction": variant("flow_prediction", lambda p: rewrite(
            p / "scheduler" / "scheduler_config.json", lambda c: c.update(prediction_type="flow"))),
        "inpainting_unet": variant("inpainting_unet", lambda p: rewrite(
            p / "unet" / "config.json", lambda c: c.update(in_channels=9))),
        "unet_blocks_negative": variant("unet_blocks_negative", lambda p: rewrite(
            p / "unet" / "config.json", lambda c: c.update(layers_per_block=-1))),
        "unet_head_dim_0": variant("unet_head_dim_0", lambda p: rewrite(
            p / "unet" / "config.json", lambda c: c.update(attention_head_dim=0))),
        "vae_blocks_0": variant("vae_blocks_0", lambda p: rewrite(
            p / "vae" / "config.json", lambda c: c.update(layers_per_block=0))),
        # a config of fewer blocks than the files hold: the extra tensors were dropped without a word, exit 0
        "vae_fewer_layers": variant("vae_fewer_layers", _shallower_vae_config),
        # ids beyond the text encoder's embedding (a token added without resizing it; a CLIP tokenizer where a T5
        # one belongs): an IndexError naming nothing
        "tokenizer_beyond_vocab": variant("tokenizer_beyond_vocab", _added_token),
        # a switch written as text is true to diffusers (SDXL's force_zeros_for_empty_prompt "false" sampled as true)
        "index_switch_text": variant("index_switch_text", lambda p: rewrite(
            p / "model_index.json", lambda c: c.update(requires_safety_checker="false"))),
        "unet_switch_text": variant("unet_switch_text", lambda p: rewrite(
            p / "unet" / "config.json", lambda c: c.update(upcast_attention="False"))),
        "text_encoder_clip_skip": variant("text_encoder_clip_skip", lambda p: rewrite(
            p / "text_encoder" / "config.json", lambda c: c.update(num_hidden_layers=1))),
        "empty_scheduler_config": variant("empty_scheduler_config", lambda p: rewrite(
            p / "scheduler" / "scheduler_config.json", lambda c: [c.pop(k) for k in list(c) if k != "_class_name"])),
        "unet_weights_folder": variant("unet_weights_folder", lambda p: _weights_file(p / "unet").unlink() or
                                       (p / "unet" / "diffusion_pytorch_model.safetensors").mkdir()),
        # json reads NaN: sampled NaN, blamed on the model's output
        "unet_eps_nan": variant("unet_eps_nan", lambda p: rewrite(
            p / "unet" / "config.json", lambda c: c.update(norm_eps=float("nan")))),
        "text_encoder_eps_nan": variant("text_encoder_eps_nan", lambda p: rewrite(
            p / "text_encoder" / "config.json", lambda c: c.update(layer_norm_eps=float("nan")))),
        "huge_sample_size": variant("huge_sample_size", lambda p: rewrite(
            p / "unet" / "config.json", lambda c: c.update(sample_size=1000000))),
        "text_sample_size": variant("text_sample_size", lambda p: rewrite(
            p / "unet" / "config.json", lambda c: c.update(sample_size="abc"))),
        "int_block_channels": variant("int_block_channels", lambda p: rewrite(
            p / "vae" / "config.json", lambda c: c.update(block_out_channels=5))),
        "no_training_steps": variant("no_training_steps", lambda p: rewrite(
            p / "scheduler" / "scheduler_config.json", lambda c: c.update(num_train_timesteps=0))),
        # the ones below ended in a NaN sample reported as converged, black images, tracebacks from diffusers, or a
        # scheduler value reported as a flag
        "betas_above_1": variant("betas_above_1", lambda p: rewrite(
            p / "scheduler" / "scheduler_config.json", lambda c: c.update(beta_schedule="linear", beta_end=5.0))),
        "bogus_beta_schedule": variant("bogus_beta_schedule", lambda p: rewrite(
            p / "scheduler" / "scheduler_config.json", lambda c: c.update(beta_schedule="bogus"))),
        "short_trained_betas": variant("short_trained_betas", lambda p: rewrite(
            p / "scheduler" / "scheduler_config.json", lambda c: c.update(trained_betas=[0.5] * 10))),
        "huge_training_steps": variant("huge_training_steps", lambda p: rewrite(
            p / "scheduler" / "scheduler_config.json", lambda c: c.update(num_train_timesteps=10 ** 12))),
        "bogus_spacing": variant("bogus_spacing", lambda p: rewrite(
            p / "scheduler" / "scheduler_config.json", lambda c: c.update(timestep_spacing="bogus"))),
        # (a negative steps_offset is reset to 1 by StableDiffusionPipeline, as 0 is: tests/test_families.py; the
        # schedule refuses it elsewhere, tests/test_schedule.py)
        "vae_scale_0": variant("vae_scale_0", lambda p: rewrite(
            p / "vae" / "config.json", lambda c: c.update(scaling_factor=0))),
        "vae_scale_text": variant("vae_scale_text", lambda p: rewrite(
            p / "vae" / "config.json", lambda c: c.update(scaling_factor="x"))),
        # these four failed after sampling (a TypeError and an OverflowError naming no file), decoded every image as
        # the same blob, or dropped the prompt with two notes
        "vae_shift_text": variant("vae_shift_text", lambda p: rewrite(
            p / "vae" / "config.json", lambda c: c.update(shift_factor="abc"))),
        "vae_scale_huge": variant("vae_scale_huge", lambda p: rewrite(
            p / "vae" / "config.json", lambda c: c.update(scaling_factor=1e308))),
        "tokenizer_no_length": variant("tokenizer_no_length", lambda p: rewrite(
            p / "tokenizer" / "tokenizer_config.json", lambda c: c.pop("model_max_length"))),
        "tokenizer_length_0": variant("tokenizer_length_0", lambda p: rewrite(
            p / "tokenizer" / "tokenizer_config.json", lambda c: c.update(model_max_length=0))),
        # longer than the text encoder's 32 positions: every prompt failed in a ValueError said as unexpected
        "tokenizer_longer_than_encoder": variant("tokenizer_longer_than_encoder", lambda p: rewrite(
            p / "tokenizer" / "tokenizer_config.json", lambda c: c.update(model_max_length=33))),
        # "false" is a string, true to the scheduler: sampled with set_alpha_to_one on, exit 0
        "alpha_to_one_text": variant("alpha_to_one_text", lambda p: rewrite(
            p / "scheduler" / "scheduler_config.json", lambda c: c.update(set_alpha_to_one="false"))),
        "garbage_text_encoder": variant("garbage_text_encoder", lambda p: (
            p / "text_encoder" / "model.safetensors").write_bytes(bytes(range(100)))),
        # these three ended in an internal error naming no file, or in black images reported as a success
        "empty_tokenizer": variant("empty_tokenizer", lambda p: [f.unlink() for f in (p / "tokenizer").iterdir()]),
        # transformers' "pop expected at most 1 argument, got 2", naming neither the file nor what is wrong with it
        "tokenizer_config_list": variant("tokenizer_config_list", lambda p: (
            p / "tokenizer" / "tokenizer_config.json").write_text("[]")),
        "unet_other_tensors": variant("unet_other_tensors", lambda p: _other_tensors(p / "unet")),
        "vae_nan": variant("vae_nan", lambda p: _nan_weights(p / "vae")),
        # transformers filled the missing tensor at random: other images, exit 0
        "text_encoder_missing_tensor": variant("text_encoder_missing_tensor", lambda p: _drop_weight(
            p / "text_encoder", "position_embedding")),
        # these three were loaded (the integers cast into the UNet, sampled as a success) or ended in diffusers'
        # "too many values to unpack", or named the folder "a 5 folder"
        "unet_integer_weights": variant("unet_integer_weights", lambda p: _change_weights(
            p / "unet", lambda v: v.round().to(torch.int64))),
        "index_unet_string": variant("index_unet_string", lambda p: rewrite(
            p / "model_index.json", lambda c: c.update(unet="UNet2DConditionModel"))),
        "index_class_number": variant("index_class_number", lambda p: rewrite(
            p / "model_index.json", lambda c: c.update(_class_name=5))),
        # these two were sampled as DDIM: an LCM UNet's guidance is an input, an EDM scheduler has no betas
        "lcm_unet": variant("lcm_unet", lambda p: rewrite(
            p / "unet" / "config.json", lambda c: c.update(time_cond_proj_dim=16))),
        "edm_scheduler": variant("edm_scheduler", lambda p: rewrite(
            p / "scheduler" / "scheduler_config.json", lambda c: c.update(
                _class_name="EDMEulerScheduler", sigma_min=0.002, sigma_max=80.0, sigma_data=0.5))),
    }


def _added_token(folder):
    from transformers import CLIPTokenizer
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    tokenizer.add_tokens(["<my-style>"])
    tokenizer.save_pretrained(folder / "tokenizer")


def _shallower_vae_config(folder):
    """The VAE saved with two layers per block, its config then saying one."""
    import json
    from diffusers import AutoencoderKL
    path = folder / "vae" / "config.json"
    config = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    AutoencoderKL.from_config({**config, "layers_per_block": 2}).save_pretrained(folder / "vae")
    path.write_text(json.dumps({**json.loads(path.read_text()), "layers_per_block": 1}))


def _weights_file(folder):
    return next(f for f in folder.iterdir() if f.suffix == ".safetensors")


def _other_tensors(folder):
    """Weights whose tensor names are none of the model's."""
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(3)}, str(_weights_file(folder)))


def _drop_weight(folder, part):
    """The folder's weight file without the tensors whose names hold part."""
    from safetensors.torch import load_file, save_file
    path = str(_weights_file(folder))
    save_file({k: v for k, v in load_file(path).items() if part not in k}, path)


def _change_weights(folder, change):
    """Every floating-point weight of the folder's file replaced by change(weight)."""
    from safetensors.torch import load_file, save_file
    path = str(_weights_file(folder))
    save_file({k: change(v) if v.is_floating_point() else v for k, v in load_file(path).items()}, path)


def _nan_weights(folder):
    _change_weights(folder, lambda v: torch.full_like(v, float("nan")))


@pytest.mark.parametrize("name, words", [
    ("unet_not_json", ["--model_path", "unet/config.json", "JSON"]),
    ("tokenizer_config_list", ["--model_path", "tokenizer/tokenizer_config.json", "no JSON object"]),
    ("vae_without_key", ["--model_path", "vae/config.json", "block_out_channels"]),
    ("flux_fill", ["FluxFillPipeline", "FluxPipeline", "StableDiffusionPipeline", "StableDiffusionXLPipeline"]),
    ("flux_labelled", ["--model_path", "transformer/"]),
    ("sdxl_missing_encoder", ["text_encoder_2"]),
    ("custom_code", ["my_module", "never run"]),
    ("thresholding", ["thresholding"]),
    ("flow_prediction", ["prediction_type", "flow", "v_prediction"]),
    ("inpainting_unet", ["9 channels"]),
    ("text_sample_size", ["unet/config.json", "sample_size", "positive integer"]),
    ("unet_eps_nan", ["--model_path", "unet/config.json", "norm_eps NaN"]),
    ("text_encoder_eps_nan", ["--model_path", "text_encoder/config.json", "layer_norm_eps NaN"]),
    ("unet_weights_folder", ["--model_path", "unet/diffusion_pytorch_model.safetensors", "not a readable file"]),
    ("unet_blocks_negative", ["--model_path", "unet/config.json", "layers_per_block", "-1"]),
    ("unet_head_dim_0", ["--model_path", "unet/config.json", "attention_head_dim", "0"]),
    ("vae_blocks_0", ["--model_path", "vae/config.json", "layers_per_block", "0"]),
    ("index_switch_text", ["--model_path", "model_index.json", "requires_safety_checker", "true or false"]),
    ("unet_switch_text", ["--model_path", "unet/config.json", "upcast_attention", "true or false"]),
    ("tokenizer_beyond_vocab", ["--model_path", "tokenizer/tokenizer_config.json", "vocab_size",
                                "not the tokenizer of this text encoder"]),
    ("vae_fewer_layers", ["--model_path", "vae", "3 blocks decoder.up_blocks.0.resnets.N", "makes 2"]),
    ("empty_scheduler_config", ["--model_path", "scheduler_config.json", "sets none", "defaults"]),
    ("int_block_channels", ["vae/config.json", "block_out_channels", "list"]),
    ("no_training_steps", ["scheduler_config.json", "num_train_timesteps", "positive integer"]),
    ("betas_above_1", ["scheduler_config.json", "alphas_cumprod outside (0, 1]"]),
    ("bogus_beta_schedule", ["scheduler_config.json", "no usable noise levels", "bogus"]),
    ("short_trained_betas", ["scheduler_config.json", "gives 10 alphas_cumprod for num_train_timesteps 1000"]),
    ("huge_training_steps", ["scheduler_config.json", "num_train_timesteps 1000000000000", "at most"]),
    ("bogus_spacing", ["scheduler_config.json", "timestep_spacing 'bogus'", "leading"]),
    ("vae_scale_0", ["--model_path", "vae/config.json", "scaling_factor 0"]),
    ("vae_scale_text", ["--model_path", "vae/config.json", "scaling_factor 'x'"]),
    ("vae_shift_text", ["--model_path", "vae/config.json", "shift_factor 'abc'"]),
    ("vae_scale_huge", ["--model_path", "vae/config.json", "scaling_factor 1e+308", "0.001..1000"]),
    ("tokenizer_no_length", ["--model_path", "tokenizer/tokenizer_config.json", "model_max_length none"]),
    ("tokenizer_length_0", ["--model_path", "tokenizer/tokenizer_config.json", "model_max_length 0"]),
    ("garbage_text_encoder", ["--model_path", "cannot load", "SafetensorError"]),
    ("tokenizer_longer_than_encoder", ["--model_path", "tokenizer/tokenizer_config.json", "model_max_length 33",
                                       "max_position_embeddings 32"]),
    ("alpha_to_one_text", ["--model_path", "scheduler_config.json", "set_alpha_to_one 'false'", "true or false"]),
    ("empty_tokenizer", ["--model_path", "tokenizer/", "tokenizer.json", "vocab.json"]),
    ("unet_other_tensors", ["--model_path", "unet", "do not hold the tensors", "conv_in.weight"]),
    ("vae_nan", ["non-finite pixels", "--vae_path", "--model_path"]),
    ("text_encoder_missing_tensor", ["--model_path", "text_encoder", "do not hold the tensors",
                                     "position_embedding.weight", "at random"]),
    ("lcm_unet", ["--model_path", "unet/config.json", "time_cond_proj_dim", "LCM"]),
    ("edm_scheduler", ["--model_path", "scheduler_config.json", "EDM scheduler"]),
    ("unet_integer_weights", ["--model_path", "unet/diffusion_pytorch_model.safetensors", "I64", "not floating point"]),
    ("index_unet_string", ["--model_path", "model_index.json", "unet", "[library, class] pair"]),
    ("index_class_number", ["--model_path", "model_index.json", "names no pipeline class", '"_class_name": 5']),
])
def test_sd_unusable_folder(bad_folders, name, words, tmp_path, capsys):
    check(parallel_sd, ["--model_path", bad_folders[name], "--timesteps", "5"], 1, words, tmp_path, capsys)


def test_a_text_encoder_set_to_skip_its_last_layers_samples_saying_so(bad_folders, tmp_path, capsys):
    """A text encoder config of fewer layers than its files hold is how "clip skip" is set: sampled, with a note
    (the same check on a VAE refuses it, `vae_fewer_layers`)."""
    parallel_sd.main(parallel_sd.parse_args(["--model_path", bad_folders["text_encoder_clip_skip"], "--timesteps", "5",
                                             "--num_samples", "1", "--output_path", str(tmp_path / "runs")]))
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line and "clip skip" in line]
    assert len(notes) == 1 and "2 blocks" in notes[0] and "makes 1" in notes[0], notes
    assert len(os.listdir(tmp_path / "runs")) == 1


@pytest.mark.parametrize("argv, words", [
    (["--prompt", "a", "handwritten", "digit", "seven"], ["--prompt", "quote", "a handwritten digit seven"]),
    (["--prompt", "line one\nline two", "x"], ["--prompt", "quote", "'line one\\nline two' x"]),  # still one line
    (["--prompt", "a b", "c d", "e f", "--num_samples", "2"], ["--prompt", "--num_samples"]),
    (["--negative_prompt", "blurry", "--cfg_scale", "1"], ["--negative_prompt", "--cfg_scale"]),
    (["--negative_prompt", "", "--cfg_scale", "1"], ["--negative_prompt", "--cfg_scale"]),  # "" is a prompt too
    (["--height", "100000"], ["--height", "100000"]),
    (["--eta", "2"], ["--eta"]),
    # too large for memory because of the image size: said (the message named only the other flags)
    (["--height", "8192", "--width", "8192", "--timesteps", "500"], ["GB", "--height 8192", "image size"]),
    # bytes that are not UTF-8 (a terminal in another encoding): Python keeps them as lone surrogates
    (["--prompt", "\udcff seven"], ["--prompt", "not valid UTF-8"]),
    (["--negative_prompt", "\udcff"], ["--negative_prompt", "not valid UTF-8"]),
    # characters the tokenizer has no token for: read as the empty prompt (the ids of ""), exit 0
    (["--prompt", "\U0001f642\U0001f642"], ["--prompt", "none of its characters", "empty prompt"]),
    (["--negative_prompt", "\u6570\u5b57"], ["--negative_prompt", "none of its characters"]),
])
def test_sd_more_bad_flags(files, argv, words, tmp_path, capsys):
    check(parallel_sd, ["--model_path", str(files / "sd")] + argv, 2, words, tmp_path, capsys)


def test_quoted_prompts_are_prompts(files, tmp_path):
    args = parallel_sd.parse_args(["--prompt", "a handwritten digit one", "a handwritten digit two", "--prompt",
                                   "a handwritten digit three"])
    assert args.prompt == ["a handwritten digit one", "a handwritten digit two", "a handwritten digit three"]


def test_integer_weights_are_refused(tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    state = load_file(os.path.join(ROOT, "models", "embedded", "dit_digits.safetensors"))
    state["final_layer.linear.weight"] = state["final_layer.linear.weight"].round().to(torch.int64)
    save_file(state, str(tmp_path / "ints.safetensors"))
    check(parallel_dit, ["--model_path", str(tmp_path / "ints.safetensors")], 1,
          ["--model_path", "final_layer.linear.weight", "int64", "not floating point"], tmp_path, capsys)


def _flip_a_weight_byte(path):
    """One byte in the middle of the largest tensor record of a .pt (torch's zip format), as a bad copy changes it."""
    import zipfile
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda r: r.file_size)
    raw = bytearray(path.read_bytes())
    local = record.header_offset  # the record's data follows its local header, name and extra field
    start = local + 30 + int.from_bytes(raw[local + 26:local + 28], "little") + \
        int.from_bytes(raw[local + 28:local + 30], "little")
    raw[start + record.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage, words", [
    # torch.load does not check the records' CRCs: the changed weights were sampled without a word
    ("changed_byte", ["cannot read", "Bad CRC-32"]),
    # load_state_dict's "Error(s) in loading state_dict for DiT:", after torch's warning about sparse tensors
    ("sparse", ["final_layer.linear.weight", "sparse_coo", "dense"]),
])
def test_a_checkpoint_torch_reads_but_that_is_not_the_weights_is_refused(tmp_path, capsys, damage, words):
    from safetensors.torch import load_file
    state = load_file(os.path.join(ROOT, "models", "embedded", "dit_digits.safetensors"))
    path = tmp_path / f"{damage}.pt"
    if damage == "sparse":
        state["final_layer.linear.weight"] = state["final_layer.linear.weight"].to_sparse()
    torch.save(state, path)
    if damage == "changed_byte":
        _flip_a_weight_byte(path)
    check(parallel_dit, ["--model_path", str(path), "--timesteps", "5"], 1, ["--model_path", path.name] + words,
          tmp_path, capsys)


def test_a_checkpoint_saved_without_crcs_still_loads(tmp_path):
    """torch.serialization.set_crc32_options(False) stores 0 for every record's CRC: not a damaged file."""
    from models.checkpoints import load_state_dict
    state = {"pos_embed": torch.arange(6.0)}
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(state, tmp_path / "no_crc.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    assert torch.equal(load_state_dict(str(tmp_path / "no_crc.pt"))["pos_embed"], state["pos_embed"])


def test_a_path_with_a_line_break_is_still_one_line(tmp_path, capsys):
    """A file name may hold a line break (--model_path $'a\\nb.pt'): the line naming it was two."""
    check(parallel_dit, ["--model_path", str(tmp_path / "a\nb.pt")], 1, ["--model_path", "a\\nb.pt", "not found"],
          tmp_path, capsys)


def test_a_link_loop_is_named_as_one(tmp_path, capsys):
    os.symlink(tmp_path / "b.pt", tmp_path / "a.pt")
    os.symlink(tmp_path / "a.pt", tmp_path / "b.pt")
    check(parallel_dit, ["--model_path", str(tmp_path / "a.pt")], 1, ["--model_path", "symbolic link"], tmp_path,
          capsys)
    err_hint = "ship with the repository"
    with pytest.raises(SystemExit):
        exit_on_error(parallel_dit.main, parallel_dit.parse_args(["--model_path", str(tmp_path / "none.pt"),
                                                                  "--output_path", str(tmp_path / "o")]))
    assert err_hint not in capsys.readouterr().err  # that hint is for the embedded default path only


def test_an_extreme_guidance_scale_is_named(tmp_path, capsys):
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as e:
        exit_on_error(parallel_dit.main, parallel_dit.parse_args(
            ["--cfg_scale", "1e38", "--timesteps", "10", "--num_samples", "1", "--output_path", str(out)]))
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert e.value.code == 1 and len(errors) == 1 and "--cfg_scale 1e+38" in errors[0], errors


def _stderr_lines(stderr):
    parts = [p.strip() for p in stderr.replace("\r", "\n").splitlines()]
    return [p for p in parts if p and not p.startswith(("samples:", "iterations:")) and p != "\x1b[A"]


@pytest.mark.parametrize("script, argv", [
    ("parallel_dit.py", ["--timesteps", "5", "--num_samples", "1"]),
    ("parallel_dit.py", ["--timesteps", "5", "--num_samples", "1", "--fp16"]),
    ("parallel_sd.py", ["--timesteps", "5", "--num_samples", "1"]),
    ("parallel_sd.py", ["--timesteps", "5", "--num_samples", "1", "--fp16"]),
])
def test_a_normal_run_prints_no_library_warnings(script, argv, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv, "--output_path", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and _stderr_lines(proc.stderr) == [], proc.stderr


def test_max_steps_before_convergence_is_said_on_the_terminal(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "parallel_dit.py"), "--timesteps", "20", "--max_steps",
                           "2", "--num_samples", "1", "--output_path", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    lines = _stderr_lines(proc.stderr)
    assert proc.returncode == 0 and len(lines) == 1 and "--max_steps 2 stopped it before it converged" in lines[0]


def test_max_steps_with_compare_sequential_says_the_image_was_not_reached(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "parallel_dit.py"), "--timesteps", "20", "--max_steps",
                           "1", "--num_samples", "2", "--window_size", "20", "--compare_sequential", "--output_path",
                           str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no sample reached the sequential sample's image (2 of 2)" in proc.stdout
    assert "for an unfinished run: --max_steps stopped 2 of 2 samples early" in proc.stdout


def test_timesteps_past_the_schedulers_training_steps_are_named(tmp_path, capsys):
    """SD v1.5's "leading" spacing with steps_offset 1 at T = 1000 would ask for model timestep 1000."""
    check(parallel_sd, ["--timesteps", "1000"], 2, ["--timesteps", "1000", "training steps"], tmp_path, capsys)
    check(parallel_sd_winit, ["--timesteps", "1000"], 2, ["--timesteps", "1000", "training steps"], tmp_path, capsys)


def test_a_size_past_the_transformers_position_embedding_is_named(tmp_path, capsys):
    """The embedded flow model's SD3 transformer embeds positions up to 4 latent cells (8 pixels): refused before
    anything is loaded."""
    flow = os.path.join(ROOT, "models", "embedded", "flow")
    check(parallel_sd, ["--model_path", flow, "--height", "10"], 2, ["--height", "10", "2..8"], tmp_path, capsys)


def test_memory_size_above_T_is_capped_and_recorded(tmp_path):
    import json
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "parallel_dit.py"), "--timesteps", "6", "--memory_size",
                           "1000", "--num_samples", "1", "--output_path", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and _stderr_lines(proc.stderr) == [
        "parallel_dit.py: note: --memory_size 1000 is more than 6 iterations can fill; using 6"], proc.stderr
    (run,) = os.listdir(tmp_path)
    for name in ("args.json", "metrics.json"):
        with open(tmp_path / run / name) as f:
            assert json.load(f)["memory_size"] == 6


def test_a_folder_of_another_model_is_not_taken_for_a_vae(files, tmp_path, capsys):
    check(parallel_dit, ["--vae_path", str(files / "sd" / "unet")], 1, ["--vae_path", "UNet2DConditionModel",
                                                                         "not an AutoencoderKL"], tmp_path, capsys)


# ------------------------------------------------------------------------- flags the parser took but a run lost
def _run_dit(out, *flags):
    """A run of parallel_dit.py in this process: (args.json, metrics.json) of its folder, metrics.json read as
    strict JSON (no Infinity or NaN, which json.dump writes for floats that are not finite)."""
    import json

    def refuse(name):
        raise ValueError(f"metrics.json is not strict JSON: {name}")
    run_dir = parallel_dit.main(parallel_dit.parse_args([*flags, "--output_path", str(out)]))
    with open(os.path.join(run_dir, "args.json")) as f:
        args = json.load(f)
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return args, json.load(f, parse_constant=refuse)


def test_a_flag_given_in_any_form_wins_over_the_preset(tmp_path):
    """--no-reference_quirks (BooleanOptionalAction's negative form) and --window_size=5 (the = form) are given
    explicitly, so the paper preset's reference_quirks true and window 100 do not replace them."""
    for record in _run_dit(tmp_path, "--preset", "paper", "--timesteps", "10", "--num_samples", "1",
                           "--no-reference_quirks", "--window_size=5"):
        assert record["reference_quirks"] is False and record["window_size"] == 5, record
    args, _ = _run_dit(tmp_path, "--preset", "paper", "--timesteps", "10", "--num_samples", "1")
    assert args["reference_quirks"] is True and args["memory_size"] == 2  # the preset's own, where no flag is given


def test_repeated_class_labels_add_up(tmp_path):
    _, m = _run_dit(tmp_path, "--timesteps", "5", "--num_samples", "2", "--class_labels", "3", "--class_labels", "4")
    assert [s["class_label"] for s in m["samples"]] == [3, 4]


def test_repeated_class_labels_are_all_counted(tmp_path, capsys):
    check(parallel_dit, ["--class_labels", "1", "2", "3", "--class_labels", "4", "--num_samples", "1"], 2,
          ["--class_labels gives 4 labels", "--num_samples 1"], tmp_path, capsys)


@pytest.mark.parametrize("field, value", [
    ("call_seconds", 1e308),          # made the predicted times inf, and metrics.json non-strict JSON (Infinity)
    ("call_seconds", "0.1"),          # text float() takes: a window and a speed-up from a made-up time
    ("call_seconds", True),
    ("call_seconds", 7200.0),         # two hours for a call of a model that takes milliseconds
    ("solver_seconds", "0.1"),
])
def test_a_cache_time_no_measurement_gives_is_measured_again(tmp_path, monkeypatch, field, value):
    """The planner's cache (tests/test_speed.py: its damaged shapes) holds times a run measured: an int or float,
    finite, positive and at most an hour. An entry with any other time is measured again, with a fixed window
    (the one time a run needs) and with window auto (the whole curve, then cached anew)."""
    import json
    import math
    monkeypatch.setenv("PARATAA_CACHE", str(tmp_path / "cache"))
    flags = ["--timesteps", "8", "--num_samples", "1"]
    _run_dit(tmp_path / "a", *flags, "--window_size", "auto")
    path = tmp_path / "cache" / "cost_curves.json"
    with open(path) as f:
        (key, entry), = json.load(f).items()
    with open(path, "w") as f:
        json.dump({key: {**entry, field: dict.fromkeys(entry[field], value)}}, f)
    _, fixed = _run_dit(tmp_path / "b", *flags, "--window_size", "4")  # first: it leaves the cache as it is
    assert fixed["per_call_seconds"] != float(value) and fixed["per_call_seconds"] > 0
    _, auto = _run_dit(tmp_path / "c", *flags, "--window_size", "auto")
    assert auto["plan"]["measured"] and math.isfinite(auto["speed"]["speedup"]), auto["plan"]
    with open(path) as f:
        times = [t for e in json.load(f).values() for part in ("call_seconds", "solver_seconds")
                 for t in e[part].values()]
    assert all(type(t) is float for t in times), times


def test_dit_unusable_files(bad_folders, tmp_path, capsys):
    """A checkpoint with keys that are not names, a FIFO (reading it waited forever) and a VAE whose scaling factor
    makes black images: each one line naming the flag and the file."""
    torch.save({1: torch.zeros(2)}, tmp_path / "numbered.pt")
    os.mkfifo(tmp_path / "fifo.pt")
    vae = os.path.join(bad_folders["garbage_text_encoder"], "vae")  # a usable VAE
    for name, words in (("numbered.pt", ["no state dict of named tensors"]), ("fifo.pt", ["not a regular file"])):
        check(parallel_dit, ["--model", "DiT-XL/2", "--model_path", str(tmp_path / name), "--vae_path", vae],
              1, ["--model_path", name] + words, tmp_path, capsys)
    check(parallel_dit, ["--vae_path", os.path.join(bad_folders["vae_scale_0"], "vae")], 1,
          ["--vae_path", "vae/config.json", "scaling_factor 0"], tmp_path, capsys)
    check(parallel_dit, ["--vae_path", os.path.join(bad_folders["unet_other_tensors"], "unet")], 1,
          ["--vae_path", "UNet2DConditionModel", "not an AutoencoderKL"], tmp_path, capsys)
    other = tmp_path / "vae_other_tensors"
    import shutil
    shutil.copytree(vae, other)
    _other_tensors(other)
    check(parallel_dit, ["--vae_path", str(other)], 1, ["--vae_path", "do not hold the tensors"], tmp_path, capsys)
    (other / "config.json").write_text("[1, 2]")
    check(parallel_dit, ["--vae_path", str(other)], 1, ["--vae_path", "config.json", "JSON list, not an object"],
          tmp_path, capsys)
    check(parallel_dit, ["--vae_path", os.path.join(bad_folders["vae_nan"], "vae"), "--output_path",
                         str(tmp_path / "made" / "by" / "the run")], 1, ["non-finite pixels"], tmp_path, capsys)
    assert not (tmp_path / "made").exists()  # the folders of --output_path the run created are gone with it


def test_an_output_path_too_long_for_the_file_system_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    """A folder name over NAME_MAX failed only after the model had loaded and left its parent folder behind; one
    3000 folders deep ended in a RecursionError."""
    import runner.rundir as rundir
    loaded = []
    monkeypatch.setattr(parallel_dit, "start_session", lambda args: loaded.append(1))  # what loading starts with
    for path in (tmp_path / "new" / ("b" * 300), tmp_path / "/".join(["d"] * 3000)):
        with pytest.raises(SystemExit) as e:
            exit_on_error(parallel_dit.main, parallel_dit.parse_args(["--output_path", str(path)]))
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert e.value.code == 2 and len(err) == 1 and "--output_path is too long" in err[0], err
    assert not loaded and os.listdir(tmp_path) == []
    # a run folder that cannot be made after all (the file system changed meanwhile) leaves no folder behind
    real = os.makedirs

    def fail_last(path, *a, **k):
        if os.path.basename(path).startswith("DiT-"):
            raise OSError(28, "No space left on device")
        return real(path, *a, **k)
    monkeypatch.setattr(rundir.os, "makedirs", fail_last)
    with pytest.raises(rundir.UsageError, match="cannot create a run folder"):
        rundir.create_run_dir(str(tmp_path / "x" / "y"), "DiT")
    assert os.listdir(tmp_path) == []


def test_an_order_above_the_planned_window_is_said(tmp_path, capsys, monkeypatch):
    """With a fixed window such an order is refused; with window auto the planner's window is known only at run
    time, so the order is capped at it (an order above the window acts as the window) and a note says so. (The
    planner is made to choose window 4 here: its choice depends on the machine.)"""
    from dataclasses import replace
    import runner.planning as planning
    real = planning.plan_window
    monkeypatch.setattr(planning, "plan_window", lambda *a, **k: replace(real(*a, **k), window=4))
    _, metrics = _run_dit(tmp_path, "--timesteps", "10", "--num_samples", "1", "--order", "8")
    notes = [line for line in capsys.readouterr().err.splitlines() if "note: --order 8" in line]
    assert metrics["window_size"] == 4 and metrics["order"] == 4
    assert len(notes) == 1 and "the planner chose (4)" in notes[0], notes


def test_a_presets_values_capped_at_the_run_are_not_said_as_flags(tmp_path, capsys, monkeypatch):
    """--preset paper --window_size auto: the preset's order (the reference's) is bounded by the planner's window as
    by an explicit --window_size, and the note "--order 10 is above the window the planner chose" named a flag that
    was never given; so did "--memory_size 2 is more than 1 iterations can fill" at --timesteps 1. A flag given
    beside the preset is still said."""
    from dataclasses import replace
    import runner.planning as planning
    real = planning.plan_window
    monkeypatch.setattr(planning, "plan_window", lambda *a, **k: replace(real(*a, **k), window=4))
    flags = ["--preset", "paper", "--window_size", "auto", "--timesteps", "10", "--num_samples", "1"]
    args, metrics = _run_dit(tmp_path / "a", *flags)
    assert "note: --order" not in capsys.readouterr().err
    assert metrics["window_size"] == 4 and metrics["order"] == 4 and args["order"] == 10 and args["preset"] == "paper"
    assert not [k for k in args if k.startswith("_")]  # the bookkeeping is not a flag
    _, metrics = _run_dit(tmp_path / "b", *flags, "--order", "8")
    assert "note: --order 8 is above the window the planner chose (4)" in capsys.readouterr().err
    assert metrics["order"] == 4
    # the same of the preset's memory size 2 at T = 1 ("--memory_size 2 is more than 1 iterations can fill")
    _, metrics = _run_dit(tmp_path / "c", "--preset", "paper", "--timesteps", "1", "--num_samples", "1")
    assert "note:" not in capsys.readouterr().err and metrics["memory_size"] == 1
    _run_dit(tmp_path / "d", "--preset", "paper", "--timesteps", "1", "--num_samples", "1", "--memory_size", "2")
    assert "note: --memory_size 2 is more than 1 iterations can fill" in capsys.readouterr().err


def test_a_batch_larger_than_the_samples_is_said_and_recorded_as_used(tmp_path, capsys):
    args, metrics = _run_dit(tmp_path, "--timesteps", "5", "--num_samples", "2", "--batch_size", "5")
    notes = [line for line in capsys.readouterr().err.splitlines() if "note: --batch_size 5" in line]
    assert len(notes) == 1 and "using 2" in notes[0] and args["batch_size"] == 2


@pytest.mark.parametrize("env, words", [
    ({"WORLD_SIZE": "abc"}, ["WORLD_SIZE='abc'", "not a non-negative integer"]),
    ({"WORLD_SIZE": "2"}, ["WORLD_SIZE=2", "MASTER_ADDR is not set"]),
    ({"WORLD_SIZE": "0"}, ["WORLD_SIZE is 0"]),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}, ["RANK=2", "WORLD_SIZE=2"]),
    ({"MASTER_PORT": "http"}, ["MASTER_PORT='http'"]),
    ({"RANK": "abc"}, ["RANK='abc'"]),
])
def test_a_bad_process_group_environment_is_one_line(env, words, tmp_path):
    """Variables accelerate launch / torchrun set, set by hand or left from another job: WORLD_SIZE=abc ended the run
    in int()'s ValueError, WORLD_SIZE=2 alone in accelerate's, both said as unexpected."""
    clean = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                               "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "parallel_dit.py"), "--timesteps", "5", "--num_samples",
                           "1", "--output_path", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, env={**clean, **env})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert all(w in lines[0] for w in words) and "unexpected" not in lines[0], lines[0]
    assert not (tmp_path / "o").exists()


def test_a_launchers_environment_passes():
    from runner.environment import launch_env_problem
    torchrun = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert launch_env_problem(torchrun) is None and launch_env_problem({}) is None
    assert launch_env_problem({"WORLD_SIZE": "1"}) is None


def test_a_note_while_sampling_is_a_line_of_its_own(monkeypatch):
    """A note said while a progress bar is drawn (the planner's, inside the samples bar) was printed after the bar's
    text, on its line."""
    import io
    from tqdm.auto import tqdm
    from runner.flags import note
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with tqdm(total=3, desc="samples", file=sys.stderr) as bar:
        bar.update(1)
        note("a note")
    text = sys.stderr.getvalue()
    line = text[:text.index("note: a note")].split("\n")[-1].split("\r")[-1]  # what the terminal shows before it
    assert line == f"{os.path.basename(sys.argv[0])}: ", repr(text)


def test_one_process_says_a_refused_launch():
    """Which process speaks (errors.rank): its RANK where that is a rank, so that a group refused for a missing
    MASTER_ADDR says it once; 0 where RANK is no rank, so that its refusal is said at all."""
    from runner.environment import process_rank
    assert process_rank({}) == 0 and process_rank({"WORLD_SIZE": "2", "RANK": "1"}) == 1
    for env in ({"RANK": ""}, {"RANK": "abc"}, {"RANK": "1"}, {"RANK": "2", "WORLD_SIZE": "2"},
                {"RANK": "1", "WORLD_SIZE": "x"}):
        assert process_rank(env) == 0, env


def test_noise_arguments_are_named():
    from paratAA import dit_schedule, solve
    from paratAA.noise import draw_noise
    with pytest.raises(ValueError, match="latent must be a shape"):
        draw_noise(1, 10, 4)  # before: TypeError "'int' object is not iterable"
    with pytest.raises(ValueError, match="latent must be a shape"):
        draw_noise(1, 10, "444")
    noise = torch.randn(1, 11, 4, 4, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="noise must be a dense tensor"):  # before: "reshape is not implemented"
        solve(lambda x, t, c: torch.zeros_like(x), dit_schedule(10), noise.to_sparse())


def test_numpy_step_counts_are_taken_as_integers():
    """np.uint8(5) passed the step-count check and overflowed inside diffusers' set_timesteps (its 1000 training
    steps divided by a uint8)."""
    import numpy as np
    from diffusers import DDIMScheduler
    from paratAA import from_ddim_scheduler
    for steps in (np.uint8(5), np.int8(5)):
        out = from_ddim_scheduler(DDIMScheduler(clip_sample=False), steps)
        ref = from_ddim_scheduler(DDIMScheduler(clip_sample=False), 5)
        assert out.num_steps == 5 and torch.equal(out.timesteps, ref.timesteps)


def test_a_stop_ratio_above_1_is_refused(tmp_path, capsys):
    """With stop_ratio above 1 a growing error passes the rule's contraction test: --stop_ratio 1e308 with
    --stop_tol 0.99 ended a run 3.5 gray levels off, "converged"."""
    check(parallel_dit, ["--stop_ratio", "1.5"], 2, ["--stop_ratio", "at most 1"], tmp_path, capsys)


def test_the_order_note_names_the_order_given(tmp_path, capsys, monkeypatch):
    """--order 1000 with window auto at T = 5: the note named order 5 (its cap at T), a value never given."""
    from dataclasses import replace
    from paratAA import planner
    choose = planner.choose
    monkeypatch.setattr(planner, "choose", lambda *a, **k: replace(choose(*a, **k), window=1))  # as a busy CPU
    parallel_dit.main(parallel_dit.parse_args(["--timesteps", "5", "--num_samples", "1", "--order", "1000",
                                               "--output_path", str(tmp_path / "o")]))
    err = capsys.readouterr().err
    assert "--order 1000 is above the window the planner chose (1)" in err and "--order 5 " not in err, err


def test_the_wrote_line_is_one_line(tmp_path, capsys):
    parallel_dit.main(parallel_dit.parse_args(["--timesteps", "5", "--num_samples", "1",
                                               "--output_path", str(tmp_path / "a\nb")]))
    wrote = [line for line in capsys.readouterr().out.splitlines() if line.startswith("wrote ")]
    assert len(wrote) == 1 and "a\\nb" in wrote[0], wrote


def test_a_size_set_by_the_models_config_is_named_as_such(bad_folders, tmp_path, capsys):
    """A UNet config's sample_size of 1000000: the memory check named --height and --width, flags never given."""
    with pytest.raises(SystemExit) as e:
        exit_on_error(parallel_sd.main, parallel_sd.parse_args(["--model_path", bad_folders["huge_sample_size"],
                                                                "--timesteps", "5", "--output_path", str(tmp_path)]))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(err) == 1 and "by the model's config" in err[0] and "--height" not in err[0], err


def vae_of_factor(folder, factor):
    """An AutoencoderKL folder whose config alone says its factor (what the flag checks read before loading)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"_class_name": "AutoencoderKL", "block_out_channels": [8] * (factor.bit_length()),
                   "latent_channels": 4}, f)
    return str(folder)


def test_a_vae_of_another_factor_is_refused_where_the_latent_is_fixed(tmp_path, capsys):
    """The embedded DiT's 4x4 latents through a VAE of factor 4 would be 16x16 images, not the 8x8 that args.json
    records: refused, naming --vae_path, before anything is loaded."""
    check(parallel_dit, ["--vae_path", vae_of_factor(tmp_path / "vae4", 4)], 2,
          ["--vae_path", "vae4", "factor 2"], tmp_path, capsys)
    # the reference's command: a checkpoint and SD's VAE, no --model (the reference always builds DiT-XL/2); the
    # line blamed --vae_path alone
    torch.save({"x": torch.zeros(1)}, tmp_path / "DiT-XL-2-256x256.pt")
    check(parallel_dit, ["--model_path", str(tmp_path / "DiT-XL-2-256x256.pt"),
                         "--vae_path", vae_of_factor(tmp_path / "vae8", 8)], 2,
          ["--vae_path", "factor 2", "add --model DiT-XL/2 --image_size 256"], tmp_path, capsys)


def test_a_checkpoint_is_read_at_its_vaes_factor(tmp_path, capsys):
    """A registry DiT's latent side is --image_size over --vae_path's factor, not over 8: a DiT-S/8 of input 8 with
    the embedded VAE (factor 2) at --image_size 64 ran with exit 0 and wrote 16x16 images where args.json said 64.
    Now its weights are checked against 32x32 latents, and the line names the size they fit."""
    from models.dit import DiT_models
    torch.save(DiT_models["DiT-S/8"](input_size=8, num_classes=10).state_dict(), tmp_path / "s8.pt")
    vae = os.path.join(ROOT, "models", "embedded", "vae")
    check(parallel_dit, ["--model", "DiT-S/8", "--model_path", str(tmp_path / "s8.pt"), "--num_classes", "10",
                         "--image_size", "64", "--vae_path", vae, "--timesteps", "2"], 1,
          ["--model_path", "--image_size 16"], tmp_path, capsys)


def test_winit_max_steps_checked_against_the_window_the_planner_chose(files, tmp_path, capsys, monkeypatch):
    """With window auto the window is known only once the planner has chosen it: checked there, still before
    prompt1 is sampled."""
    from dataclasses import replace
    from paratAA import planner
    choose = planner.choose
    monkeypatch.setattr(planner, "choose", lambda *a, **k: replace(choose(*a, **k), window=4))
    check(parallel_sd_winit, ["--model_path", str(files / "sd"), "--timesteps", "10", "--variation_steps", "5",
                              "--max_steps", "2"], 2, ["--max_steps 2", "the 3 that window 4 needs"], tmp_path, capsys)


@pytest.mark.parametrize("flags, said", [(["--tol1", "0.5"], "--tol1 0.5 above 0.01"),
                                         (["--tol1", "0.02", "--tol2", "0.3"], "--tol1 0.02 and --tol2 0.3 above"),
                                         (["--tol1", "1e-3", "--tol2", "0.01"], None)])
def test_a_loose_tolerance_is_said(flags, said, tmp_path, capsys):
    """--tol1 and --tol2 0.99 passed the check (below 1) and ended samples 17-48 gray levels off, "converged",
    without a word: above 0.01 a note says what such a tolerance allows."""
    parallel_dit.main(parallel_dit.parse_args(["--timesteps", "3", "--num_samples", "1", *flags,
                                               "--output_path", str(tmp_path)]))
    notes = [line for line in capsys.readouterr().err.splitlines() if ": note: " in line]
    assert [said in line for line in notes] == ([True] if said else []), notes
