"""PixArt (diffusers' PixArtSigmaPipeline and PixArtAlphaPipeline folders) where it differs from SD's noise
prediction, for models/sd.py (the folder and pipeline checks, loading, prompt encoding), models/adapters.py
(PixArtDenoiser) and models/bundles.py (the size sampled, the decode):

    schedule    a DDPM-family scheduler (DPMSolverMultistep by default) read as DDIM, as SD's are
    network     a PixArtTransformer2DModel predicting the noise; with learned sigma (out_channels twice the latent's)
                the first half is the noise, as the pipelines take it
    prompts     one T5 encoder whose token embeddings come with their attention mask (the transformer's
                encoder_attention_mask: the padding up to max_sequence_length is not attended to); the negative
                prompt is always encoded under guidance ("" by default)
    size        use_resolution_binning, the pipelines' default: the latents are sampled at the aspect-ratio bin
                nearest the size asked for, and the decoded image resized and center-cropped back to it by the
                pipeline's image processor. The same is done here (the solver's state is the binned latent; the
                images come back at the size asked for), rather than refusing sizes outside the bins, so that a
                PixArt folder makes the image its pipeline makes at any size. A transformer whose sample_size has no
                bins (the pipeline raises "Invalid sample size") is refused
    conditions  PixArt-Alpha at sample_size 128 (1024 px) adds the (binned) resolution and aspect ratio as
                micro-conditions; Sigma, and Alpha at other sizes, give none (a transformer that needs them there
                fails inside the pipeline: refused)
    captions    __call__'s clean_caption (default True) needs bs4 and ftfy; without them the pipeline lowercases and
                strips the prompt instead. The prompt is encoded through the pipeline's own encode_prompt with
                clean_caption=True, so it does whichever the installed packages allow, as __call__ does
"""
ALPHA = "PixArtAlphaPipeline"
SIGMA = "PixArtSigmaPipeline"
FAMILIES = (SIGMA, ALPHA)
# the default max_sequence_length of each pipeline's T5 prompt (its __call__'s and encode_prompt's)
MAX_SEQUENCE_LENGTH = {ALPHA: 120, SIGMA: 300}
SIZE_CONDITIONED = 128  # the sample_size at which PixArtAlphaPipeline passes resolution and aspect ratio


def _bins(kind):
    """{transformer sample_size: aspect-ratio bins} of the pipeline `kind`, as its __call__ chooses them (Alpha has
    no 2048 bins)."""
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (ASPECT_RATIO_256_BIN, ASPECT_RATIO_512_BIN,
                                                                         ASPECT_RATIO_1024_BIN)
    bins = {128: ASPECT_RATIO_1024_BIN, 64: ASPECT_RATIO_512_BIN, 32: ASPECT_RATIO_256_BIN}
    if kind == SIGMA:
        from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN
        bins[256] = ASPECT_RATIO_2048_BIN
    return bins


def sample_size_problem(kind, sample_size):
    """Why the pipeline `kind` cannot bin sizes for a transformer of this sample_size (to follow "has"), or None."""
    sizes = sorted(_bins(kind))
    if sample_size not in sizes:
        return (f"sample_size {sample_size!r}: {kind} bins image sizes (use_resolution_binning) only for "
                f"sample_size {', '.join(map(str, sizes))} (it raises \"Invalid sample size\" otherwise)")
    return None


def binned_size(kind, sample_size, height, width):
    """(height, width) in pixels the pipeline samples for an image asked of height x width: the nearest aspect
    ratio's bin, through its image processor's own classify_height_width_bin."""
    from diffusers.image_processor import PixArtImageProcessor
    return PixArtImageProcessor.classify_height_width_bin(int(height), int(width), ratios=_bins(kind)[sample_size])


def resize_back(height, width):
    """images [N, 3, h, w] (decoded, in [-1, 1]) -> [N, 3, height, width], resized and center-cropped as the pipeline
    brings its binned image back to the size asked for (before it quantises)."""
    from diffusers.image_processor import PixArtImageProcessor
    return lambda images: PixArtImageProcessor.resize_and_crop_tensor(images, int(width), int(height))


def size_conditioned(kind, sample_size):
    """Whether the pipeline passes the image's resolution and aspect ratio to its transformer."""
    return kind == ALPHA and sample_size == SIZE_CONDITIONED


def transformer_problem(kind, config, latent_channels):
    """Why the pipeline `kind` cannot sample with a transformer of this config (a dict) and a VAE of latent_channels
    (to follow "has"), or None."""
    problem = sample_size_problem(kind, config.get("sample_size"))
    if problem:
        return problem
    out = config.get("out_channels") or config.get("in_channels")
    if out not in (latent_channels, 2 * latent_channels):  # the pipeline's scheduler step fails on another width
        return (f"a transformer with out_channels {out!r} for {latent_channels}-channel latents: the noise (and with "
                f"learned sigma its variance, {2 * latent_channels}) expected")
    scale = config.get("interpolation_scale")  # the positional embedding's grid divides by it (a TypeError inside)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
        return f"interpolation_scale {scale!r}: a positive number (or null, the model's default) is needed"
    needs = config.get("use_additional_conditions")
    if needs is None:  # PixArtTransformer2DModel's own default
        needs = config.get("sample_size") == SIZE_CONDITIONED
    if needs and not size_conditioned(kind, config.get("sample_size")):
        return (f"a transformer with use_additional_conditions at sample_size {config.get('sample_size')!r}: {kind} "
                f"gives it no resolution or aspect ratio there (its own call fails)")
    return None


def encode(pipe, kind, prompts, negative_prompt, device, size, max_sequence_length=None):
    """{"cond", "uncond": [P, L, E] T5 embeddings of the prompts and of the negative prompt ("" when None, the
    pipeline's default), "mask", "uncond_mask": [P, L] their attention masks} through the pipeline's own
    encode_prompt (kind: its family; L = max_sequence_length, default the pipeline's); for PixArt-Alpha at
    sample_size 128 also "resolution" [P, 2] and "aspect_ratio" [P, 1] of the sampled `size` (height, width;
    binned), as __call__ makes them (in the embeddings' dtype)."""
    import torch
    emb, mask, uncond, uncond_mask = pipe.encode_prompt(
        list(prompts), do_classifier_free_guidance=True, negative_prompt="" if negative_prompt is None else
        negative_prompt, num_images_per_prompt=1, device=device, clean_caption=True,  # as __call__ (module doc)
        max_sequence_length=max_sequence_length or MAX_SEQUENCE_LENGTH[kind])
    out = {"cond": emb, "uncond": uncond, "mask": mask, "uncond_mask": uncond_mask}
    if size_conditioned(kind, pipe.transformer.config.sample_size):
        height, width = size
        P = len(prompts)
        out["resolution"] = torch.tensor([height, width]).repeat(P, 1).to(dtype=emb.dtype, device=device)
        out["aspect_ratio"] = torch.tensor([float(height / width)]).repeat(P, 1).to(dtype=emb.dtype, device=device)
    return out
