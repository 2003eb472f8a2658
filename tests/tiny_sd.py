"""A tiny randomly initialised pipeline in the Stable Diffusion v1.5 folder layout, built by the tests."""
import json
import os
import tempfile

import torch


def build_tiny_sd(folder, seed=0, **scheduler_config):
    """scheduler_config: DDIMScheduler settings over SD v1.5's (e.g. prediction_type="v_prediction")."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=16)
    with torch.no_grad():  # the zero-initialised output conv would make eps = 0: randomise it
        unet.conv_out.weight.normal_(0, 0.05)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=16, sample_size=16)
    # transformers 5 ignores CLIPTokenizer(vocab_file=...): write the files and load the folder instead
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tok_dir:
        with open(os.path.join(tok_dir, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(tok_dir, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")  # no merges: every word is spelt out letter by letter
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=32)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=37, max_position_embeddings=32,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    scheduler = DDIMScheduler(**{**dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear", set_alpha_to_one=False, steps_offset=1,
                                        clip_sample=False, timestep_spacing="leading"), **scheduler_config})
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder
