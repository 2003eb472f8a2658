"""The model families beyond SD 1.x: each at tolerance 0 against the pipeline's own sequential loop in diffusers
(same initial noise, output_type "latent"), and 1 vs 2 processes."""
import os

import numpy as np
import pytest
import torch

import parallel_sd
from paratAA import draw_noise
from tests.conftest import assert_processes_agree, read_latents, read_metrics, run_two_processes
from tests.tiny_models import build_tiny_sd, build_tiny_sd3, build_tiny_sdxl

PROMPT = "a handwritten digit four"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("families")
    return {"sdxl": build_tiny_sdxl(str(d / "sdxl")), "sd3": build_tiny_sd3(str(d / "sd3")),
            "sd2_768": build_tiny_sd(str(d / "sd2_768"), seed=2, prediction_type="v_prediction",
                                     timestep_spacing="trailing"),
            # noise levels down to alphas_cumprod 2e-7 and 2.4e-9 (t = 999, which trailing spacing visits)
            "small_alpha": build_tiny_sd(str(d / "small_alpha"), seed=3, beta_schedule="linear", beta_start=0.0005,
                                         beta_end=0.03, timestep_spacing="trailing"),
            "cosine": build_tiny_sd(str(d / "cosine"), seed=4, beta_schedule="squaredcos_cap_v2",
                                    timestep_spacing="trailing")}


def run_sd(folder, out, *flags):
    run_dir = parallel_sd.main(parallel_sd.parse_args(["--model_path", folder, "--output_path", str(out), *flags]))
    return run_dir, read_metrics(run_dir)


def diffusers_loop(folder, T, cfg, num_samples, seed=0, noise_half=False):
    """The pipeline's own __call__ with its own loop, from our x_T; SD 1.x/2.x/XL with DDIMScheduler (how the
    scripts read their schedulers), SD3 with its own flow-matching scheduler. noise_half: the UNet's output cut to
    its first 4 channels (a learned variance after the noise, which DDIMScheduler.step does not split off)."""
    import diffusers
    from diffusers import DDIMScheduler
    from models.sd import family
    kind = family(folder)
    absent = dict(text_encoder_3=None, tokenizer_3=None, image_encoder=None, feature_extractor=None) \
        if kind == "StableDiffusion3Pipeline" else {}
    pipe = getattr(diffusers, kind).from_pretrained(folder, **absent)
    if kind != "StableDiffusion3Pipeline":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)  # read as linear DDIM
    pipe.set_progress_bar_config(disable=True)
    if noise_half:  # the pipeline calls unet(..., return_dict=False)[0]
        forward = pipe.unet.forward
        pipe.unet.forward = lambda *a, **k: (forward(*a, **{**k, "return_dict": False})[0][:, :4],)
    latent = (4, 8, 8)
    x_T = draw_noise(num_samples, T, latent, torch.Generator().manual_seed(seed))[:, T].float()
    with torch.no_grad():
        out = pipe([PROMPT] * num_samples, num_inference_steps=T, guidance_scale=cfg, latents=x_T,
                   output_type="latent").images
    return out.float().numpy()


# sd2_768 at T = 7: "trailing" spacing with 1000 % T != 0, where diffusers' DDIM step goes to t - 1000 // T and
# not to the next timestep it calls the model at (the solver followed the list before and missed by 0.7 of 52)
# small_alpha, cosine: 1 - A taken in float32 (as the reference's SD script) recovered A = 2e-7 12% low and 2.4e-9
# as 0: 7% off this loop, and refused
@pytest.mark.parametrize("name, T", [("sdxl", 10), ("sd3", 10), ("sd2_768", 10), ("sd2_768", 7), ("small_alpha", 10),
                                     ("cosine", 10)])
def test_tolerance_zero_equals_the_pipelines_own_loop(folders, tmp_path, name, T, capsys):
    run_dir, m = run_sd(folders[name], tmp_path, "--timesteps", str(T), "--tol1", "0", "--tol2", "0",
                        "--num_samples", "2", "--batch_size", "2", "--prompt", PROMPT, "--cfg_scale", "3")
    ref = diffusers_loop(folders[name], T, 3.0, 2)
    ours = read_latents(run_dir)
    assert np.isfinite(ref).all() and np.abs(ref).max() > 0
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    z = np.load(os.path.join(run_dir, "latents.npz"))
    assert z["x_T"].shape == ours.shape  # the initial noise, to replay the run in diffusers
    assert m["scheduler"]["class"] == ("FlowMatchEulerDiscreteScheduler" if name == "sd3" else
                                       "EulerDiscreteScheduler" if name == "sdxl" else "DDIMScheduler")
    # a scheduler other than DDIM (or a flow's Euler) is read as DDIM: the run says so once, the others say nothing
    said = capsys.readouterr().err
    assert said.count("sampled as DDIM") == (name == "sdxl")


def test_a_unet_with_a_learned_variance_samples_its_noise_half(tmp_path):
    """A UNet whose output carries a learned variance after the noise (out_channels 8 for 4-channel latents, as
    DDPMScheduler.step splits it) failed at the first model call ("eps_fn returned shape (1, 8, 8, 8)"), though the
    pipeline's own call samples it with DDPMScheduler. Now its noise half is sampled, as for DiT and PixArt: at
    tolerance 0 the pipeline's own DDIM loop on that half, guided."""
    folder = build_tiny_sd(str(tmp_path / "learned"), seed=5, unet_out_channels=8)
    run_dir, _ = run_sd(folder, tmp_path / "runs", "--timesteps", "10", "--tol1", "0", "--tol2", "0",
                        "--num_samples", "2", "--batch_size", "2", "--prompt", PROMPT, "--cfg_scale", "3")
    ref = diffusers_loop(folder, 10, 3.0, 2, noise_half=True)
    assert np.isfinite(ref).all() and np.abs(ref).max() > 0
    np.testing.assert_allclose(read_latents(run_dir), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_a_dit_folder_whose_patches_do_not_tile_its_latent_is_named(dit_folder, tmp_path, capsys):
    """sample_size 6 with patch_size 2 is fine, 6 with 4 is not: the transformer's output came back 4x4 for a 6x6
    latent, an "unexpected" error at the first model call."""
    import shutil
    import parallel_dit
    from tests.test_bad_input import check
    folder = tmp_path / "dit"
    shutil.copytree(dit_folder, folder)
    _edit(folder / "transformer" / "config.json", sample_size=6, patch_size=4)
    check(parallel_dit, ["--model_path", str(folder), "--timesteps", "5"], 1,
          ["transformer/config.json", "sample_size 6", "patch_size 4"], tmp_path, capsys)


@pytest.mark.parametrize("preset", ["default", "paper"])
def test_compare_sequential_samples_the_system_the_solver_solved(folders, tmp_path, preset):
    """The paper mode solves SD's steps in the reference's arithmetic (1 - A in float32), which at small_alpha's
    noisiest level (2e-7) is 12% off A: the sequential sample it is compared with is that system's (it was the
    default's, 0.065 of the first distance away, and reported as such)."""
    flags = ["--preset", "paper"] if preset == "paper" else []
    _, m = run_sd(folders["small_alpha"], tmp_path, *flags, "--tol1", "0", "--tol2", "0", "--compare_sequential",
                  "--timesteps", "10", "--num_samples", "2", "--batch_size", "2")
    assert m["reference_quirks"] == (preset == "paper")
    for sample in m["samples"]:
        distance = sample["sequential_distance_history"]
        assert distance[-1] <= 1e-4 * distance[0], distance


@pytest.mark.parametrize("name", ["sdxl", "sd3"])
def test_one_and_two_processes_agree(folders, tmp_path, name):
    assert_processes_agree(["--model_path", folders[name], "--timesteps", "12", "--window_size", "12", "--num_samples",
                            "2", "--batch_size", "2"], tmp_path)


def test_a_flow_model_refuses_eta(folders, tmp_path, capsys):
    from runner.errors import exit_on_error
    with pytest.raises(SystemExit) as e:
        exit_on_error(parallel_sd.main, parallel_sd.parse_args(["--model_path", folders["sd3"], "--eta", "0.5",
                                                                "--output_path", str(tmp_path)]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--eta" in err[0]


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    from tests.tiny_models import build_tiny_dit_pipeline
    return build_tiny_dit_pipeline(str(tmp_path_factory.mktemp("dit_pipeline") / "dit"))


def test_diffusers_dit_at_tolerance_zero_equals_ditpipelines_own_loop(dit_folder):
    """DiTPipeline draws its own initial latents and returns decoded images: the solver starts from the same
    latents, and its x_0 is decoded the way the pipeline decodes."""
    from diffusers import DiTPipeline
    from models.adapters import DiffusersDiTDenoiser
    from paratAA import pipeline_schedule, solve
    pipe = DiTPipeline.from_pretrained(dit_folder)
    pipe.set_progress_bar_config(disable=True)
    T, labels, cfg = 10, [3, 917], 4.0
    with torch.no_grad():
        images = pipe(class_labels=labels, guidance_scale=cfg, generator=torch.Generator().manual_seed(5),
                      num_inference_steps=T, output_type="np").images                      # [2, H, W, 3] in [0, 1]
    x_T = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(5))         # what the pipeline drew
    noise = torch.zeros(2, T + 1, 4, 8, 8, dtype=torch.float64)
    noise[:, T] = x_T
    out = solve(DiffusersDiTDenoiser(pipe.transformer, cfg), pipeline_schedule(pipe, T), noise, torch.tensor(labels),
                tol1=0, tol2=0)
    with torch.no_grad():
        ours = pipe.vae.decode(out.samples.float() / pipe.vae.config.scaling_factor).sample
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - images).max() < 1e-4


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_a_ditpipeline_predicting_v_or_x0_equals_its_own_loop(tmp_path, prediction_type):
    """The scheduler's prediction_type says what DiTPipeline's loop hands to scheduler.step; the transformer's output
    was read as the noise whatever it said (291 off the pipeline's loop, latents of 7.6)."""
    from diffusers import DiTPipeline
    from models.dit_source import pipeline_denoiser
    from paratAA import pipeline_schedule, solve
    from tests.tiny_models import build_tiny_dit_pipeline
    pipe = DiTPipeline.from_pretrained(build_tiny_dit_pipeline(str(tmp_path / "dit"), prediction_type=prediction_type))
    pipe.set_progress_bar_config(disable=True)
    T, labels, cfg = 8, [3, 917], 4.0
    with torch.no_grad():
        images = pipe(class_labels=labels, guidance_scale=cfg, generator=torch.Generator().manual_seed(5),
                      num_inference_steps=T, output_type="np").images
    noise = torch.zeros(2, T + 1, 4, 8, 8, dtype=torch.float64)
    noise[:, T] = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(5))  # what the pipeline drew
    out = solve(pipeline_denoiser(pipe, cfg), pipeline_schedule(pipe, T), noise, torch.tensor(labels), tol1=0, tol2=0)
    with torch.no_grad():
        ours = pipe.vae.decode(out.samples.float() / pipe.vae.config.scaling_factor).sample
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - images).max() < 1e-4


def test_a_ditpipeline_folder_through_parallel_dit(dit_folder, tmp_path):
    import parallel_dit
    from diffusers import DiTPipeline
    from models.adapters import DiffusersDiTDenoiser
    from paratAA import pipeline_schedule, sample_sequential
    from tests.conftest import script_noise
    flags = ["--model_path", dit_folder, "--timesteps", "10", "--window_size", "10", "--num_samples", "2",
             "--batch_size", "2",
             "--class_labels", "3", "917", "--tol1", "0", "--tol2", "0"]
    one = parallel_dit.main(parallel_dit.parse_args([*flags, "--output_path", str(tmp_path / "one")]))
    m = read_metrics(one)
    assert m["model"] == "diffusers DiTPipeline" and m["scheduler"]["class"] == "DDIMScheduler"
    pipe = DiTPipeline.from_pretrained(dit_folder)
    ref = sample_sequential(DiffusersDiTDenoiser(pipe.transformer, 4.0), pipeline_schedule(pipe, 10),
                            script_noise(0, 2, 10, (4, 8, 8)), torch.tensor([3, 917]))[:, 0]
    assert np.abs(read_latents(one) - ref.float().numpy()).max() <= 1e-6 * ref.abs().max() + 1e-4
    two = run_two_processes("parallel_dit.py", flags, tmp_path / "two")
    a, b = read_latents(one), read_latents(two)
    assert np.abs(a - b).max() <= 1e-6 * np.abs(a).max() + 1e-5  # a random DiT drives latents to ~100


def loaded_dit(folder):
    """The tiny DiTPipeline as a notebook loads it, with label names (the public models' ImageNet id2label)."""
    from diffusers import DiTPipeline
    parts = DiTPipeline.from_pretrained(folder).components
    pipe = DiTPipeline(**parts, id2label={3: "tiger shark, Galeocerdo cuvieri", 917: "comic book"})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gray_levels(images):
    """DiTPipeline's output_type "np" images (floats in [0, 1]) as parallel_sample's uint8 ones."""
    return (np.asarray(images) * 255).round()


@pytest.mark.parametrize("guidance_scale", [4.0, 1.0])
def test_parallel_sample_on_a_loaded_ditpipeline_equals_its_own_call(dit_folder, guidance_scale):
    """A DiTPipeline loaded in Python (parallel_sample refused it; only its folders were sampled, by parallel_dit.py):
    at tolerance 0 the images of its own __call__ for the same seed, guided or not, with 3 images solved in batches
    of 2 + 1 from the one draw of x_T the pipeline makes, labels given by name as pipe.get_label_ids reads them."""
    from models.pipelines import parallel_sample
    pipe = loaded_dit(dit_folder)
    T, labels = 10, [3, 917, 5]
    with torch.no_grad():
        ref = gray_levels(pipe(class_labels=labels, guidance_scale=guidance_scale, num_inference_steps=T,
                               generator=torch.Generator().manual_seed(5), output_type="np").images)
    by_name = ["Galeocerdo cuvieri", "comic book", 5]
    exact = parallel_sample(pipe, class_labels=by_name, num_images=3, batch_size=2, seed=5, num_inference_steps=T,
                            guidance_scale=guidance_scale, tol1=0, tol2=0, output_type="np")
    assert len(exact.results) == 2 and np.abs(np.stack(exact.images) - ref).max() <= 1
    assert torch.equal(exact.x_T.float(), torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(5)))
    # the default tolerance: the same image; sequential sampling measured as for the other families
    default = parallel_sample(pipe, class_labels=by_name, num_images=3, seed=5, num_inference_steps=T,
                              guidance_scale=guidance_scale, compare_sequential=True, output_type="np")
    assert np.sqrt(((np.stack(default.images) - ref) ** 2).mean()) <= 1
    assert default.speed["sequential_measured"] and default.speed["sequential_seconds"] > 0


def test_parallel_sample_on_a_ditpipeline_takes_its_calls_defaults(dit_folder):
    """Left out, guidance and steps are DiTPipeline's own (4 and 50); one label is a label; eta > 0, which its loop
    has not, draws the steps' noise after the pipeline's x_T."""
    from models.pipelines import parallel_sample
    pipe = loaded_dit(dit_folder)
    with torch.no_grad():
        ref = gray_levels(pipe(class_labels=[917], generator=torch.Generator().manual_seed(0),
                               output_type="np").images)
    # window 1 is sequential sampling: the 50 default steps at tolerance 0 without a window of them
    out = parallel_sample(pipe, class_labels="comic book", window_size=1, tol1=0, tol2=0, output_type="np")
    assert np.abs(np.stack(out.images) - ref).max() <= 1 and out.iterations == [50]
    noisy = parallel_sample(pipe, class_labels=917, num_inference_steps=10, eta=0.5, output_type="np")
    assert torch.equal(noisy.x_T, out.x_T)


def test_parallel_sample_refusals_on_a_ditpipeline_name_the_argument(dit_folder, tiny_sd):
    """What a DiTPipeline's __call__ does not take (a prompt, a size: it would sample another image than asked),
    labels it has no class for, and class_labels for a text pipeline: one line naming the argument, before the
    model is called."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from models.pipelines import parallel_sample
    pipe = loaded_dit(dit_folder)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    cases = [(dict(prompt="a cat"), ValueError, "prompt is for the text-to-image pipelines"),
             (dict(negative_prompt="blurry"), ValueError, "negative_prompt is for the text-to-image"),
             (dict(max_sequence_length=64), ValueError, "max_sequence_length is for the text-to-image"),
             (dict(true_cfg_scale=4.0), ValueError, "true_cfg_scale is for the text-to-image"),
             (dict(height=32), ValueError, "height must be 16 for a DiTPipeline"),
             (dict(width=8), ValueError, "width must be 16 for a DiTPipeline"),
             (dict(class_labels=None), ValueError, "class_labels must be given for a DiTPipeline"),
             (dict(class_labels=[3, 1000]), ValueError, r"class_labels must be in 0\.\.999 .*got 1000"),
             (dict(class_labels=-1), ValueError, r"class_labels must be in 0\.\.999"),
             (dict(class_labels=True), TypeError, "class_labels must be a class id"),
             (dict(class_labels=[3.0]), TypeError, "class_labels must be a class id"),
             (dict(class_labels=[]), TypeError, "class_labels must be a class id"),
             (dict(class_labels="goldfish"), ValueError, "class_labels: 'goldfish' is not a name in pipe.labels"),
             (dict(class_labels=[3, 917]), ValueError, "2 class_labels for num_images = 1")]
    for kwargs, error, text in cases:
        with pytest.raises(error, match=text) as e:
            parallel_sample(pipe, **{"class_labels": 3, "num_inference_steps": 4, **kwargs})
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="prompt is for the text-to-image pipelines"):
        parallel_sample(pipe, "a cat", class_labels=3)  # positional, as the text pipelines take it
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=True)  # as the SD pipelines
    with pytest.raises(ValueError, match="pipe has a scheduler that sets clip_sample"):
        parallel_sample(pipe, class_labels=3, num_inference_steps=4)
    assert not calls
    sd = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    with pytest.raises(ValueError, match="class_labels are a DiTPipeline's conditioning; a StableDiffusionPipeline "
                                         "takes a prompt"):
        parallel_sample(sd, "a handwritten digit four", class_labels=[3], num_inference_steps=4)


def test_the_embedded_flow_model_out_of_the_box(tmp_path):
    """The flow-matching digits model (SD3 layout): 10 digits at 50 Euler steps, window T, the defaults otherwise:
    the prompted digit, the same image as sequential Euler sampling, within a few iterations."""
    from models import digits
    from models.sd import EMBEDDED_FLOW
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    prompts = [x for n in names for x in ("--prompt", f"a handwritten digit {n}")]
    run_dir, m = run_sd(EMBEDDED_FLOW, tmp_path, "--timesteps", "50", "--window_size", "50", "--num_samples", "10",
                        "--batch_size", "10", "--cfg_scale", "4", "--compare_sequential", *prompts)
    assert m["scheduler"]["class"] == "FlowMatchEulerDiscreteScheduler" and m["scheduler"]["config"]["shift"] == 3.0
    same = sorted(s["iterations_to_same_image"] for s in m["samples"])
    assert all(s["final_image_rms"] <= 1.0 for s in m["samples"]) and same[len(same) // 2] <= 8, same
    from models.adapters import VAEDecoder
    from models.sd import load_pipeline
    pipe = load_pipeline(EMBEDDED_FLOW, torch.device("cpu"), torch.float32)
    imgs = VAEDecoder(pipe.vae, torch.device("cpu"))(torch.as_tensor(read_latents(run_dir)))
    predicted = digits.classify_images(digits.train_digit_classifier(),
                                       torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert float((predicted == torch.arange(10)).float().mean()) >= 0.8


def hub_layouts(clean, root):
    """Copies of a tiny SD folder laid out as users have them: the hub's model_index.json of SD v1.5 (its safety
    checker is named from diffusers' own "stable_diffusion" module; refused as code outside diffusers before),
    weights only as fp16 variant files (unet/diffusion_pytorch_model.fp16.safetensors: refused by diffusers'
    message about a missing .bin), an outdated steps_offset 0 (which the pipeline resets to 1). Also the clean
    folder with the fp16-rounded UNet, which the variant folder must equal."""
    import json
    import shutil
    from safetensors.torch import load_file, save_file

    def copy(name, index=None, scheduler=None):
        folder = os.path.join(root, name)
        shutil.copytree(clean, folder)
        for file, change in (("model_index.json", index), (os.path.join("scheduler", "scheduler_config.json"),
                                                            scheduler)):
            if change:
                with open(os.path.join(folder, file)) as f:
                    config = json.load(f)
                change(config)
                with open(os.path.join(folder, file), "w") as f:
                    json.dump(config, f)
        return folder

    hub = copy("hub", index=lambda c: c.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                                                feature_extractor=["transformers", "CLIPImageProcessor"]))
    offset0 = copy("offset0", scheduler=lambda c: c.update(steps_offset=0))
    rounded, variant = copy("rounded"), copy("variant")
    weights = os.path.join("unet", "diffusion_pytorch_model.safetensors")
    half = {k: v.half() for k, v in load_file(os.path.join(clean, weights)).items()}
    save_file(half, os.path.join(rounded, weights))
    save_file(half, os.path.join(variant, "unet", "diffusion_pytorch_model.fp16.safetensors"))
    os.remove(os.path.join(variant, weights))
    return {"hub": hub, "offset0": offset0, "rounded": rounded, "variant": variant}


def test_folders_laid_out_as_on_the_hub_sample_as_the_clean_one(tiny_sd, tmp_path, capsys):
    from tests.test_bad_input import check
    layouts = hub_layouts(tiny_sd, str(tmp_path / "layouts"))
    flags = ["--timesteps", "4", "--window_size", "4", "--tol1", "0", "--tol2", "0", "--num_samples", "1"]
    runs = {name: read_latents(run_sd(folder, tmp_path / name, *flags)[0])
            for name, folder in [("clean", tiny_sd), *layouts.items()]}
    assert np.array_equal(runs["hub"], runs["clean"]) and np.array_equal(runs["offset0"], runs["clean"])
    assert np.array_equal(runs["variant"], runs["rounded"]) and not np.array_equal(runs["rounded"], runs["clean"])
    # steps_offset 0 is checked as the pipeline holds it (1): T = 1000 is then one line before loading, exit 2
    capsys.readouterr()
    check(parallel_sd, ["--model_path", layouts["offset0"], "--timesteps", "1000"], 2,
          ["--timesteps", "1000", "steps_offset 1"], tmp_path / "t1000", capsys)


def test_sd3_with_its_t5_named_but_not_downloaded(folders, tmp_path):
    """SD3's third text encoder (T5) is optional: a folder whose model_index.json names it without its folders
    samples without it, as one whose index has no T5 (diffusers' message about a missing model.safetensors
    before)."""
    import json
    import shutil
    folder = str(tmp_path / "sd3_t5_named")
    shutil.copytree(folders["sd3"], folder)
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    index.update(text_encoder_3=["transformers", "T5EncoderModel"], tokenizer_3=["transformers", "T5TokenizerFast"])
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f)
    flags = ["--timesteps", "4", "--window_size", "4", "--num_samples", "1"]
    a, _ = run_sd(folders["sd3"], tmp_path / "a", *flags)
    b, _ = run_sd(folder, tmp_path / "b", *flags)
    assert np.array_equal(read_latents(a), read_latents(b))


def test_the_scheduler_model_index_names_is_the_one_said(tmp_path, capsys):
    """diffusers loads the scheduler class model_index.json names, with scheduler_config.json's values: an Euler
    entry over a DDIM config was stepped with Euler by the pipeline's own __call__ and sampled here as DDIM without
    the note the scripts give every scheduler read as DDIM."""
    import json
    import shutil
    from models.sd import EMBEDDED_SD
    folder = tmp_path / "euler_index"
    shutil.copytree(EMBEDDED_SD, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    run_dir, m = run_sd(str(folder), tmp_path / "out", "--timesteps", "5", "--num_samples", "1")
    assert m["scheduler"]["class"] == "EulerDiscreteScheduler"
    assert capsys.readouterr().err.count("EulerDiscreteScheduler: sampled as DDIM") == 1


def test_sd3_with_a_scheduler_of_betas_is_refused(folders, tmp_path, capsys):
    """SD3's transformer predicts a flow's velocity: a scheduler with betas (DDIM, Euler) read it as noise, and the
    run wrote a meaningless image with exit 0 (Flux's own call fails on one; both are refused alike)."""
    import json
    import shutil
    from diffusers import DDIMScheduler, StableDiffusion3Pipeline
    from models.pipelines import parallel_sample
    from runner.errors import exit_on_error
    folder = tmp_path / "sd3_ddim"
    shutil.copytree(folders["sd3"], folder)
    json.dump({"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule":
               "scaled_linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1},
              open(folder / "scheduler" / "scheduler_config.json", "w"))
    index = json.load(open(folder / "model_index.json"))
    json.dump({**index, "scheduler": ["diffusers", "DDIMScheduler"]}, open(folder / "model_index.json", "w"))
    with pytest.raises(SystemExit) as e:
        exit_on_error(parallel_sd.main, parallel_sd.parse_args(["--model_path", str(folder), "--timesteps", "5",
                                                                "--output_path", str(tmp_path / "runs")]))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 1 and len(err) == 1, err
    assert all(w in err[0] for w in ("scheduler_config.json", "DDIMScheduler", "velocity")), err[0]
    assert not (tmp_path / "runs").exists()
    pipe = StableDiffusion3Pipeline.from_pretrained(folders["sd3"], text_encoder_3=None, tokenizer_3=None)
    pipe.scheduler = DDIMScheduler()
    with pytest.raises(ValueError, match="DDIMScheduler, with betas, .* velocity"):
        parallel_sample(pipe, PROMPT, num_inference_steps=5)


def test_a_scheduler_switch_left_at_its_class_default_is_read_as_it(folders, tmp_path, capsys):
    """DDPMScheduler clips by default: an SDXL folder naming it without clip_sample was read as not clipping, then
    refused after loading in a line calling itself unexpected. Now named before loading, as the key set to true is."""
    import json
    import shutil
    from runner.errors import exit_on_error
    folder = tmp_path / "sdxl_ddpm"
    shutil.copytree(folders["sdxl"], folder)
    path = folder / "scheduler" / "scheduler_config.json"
    config = {k: v for k, v in json.load(open(path)).items() if k != "clip_sample"}
    json.dump({**config, "_class_name": "DDPMScheduler"}, open(path, "w"))
    index = json.load(open(folder / "model_index.json"))
    json.dump({**index, "scheduler": ["diffusers", "DDPMScheduler"]}, open(folder / "model_index.json", "w"))
    with pytest.raises(SystemExit) as e:
        exit_on_error(parallel_sd.main, parallel_sd.parse_args(["--model_path", str(folder), "--timesteps", "5",
                                                                "--output_path", str(tmp_path / "runs")]))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "note:" not in line]
    assert e.value.code == 1 and len(err) == 1, err
    assert "scheduler_config.json" in err[0] and "clip_sample" in err[0] and "unexpected" not in err[0], err[0]


@pytest.mark.parametrize("change, word", [({"invert_sigmas": True}, "invert_sigmas True"),
                                          ({"shift_terminal": 1.5}, "shift_terminal 1.5"),
                                          ({"shift": 1e9}, "shift 1000000000.0")])
def test_flow_levels_that_do_not_fall_are_named_before_loading(folders, tmp_path, capsys, change, word):
    """A flow scheduler whose levels rise (invert_sigmas, shift_terminal above 1) gave a negative step, refused after
    loading as "schedule.sigma ... (unexpected)"; a shift so large that the levels tie sampled one effective step,
    exit 0, where StableDiffusion3Pipeline's own call fails."""
    import json
    import shutil
    from runner.errors import exit_on_error
    folder = tmp_path / "sd3_levels"
    shutil.copytree(folders["sd3"], folder)
    path = folder / "scheduler" / "scheduler_config.json"
    json.dump({**json.load(open(path)), **change}, open(path, "w"))
    with pytest.raises(SystemExit) as e:
        exit_on_error(parallel_sd.main, parallel_sd.parse_args(["--model_path", str(folder), "--timesteps", "6",
                                                                "--output_path", str(tmp_path / "runs")]))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 1 and len(err) == 1, err
    assert all(w in err[0] for w in ("scheduler_config.json", "do not fall", word)), err[0]
    assert "unexpected" not in err[0] and not (tmp_path / "runs").exists()


def test_sdxl_tokenizers_of_other_lengths_are_named(folders, tmp_path, capsys):
    """SDXL joins its two text encoders' outputs token by token: a tokenizer_2 of another model_max_length failed
    in "RuntimeError: Sizes of tensors must match" (unexpected)."""
    import json
    import shutil
    from runner.errors import exit_on_error
    folder = tmp_path / "sdxl_short"
    shutil.copytree(folders["sdxl"], folder)
    path = folder / "tokenizer_2" / "tokenizer_config.json"
    json.dump({**json.load(open(path)), "model_max_length": 16}, open(path, "w"))
    with pytest.raises(SystemExit) as e:
        exit_on_error(parallel_sd.main, parallel_sd.parse_args(["--model_path", str(folder), "--timesteps", "5",
                                                                "--output_path", str(tmp_path / "runs")]))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 1 and len(err) == 1, err
    assert all(w in err[0] for w in ("tokenizer_2/tokenizer_config.json", "model_max_length 16", "must agree")), err


def _edit(path, **changes):
    import json
    json.dump({**json.load(open(path)), **changes}, open(path, "w"))


@pytest.mark.parametrize("family, name, edit, words", [case if len(case) == 4 else ("sdxl", *case)
                                                    for case in [
    ("time_embed_width", lambda f: _edit(f / "unet" / "config.json", addition_time_embed_dim=16),
     ["unet/config.json", "projection_class_embeddings_input_dim 80", "16 x 6 sizes + text_encoder_2's "
      "projection_dim 32 make 128"]),
    # a refiner's UNet (five sizes: the aesthetic score in place of the target size) under a text-to-image
    # model_index.json that says requires_aesthetics_score, which StableDiffusionXLPipeline does not read
    ("refiner_widths", lambda f: (_edit(f / "unet" / "config.json", projection_class_embeddings_input_dim=72),
                                  _edit(f / "model_index.json", requires_aesthetics_score=True)),
     ["unet/config.json", "projection_class_embeddings_input_dim 72", "8 x 6 sizes", "make 80"]),
    ("no_added_conditions", lambda f: _edit(f / "unet" / "config.json", addition_embed_type=None),
     ["unet/config.json", "addition_embed_type None", "text_time"]),
    ("labelled_sd", lambda f: _edit(f / "model_index.json", _class_name="StableDiffusionPipeline"),
     ["unet/config.json", "an SDXL UNet, in a StableDiffusionPipeline folder", "_class_name"]),
    ("encoder_2_without_projection", lambda f: _edit(f / "model_index.json",
                                                     text_encoder_2=["transformers", "CLIPTextModel"]),
     ["text_encoder_2 that is a CLIPTextModel", "CLIPTextModelWithProjection"]),
    # the prompt embeddings' widths against the network's (both encoders' hidden sizes add up to SDXL's): a size
    # error at the first model call ("mat1 and mat2 shapes cannot be multiplied"), said as unexpected
    ("encoder_width", lambda f: _edit(f / "text_encoder" / "config.json", hidden_size=48),
     ["unet/config.json", "cross_attention_dim 64", "text_encoder's hidden_size 48 + text_encoder_2's hidden_size 32"]),
    ("sd3", "pooled_width", lambda f: _edit(f / "text_encoder" / "config.json", projection_dim=48),
     ["transformer/config.json", "pooled_projection_dim 64", "text_encoder's projection_dim 48"]),
    ("sd3", "output_width", lambda f: _edit(f / "transformer" / "config.json", out_channels=8),
     ["transformer/config.json", "out_channels 8", "4 expected"]),
    ("sd2_768", "unet_output_width", lambda f: _edit(f / "unet" / "config.json", out_channels=5),
     ["unet/config.json", "out_channels 5", "learned variance"]),
    # SDXL's __call__ unscales its latents per channel with these: a size error or a TypeError after sampling
    ("vae_mean_count", lambda f: _edit(f / "vae" / "config.json", latents_mean=[0.1, 0.2, 0.3]),
     ["vae/config.json", "latents_mean [0.1, 0.2, 0.3]", "4 finite numbers"]),
    ("vae_std_text", lambda f: _edit(f / "vae" / "config.json", latents_std=["1", "1", "1", "1"]),
     ["vae/config.json", "latents_std", "4 positive finite numbers"]),
]])
def test_folders_whose_parts_do_not_fit_are_named(folders, tmp_path, capsys, family, name, edit, words):
    """Each failed inside when sampling, in a line calling itself unexpected: diffusers' "Model expects an added
    time embedding vector of length ...", a TypeError or AttributeError on None, a size error."""
    import shutil
    from runner.errors import exit_on_error
    folder = tmp_path / name
    shutil.copytree(folders[family], folder)
    edit(folder)
    with pytest.raises(SystemExit) as e:
        exit_on_error(parallel_sd.main, parallel_sd.parse_args(["--model_path", str(folder), "--timesteps", "5",
                                                                "--output_path", str(tmp_path / "runs")]))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 1 and len(err) == 1 and "unexpected" not in err[0], err
    assert all(w in err[0] for w in words), err[0]
    assert not (tmp_path / "runs").exists()


def test_a_loaded_sdxl_pipeline_whose_parts_do_not_fit_is_refused(folders):
    """The same checks on a loaded pipeline (parallel_sample): a second text encoder without projection failed in
    a TypeError on None, a tokenizer_2 of another length in a size error."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel
    from models.pipelines import parallel_sample
    pipe = StableDiffusionXLPipeline.from_pretrained(folders["sdxl"])
    pipe.tokenizer_2.model_max_length = 16
    with pytest.raises(ValueError, match="tokenizer_2 that has model_max_length 16 .* must agree"):
        parallel_sample(pipe, PROMPT, num_inference_steps=5)
    pipe.tokenizer_2.model_max_length = pipe.tokenizer.model_max_length
    encoder_2 = pipe.text_encoder_2
    pipe.text_encoder_2 = CLIPTextModel(pipe.text_encoder_2.config)
    with pytest.raises(ValueError, match="text_encoder_2 that is a CLIPTextModel"):
        parallel_sample(pipe, PROMPT, num_inference_steps=5)
    # a text encoder of another width (a size error at the first model call, naming no part)
    pipe.text_encoder_2 = encoder_2
    pipe.text_encoder = CLIPTextModel(type(pipe.text_encoder.config)(**{**pipe.text_encoder.config.to_dict(),
                                                                        "hidden_size": 48}))
    with pytest.raises(ValueError, match="cross_attention_dim 64 and prompt embeddings 80 wide .text_encoder's "
                                         "hidden_size 48"):
        parallel_sample(pipe, PROMPT, num_inference_steps=5)


@pytest.mark.parametrize("labels", ["oops", {"x": "cat"}, {"0": 5}, {"1000": "cat"}])
def test_a_dit_folders_bad_id2label_is_named(dit_folder, tmp_path, capsys, labels):
    """DiTPipeline reads model_index.json's id2label when it is built: a text, a key that is no class id or a label
    that is not text failed there, in a line naming the folder but not the key."""
    import json
    import shutil
    import parallel_dit
    from runner.errors import exit_on_error
    folder = tmp_path / "dit"
    shutil.copytree(dit_folder, folder)
    _edit(folder / "model_index.json", id2label=labels)
    with pytest.raises(SystemExit) as e:
        exit_on_error(parallel_dit.main, parallel_dit.parse_args(["--model_path", str(folder), "--timesteps", "5",
                                                                  "--class_labels", "1",
                                                                  "--output_path", str(tmp_path / "runs")]))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 1 and len(err) == 1, err
    assert all(w in err[0] for w in ("model_index.json", "id2label", json.dumps(labels)[:20])), err[0]
