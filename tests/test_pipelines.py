"""parallel_sample on a diffusers pipeline loaded in Python: the notebook entry point."""
import numpy as np
import pytest
import torch
from PIL import Image

from models.pipelines import parallel_sample
from tests.test_sd import diffusers_ddim


def test_tolerance_zero_equals_diffusers_own_ddim_loop(tiny_sd):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    out = parallel_sample(pipe, "a handwritten digit four", num_inference_steps=12, guidance_scale=3.0, num_images=2,
                          tol1=0, tol2=0, output_type="pil")
    ref = diffusers_ddim(tiny_sd, "a handwritten digit four", 12, 0.0, 0, 2, 3.0)  # the same noise: seed 0
    assert np.abs(out.latents.float().numpy() - ref).max() < 1e-4
    assert len(out.images) == 2 and isinstance(out.images[0], Image.Image)
    assert out.x_T.shape == (2, 4, 8, 8) and out.iterations == out.results[0].iterations
    assert all(len(h.x0) == k + 1 for h, k in zip(out.results[0].history, out.iterations))


# SDXL comes with Euler, read as DDIM: the warning is the subject of its own test below
@pytest.mark.filterwarnings("ignore:.*sampled as DDIM")
def test_guidance_at_or_below_1_is_off_as_in_diffusers(tiny_sd, tmp_path):
    """diffusers guides only above 1 (SDXL-Turbo's guidance_scale 0 is no guidance); u + s (c - u) at s = 0 sampled
    the unconditional model instead and missed the pipeline's own loop by 1.9 on this tiny model."""
    import diffusers
    from tests.test_families import PROMPT, diffusers_loop
    from tests.tiny_models import build_tiny_sdxl
    for folder, kind in ((tiny_sd, "StableDiffusionPipeline"),
                         (build_tiny_sdxl(str(tmp_path / "sdxl")), "StableDiffusionXLPipeline")):
        pipe = getattr(diffusers, kind).from_pretrained(folder)
        for scale in (0.0, 0.5):
            out = parallel_sample(pipe, PROMPT, num_inference_steps=8, guidance_scale=scale, num_images=2, tol1=0,
                                  tol2=0, output_type="np")
            ref = diffusers_loop(folder, 8, scale, 2)
            np.testing.assert_allclose(out.latents.float().numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_a_scheduler_read_as_ddim_is_said_once_and_left_as_it_was(tiny_sd):
    """The scripts say it on the terminal; in Python it was silent (a DPM-Solver pipeline's own __call__ differs)."""
    import warnings
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        parallel_sample(pipe, "a handwritten digit one", num_inference_steps=4, output_type="np")
    assert not [w for w in said if "sampled as DDIM" in str(w.message)]  # its own DDIM: nothing to say
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler.set_timesteps(50)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        parallel_sample(pipe, "a handwritten digit one", num_inference_steps=4, output_type="np")
    (w,) = [w for w in said if "DPMSolverMultistepScheduler: sampled as DDIM" in str(w.message)]
    assert w.filename == __file__  # it points at the caller's line
    assert len(pipe.scheduler.timesteps) == 50  # the pipeline's scheduler keeps its state


def test_defaults_batches_and_auto_window(tiny_sd):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    together = parallel_sample(pipe, ["a handwritten digit one", "a handwritten digit two"], num_inference_steps=16,
                               num_images=3, output_type="np", compare_sequential=True)
    apart = parallel_sample(pipe, ["a handwritten digit one", "a handwritten digit two"], num_inference_steps=16,
                            num_images=3, output_type="np", batch_size=1)
    assert torch.allclose(together.latents, apart.latents, atol=1e-5)  # batching changes nothing
    # the stop rule judged x_0 by the image the pipeline's VAE decodes, as the scripts' does
    assert any(g == g for res in together.results for h in res.history for g in h.image_estimate)
    assert together.speed["sequential_seconds"] > 0 and together.images[0].dtype == np.uint8
    # every run says what it gained: without compare_sequential, sequential sampling estimated (the API gave
    # sampling seconds alone), T calls of one state per sample for each batch, as the scripts estimate it
    assert together.speed["sequential_measured"] is True and apart.speed["sequential_measured"] is False
    for out in (together, apart):
        s = out.speed
        assert s["sequential_seconds"] > 0 and s["speedup"] == s["sequential_seconds"] / s["sampling_seconds"]
    auto = parallel_sample(pipe, "a handwritten digit one", num_inference_steps=16, window_size="auto",
                           output_type="np", num_images=3, batch_size=2)
    assert isinstance(auto.config.window_size, int) and 1 <= auto.config.window_size <= 16
    # the planner's record, as the scripts keep it in metrics.json: its choice is the window sampled with
    assert auto.plan.window == auto.config.window_size and auto.plan.call_seconds and together.plan is None
    # the prediction of the whole run, as the scripts' predicted_sampling_seconds (the plan's is the first batch's)
    predicted = auto.speed["predicted_sampling_seconds"]
    assert predicted > auto.plan.predicted_seconds and auto.speed["sampling_seconds"] > 0
    assert "predicted_sampling_seconds" not in together.speed


# SDXL comes with Euler, read as DDIM: the warning is the subject of its own test below
@pytest.mark.filterwarnings("ignore:.*sampled as DDIM")
def test_sdxl_and_sd3_pipelines_in_python(tmp_path):
    import diffusers
    from tests.test_families import PROMPT, diffusers_loop
    from tests.tiny_models import build_tiny_sd3, build_tiny_sdxl
    for build, kind, absent in ((build_tiny_sdxl, "StableDiffusionXLPipeline", {}),
                                (build_tiny_sd3, "StableDiffusion3Pipeline",
                                 dict(text_encoder_3=None, tokenizer_3=None, image_encoder=None,
                                      feature_extractor=None))):
        folder = build(str(tmp_path / kind))
        pipe = getattr(diffusers, kind).from_pretrained(folder, **absent)
        out = parallel_sample(pipe, PROMPT, num_inference_steps=8, guidance_scale=3.0, num_images=2, tol1=0, tol2=0,
                              output_type="np")
        ref = diffusers_loop(folder, 8, 3.0, 2)
        np.testing.assert_allclose(out.latents.float().numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # SDXL zeroes the negative embeddings only when no negative prompt is given: "" is encoded (it was taken for
    # none, 5.3 off the pipeline's own negative_prompt=""); with one text encoder missing it is refused, not failed
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tmp_path / "StableDiffusionXLPipeline")
    pipe.set_progress_bar_config(disable=True)
    for negative in (None, ""):
        out = parallel_sample(pipe, PROMPT, negative, num_inference_steps=4, guidance_scale=3.0, tol1=0, tol2=0,
                              output_type="np")
        with torch.no_grad():
            ref = pipe(PROMPT, negative_prompt=negative, num_inference_steps=4, guidance_scale=3.0,
                       latents=out.x_T.float(), output_type="latent").images
        assert (out.latents.float() - ref).abs().max() <= 1e-4 * ref.abs().max()
    pipe.text_encoder = pipe.tokenizer = None
    with pytest.raises(ValueError, match="pipe has no text_encoder or tokenizer"):
        parallel_sample(pipe, PROMPT, num_inference_steps=4, output_type="np")


def test_the_empty_prompt_samples_as_the_pipelines_own_call(tiny_sd):
    """pipe("") samples the empty prompt (an unconditional image; with guidance the conditional and unconditional
    passes are the same); parallel_sample refused it before, as the scripts refuse --prompt "". Blank prompts are
    encoded as given, as __call__ encodes them."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for prompt in ("", [" ", "a handwritten digit four"]):
        out = parallel_sample(pipe, prompt, num_images=2, seed=3, num_inference_steps=4, guidance_scale=3.0, tol1=0,
                              tol2=0, output_type="np")
        prompts = [prompt] * 2 if isinstance(prompt, str) else prompt
        with torch.no_grad():
            ref = pipe(prompts, num_inference_steps=4, guidance_scale=3.0, latents=out.x_T.float(),
                       output_type="latent").images
        assert out.latents.shape == ref.shape
        assert (out.latents.float() - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_sdxls_watermark_is_applied_as_the_pipelines_own_call(tmp_path):
    """StableDiffusionXLPipeline watermarks its decoded images where it has a watermarker (by default when the
    invisible-watermark package is installed); parallel_sample returned them unmarked. A stand-in watermarker
    mirrors the image, so that the mark is seen in every pixel."""
    import diffusers
    from tests.tiny_models import build_tiny_sdxl

    class Mirror:
        def apply_watermark(self, images):  # [N, 3, H, W] in [-1, 1], as the real one takes and gives them
            return images.flip(-1)

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(build_tiny_sdxl(str(tmp_path / "sdxl")))
    pipe.set_progress_bar_config(disable=True)
    pipe.watermark = None
    args = dict(num_images=2, num_inference_steps=4, guidance_scale=3.0, tol1=0, tol2=0, output_type="np")
    plain = parallel_sample(pipe, "a handwritten digit four", **args)
    pipe.watermark = Mirror()
    marked = parallel_sample(pipe, "a handwritten digit four", **args)
    assert torch.equal(marked.latents, plain.latents)
    assert np.array_equal(np.stack(marked.images), np.stack(plain.images)[:, :, ::-1])
    assert not np.array_equal(np.stack(marked.images), np.stack(plain.images))
    with torch.no_grad():
        ref = pipe("a handwritten digit four", num_images_per_prompt=2, num_inference_steps=4, guidance_scale=3.0,
                   latents=marked.x_T.float(), output_type="np").images
    # the latents agree to 1e-4 of their scale, not bit for bit: a pixel may round to the next level
    assert np.abs(np.stack(marked.images).astype(int) - (ref * 255).round().astype(int)).max() <= 1


def test_a_unet_sample_size_of_height_and_width_is_the_default_size(tiny_sd):
    """A UNet config may give sample_size as (height, width): the pipeline's default image is then that shape (it
    was made square from the height)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.register_to_config(sample_size=[8, 12])
    pipe = StableDiffusionPipeline(**pipe.components, requires_safety_checker=False)  # __init__ reads the kind
    pipe.set_progress_bar_config(disable=True)
    out = parallel_sample(pipe, "a handwritten digit four", num_inference_steps=4, guidance_scale=3.0, tol1=0,
                          tol2=0, output_type="np")
    with torch.no_grad():
        ref = pipe("a handwritten digit four", num_inference_steps=4, guidance_scale=3.0, latents=out.x_T.float(),
                   output_type="latent").images
    assert out.latents.shape == ref.shape == (1, 4, 8, 12)
    assert (out.latents.float() - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_bad_arguments_are_refused_naming_them(tiny_sd):
    """Each refused before anything is encoded or drawn, with the argument's name: before, an empty prompt list, a
    zero or negative num_images or batch_size, a seed as text and a config as a dict ended in tracebacks from
    inside, batch_size 0 meant all images, height 0 the model's size, and output_type "latent" gave arrays."""
    import numpy as np  # numpy integers are integers (the seed's failed inside before)
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    cases = [(dict(prompt=[]), TypeError, "prompt must be"), (dict(prompt=3), TypeError, "prompt must be"),
             (dict(negative_prompt=["x"]), TypeError, "negative_prompt"),
             (dict(num_images=0), ValueError, "num_images"), (dict(num_images=-1), ValueError, "num_images"),
             (dict(batch_size=0), ValueError, "batch_size"), (dict(num_images=3, batch_size=-2), ValueError,
                                                              "batch_size"),
             (dict(guidance_scale=float("nan")), ValueError, "guidance_scale"),
             (dict(seed="1"), ValueError, "seed"), (dict(seed=-1), ValueError, "seed"),
             (dict(height=7), ValueError, r"height must be a multiple of the VAE factor \d+ in"),
             (dict(height=0), ValueError, "height"), (dict(width=True), ValueError, "width"),
             (dict(output_type="latent"), ValueError, "output_type"),
             (dict(output_type=np.array(["np"])), ValueError, "output_type"),  # passed: the array == "np" is true
             (dict(config={"window_size": 4}), TypeError, "config must be a SolverConfig"),
             (dict(windowsize=4), TypeError, r"unknown solver parameters \['windowsize'\]"),
             # named as the argument is called here (before: "timesteps (number of sampling steps T)")
             (dict(num_inference_steps=0), ValueError, r"num_inference_steps must be an integer in 1\.\.1000"),
             (dict(num_inference_steps=4.0), ValueError, "num_inference_steps"),
             (dict(num_inference_steps=1001), ValueError, "num_inference_steps"),
             # SD v1.5's "leading" spacing with steps_offset 1 reaches timestep 1000 at 1000 steps
             (dict(num_inference_steps=1000), ValueError, "num_inference_steps 1000 is too many for this scheduler"),
             (dict(eta=2.0), ValueError, "eta"), (dict(window_size=0), ValueError, "window_size"),
             # what the scripts refuse: a prompt never sampled, a negative prompt without guidance
             (dict(prompt=["a handwritten digit one", "a handwritten digit two"]), ValueError,
              "2 prompts for num_images = 1"),
             (dict(negative_prompt="blurry", guidance_scale=1), ValueError, "negative_prompt has no effect"),
             (dict(negative_prompt="blurry", guidance_scale=0), ValueError, "negative_prompt has no effect"),
             (dict(negative_prompt="", guidance_scale=1), ValueError, "negative_prompt has no effect"),
             (dict(compare_sequential="no"), TypeError, "compare_sequential must be True or False"),
             # bytes decoded with errors="surrogateescape": the tokenizer failed on them, naming nothing
             (dict(prompt="\udcff seven"), ValueError, "prompt holds characters that are not text"),
             (dict(negative_prompt="\udcff"), ValueError, "negative_prompt holds characters that are not text"),
             (dict(num_images=10 ** 12), ValueError, "GiB of noise per batch alone .* lower batch_size")]
    for kwargs, error, text in cases:
        args = dict(prompt="a handwritten digit four", num_inference_steps=8, output_type="np") | kwargs
        with pytest.raises(error, match=text):
            parallel_sample(pipe, **args)
    assert not calls
    out = parallel_sample(pipe, "a handwritten digit four", negative_prompt=None, num_inference_steps=8,
                          output_type="np")
    same = parallel_sample(pipe, "a handwritten digit four", negative_prompt="", num_inference_steps=8,
                           output_type="np")
    assert calls and torch.equal(out.latents, same.latents)  # None: no negative prompt, as in diffusers
    seeded = [parallel_sample(pipe, "a handwritten digit four", seed=s, num_images=n, num_inference_steps=8,
                              output_type="np").latents for s, n in ((5, 1), (np.uint64(5), np.int64(1)))]
    assert torch.equal(*seeded)


def test_a_pipeline_the_solver_cannot_sample_is_refused_naming_why(tiny_sd, tmp_path):
    """The checks the scripts make on a folder, made on the loaded pipeline: before, a scheduler that clips or
    thresholds was sampled as if it did not (a result that is not the pipeline's), and a DiT or inpainting pipeline
    failed inside. A subclass of a supported pipeline is that pipeline."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler, DiTPipeline, EDMEulerScheduler, StableDiffusionPipeline
    from tests.tiny_models import build_tiny_dit_pipeline

    def load():
        return StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)

    clipping = load()
    clipping.scheduler = DDIMScheduler.from_config(clipping.scheduler.config, clip_sample=True)
    lcm = load()
    lcm.unet.register_to_config(time_cond_proj_dim=16)  # diffusers then guides through timestep_cond, not CFG
    edm = load()
    edm.scheduler = EDMEulerScheduler()  # no betas: it was read with DDIM's default ones
    inverse = load()  # an image to its noise: read as DDIM, it was sampled as a sampler, with one warning line
    inverse.scheduler = DDIMInverseScheduler.from_config(inverse.scheduler.config)
    other_channels = load()
    other_channels.vae.register_to_config(latent_channels=8)
    unscaled = load()
    unscaled.vae.register_to_config(scaling_factor=0.0)  # every image would be black
    shifted = load()
    shifted.vae.register_to_config(shift_factor="abc")  # a TypeError naming no part, after sampling
    unbounded = load()
    unbounded.tokenizer.model_max_length = int(1e30)  # transformers' value where tokenizer_config.json has none
    dit = DiTPipeline.from_pretrained(build_tiny_dit_pipeline(str(tmp_path / "dit")))
    for pipe, text in ((clipping, "pipe has a scheduler that sets clip_sample"),
                       (other_channels, "pipe has a denoiser taking 4 channels but a VAE making 8-channel"),
                       (unscaled, "pipe has a VAE that has scaling_factor 0.0; a number in 0.001..1000 is needed"),
                       (shifted, "pipe has a VAE that has shift_factor 'abc'"),
                       (unbounded, "pipe has a tokenizer that has model_max_length none"),
                       # sampled since, with class_labels (tests/test_families.py)
                       (dit, "prompt is for the text-to-image pipelines; a DiTPipeline is conditioned on class_labels"),
                       (lcm, "pipe has a UNet with time_cond_proj_dim"),
                       (edm, "pipe has a scheduler that is an EDM scheduler"),
                       (inverse, "pipe has a scheduler that is DDIMInverseScheduler, which runs the steps backwards")):
        with pytest.raises(ValueError, match=text):
            parallel_sample(pipe, "a handwritten digit four", num_inference_steps=8, output_type="np")

    class Mine(StableDiffusionPipeline):
        pass

    mine = Mine.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    ours = parallel_sample(mine, "a handwritten digit four", num_inference_steps=8, output_type="np")
    theirs = parallel_sample(load(), "a handwritten digit four", num_inference_steps=8, output_type="np")
    assert torch.equal(ours.latents, theirs.latents)


def test_flow_schedulers_other_than_euler_and_flow_on_a_unet_are_refused(tiny_sd, tmp_path):
    """SD3 with FlowMatchHeunDiscreteScheduler failed on the noise's shape (its 2T - 1 timesteps; the scripts: an
    'unexpected' IndexError), with FlowMatchLCMScheduler it was sampled as Euler steps without a word (3.1 off its own
    loop), and an SD or SDXL pipeline given a flow-matching scheduler ended in an AttributeError traceback."""
    import diffusers
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline
    from models.sd import check_folder
    from paratAA import flow_schedule
    from runner.errors import InputFileError
    from tests.tiny_models import build_tiny_sd3
    sd3 = StableDiffusion3Pipeline.from_pretrained(build_tiny_sd3(str(tmp_path / "sd3")), text_encoder_3=None,
                                                   tokenizer_3=None)
    sd = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    calls = []
    for pipe in (sd3, sd):
        network = pipe.transformer if pipe is sd3 else pipe.unet
        network.register_forward_pre_hook(lambda *a: calls.append(1))
    for pipe, cls, text in ((sd3, "FlowMatchHeunDiscreteScheduler", "is a FlowMatchHeunDiscreteScheduler: of the flow"),
                            (sd3, "FlowMatchLCMScheduler", "is a FlowMatchLCMScheduler: of the flow"),
                            (sd, "FlowMatchEulerDiscreteScheduler", "flow-matching FlowMatchEulerDiscreteScheduler, "
                                                                    "for a StableDiffusionPipeline")):
        own = pipe.scheduler
        pipe.scheduler = getattr(diffusers, cls).from_config(sd3.scheduler.config)
        with pytest.raises(ValueError, match=text):
            parallel_sample(pipe, "a handwritten digit four", num_inference_steps=4, output_type="np")
        if pipe is sd3:
            with pytest.raises(TypeError, match=f"FlowMatchEulerDiscreteScheduler\\), got {cls}"):
                flow_schedule(pipe.scheduler, 4)
        # the scripts: the same, as one line naming the folder's scheduler, before anything is loaded
        folder = str(tmp_path / cls)
        pipe.save_pretrained(folder)
        with pytest.raises(InputFileError, match=f"scheduler_config.json .*{text}"):
            check_folder(folder)
        pipe.scheduler = own
    assert not calls


@pytest.mark.parametrize("name", ["KarrasVeScheduler", "IPNDMScheduler", "ScoreSdeVeScheduler"])
def test_a_scheduler_without_betas_is_refused(tiny_sd, tmp_path, name):
    """Its noise levels are its own (sigmas, IPNDM's reading of trained_betas): read as DDIM it took DDIM's default
    betas and sampled another model's noise levels without a word. Schedulers with betas are read as DDIM."""
    import diffusers
    from diffusers import StableDiffusionPipeline
    from models.sd import check_folder
    from runner.errors import InputFileError
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    own = pipe.scheduler
    pipe.scheduler = getattr(diffusers, name)()
    with pytest.raises(ValueError, match=f"is {name}, whose noise levels come from no beta schedule"):
        parallel_sample(pipe, "a handwritten digit four", num_inference_steps=4, output_type="np")
    folder = str(tmp_path / name)
    pipe.save_pretrained(folder)
    with pytest.raises(InputFileError, match=f"scheduler_config.json .*is {name}, whose"):
        check_folder(folder)
    assert not calls
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(own.config)  # betas: read as DDIM
    with pytest.warns(UserWarning, match="DPMSolverMultistepScheduler"):
        parallel_sample(pipe, "a handwritten digit four", num_inference_steps=4, output_type="np")


def test_a_prompt_longer_than_the_text_encoder_takes_is_said_by_its_text(tiny_sd, capsys):
    """Cut as the pipeline cuts it, and said in one line that names the prompt, not a script flag ("--prompt" was
    said from Python and for parallel_sd_winit.py's --prompt1 / --prompt2 too)."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    long = " ".join(["four"] * (pipe.tokenizer.model_max_length + 5))
    parallel_sample(pipe, long, num_inference_steps=2, output_type="np")
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "tokens" in x]
    assert f"the prompt {long[:40]!r}... has" in line and "--prompt" not in line


def test_a_float16_pipeline_decodes_in_float32_where_its_vae_asks(tiny_sd):
    """A pipeline loaded in float16 whose VAE config sets force_upcast decodes in float32, as parallel_sd.py --fp16
    and SDXL's own __call__ do (it decoded in float16: pixels 1 level off, and NonFiniteModelOutput where the
    VAE's activations exceed float16's range, as SDXL's do); the VAE is given back in float16."""
    from diffusers import StableDiffusionPipeline
    from models.adapters import VAEDecoder
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, torch_dtype=torch.float16, safety_checker=None,
                                                   requires_safety_checker=False)
    assert pipe.vae.config.force_upcast
    with torch.no_grad():  # activations beyond float16's range, normalised again before the output
        pipe.vae.decoder.conv_in.weight.mul_(1e5)
        pipe.vae.decoder.conv_in.bias.mul_(1e5)
    out = parallel_sample(pipe, "a handwritten digit four", num_inference_steps=4, guidance_scale=3.0,
                          num_images=2, output_type="np")
    assert pipe.vae.dtype == torch.float16
    ref = VAEDecoder(pipe.vae.to(torch.float32), "cpu")(out.latents)
    assert np.array_equal(np.stack(out.images), ref)


def test_a_part_set_to_none_is_refused_naming_it(tiny_sd, tmp_path):
    """pipe.vae = None (or the unet, a text encoder, a tokenizer, the scheduler) failed inside with an
    AttributeError on None that named no part; SDXL's and SD3's second text encoder and tokenizer alike."""
    import diffusers
    from tests.tiny_models import build_tiny_sd3
    sd = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    sd3 = diffusers.StableDiffusion3Pipeline.from_pretrained(build_tiny_sd3(str(tmp_path / "sd3")),
                                                             text_encoder_3=None, tokenizer_3=None)
    for pipe, parts in ((sd, ("vae", "unet", "text_encoder", "tokenizer", "scheduler")),
                        (sd3, ("transformer", "text_encoder_2", "tokenizer_2"))):
        for part in parts:
            own = getattr(pipe, part)
            setattr(pipe, part, None)
            with pytest.raises(ValueError, match=f"pipe has {part} set to None; sampling needs its"):
                parallel_sample(pipe, "a handwritten digit four", num_inference_steps=2, output_type="np")
            setattr(pipe, part, own)
    sd.vae.to("meta")  # weights without data: a device error inside ("Tensor on device meta ...") named no part
    with pytest.raises(ValueError, match="pipe has vae on the meta device"):
        parallel_sample(sd, "a handwritten digit four", num_inference_steps=2, output_type="np")


@pytest.mark.filterwarnings("ignore:.*sampled as DDIM")
def test_images_are_unscaled_as_the_pipelines_own_call(tiny_sd, tmp_path):
    """The latents go to the VAE as each pipeline's __call__ unscales them: SDXL with the VAE's latents_mean and
    latents_std where its config has both (ignored before: 25 pixel levels off the pipeline's own images), SD 1.x/2.x
    and SDXL without the shift_factor that only SD3 adds (21 levels off with shift_factor 5)."""
    import diffusers
    from diffusers import DDIMScheduler
    from tests.tiny_models import build_tiny_sdxl
    sdxl = diffusers.StableDiffusionXLPipeline.from_pretrained(build_tiny_sdxl(str(tmp_path / "sdxl")))
    sdxl.scheduler = DDIMScheduler.from_config(sdxl.scheduler.config, clip_sample=False)
    sd = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    for pipe, vae_config in ((sdxl, dict(latents_mean=[0.5, -0.3, 0.2, 0.1], latents_std=[0.8, 1.2, 0.9, 1.1])),
                             (sd, dict(shift_factor=5.0))):
        pipe.set_progress_bar_config(disable=True)
        pipe.vae.register_to_config(**vae_config)
        out = parallel_sample(pipe, "a handwritten digit four", num_inference_steps=2, guidance_scale=3.0, tol1=0,
                              tol2=0, output_type="np")
        with torch.no_grad():
            ref = pipe("a handwritten digit four", num_inference_steps=2, guidance_scale=3.0,
                       latents=out.x_T.float(), output_type="np").images
        assert np.abs(np.stack(out.images).astype(int) - (ref * 255).round().astype(int)).max() <= 1


def test_a_unet_or_text_encoder_cast_alone_samples(tiny_sd):
    """pipe.unet.half() (or the text encoder alone): the embeddings reached the network in the text encoder's dtype
    and sampling failed inside torch ("expected m1 and m2 to have the same dtype"); they are cast as the states are."""
    from diffusers import StableDiffusionPipeline
    ref = parallel_sample(StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None,
                                                                  requires_safety_checker=False),
                          "a handwritten digit four", num_inference_steps=4, guidance_scale=3.0, output_type="np")
    for part in ("unet", "text_encoder"):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
        getattr(pipe, part).to(torch.bfloat16)
        out = parallel_sample(pipe, "a handwritten digit four", num_inference_steps=4, guidance_scale=3.0,
                              output_type="np")
        assert (out.latents - ref.latents).abs().max() < 0.05 * ref.latents.abs().max()  # bfloat16's round-off


def test_a_unet_without_sample_size_takes_the_given_size(tiny_sd):
    """A UNet config with sample_size None (UNet2DConditionModel's default): the default size was read even where
    height and width were given (a TypeError from int(None)); without them it is one line saying to give them."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.register_to_config(sample_size=None)
    out = parallel_sample(pipe, "a handwritten digit four", num_inference_steps=2, guidance_scale=3.0, height=16,
                          width=24, tol1=0, tol2=0, output_type="np")
    with torch.no_grad():
        ref = pipe("a handwritten digit four", num_inference_steps=2, guidance_scale=3.0, latents=out.x_T.float(),
                   height=16, width=24, output_type="latent").images
    assert out.latents.shape == (1, 4, 8, 12) and (out.latents.float() - ref).abs().max() <= 1e-4 * ref.abs().max()
    with pytest.raises(ValueError, match="height and width must be given: pipe's UNet2DConditionModel config has no "
                                         "sample_size"):
        parallel_sample(pipe, "a handwritten digit four", num_inference_steps=2, height=12, output_type="np")


def test_sequential_cpu_offload_is_refused_naming_it(tiny_sd):
    """enable_sequential_cpu_offload leaves the weights on the meta device between calls: a TypeError inside."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.enable_sequential_cpu_offload(device="cpu")
    with pytest.raises(ValueError, match="enable_sequential_cpu_offload.* use enable_model_cpu_offload"):
        parallel_sample(pipe, "a handwritten digit four", num_inference_steps=2, output_type="np")


def test_a_pipeline_with_model_cpu_offload_samples_as_without(tiny_sd):
    """enable_model_cpu_offload: the states go where the pipeline's hooks run the network (here the CPU; on a GPU
    the weights rest on the CPU between calls, so the network's own device is not where it runs: not run here)."""
    from diffusers import StableDiffusionPipeline

    def load():
        return StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    ref = parallel_sample(load(), "a handwritten digit four", num_inference_steps=4, output_type="np")
    pipe = load()
    pipe.enable_model_cpu_offload(device="cpu")
    out = parallel_sample(pipe, "a handwritten digit four", num_inference_steps=4, output_type="np")
    assert torch.equal(out.latents, ref.latents) and np.array_equal(np.stack(out.images), np.stack(ref.images))


def test_the_first_calls_costs_are_not_charged_to_the_sampling_time(tiny_sd):
    """A device's first call of a size costs more (kernel loading, autotuning): parallel_sample warms the model up at
    the sizes it times, as the scripts do. Without it the first solve paid that cost and the sequential run after it
    did not: window 1, which is sequential sampling, reported 0.25x for a model whose first call cost 0.3 s."""
    import time
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    forward, first = pipe.unet.forward, [True]

    def slow_first_call(*args, **kwargs):  # 0.5 s the first time the model is called
        if first:
            first.pop()
            time.sleep(0.5)
        return forward(*args, **kwargs)

    pipe.unet.forward = slow_first_call
    out = parallel_sample(pipe, "a handwritten digit four", num_inference_steps=8, num_images=1, window_size=1,
                          compare_sequential=True, output_type="np")
    assert out.speed["sampling_seconds"] < 0.5 and out.speed["sequential_seconds"] < 0.5, out.speed


def test_guidance_and_steps_default_to_the_pipelines_own_call(tiny_sd, tmp_path):
    """guidance_scale and num_inference_steps left out are each pipeline's own __call__ defaults (SDXL guides at 5,
    SD3 at 7 with 28 steps): parallel_sample took 7.5 and 50 for every family but Flux, and an image that
    pipe(prompt) with the same noise does not make (SDXL 10 off, SD3 0.5 off on these tiny models)."""
    import diffusers
    from diffusers import DDIMScheduler
    from tests.tiny_models import build_tiny_sd3, build_tiny_sdxl
    sdxl = diffusers.StableDiffusionXLPipeline.from_pretrained(build_tiny_sdxl(str(tmp_path / "sdxl")))
    sdxl.scheduler = DDIMScheduler.from_config(sdxl.scheduler.config, clip_sample=False)  # as it is read
    sd3 = diffusers.StableDiffusion3Pipeline.from_pretrained(build_tiny_sd3(str(tmp_path / "sd3")),
                                                             text_encoder_3=None, tokenizer_3=None)
    sd = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    for pipe in (sdxl, sd3, sd):
        pipe.set_progress_bar_config(disable=True)
        # window 1 is sequential sampling: the default steps at tolerance 0 without a window of them
        out = parallel_sample(pipe, "a handwritten digit four", height=8, width=8, window_size=1, tol1=0, tol2=0,
                              output_type="np")
        with torch.no_grad():
            ref = pipe("a handwritten digit four", height=8, width=8, latents=out.x_T.float(),
                       output_type="latent").images
        assert (out.latents.float() - ref).abs().max() <= 1e-4 * ref.abs().max(), type(pipe).__name__


def test_a_sharding_that_is_not_one_is_refused_naming_it(tiny_sd):
    """sharding="..." (or any object but a paratAA.Sharding) failed after the prompt was encoded, in an
    AttributeError ('str' object has no attribute 'evaluate') naming no argument."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    for sharding in ("cpu", 2, object()):
        with pytest.raises(TypeError, match="sharding must be a paratAA.Sharding or None, got"):
            parallel_sample(pipe, "a handwritten digit four", num_inference_steps=4, sharding=sharding,
                            output_type="np")
    assert not calls


def test_max_steps_stopping_a_sample_early_is_said(tiny_sd):
    """The scripts say on the terminal that --max_steps stopped a sample before it converged; parallel_sample gave
    that image, not the sequential sampler's, without a word (out.results[b].converged alone told it)."""
    import warnings
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    with pytest.warns(UserWarning, match=r"max_steps 2 stopped 2 of 2 samples \(0, 1\) before they converged"):
        out = parallel_sample(pipe, "a handwritten digit four", num_inference_steps=8, num_images=2, batch_size=1,
                              window_size=2, max_steps=2, output_type="np")
    assert [c for r in out.results for c in r.converged] == [False, False]
    assert out.speed["unfinished"] == 2  # its speed-up is not one to the sequential image (the scripts say it too)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converged: nothing to say
        out = parallel_sample(pipe, "a handwritten digit four", num_inference_steps=4, max_steps=4, output_type="np")
    assert out.speed["unfinished"] == 0


def test_a_safety_checker_blacks_out_flagged_images_as_the_pipelines_own_call(tiny_sd):
    """StableDiffusionPipeline.from_pretrained loads SD v1.x with its safety checker: __call__ returns a flagged
    image black (nsfw_content_detected), parallel_sample returned it as sampled, without a word. A stand-in checker
    flags the second image of each batch it is given, as the real one zeroes what it flags."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor

    class FlagSecond(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
        device = property(lambda self: self.w.device)  # the pipeline reads its parts' devices
        dtype = property(lambda self: self.w.dtype)

        def forward(self, clip_input, images):
            assert clip_input.shape[0] == len(images)
            flags = [i % 2 == 1 for i in range(len(images))]
            for i in [i for i, f in enumerate(flags) if f]:
                images[i] = 0
            return images, flags

    parts = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None,
                                                    requires_safety_checker=False).components
    pipe = StableDiffusionPipeline(**{**parts, "safety_checker": FlagSecond(), "feature_extractor":
                                      CLIPImageProcessor()})
    pipe.set_progress_bar_config(disable=True)
    out = parallel_sample(pipe, "a handwritten digit four", num_images=2, num_inference_steps=3, guidance_scale=3.0,
                          tol1=0, tol2=0, output_type="np")
    with torch.no_grad():
        ref = pipe("a handwritten digit four", num_images_per_prompt=2, num_inference_steps=3, guidance_scale=3.0,
                   latents=out.x_T.float(), output_type="np")
    assert np.array_equal(np.stack(out.images), (ref.images * 255).round().astype(np.uint8))
    assert out.images[1].max() == 0 < out.images[0].max()
    assert out.nsfw_content_detected == ref.nsfw_content_detected == [False, True]
    pipe.feature_extractor = None  # its __call__ fails on it after sampling: refused before
    with pytest.raises(ValueError, match="pipe has a safety_checker but no feature_extractor"):
        parallel_sample(pipe, "a handwritten digit four", num_inference_steps=2, output_type="np")
    no_checker = parallel_sample(StableDiffusionPipeline(**parts), "a handwritten digit four", num_inference_steps=2,
                                 output_type="np")
    assert no_checker.nsfw_content_detected is None


def test_arguments_of_the_pipelines_own_call_are_refused_as_such(tiny_sd, tmp_path):
    """generator, latents, num_images_per_prompt, prompt_embeds, return_dict, guidance_rescale, ... (what a user
    passes to pipe(...)) reached **solver and were refused as "unknown solver parameters ... (see
    paratAA.SolverConfig)"; prompt=None with prompt_embeds was refused for the prompt alone. Each is named as an
    argument of the pipeline's __call__, with what parallel_sample takes instead, before the model is called."""
    from diffusers import DiTPipeline, StableDiffusionPipeline
    from tests.tiny_models import build_tiny_dit_pipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    dit = DiTPipeline.from_pretrained(build_tiny_dit_pipeline(str(tmp_path / "dit")))
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    dit.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    embeds = torch.zeros(1, 32, 32)
    cases = [(dict(generator=torch.Generator()), "generator .*: the noise comes from seed"),
             (dict(latents=torch.zeros(1, 4, 8, 8)), "latents .*: the initial noise comes from seed"),
             (dict(num_images_per_prompt=2), "num_images_per_prompt .*: give num_images"),
             (dict(prompt=None, prompt_embeds=embeds), "prompt_embeds .*: give the prompt as text"),
             (dict(negative_prompt_embeds=embeds), "negative_prompt_embeds .*: give negative_prompt as text"),
             (dict(return_dict=False), "return_dict .*: it returns a ParallelOutput"),
             (dict(callback_on_step_end=print), "callback_on_step_end .*: the solver's iterations"),
             (dict(guidance_rescale=0.7), "guidance_rescale .*: it samples what __call__ does with that argument "
                                          "left out"),
             (dict(cross_attention_kwargs={"scale": 0.5}), "cross_attention_kwargs .*"),
             (dict(clip_skip=1), "clip_skip .*"), (dict(timesteps=[999, 500]), "timesteps .*")]
    for kwargs, text in cases:
        args = dict(prompt="a handwritten digit four", num_inference_steps=4, output_type="np") | kwargs
        with pytest.raises(TypeError, match="^" + text.replace(" .*", " is an argument of StableDiffusionPipeline"
                                                                       r"\.__call__ that parallel_sample does not "
                                                                       "take")) as e:
            parallel_sample(pipe, **args)
        assert "\n" not in str(e.value)
    with pytest.raises(TypeError, match=r"^generator is an argument of DiTPipeline\.__call__"):
        parallel_sample(dit, class_labels=3, num_inference_steps=4, generator=torch.Generator())
    with pytest.raises(TypeError, match=r"unknown solver parameters \['prompt_embeds'\]"):  # not DiTPipeline's
        parallel_sample(dit, class_labels=3, num_inference_steps=4, prompt_embeds=embeds)
    # a mistyped solver parameter is still said as one
    with pytest.raises(TypeError, match=r"unknown solver parameters \['windowsize'\]"):
        parallel_sample(pipe, "a handwritten digit four", num_inference_steps=4, windowsize=4)
    assert not calls


def test_an_overflow_from_extreme_guidance_names_the_argument(tiny_sd):
    """guidance_scale=1e308 passes as a finite number, and the guided prediction overflows: the error named no
    argument (the scripts name --cfg_scale)."""
    from diffusers import StableDiffusionPipeline
    from paratAA import NonFiniteModelOutput
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    with pytest.raises(NonFiniteModelOutput, match=r"guidance_scale 1e\+308 is extreme"):
        parallel_sample(pipe, "a handwritten digit four", num_inference_steps=6, guidance_scale=1e308)
    pipe.unet.conv_out.bias.data[:] = float("nan")  # a model's own NaN at ordinary guidance: said as it is
    with pytest.raises(NonFiniteModelOutput) as e:
        parallel_sample(pipe, "a handwritten digit four", num_inference_steps=6, guidance_scale=3.0)
    assert "extreme" not in str(e.value)
