"""Tiny randomly initialised pipelines in the real diffusers folder layouts, built by the tests (no downloads):
Stable Diffusion 1.x/2.x, SDXL, SD3 (flow matching), Flux and diffusers' DiT."""
import json
import os
import tempfile

import torch


def _tokenizer(max_length=32):
    """A CLIP tokenizer whose words are spelt out letter by letter (transformers 5 ignores
    CLIPTokenizer(vocab_file=...): the files are written and the folder loaded)."""
    from transformers import CLIPTokenizer
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tok_dir:
        with open(os.path.join(tok_dir, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(tok_dir, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")  # no merges
        return CLIPTokenizer.from_pretrained(tok_dir, model_max_length=max_length)


def _text_config(tokenizer, hidden=32, projection=None):
    from transformers import CLIPTextConfig
    extra = {"projection_dim": projection} if projection else {}
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=37, max_position_embeddings=tokenizer.model_max_length, bos_token_id=0,
                          eos_token_id=1, pad_token_id=1, **extra)


def _vae(shift_factor=None, block_out_channels=(16, 32)):
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=block_out_channels, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
                         up_block_types=("UpDecoderBlock2D",) * len(block_out_channels), layers_per_block=1,
                         norm_num_groups=16, sample_size=16, shift_factor=shift_factor)


def _sd_scheduler(**overrides):
    from diffusers import DDIMScheduler
    return DDIMScheduler(**{**dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", set_alpha_to_one=False, steps_offset=1,
                                   clip_sample=False, timestep_spacing="leading"), **overrides})


def _randomise(module, seed):
    """Zero-initialised output layers would make the prediction 0: give every weight a small random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def build_tiny_sd(folder, seed=0, unet_out_channels=4, **scheduler_config):
    """SD 1.x/2.x layout; scheduler_config: DDIMScheduler settings over SD v1.5's (e.g. prediction_type=
    "v_prediction", timestep_spacing="trailing" for an SD 2.x 768 configuration). unet_out_channels 8: a UNet with a
    learned variance after the noise."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=unet_out_channels, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=16)
    with torch.no_grad():  # the zero-initialised output conv would make eps = 0: randomise it
        unet.conv_out.weight.normal_(0, 0.05)
    tokenizer = _tokenizer()
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=CLIPTextModel(_text_config(tokenizer)), tokenizer=tokenizer,
                                   unet=unet, scheduler=_sd_scheduler(**scheduler_config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def build_tiny_sdxl(folder, seed=0):
    """SDXL layout: two text encoders (the second with a projection: the pooled embedding), added time ids, SDXL's
    Euler scheduler config (read as DDIM by the scripts)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 32,
                                cross_attention_dim=64, norm_num_groups=16)
    _randomise(unet, seed)
    tokenizer = _tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config(tokenizer)), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer, projection=32)), tokenizer_2=_tokenizer(),
        unet=unet, scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                                    beta_schedule="scaled_linear", timestep_spacing="leading"))
    pipe.save_pretrained(folder)
    return folder


def build_tiny_sd3(folder, seed=0, shift=3.0):
    """SD3 layout: an MMDiT predicting the flow velocity, two CLIP text encoders with projections (no T5: the
    pipeline then uses zeros for its part), FlowMatchEulerDiscreteScheduler with a timestep shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,
                                        pooled_projection_dim=64, out_channels=4)
    _randomise(transformer, seed)
    tokenizer = _tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=_vae(shift_factor=0.1),
        text_encoder=CLIPTextModelWithProjection(_text_config(tokenizer, projection=32)), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer, projection=32)), tokenizer_2=_tokenizer(),
        text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(folder)
    with open(os.path.join(folder, "model_index.json")) as f:  # absent parts are written as null, as on the hub
        index = json.load(f)
    for part in ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor"):
        index.setdefault(part, [None, None])
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=1)
    return folder


def _t5_tokenizer(max_length=512):
    """A T5 tokenizer built offline (no sentencepiece): a Unigram model over the letters and the word-start mark, so
    words are spelt out letter by letter, with T5's <pad> 0, </s> 1 (appended), <unk> 2."""
    from transformers import T5TokenizerFast
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(ch, -3.0) for ch in "abcdefghijklmnopqrstuvwxyz"]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


def build_tiny_flux(folder, seed=0, guidance_embeds=True, dynamic_shifting=True):
    """FluxPipeline layout: a FluxTransformer2DModel on 2x2-packed latents (in_channels 4 x the VAE's 4),
    guidance-distilled as FLUX.1-dev (guidance_embeds) or not as FLUX.1-schnell; a CLIP text encoder (its pooled
    embedding) and a T5 encoder (the token embeddings); a VAE with a shift_factor; FLUX.1-dev's scheduler config
    (dynamic shifting) or FLUX.1-schnell's (use_dynamic_shifting false, shift 1)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(2, 2, 4))
    _randomise(transformer, seed)
    tokenizer, t5_tokenizer = _tokenizer(), _t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                 num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0))
    scheduler = FlowMatchEulerDiscreteScheduler(
        **(dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                max_image_seq_len=4096) if dynamic_shifting else dict(shift=1.0, use_dynamic_shifting=False)))
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=_vae(shift_factor=0.1),
                        text_encoder=CLIPTextModel(_text_config(tokenizer)), tokenizer=tokenizer,
                        text_encoder_2=t5, tokenizer_2=t5_tokenizer)
    pipe.save_pretrained(folder)
    return folder


def build_tiny_dit_pipeline(folder, seed=0, **scheduler_config):
    """diffusers' DiT layout (DiTPipeline): a DiTTransformer2DModel with 1000 classes (the pipeline's null class is
    1000) and a learned-sigma output, a VAE, a DDIM scheduler."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                        num_attention_heads=2, in_channels=4, out_channels=8,
                                        num_embeds_ada_norm=1000)
    _randomise(transformer, seed)
    pipe = DiTPipeline(transformer=transformer, vae=_vae(), scheduler=DDIMScheduler(clip_sample=False,
                                                                                   **scheduler_config))
    pipe.save_pretrained(folder)
    return folder


def build_tiny_pixart(folder, variant="sigma", seed=0, sample_size=32, patch_size=2):
    """PixArtSigmaPipeline or PixArtAlphaPipeline layout (variant "sigma" | "alpha"): a one-layer
    PixArtTransformer2DModel with learned sigma (out_channels twice the latent's), a T5 encoder (the offline
    tokenizer of build_tiny_flux), a VAE of factor 8 (the aspect-ratio bins are PixArt's pixel sizes: sample_size
    32 is the 256 px bins, 128 the 1024 px ones, where PixArt-Alpha adds its resolution micro-conditions; a larger
    patch_size keeps those tokens few), PixArt's DPMSolverMultistepScheduler config (read as DDIM)."""
    from diffusers import (DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline,
                           PixArtTransformer2DModel)
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(seed)
    # 3 heads: PixArt-Alpha's resolution and aspect-ratio embeddings take a third of the width each
    transformer = PixArtTransformer2DModel(num_attention_heads=3, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=1, sample_size=sample_size, patch_size=patch_size,
                                           cross_attention_dim=24, caption_channels=32)
    _randomise(transformer, seed)
    tokenizer = _t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0))
    scheduler = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                            prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2)
    cls = PixArtSigmaPipeline if variant == "sigma" else PixArtAlphaPipeline
    pipe = cls(tokenizer=tokenizer, text_encoder=t5, vae=_vae(block_out_channels=(16, 16, 16, 16)),
               transformer=transformer, scheduler=scheduler)
    pipe.save_pretrained(folder)
    return folder
