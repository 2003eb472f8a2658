"""Flux (FluxPipeline folders, FLUX.1-dev and -schnell layouts): at tolerance 0 the solver equals FluxPipeline's own
__call__ from the same initial latents (packed as the pipeline packs them), through parallel_sd.py and through
parallel_sample; 1 vs 2 processes; what is not supported is refused in one line."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import parallel_sd
from models.pipelines import parallel_sample
from tests.conftest import assert_processes_agree, edit_json, folder_variant, read_metrics
from tests.test_bad_input import check
from tests.tiny_models import build_tiny_flux

PROMPT = "a handwritten digit four"
SIZE = ["--height", "16", "--width", "24"]  # not square: latents [4, 8, 12], 4 x 6 tokens


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("flux")
    # FLUX.1-dev: guidance-distilled, dynamic shifting; FLUX.1-schnell: neither (shift 1)
    return {"dev": build_tiny_flux(str(d / "dev")),
            "schnell": build_tiny_flux(str(d / "schnell"), seed=1, guidance_embeds=False, dynamic_shifting=False)}


def pack_latents(x):
    """[N, C, H, W] latents packed into tokens by FluxPipeline itself (the reference, not models.adapters')."""
    from diffusers import FluxPipeline
    return FluxPipeline._pack_latents(x, *x.shape)


def unpack_latents(tokens, height, width):
    """FluxPipeline's own unpacking to [N, C, height, width] latent cells (a VAE factor of 1: cells, not pixels)."""
    from diffusers import FluxPipeline
    return FluxPipeline._unpack_latents(tokens, height, width, 1)


def load(folder):
    from diffusers import FluxPipeline
    pipe = FluxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def own_call(pipe, x_T, T, guidance, height, width, output_type="latent", **kwargs):
    """FluxPipeline's own __call__ from the unpacked initial latents x_T [N, C, H, W]: latents [N, C, H, W] (or
    images [N, H, W, 3] in [0, 1] with output_type "np")."""
    with torch.no_grad():
        out = pipe([PROMPT] * len(x_T), num_inference_steps=T, guidance_scale=guidance, height=height, width=width,
                   latents=pack_latents(x_T.float()), output_type=output_type, **kwargs).images
    return unpack_latents(out, *x_T.shape[2:]) if output_type == "latent" else out


def run_sd(folder, out, *flags):
    run_dir = parallel_sd.main(parallel_sd.parse_args(["--model_path", folder, "--output_path", str(out), *flags]))
    return run_dir, read_metrics(run_dir)


def test_packing_is_the_pipelines():
    """The adapter's packing is FluxPipeline's own, and its unpacking the inverse."""
    from models import adapters
    x = torch.randn(2, 4, 8, 12)
    assert torch.equal(adapters.pack_latents(x), pack_latents(x))
    assert torch.equal(adapters.unpack_latents(pack_latents(x), 8, 12), x)


@pytest.mark.parametrize("name", ["dev", "schnell"])
def test_parallel_sd_at_tolerance_zero_equals_fluxpipelines_own_loop(folders, tmp_path, name):
    T = 8
    run_dir, m = run_sd(folders[name], tmp_path, "--timesteps", str(T), "--tol1", "0", "--tol2", "0",
                        "--num_samples", "2", "--batch_size", "2", "--prompt", PROMPT, "--cfg_scale", "3", *SIZE)
    z = np.load(os.path.join(run_dir, "latents.npz"))
    ours, x_T = z["latents"], torch.from_numpy(z["x_T"])
    assert ours.shape == x_T.shape == (2, 4, 8, 12)  # the unpacked latent is the state (and what is written)
    pipe = load(folders[name])
    ref = own_call(pipe, x_T, T, 3.0, 16, 24).numpy()
    assert np.isfinite(ref).all() and np.abs(ref).max() > 0
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert m["scheduler"]["class"] == "FlowMatchEulerDiscreteScheduler" and "mu" in m["scheduler"]["read_as"]
    # the guidance embedding is used where the model has one: another scale is another image (schnell: the same)
    other = own_call(pipe, x_T, T, 6.0, 16, 24).numpy()
    assert (np.abs(other - ref).max() > 1e-2) == (name == "dev")


def test_parallel_sample_on_a_loaded_fluxpipeline_equals_its_own_call(folders):
    """Latents and decoded images at tolerance 0 (its defaults: guidance 3.5, T5 prompt of max_sequence_length), and
    the same image at the default tolerances."""
    pipe = load(folders["dev"])
    T = 6
    exact = parallel_sample(pipe, PROMPT, num_inference_steps=T, num_images=2, height=24, width=16, tol1=0, tol2=0,
                            output_type="np", max_sequence_length=40)
    assert exact.latents.shape == (2, 4, 12, 8)
    ref = own_call(pipe, exact.x_T, T, 3.5, 24, 16, max_sequence_length=40)
    assert (exact.latents.float() - ref).abs().max() <= 1e-4 * ref.abs().max()
    images = own_call(pipe, exact.x_T, T, 3.5, 24, 16, "np", max_sequence_length=40)           # [2, H, W, 3]
    assert np.abs(np.stack(exact.images).astype(int) - (images * 255).round().astype(int)).max() <= 1
    default = parallel_sample(pipe, PROMPT, num_inference_steps=T, num_images=2, height=24, width=16,
                              output_type="np", max_sequence_length=40)
    diff = np.stack(default.images).astype(float) - np.stack(exact.images).astype(float)
    assert np.sqrt((diff ** 2).mean()) <= 1.0  # "same image": within one gray level (RMS)


def test_one_and_two_processes_agree(folders, tmp_path):
    assert_processes_agree(["--model_path", folders["dev"], "--timesteps", "8", "--window_size", "8",
                            "--num_samples", "2", "--batch_size", "2", *SIZE], tmp_path)


def _index(change):
    def edit(folder):
        path = os.path.join(folder, "model_index.json")
        with open(path) as f:
            index = json.load(f)
        change(index)
        with open(path, "w") as f:
            json.dump(index, f)
    return edit


def test_what_is_not_supported_is_one_line(folders, tmp_path, capsys):
    dev, root = folders["dev"], str(tmp_path / "variants")
    cases = [
        # Flux's other pipelines (image conditions, an image prompt): named, with what is supported
        (folder_variant(dev, root, "fill", _index(lambda c: c.update(_class_name="FluxFillPipeline"))), [], 1,
         ["FluxFillPipeline", "FluxPipeline", "StableDiffusionPipeline"]),
        (folder_variant(dev, root, "kontext", _index(lambda c: c.update(_class_name="FluxKontextPipeline"))), [], 1,
         ["FluxKontextPipeline", "FluxPipeline"]),
        # incomplete folders, as a partial download leaves them
        (folder_variant(dev, root, "no_t5", lambda f: shutil.rmtree(os.path.join(f, "text_encoder_2"))), [], 1,
         ["--model_path", "text_encoder_2/"]),
        (folder_variant(dev, root, "no_t5_tokenizer", lambda f: shutil.rmtree(os.path.join(f, "tokenizer_2"))), [], 1,
         ["--model_path", "tokenizer_2/"]),
        # a transformer whose input is wider than the packed latents (a Fill or Control transformer)
        (folder_variant(dev, root, "wide", lambda f: edit_json(os.path.join(f, "transformer", "config.json"),
                                                          in_channels=32)), [], 1,
         ["32 features per token", "4-channel latents"]),
        (folder_variant(dev, root, "stochastic", lambda f: edit_json(
            os.path.join(f, "scheduler", "scheduler_config.json"), stochastic_sampling=True)), [], 1,
         ["stochastic_sampling"]),
        # FluxPipeline guides with a negative prompt only at true_cfg_scale > 1, and ignores either given alone
        (dev, ["--negative_prompt", "blurry"], 2, ["--negative_prompt", "distilled guidance", "--true_cfg_scale 1"]),
        (dev, ["--negative_prompt", "", "--true_cfg_scale", "1"], 2, ["--negative_prompt", "no effect"]),
        (dev, ["--true_cfg_scale", "4"], 2, ["--true_cfg_scale 4", "--negative_prompt", "none was given"]),
        (dev, ["--true_cfg_scale", "nan", "--negative_prompt", "x"], 2, ["--true_cfg_scale must be a finite"]),
        # the T5 prompt's length: the pipelines' limit
        (dev, ["--max_sequence_length", "0"], 2, ["--max_sequence_length must be in 1..512", "got 0"]),
        (dev, ["--max_sequence_length", "513"], 2, ["--max_sequence_length must be in 1..512"]),
        # the 2x2 packing: sides are multiples of the VAE factor (2) x 2
        (dev, ["--height", "18"], 2, ["--height", "multiple of 4"]),
    ]
    for folder, flags, code, words in cases:
        check(parallel_sd, ["--model_path", folder, "--timesteps", "2", *SIZE, *flags], code, words, tmp_path, capsys)
    # below 1 Flux's guidance is an input like any other: no note that it is off
    capsys.readouterr()
    run_sd(dev, tmp_path / "low", "--timesteps", "2", "--cfg_scale", "0.5", "--num_samples", "1", *SIZE)
    assert "guidance is off" not in capsys.readouterr().err


def test_parallel_sample_refusals_name_the_argument(folders, tiny_sd):
    from diffusers import StableDiffusionPipeline
    pipe = load(folders["dev"])
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    for kwargs, text in ((dict(negative_prompt="blurry"), "negative_prompt has no effect without true "
                                                          "classifier-free guidance \\(true_cfg_scale 1 <= 1\\)"),
                         (dict(negative_prompt=""), "negative_prompt has no effect"),
                         (dict(true_cfg_scale=2), "true_cfg_scale 2 guides away from a negative prompt"),
                         (dict(true_cfg_scale=float("inf"), negative_prompt="x"), "true_cfg_scale must be a finite"),
                         (dict(height=18), "height must be a multiple of 4"),
                         (dict(max_sequence_length=0), "max_sequence_length must be an integer in 1..512"),
                         (dict(max_sequence_length=513), "max_sequence_length must be an integer in 1..512"),
                         (dict(num_inference_steps=0), "num_inference_steps must be")):
        with pytest.raises(ValueError, match=text):
            parallel_sample(pipe, PROMPT, **{"num_inference_steps": 2, "height": 16, "width": 16, **kwargs})
    pipe.text_encoder_2 = None
    with pytest.raises(ValueError, match="pipe has text_encoder_2 set to None"):
        parallel_sample(pipe, PROMPT, num_inference_steps=2, height=16, width=16)
    pipe = load(folders["dev"])
    pipe.transformer.register_to_config(in_channels=32)  # a Fill or Control transformer's wider input
    with pytest.raises(ValueError, match="pipe has a transformer taking 32 features per token but a VAE making "
                                         "4-channel latents"):
        parallel_sample(pipe, PROMPT, num_inference_steps=2, height=16, width=16)
    assert not calls
    sd = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    with pytest.raises(ValueError, match="max_sequence_length is the T5 prompt's length .* pipe is a "
                                         "StableDiffusionPipeline"):
        parallel_sample(sd, PROMPT, num_inference_steps=2, max_sequence_length=64)
    with pytest.raises(ValueError, match="true_cfg_scale is FluxPipeline's classifier-free guidance; for a "
                                         "StableDiffusionPipeline it is guidance_scale"):
        parallel_sample(sd, PROMPT, num_inference_steps=2, true_cfg_scale=4)


def test_dynamic_shifting_needs_mu_and_stays_refused_for_sd3(folders, tmp_path):
    """paratAA.flow_schedule takes the pipeline's sigmas and mu; without mu a dynamically shifting scheduler is
    refused (the shift depends on the image size), and SD3 with dynamic shifting stays refused in one line."""
    from models.flux import flux_schedule
    from models.sd import check_folder
    from paratAA import flow_schedule
    from runner.errors import InputFileError
    from tests.tiny_models import build_tiny_sd3
    pipe = load(folders["dev"])
    with pytest.raises(ValueError, match="mu must be given"):
        flow_schedule(pipe.scheduler, 4)
    with pytest.raises(ValueError, match="sigmas must be 4 noise levels"):
        flow_schedule(pipe.scheduler, 4, sigmas=[1.0, 0.5], mu=0.5)
    small, large = flux_schedule(pipe.scheduler, 4, 0.0, 16, 16, 2), flux_schedule(pipe.scheduler, 4, 0.0, 64, 64, 2)
    assert not torch.equal(small.timesteps, large.timesteps)  # more image tokens, more shift
    sd3 = build_tiny_sd3(str(tmp_path / "sd3"))
    edit_json(os.path.join(sd3, "scheduler", "scheduler_config.json"), use_dynamic_shifting=True)
    with pytest.raises(InputFileError, match="use_dynamic_shifting: supported are .* dynamic shifting with "
                                             "FluxPipeline"):
        check_folder(sd3)


def test_parallel_sd_winit_shares_the_loader(folders, tmp_path):
    """The warm start on a Flux folder: prompt2 re-solved over all T steps from prompt1's trajectory is, at tolerance
    0, FluxPipeline's own sample of prompt2 from the same x_T."""
    import parallel_sd_winit
    T, prompt2 = 6, "a handwritten digit seven"
    run_dir = parallel_sd_winit.main(parallel_sd_winit.parse_args(
        ["--model_path", folders["dev"], "--output_path", str(tmp_path), "--prompt1", PROMPT, "--prompt2", prompt2,
         "--timesteps", str(T), "--variation_steps", str(T), "--tol1", "0", "--tol2", "0", "--num_samples", "1",
         "--cfg_scale", "3", *SIZE]))
    z = np.load(os.path.join(run_dir, "prompt2", "latents.npz"))
    pipe = load(folders["dev"])
    with torch.no_grad():
        ref = pipe(prompt2, num_inference_steps=T, guidance_scale=3.0, height=16, width=24,
                   latents=pack_latents(torch.from_numpy(z["x_T"]).float()), output_type="latent").images
    ref = unpack_latents(ref, 8, 12).numpy()
    np.testing.assert_allclose(z["latents"], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_the_guidance_default_is_the_families(folders, tmp_path):
    """Without --cfg_scale a Flux folder takes FluxPipeline's own default guidance (3.5), the other families the SD
    scripts' 5: the image equals the pipeline's default call, and args.json records the value used."""
    from models.sd import EMBEDDED_SD, SD_CFG_SCALE
    T = 4
    run_dir, _ = run_sd(folders["dev"], tmp_path / "flux", "--timesteps", str(T), "--tol1", "0", "--tol2", "0",
                        "--num_samples", "1", "--prompt", PROMPT, *SIZE)
    with open(os.path.join(run_dir, "args.json")) as f:
        assert json.load(f)["cfg_scale"] == 3.5
    z = np.load(os.path.join(run_dir, "latents.npz"))
    pipe = load(folders["dev"])
    with torch.no_grad():  # guidance_scale not given: the pipeline's own default
        own = pipe([PROMPT], num_inference_steps=T, height=16, width=24,
                   latents=pack_latents(torch.from_numpy(z["x_T"]).float()), output_type="latent").images
    np.testing.assert_allclose(z["latents"], unpack_latents(own, 8, 12).numpy(), atol=1e-5)
    run_dir, _ = run_sd(EMBEDDED_SD, tmp_path / "sd", "--timesteps", "2", "--num_samples", "1")
    with open(os.path.join(run_dir, "args.json")) as f:
        assert json.load(f)["cfg_scale"] == SD_CFG_SCALE


def _with_scheduler(folder, root, name, **values):
    return folder_variant(folder, root, name, lambda f: edit_json(os.path.join(f, "scheduler", "scheduler_config.json"),
                                                             **values))


def _own_call_fails_or_nan(folder, T):
    """Whether FluxPipeline's own __call__ cannot sample this folder at T steps: an exception, or NaN latents."""
    try:  # numpy's warning of the pipeline's own 0/0 is the failure looked for here
        with torch.no_grad(), np.errstate(divide="ignore", invalid="ignore"):
            out = load(folder)(PROMPT, num_inference_steps=T, height=16, width=16, output_type="latent").images
    except Exception:
        return True
    return not bool(torch.isfinite(out).all())


def test_scheduler_configs_fluxpipeline_cannot_sample_are_refused_in_one_line(folders, tmp_path, capsys):
    """Shift parameters FluxPipeline's own call cannot compute its mu from (two equal lengths: its calculate_shift
    divides by zero; a null or a string: a TypeError), and levels it makes NaN (shift_terminal at one step: 0/0),
    failed after loading in a line calling itself unexpected, or as NaN states blamed on the model's predictions;
    so did --timesteps above a flow scheduler's num_train_timesteps. One line naming the setting or the flag, before
    anything is loaded, and parallel_sample's ValueError."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    dev, root = folders["dev"], str(tmp_path / "variants")
    cases = [(dict(base_image_seq_len=4096), 2, ["base_image_seq_len", "max_image_seq_len", "4096"]),
             (dict(max_shift=None), 2, ["max_shift None"]),
             (dict(base_shift="0.5"), 2, ["base_shift '0.5'"]),
             (dict(use_dynamic_shifting=False, shift=3.0, base_image_seq_len=4096), 2, ["base_image_seq_len"]),
             (dict(shift_terminal=0.2), 1, ["non-finite noise levels", "shift_terminal 0.2"]),
             (dict(shift_terminal="0.2"), 2, ["no usable noise levels", "TypeError"])]
    for i, (values, T, words) in enumerate(cases):
        folder = _with_scheduler(dev, root, f"v{i}", **values)
        assert _own_call_fails_or_nan(folder, T), values  # the reference: the pipeline itself cannot sample it
        check(parallel_sd, ["--model_path", folder, "--timesteps", str(T), *SIZE], 1,
              ["--model_path", "scheduler_config.json", *words], tmp_path, capsys)
        pipe = load(dev)
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config({**pipe.scheduler.config, **values})
        with pytest.raises(ValueError, match=words[-1]):
            parallel_sample(pipe, PROMPT, num_inference_steps=T, height=16, width=16)
    # the same config at two steps is sampled, as the pipeline samples it
    assert not _own_call_fails_or_nan(_with_scheduler(dev, root, "two", shift_terminal=0.2), 2)
    few = _with_scheduler(dev, root, "few", num_train_timesteps=10)
    check(parallel_sd, ["--model_path", few, "--timesteps", "20", *SIZE], 2, ["--timesteps", "1..10", "20"],
          tmp_path, capsys)


def test_a_scheduler_that_is_not_flow_matching_is_refused_in_one_line(folders, tmp_path, capsys):
    """FluxPipeline hands its scheduler sigmas and mu, which only a flow-matching one takes: its own call fails on
    DDIM or Euler. A folder with one failed after loading in a line calling itself unexpected; a loaded pipeline
    with DDIM's defaults was told to unset clip_sample (then failed the same way). One line naming the scheduler."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    def ddim(folder):
        edit_json(os.path.join(folder, "scheduler", "scheduler_config.json"), _class_name="DDIMScheduler",
                   clip_sample=False)
        _index(lambda c: c.update(scheduler=["diffusers", "DDIMScheduler"]))(folder)
    folder = folder_variant(folders["dev"], str(tmp_path / "variants"), "ddim", ddim)
    assert _own_call_fails_or_nan(folder, 2)  # the reference: the pipeline itself cannot sample it
    check(parallel_sd, ["--model_path", folder, "--timesteps", "2", *SIZE], 1,
          ["--model_path", "scheduler_config.json", "DDIMScheduler", "flow-matching"], tmp_path, capsys)
    pipe = load(folders["dev"])
    for cls in (DDIMScheduler, EulerDiscreteScheduler):
        pipe.scheduler = cls()
        with pytest.raises(Exception):
            pipe(PROMPT, num_inference_steps=2, height=16, width=16, output_type="latent")
        with pytest.raises(ValueError, match=f"pipe has a scheduler that is a {cls.__name__}, with betas, for a "
                                             f"FluxPipeline .* it samples with a flow-matching scheduler"):
            parallel_sample(pipe, PROMPT, num_inference_steps=2, height=16, width=16)
    # a scheduler config naming no class loads as model_index.json names it (FLUX.1's: flow matching): sampled
    nameless = folder_variant(folders["dev"], str(tmp_path / "variants"), "nameless", lambda f: _drop_key(
        os.path.join(f, "scheduler", "scheduler_config.json"), "_class_name"))
    run_dir, _ = run_sd(nameless, tmp_path / "nameless", "--timesteps", "2", "--tol1", "0", "--tol2", "0",
                        "--num_samples", "1", "--prompt", PROMPT, *SIZE)
    z = np.load(os.path.join(run_dir, "latents.npz"))
    ref = own_call(load(nameless), torch.from_numpy(z["x_T"]), 2, 3.5, 16, 24).numpy()
    np.testing.assert_allclose(z["latents"], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def _drop_key(path, key):
    with open(path) as f:
        config = json.load(f)
    config.pop(key)
    with open(path, "w") as f:
        json.dump(config, f)


def test_true_cfg_with_a_negative_prompt_equals_fluxpipelines_own(folders, tmp_path):
    """--true_cfg_scale with --negative_prompt (and parallel_sample's true_cfg_scale): at tolerance 0 FluxPipeline's
    own __call__ with the same true_cfg_scale and negative prompt, which adds a pass on the negative prompt; the
    negative prompt changes the sample (else the branch would not be used)."""
    T, negative = 6, "a blurry photo"
    run_dir, _ = run_sd(folders["dev"], tmp_path, "--timesteps", str(T), "--tol1", "0", "--tol2", "0",
                        "--num_samples", "2", "--prompt", PROMPT, "--cfg_scale", "3", "--negative_prompt", negative,
                        "--true_cfg_scale", "4", "--max_sequence_length", "24", *SIZE)
    z = np.load(os.path.join(run_dir, "latents.npz"))
    ours, x_T = z["latents"], torch.from_numpy(z["x_T"])
    pipe = load(folders["dev"])
    ref = own_call(pipe, x_T, T, 3.0, 16, 24, negative_prompt=negative, true_cfg_scale=4.0,
                   max_sequence_length=24).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    plain = own_call(pipe, x_T, T, 3.0, 16, 24, max_sequence_length=24).numpy()
    assert np.abs(plain - ref).max() > 1e-2 * np.abs(ref).max()
    api = parallel_sample(pipe, PROMPT, negative_prompt=negative, true_cfg_scale=4.0, guidance_scale=3.0,
                          num_inference_steps=T, num_images=2, height=16, width=24, tol1=0, tol2=0,
                          max_sequence_length=24, output_type="np")
    ref = own_call(pipe, api.x_T, T, 3.0, 16, 24, negative_prompt=negative, true_cfg_scale=4.0, max_sequence_length=24)
    assert (api.latents.float() - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_max_sequence_length_is_the_pipelines_for_flux_and_sd3(folders, tmp_path, capsys):
    """--max_sequence_length: the T5 prompt's length FluxPipeline and StableDiffusion3Pipeline take (SD3 without its
    T5 appends that many zero tokens, which its transformer attends to: another length, another image); refused in
    one line for the families without T5."""
    from diffusers import StableDiffusion3Pipeline
    from models.sd import EMBEDDED_SD
    from tests.tiny_models import build_tiny_sd3
    T = 4
    run_dir, _ = run_sd(folders["dev"], tmp_path / "flux", "--timesteps", str(T), "--tol1", "0", "--tol2", "0",
                        "--num_samples", "1", "--prompt", PROMPT, "--max_sequence_length", "20", *SIZE)
    z = np.load(os.path.join(run_dir, "latents.npz"))
    pipe = load(folders["dev"])
    ref = own_call(pipe, torch.from_numpy(z["x_T"]), T, 3.5, 16, 24, max_sequence_length=20).numpy()
    np.testing.assert_allclose(z["latents"], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    longer = own_call(pipe, torch.from_numpy(z["x_T"]), T, 3.5, 16, 24, max_sequence_length=40).numpy()
    assert np.abs(longer - ref).max() > 0  # the padded length is an input: the flag is not ignored

    sd3 = build_tiny_sd3(str(tmp_path / "sd3"))
    run_dir, _ = run_sd(sd3, tmp_path / "sd3_run", "--timesteps", str(T), "--tol1", "0", "--tol2", "0",
                        "--num_samples", "1", "--prompt", PROMPT, "--cfg_scale", "4", "--max_sequence_length", "16")
    z = np.load(os.path.join(run_dir, "latents.npz"))
    own = StableDiffusion3Pipeline.from_pretrained(sd3, text_encoder_3=None, tokenizer_3=None)
    own.set_progress_bar_config(disable=True)

    def own_sd3(length):
        with torch.no_grad():
            return own(PROMPT, num_inference_steps=T, guidance_scale=4.0, latents=torch.from_numpy(z["x_T"]).float(),
                       output_type="latent", max_sequence_length=length).images.numpy()
    ref = own_sd3(16)
    np.testing.assert_allclose(z["latents"], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert np.abs(own_sd3(256) - ref).max() > 1e-3 * np.abs(ref).max()
    api = parallel_sample(own, PROMPT, num_inference_steps=T, guidance_scale=4.0, tol1=0, tol2=0,
                          max_sequence_length=16, output_type="np")
    with torch.no_grad():
        ref = own(PROMPT, num_inference_steps=T, guidance_scale=4.0, latents=api.x_T.float(), output_type="latent",
                  max_sequence_length=16).images
    assert (api.latents.float() - ref).abs().max() <= 1e-4 * ref.abs().max()

    capsys.readouterr()  # the notes of the runs above
    for folder, flags, words in (
            (EMBEDDED_SD, ["--max_sequence_length", "64"], ["--max_sequence_length is the T5 prompt's length",
                                                           "StableDiffusionPipeline"]),
            (EMBEDDED_SD, ["--true_cfg_scale", "4", "--negative_prompt", "x"],
             ["--true_cfg_scale is FluxPipeline's", "--cfg_scale"]),
            (sd3, ["--max_sequence_length", "600"], ["--max_sequence_length must be in 1..512"])):
        check(parallel_sd, ["--model_path", folder, "--timesteps", "2", *flags], 2, words, tmp_path, capsys)


def test_a_config_that_drops_the_guidance_embedder_of_its_weights_is_refused(folders, tmp_path, capsys):
    """FLUX.1-dev's weights with "guidance_embeds": false: diffusers dropped the guidance embedder's tensors and the
    run ignored --cfg_scale, exit 0. Written as text ("false"), it was read as true."""
    dropped = folder_variant(folders["dev"], str(tmp_path / "variants"), "no_guidance", lambda f: edit_json(
        os.path.join(f, "transformer", "config.json"), guidance_embeds=False))
    check(parallel_sd, ["--model_path", dropped, "--timesteps", "2", *SIZE], 1,
          ["--model_path", "transformer", "guidance_embedder", "guidance_embeds"], tmp_path, capsys)
    text = folder_variant(folders["dev"], str(tmp_path / "variants"), "guidance_text", lambda f: edit_json(
        os.path.join(f, "transformer", "config.json"), guidance_embeds="false"))
    check(parallel_sd, ["--model_path", text, "--timesteps", "2", *SIZE], 1,
          ["--model_path", "transformer/config.json", "guidance_embeds", "true or false"], tmp_path, capsys)


def test_rotary_axes_that_do_not_cover_a_head_are_named(folders, tmp_path, capsys):
    """axes_dims_rope must sum to attention_head_dim: otherwise a tensor-size RuntimeError at the first call."""
    folder = folder_variant(folders["dev"], str(tmp_path / "variants"), "axes", lambda f: edit_json(
        os.path.join(f, "transformer", "config.json"), axes_dims_rope=[2, 2, 2]))
    check(parallel_sd, ["--model_path", folder, "--timesteps", "2", *SIZE], 1,
          ["--model_path", "transformer/config.json", "axes_dims_rope [2, 2, 2]", "attention_head_dim"], tmp_path,
          capsys)


def test_a_text_encoder_config_of_other_sizes_names_the_tensor(folders, tmp_path, capsys):
    """A T5 config whose d_ff differs from its weights': transformers' error points at a report that quiet
    loading does not print ("For details look at the above report!"). The tensor and both shapes are named."""
    folder = folder_variant(folders["dev"], str(tmp_path / "variants"), "t5_ff", lambda f: edit_json(
        os.path.join(f, "text_encoder_2", "config.json"), d_ff=64))
    check(parallel_sd, ["--model_path", folder, "--timesteps", "2", *SIZE], 1,
          ["--model_path", "text_encoder_2/", "in its weight files but", "by its config.json"], tmp_path, capsys)


@pytest.mark.parametrize("part, key, words", [
    ("text_encoder_2", "d_model", ["joint_attention_dim 32", "text_encoder_2's d_model 48"]),  # T5's tokens
    ("text_encoder", "hidden_size", ["pooled_projection_dim 32", "text_encoder's hidden_size 48"]),  # CLIP's pooled
])
def test_text_encoders_whose_embeddings_do_not_fit_the_transformer_are_named(folders, tmp_path, capsys, part, key,
                                                                            words):
    """Their widths failed at the first model call ("mat1 and mat2 shapes cannot be multiplied"), said as
    unexpected; now before anything loads, naming the transformer's config and each encoder's key."""
    folder = folder_variant(folders["dev"], str(tmp_path / "variants"), part, lambda f: edit_json(
        os.path.join(f, part, "config.json"), **{key: 48}))
    check(parallel_sd, ["--model_path", folder, "--timesteps", "2", *SIZE], 1,
          ["--model_path", "transformer/config.json", *words, "do not fit"], tmp_path, capsys)
