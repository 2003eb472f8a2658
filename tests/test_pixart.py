"""PixArt (PixArtSigmaPipeline and PixArtAlphaPipeline folders): at tolerance 0 the solver equals the pipeline's own
__call__ with DDIMScheduler swapped in (how its DPM-Solver is read) from the same initial latents, through
parallel_sd.py and through parallel_sample, at the aspect-ratio bin the pipeline samples (the images resized back);
1 vs 2 processes; what is not supported is refused in one line."""
import os
import shutil

import numpy as np
import pytest
import torch

import parallel_sd
from models.pipelines import parallel_sample
from tests.conftest import assert_processes_agree, edit_json, folder_variant, read_metrics
from tests.test_bad_input import check
from tests.tiny_models import build_tiny_pixart

PROMPT = "a handwritten digit four"
# relative to the latents' largest value, as for SD. It was 1e-3 while 1 - A was taken in float32 (as the
# reference's script does), which loses ~1e-3 of sqrt(A) at PixArt's last level, A = 4e-5 (~3e-4 of the result at 20
# steps); 1 - A in float64 keeps A's digits (paratAA.schedule.from_ddim_scheduler)
TOL = 1e-4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("pixart")
    # Sigma at 256 px (no micro-conditions); Alpha at 1024 px, where it adds resolution and aspect ratio (patches of
    # 8 keep its 128 x 128 latent to 16 x 16 tokens)
    return {"sigma": build_tiny_pixart(str(d / "sigma")),
            "alpha": build_tiny_pixart(str(d / "alpha"), variant="alpha", seed=1, sample_size=128, patch_size=8)}


def load(folder):
    import diffusers
    from models.sd import family
    pipe = getattr(diffusers, family(folder)).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def own_call(pipe, x_T, T, guidance, height, width, output_type="latent", **kwargs):
    """The pipeline's own __call__ with DDIMScheduler in place of its DPM-Solver (as tests/test_families.py's
    diffusers_loop reads SD's), from x_T [N, C, h, w] at the binned size of height x width: latents [N, C, h, w], or
    images [N, height, width, 3] in [0, 1] with output_type "np"."""
    from diffusers import DDIMScheduler
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    with torch.no_grad():
        return pipe([PROMPT] * len(x_T), num_inference_steps=T, guidance_scale=guidance, height=height, width=width,
                    latents=x_T.float(), output_type=output_type, **kwargs).images


def run_sd(folder, out, *flags):
    run_dir = parallel_sd.main(parallel_sd.parse_args(["--model_path", folder, "--output_path", str(out), *flags]))
    return run_dir, read_metrics(run_dir)


# (folder, guidance, flags, the pipeline's arguments, size asked, size sampled): guidance on and off, a negative
# prompt, max_sequence_length; sizes off the bins, resized back (Alpha's also its resolution micro-conditions)
CASES = [("sigma", 3.0, ["--negative_prompt", "blurry", "--max_sequence_length", "20"],
          dict(negative_prompt="blurry", max_sequence_length=20), (200, 300), (208, 304)),
         ("sigma", 1.0, [], {}, (192, 320), (192, 320)),
         ("alpha", 3.0, [], {}, (600, 1700), (576, 1664))]


@pytest.mark.parametrize("name, cfg, flags, kwargs, size, binned", CASES)
def test_parallel_sd_at_tolerance_zero_equals_pixarts_own_loop(folders, tmp_path, name, cfg, flags, kwargs, size,
                                                               binned, capsys):
    T = 6
    run_dir, m = run_sd(folders[name], tmp_path, "--timesteps", str(T), "--tol1", "0", "--tol2", "0",
                        "--num_samples", "2", "--batch_size", "2", "--prompt", PROMPT, "--cfg_scale", str(cfg),
                        "--height", str(size[0]), "--width", str(size[1]), *flags)
    z = np.load(os.path.join(run_dir, "latents.npz"))
    ours, x_T = z["latents"], torch.from_numpy(z["x_T"])
    assert ours.shape == x_T.shape == (2, 4, binned[0] // 8, binned[1] // 8)  # sampled at the bin
    assert m["sampled_size"] == list(binned)
    ref = own_call(load(folders[name]), x_T, T, cfg, *size, **kwargs).numpy()
    assert np.isfinite(ref).all() and np.abs(ref).max() > 0
    np.testing.assert_allclose(ours, ref, rtol=TOL, atol=TOL * np.abs(ref).max())
    assert m["scheduler"]["class"] == "DPMSolverMultistepScheduler"
    assert capsys.readouterr().err.count("sampled as DDIM") == 1  # said once


def test_parallel_sample_on_a_loaded_pixart_pipeline_equals_its_own_call(folders):
    """Sigma at its __call__'s defaults (20 steps, guidance 4.5, negative prompt ""): latents, and images resized back
    from the bin within one gray level; Alpha's latents with its resolution micro-conditions."""
    pipe = load(folders["sigma"])
    with pytest.warns(UserWarning, match="sampled as DDIM"):
        exact = parallel_sample(pipe, PROMPT, num_images=2, height=200, width=300, tol1=0, tol2=0,
                                output_type="np")
    assert exact.latents.shape == (2, 4, 26, 38) and len(exact.results[0].converged) == 2  # 208 x 304 sampled
    ref = own_call(pipe, exact.x_T, 20, 4.5, 200, 300)
    assert (exact.latents.float() - ref).abs().max() <= TOL * ref.abs().max()
    images = own_call(pipe, exact.x_T, 20, 4.5, 200, 300, "np")                                  # [2, 200, 300, 3]
    assert np.stack(exact.images).shape == images.shape == (2, 200, 300, 3)
    assert np.abs(np.stack(exact.images).astype(int) - (images * 255).round().astype(int)).max() <= 1
    pipe = load(folders["alpha"])
    with pytest.warns(UserWarning, match="sampled as DDIM"):
        out = parallel_sample(pipe, PROMPT, num_inference_steps=4, guidance_scale=2.0, negative_prompt="", tol1=0,
                              tol2=0, max_sequence_length=12, output_type="np")              # its 1024 x 1024
    ref = own_call(pipe, out.x_T, 4, 2.0, 1024, 1024, negative_prompt="", max_sequence_length=12)
    assert out.latents.shape == (1, 4, 128, 128)
    assert (out.latents.float() - ref).abs().max() <= TOL * ref.abs().max()


def test_one_and_two_processes_agree(folders, tmp_path):
    assert_processes_agree(["--model_path", folders["sigma"], "--timesteps", "8", "--window_size", "8",
                            "--num_samples", "2", "--batch_size", "2", "--height", "192", "--width", "320"], tmp_path)


def test_what_is_not_supported_is_one_line(folders, tmp_path, capsys, tiny_sd):
    sigma, root = folders["sigma"], str(tmp_path / "variants")
    transformer = lambda **values: lambda f: edit_json(os.path.join(f, "transformer", "config.json"), **values)
    cases = [
        # PixArt's ControlNet pipelines (diffusers' community ones): named, with what is supported
        (folder_variant(sigma, root, "controlnet", lambda f: edit_json(os.path.join(f, "model_index.json"),
                                                                  _class_name="PixArtSigmaControlNetPipeline")), [],
         1, ["PixArtSigmaControlNetPipeline", "PixArtSigmaPipeline"]),
        # a sample_size the pipeline has no bins for (its own call raises "Invalid sample size")
        (folder_variant(sigma, root, "size48", transformer(sample_size=48)), [], 1,
         ["transformer/config.json", "sample_size 48", "32, 64, 128, 256"]),
        # Sigma gives no micro-conditions: a transformer that needs them fails inside the pipeline
        (folder_variant(sigma, root, "conditions", transformer(use_additional_conditions=True)), [], 1,
         ["use_additional_conditions"]),
        # the positional embedding's grid divides by it: a TypeError inside naming no file
        (folder_variant(sigma, root, "interpolation_text", transformer(interpolation_scale="x")), [], 1,
         ["transformer/config.json", "interpolation_scale 'x'", "positive number"]),
        (folder_variant(sigma, root, "no_tokenizer", lambda f: shutil.rmtree(os.path.join(f, "tokenizer"))), [], 1,
         ["--model_path", "tokenizer/"]),
        # T5's width against the transformer's caption projection: a size error at the first model call
        (folder_variant(sigma, root, "t5_width", lambda f: edit_json(os.path.join(f, "text_encoder", "config.json"),
                                                                d_model=48)), [], 1,
         ["transformer/config.json", "caption_channels 32", "text_encoder's d_model 48", "do not fit"]),
        (sigma, ["--max_sequence_length", "0"], 2, ["--max_sequence_length must be in 1..512", "got 0"]),
        (sigma, ["--negative_prompt", "x", "--cfg_scale", "1"], 2, ["--negative_prompt has no effect"]),
        (sigma, ["--height", "0"], 2, ["--height must be an integer in 1..8192"]),
        # --max_sequence_length is a T5 prompt's: not for SD 1.x, which says which families take it
        (tiny_sd, ["--max_sequence_length", "20"], 2, ["--max_sequence_length", "PixArt"]),
    ]
    for folder, flags, code, words in cases:
        check(parallel_sd, ["--model_path", folder, "--timesteps", "2", *flags], code, words, tmp_path, capsys)


def test_parallel_sample_refusals_name_the_argument(folders):
    pipe = load(folders["sigma"])
    for kwargs, text in ((dict(height=0), "height must be an integer in 1..8192"),
                         (dict(max_sequence_length=513), "max_sequence_length must be an integer in 1..512"),
                         (dict(negative_prompt="x", guidance_scale=1), "negative_prompt has no effect"),
                         (dict(true_cfg_scale=2), "true_cfg_scale is FluxPipeline's")):
        with pytest.raises(ValueError, match=text):
            parallel_sample(pipe, PROMPT, **{"num_inference_steps": 2, **kwargs})
    pipe.transformer.register_to_config(sample_size=48)
    with pytest.raises(ValueError, match="pipe has sample_size 48"):
        parallel_sample(pipe, PROMPT, num_inference_steps=2, height=256, width=256)


def test_a_config_that_drops_the_resolution_embedder_of_its_weights_is_refused(folders, tmp_path, capsys):
    """PixArt-Alpha 1024 weights with "use_additional_conditions": false: diffusers dropped the resolution and
    aspect-ratio embedders' tensors and sampled without the micro-conditions, exit 0."""
    folder = folder_variant(folders["alpha"], str(tmp_path / "variants"), "no_conditions", lambda f: edit_json(
        os.path.join(f, "transformer", "config.json"), use_additional_conditions=False))
    check(parallel_sd, ["--model_path", folder, "--timesteps", "2"], 1,
          ["--model_path", "transformer", "resolution_embedder", "use_additional_conditions"], tmp_path, capsys)
