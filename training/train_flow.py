"""Trains the embedded flow-matching text-to-image model in models/embedded/flow: a tiny Stable-Diffusion-3 layout
(SD3Transformer2DModel, two CLIP text encoders with projection + their tokenizers, no T5, the digits AutoencoderKL,
FlowMatchEulerDiscreteScheduler) on sklearn's 8x8 digits captioned "a handwritten digit <name>". Seeded, CPU only,
no downloads; needs the VAE that training.train_embedded writes to models/embedded/vae.

    python -m training.train_flow              (train, save the EMA pipeline, evaluate)
    python -m training.train_flow --eval-only

Rectified flow as SD3 trains it: z_s = (1 - s) z_0 + s n with n ~ N(0, I), the transformer gets timestep = 1000 s
and predicts v = n - z_0 (MSE). s is SD3's density: u ~ logit-normal(0, 1), s = shift u / (1 + (shift - 1) u), the
same shift the saved scheduler applies to its sampling sigmas. The pipeline samples from s = 1 down to 0 with
z <- z + (sigma_{i+1} - sigma_i) v(z, 1000 sigma_i).

Without text_encoder_3 the SD3 pipeline appends max_sequence_length (default 256) all-zero "T5" tokens to the 16
CLIP tokens. They are identical tokens in every layer (no position embedding on the text stream), so 256 of them
act exactly as one token whose attention logit is raised by log(256): training uses that one token and a key bias
(the `_KeyBiasJointAttnProcessor`), 33 tokens a sample instead of 288, and `check_compact_context` verifies it
against the pipeline's own 256-token input. The model is thus trained for the pipeline's default
max_sequence_length=256 (another value changes that weight and the predictions).
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # allow `python training/...py`
from models import digits  # noqa: E402
from training.loop import train as train_loop  # noqa: E402
from training.train_text2img import (  # noqa: E402
    CAPTIONS, MAX_LEN, check_tokenizer, encode_dataset, make_text_encoder, make_tokenizer, save)
from training.train_text2img import report as text2img_report  # noqa: E402

OUT_DIR = os.path.join(digits.EMBEDDED_DIR, "flow")
NUM_TRAIN_TIMESTEPS = 1000
T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length: the zero "T5" tokens it appends
DEFAULT_CFG = 4.0
DEFAULT_SHIFT = 3.0


class _KeyBiasJointAttnProcessor:
    """diffusers' JointAttnProcessor2_0 (SD3 joint attention) plus an additive attention-logit bias `key_bias`
    ([1, 1, 1, L_image + L_text], None: exactly the stock processor). Used in training only."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, key_bias=None):
        b, n_img = hidden_states.shape[:2]
        heads = attn.heads

        def split(x):  # [B, L, H * d] -> [B, H, L, d]
            return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        cq = split(attn.add_q_proj(encoder_hidden_states))
        ck = split(attn.add_k_proj(encoder_hidden_states))
        cv = split(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)  # [B, H, L, d]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, heads * q.shape[-1])  # [B, L, H * d]
        img, ctx = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            ctx = attn.to_add_out(ctx)
        img = attn.to_out[1](attn.to_out[0](img))
        return img, ctx


def set_processor(transformer, compact):
    from diffusers.models.attention_processor import JointAttnProcessor2_0
    transformer.set_attn_processor(_KeyBiasJointAttnProcessor() if compact else JointAttnProcessor2_0())


def make_text_encoder_with_projection(args, tok):
    """train_text2img's tiny CLIP text config, as the CLIPTextModelWithProjection SD3 needs (pooled projection)."""
    from transformers import CLIPTextModelWithProjection
    return CLIPTextModelWithProjection(make_text_encoder(args, tok).config)


def make_transformer(args):
    from diffusers import SD3Transformer2DModel
    text_dim = 2 * args.text_hidden  # both CLIP hidden states side by side == the zero T5 width (no padding)
    return SD3Transformer2DModel(
        sample_size=digits.EMBEDDED_IMAGE_SIZE // 2, patch_size=1, in_channels=4, out_channels=4,
        num_layers=args.layers, attention_head_dim=args.head_dim, num_attention_heads=args.heads,
        joint_attention_dim=text_dim, caption_projection_dim=args.heads * args.head_dim,
        pooled_projection_dim=2 * args.text_hidden,  # the two projection_dim (= text_hidden) pooled embeddings
        pos_embed_max_size=digits.EMBEDDED_IMAGE_SIZE // 2,  # 4x4 latent grid: no larger position table saved
    )


def make_scheduler(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)


def make_pipeline(transformer, text_encoder, text_encoder_2, tokenizer, vae, shift):
    from diffusers import StableDiffusion3Pipeline
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=make_scheduler(shift), vae=vae,
                                    text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                                    tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)


def load_vae(path):
    """The digits VAE with shift_factor 0.0 in its config (SD3 decodes latents / scaling_factor + shift_factor)."""
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(path).eval()
    # diffusers records the folder it loaded from and saves it with the pipeline: keep that path repository-relative
    # so that no machine's absolute path ends up in the committed config
    root = os.path.dirname(os.path.dirname(digits.EMBEDDED_DIR))
    vae.register_to_config(shift_factor=0.0, _name_or_path=os.path.relpath(os.path.abspath(path), root))
    return vae


def clip_context(text_encoders, ids):
    """As StableDiffusion3Pipeline.encode_prompt (clip_skip None): (penultimate hidden states of both encoders side
    by side [B, L, 2D], both pooled projections side by side [B, 2P]); the zero T5 part is added by the caller."""
    hidden, pooled = [], []
    for te in text_encoders:
        out = te(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out[0])
    return torch.cat(hidden, -1), torch.cat(pooled, -1)


def compact_t5(ctx):
    """ctx [B, L, D] + ONE zero T5 token (with key_bias() it counts as T5_TOKENS identical ones), and its length."""
    b, n_txt, d = ctx.shape
    ctx = torch.cat([ctx, ctx.new_zeros(b, 1, d)], 1)  # [B, L + 1, D]
    return ctx, n_txt + 1


def key_bias(n_img, n_ctx, n_tokens=T5_TOKENS):
    bias = torch.zeros(1, 1, 1, n_img + n_ctx)
    bias[..., -1] = math.log(n_tokens)
    return bias  # [1, 1, 1, L_img + L_ctx]


def sample_sigmas(batch, shift, g, mode="logit_normal"):
    """SD3's training density of s (= sigma, the noise fraction), shifted like the scheduler's sigmas."""
    u = torch.sigmoid(torch.randn(batch, generator=g)) if mode == "logit_normal" else torch.rand(batch, generator=g)
    return shift * u / (1 + (shift - 1) * u)  # [B]


@torch.no_grad()
def check_compact_context(pipe):
    """The compact 1-token + log(256)-bias input gives the pipeline's own 256-zero-token prediction."""
    tr = pipe.transformer
    emb, _, pooled, _ = pipe.encode_prompt(CAPTIONS[:3], None, None, do_classifier_free_guidance=False)  # [3, 272, D]
    ids = pipe.tokenizer(CAPTIONS[:3], padding="max_length", max_length=MAX_LEN, truncation=True,
                         return_tensors="pt").input_ids
    ctx, pooled2 = clip_context([pipe.text_encoder, pipe.text_encoder_2], ids)
    assert torch.equal(emb[:, :MAX_LEN], ctx) and torch.equal(pooled, pooled2) and emb.shape[1] == MAX_LEN + T5_TOKENS
    assert not emb[:, MAX_LEN:].any()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 4, 4, generator=g)
    t = torch.tensor([990.0, 500.0, 20.0])
    ref = tr(hidden_states=z, timestep=t, encoder_hidden_states=emb, pooled_projections=pooled).sample
    set_processor(tr, compact=True)
    cctx, n_ctx = compact_t5(ctx)
    out = tr(hidden_states=z, timestep=t, encoder_hidden_states=cctx, pooled_projections=pooled2,
             joint_attention_kwargs=dict(key_bias=key_bias(16, n_ctx))).sample
    set_processor(tr, compact=False)
    err = (out - ref).abs().max().item()
    print(f"compact T5 context vs the pipeline's {T5_TOKENS} zero tokens: max abs diff {err:.2e}")
    assert err < 1e-4, err
    return err


@torch.no_grad()
def evaluate_quality(pipe_dir, n_per_class=10, steps=50, cfg=DEFAULT_CFG, seed=0, clf=None, verbose=True):
    """Fraction of the pipeline's own samples (StableDiffusion3Pipeline.__call__, `steps` Euler steps) that the
    digit classifier assigns to the prompted digit. pipe_dir may also be an in-memory pipeline."""
    pipe = load_pipeline(pipe_dir) if isinstance(pipe_dir, str) else pipe_dir
    pipe.set_progress_bar_config(disable=True)
    clf = clf if clf is not None else digits.train_digit_classifier(seed=0)
    labels = torch.arange(10).repeat_interleave(n_per_class)  # [10 * n_per_class]
    out = pipe(prompt=[CAPTIONS[k] for k in labels], num_inference_steps=steps, guidance_scale=cfg,
               generator=torch.Generator().manual_seed(seed), output_type="np").images  # [N, 8, 8, 3] in [0, 1]
    imgs = torch.from_numpy(np.ascontiguousarray(out)).permute(0, 3, 1, 2) * 2 - 1  # [N, 3, 8, 8] in [-1, 1]
    pred = digits.classify_images(clf, imgs)
    acc = (pred == labels).float().mean().item()
    per_class = [(pred[labels == k] == k).float().mean().item() for k in range(10)]
    if verbose:
        print(f"  Euler-{steps} cfg {cfg}: agreement {acc:.3f}  per class "
              + " ".join(f"{a:.1f}" for a in per_class), flush=True)
    return dict(agreement=acc, per_class=per_class, pred=pred)


def train(args, vae, tok, clf):
    torch.manual_seed(args.seed)
    images, labels = digits.load_digit_images()
    lat_mean, lat_std = encode_dataset(vae, images)
    scale = vae.config.scaling_factor
    te1 = make_text_encoder_with_projection(args, tok).train()
    te2 = make_text_encoder_with_projection(args, tok).train()
    transformer = make_transformer(args).train()
    set_processor(transformer, compact=True)
    model = torch.nn.ModuleDict(dict(transformer=transformer, text_encoder=te1, text_encoder_2=te2))
    print(f"transformer params: {sum(p.numel() for p in transformer.parameters()):,}, text encoder params: "
          f"{sum(p.numel() for p in te1.parameters()):,} x 2", flush=True)
    # caption ids as the pipeline pads them; row 10 is the empty prompt used for guidance dropout
    ids = tok(CAPTIONS + [""], padding="max_length", max_length=MAX_LEN, truncation=True,
              return_tensors="pt").input_ids  # [11, L]
    n_img = lat_mean.shape[-1] * lat_mean.shape[-2]
    bias = key_bias(n_img, MAX_LEN + 1)
    g = torch.Generator().manual_seed(args.seed + 1)
    t0 = time.time()

    def batch_loss(step):
        idx = torch.randint(0, len(lat_mean), (args.batch,), generator=g)
        z0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)) * scale  # [B, 4, 4, 4]
        noise = torch.randn(z0.shape, generator=g)
        s = sample_sigmas(args.batch, args.shift, g, args.t_sampling)  # [B]
        zs = (1 - s[:, None, None, None]) * z0 + s[:, None, None, None] * noise
        drop = torch.rand(args.batch, generator=g) < args.uncond_prob
        cap = torch.where(drop, torch.full_like(labels[idx], 10), labels[idx])  # [B]
        ctx, pooled = clip_context([model["text_encoder"], model["text_encoder_2"]], ids[cap])
        ctx, _ = compact_t5(ctx)  # [B, L + 1, 2D]
        v = transformer(hidden_states=zs, timestep=s * NUM_TRAIN_TIMESTEPS, encoder_hidden_states=ctx,
                        pooled_projections=pooled, joint_attention_kwargs=dict(key_bias=bias)).sample
        return {"loss": F.mse_loss(v, noise - z0)}

    def evaluate(step, ema):
        if args.eval_every and step > 0 and step % args.eval_every == 0:
            pipe = make_pipeline(ema["transformer"], ema["text_encoder"], ema["text_encoder_2"], tok, vae, args.shift)
            evaluate_quality(pipe, n_per_class=5, cfg=args.cfg, seed=args.seed, clf=clf)

    ema = train_loop(model, list(model.parameters()), batch_loss, args.steps, args.lr, warmup=100, name="flow",
                     log_every=200, clip=1.0, ema_decay=args.ema, on_step=evaluate)
    set_processor(ema["transformer"], compact=False)  # the stock processor in the saved pipeline
    minutes = (time.time() - t0) / 60
    print(f"training done in {minutes:.1f} min")
    return ema, minutes


def load_pipeline(path):
    """The saved pipeline. diffusers 0.42 only treats image_encoder/feature_extractor as optional, so the null T5
    entries of model_index.json must be passed as None explicitly (its documented way to drop T5)."""
    from diffusers import StableDiffusion3Pipeline
    return StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)


def check_saved(out_dir):
    """model_index.json has no T5; the folder loads with the hub offline."""
    with open(os.path.join(out_dir, "model_index.json")) as f:
        index = json.load(f)
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None], index
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        pipe = load_pipeline(out_dir)
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE")
        else:
            os.environ["HF_HUB_OFFLINE"] = old
    assert pipe.text_encoder_3 is None and pipe.vae.config.shift_factor == 0.0
    assert pipe.scheduler.config.shift != 1.0
    print(f"  {out_dir} loads offline: scheduler shift {pipe.scheduler.config.shift}, "
          f"vae shift_factor {pipe.vae.config.shift_factor}")
    return pipe


def report(pipe_dir, clf, cfg, seed):
    return text2img_report(pipe_dir, clf, cfg, seed, evaluate=evaluate_quality, sampler="euler")


def main(args):
    torch.set_num_threads(args.threads)
    clf = digits.train_digit_classifier(seed=0)
    if args.eval_only:
        pipe = check_saved(args.out)
        check_compact_context(pipe)
        for cfg in args.eval_cfgs or [args.cfg]:
            report(pipe, clf, cfg, args.seed)
        return
    tok = make_tokenizer()
    check_tokenizer(tok)
    vae = load_vae(args.vae)
    print(f"VAE from {args.vae}: scaling_factor {vae.config.scaling_factor:.4f}, shift_factor 0.0")
    ema, minutes = train(args, vae, tok, clf)
    pipe = make_pipeline(ema["transformer"], ema["text_encoder"], ema["text_encoder_2"], tok, vae, args.shift)
    check_compact_context(pipe)
    res = report(pipe, clf, args.cfg, args.seed)
    meta = dict(seed=args.seed, threads=args.threads, steps=args.steps, batch=args.batch, lr=args.lr, ema=args.ema,
                uncond_prob=args.uncond_prob, t_sampling=args.t_sampling, shift=args.shift, layers=args.layers,
                heads=args.heads, head_dim=args.head_dim, text_hidden=args.text_hidden, text_layers=args.text_layers,
                text_heads=args.text_heads, t5_tokens=T5_TOKENS, vae=os.path.relpath(args.vae, digits.EMBEDDED_DIR),
                train_minutes=round(minutes, 1), default_cfg=args.cfg, quality=res,
                objective="rectified flow: z_s = (1 - s) z_0 + s n, timestep = 1000 s, target v = n - z_0")
    save(pipe, meta, args.out)
    check_saved(args.out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)  # 2 oversubscribes a shared 2-core CPU: 3-10x slower
    parser.add_argument("--vae", default=digits.VAE_DIR)
    parser.add_argument("--out", default=OUT_DIR)
    parser.add_argument("--text-hidden", type=int, default=32)
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--text-heads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--uncond-prob", type=float, default=0.1)
    parser.add_argument("--shift", type=float, default=DEFAULT_SHIFT)
    parser.add_argument("--t-sampling", choices=["logit_normal", "uniform"], default="logit_normal")
    parser.add_argument("--cfg", type=float, default=DEFAULT_CFG)
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--eval-only", action="store_true")
    parser.add_argument("--eval-cfgs", type=float, nargs="*")
    main(parser.parse_args())
