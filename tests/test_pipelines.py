"""parallel_sample on a diffusers pipeline loaded in Python: the notebook entry point."""
import numpy as np
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


def test_defaults_batches_and_auto_window(tiny_sd):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    together = parallel_sample(pipe, ["a handwritten digit one", "a handwritten digit two"], num_inference_steps=16,
                               num_images=3, output_type="np", compare_sequential=True)
    apart = parallel_sample(pipe, ["a handwritten digit one", "a handwritten digit two"], num_inference_steps=16,
                            num_images=3, output_type="np", batch_size=1)
    assert torch.allclose(together.latents, apart.latents, atol=1e-5)  # batching changes nothing
    assert together.speed["sequential_seconds"] > 0 and together.images[0].dtype == np.uint8
    auto = parallel_sample(pipe, "a handwritten digit one", num_inference_steps=16, window_size="auto",
                           output_type="np")
    assert isinstance(auto.config.window_size, int) and 1 <= auto.config.window_size <= 16


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
