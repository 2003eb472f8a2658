"""Trains the embedded text-to-image model in models/embedded/text2img: a tiny Stable-Diffusion-v1.5 layout (CLIP
text encoder + tokenizer, UNet2DConditionModel, the digits AutoencoderKL, DDIM scheduler) on sklearn's 8x8 digits
captioned "a handwritten digit <name>". Seeded, CPU only, no downloads; needs the VAE that
training.train_embedded writes to models/embedded/vae.

    python -m training.train_text2img              (train, save the EMA pipeline, evaluate)
    python -m training.train_text2img --eval-only
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # allow `python training/...py`
from models import digits  # noqa: E402
from training.loop import noisy_latents, train as train_loop  # noqa: E402

OUT_DIR = os.path.join(digits.EMBEDDED_DIR, "text2img")
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTIONS = [f"a handwritten digit {n}" for n in NAMES]
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LEN = 16  # tokenizer.model_max_length == text encoder positions
# Stable Diffusion v1.5's training schedule and its scheduler config
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
DDIM_CONFIG = dict(SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                   timestep_spacing="leading", prediction_type="epsilon")
DEFAULT_CFG = 5.0


def tokenizer_vocab():
    """(vocab, merges) of a byte-level BPE whose merges assemble every caption word into one token.
    Every single letter/digit is in the vocabulary too, so unknown words fall back to characters."""
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    vocab = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []
    for word in ["a", "handwritten", "digit"] + NAMES:
        # left-to-right chain: h+a, ha+n, han+d, ... last piece carries the end-of-word suffix
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        cur = pieces[0]
        for p in pieces[1:]:
            if (cur, p) not in merges:
                merges.append((cur, p))
            cur = cur + p
            vocab.setdefault(cur, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def make_tokenizer():
    from transformers import CLIPTokenizer
    vocab, merges = tokenizer_vocab()
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LEN)
    for cap in CAPTIONS:
        ids = tok(cap).input_ids
        # bos + one token per word + eos: the chained merges must not collide across words
        assert len(ids) == len(cap.split()) + 2, (cap, tok.convert_ids_to_tokens(ids))
    return tok


def make_text_encoder(args, tok):
    from transformers import CLIPTextConfig, CLIPTextModel
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=args.text_hidden, intermediate_size=2 * args.text_hidden,
                         num_hidden_layers=args.text_layers, num_attention_heads=args.text_heads,
                         max_position_embeddings=MAX_LEN, projection_dim=args.text_hidden,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return CLIPTextModel(cfg)


def make_unet(args):
    from diffusers import UNet2DConditionModel
    # two levels: 4x4 -> 2x2; cross-attention in the 4x4 level and the mid block
    return UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=tuple(args.unet_channels), layers_per_block=1, cross_attention_dim=args.text_hidden,
        attention_head_dim=args.unet_heads, norm_num_groups=args.norm_groups,
    )


def make_pipeline(unet, text_encoder, tokenizer, vae):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**DDIM_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


@torch.no_grad()
def ddim_sample(pipe, prompts, steps=50, cfg=DEFAULT_CFG, seed=0, negative_prompt=None):
    """Plain sequential DDIM (eta 0) with classifier-free guidance; decoded images [N, 3, 8, 8] in [-1, 1]."""
    from diffusers import DDIMScheduler
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt)  # [N, L, D] each
    emb = torch.cat([uncond, cond])  # [2N, L, D]
    n, c, s = len(prompts), pipe.unet.config.in_channels, pipe.unet.config.sample_size
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, s, s, generator=g) * sched.init_noise_sigma  # [N, 4, 4, 4]
    for t in sched.timesteps:
        eps_u, eps_c = pipe.unet(torch.cat([z, z]), t, encoder_hidden_states=emb).sample.chunk(2)  # [N, 4, 4, 4] each
        z = sched.step(eps_u + cfg * (eps_c - eps_u), t, z).prev_sample
    vae = pipe.vae
    return vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1)  # [N, 3, 8, 8]


@torch.no_grad()
def evaluate_quality(pipe_dir, n_per_class=10, steps=50, cfg=DEFAULT_CFG, seed=0, clf=None, verbose=True):
    """Fraction of DDIM-`steps` samples that the digit classifier assigns to the prompted digit.
    pipe_dir may also be an in-memory StableDiffusionPipeline."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir) if isinstance(pipe_dir, str) else pipe_dir
    clf = clf if clf is not None else digits.train_digit_classifier(seed=0)
    labels = torch.arange(10).repeat_interleave(n_per_class)  # [10 * n_per_class]
    imgs = ddim_sample(pipe, [CAPTIONS[k] for k in labels], steps, cfg, seed)
    pred = digits.classify_images(clf, imgs)
    acc = (pred == labels).float().mean().item()
    per_class = [(pred[labels == k] == k).float().mean().item() for k in range(10)]
    if verbose:
        print(f"  DDIM-{steps} cfg {cfg}: agreement {acc:.3f}  per class "
              + " ".join(f"{a:.1f}" for a in per_class), flush=True)
    return dict(agreement=acc, per_class=per_class, pred=pred)


def encode_dataset(vae, images):
    vae.eval()
    with torch.no_grad():
        post = vae.encode(images).latent_dist
    return post.mean, post.std  # [N, 4, 4, 4] each


def train(args, vae, tok, clf):
    from diffusers import DDPMScheduler
    torch.manual_seed(args.seed)
    images, labels = digits.load_digit_images()
    lat_mean, lat_std = encode_dataset(vae, images)
    scale = vae.config.scaling_factor
    text_encoder = make_text_encoder(args, tok).train()
    unet = make_unet(args).train()
    model = torch.nn.ModuleDict(dict(unet=unet, text_encoder=text_encoder))
    print(f"UNet params: {sum(p.numel() for p in unet.parameters()):,}, "
          f"text encoder params: {sum(p.numel() for p in text_encoder.parameters()):,}")
    # caption ids as the pipeline pads them; row 10 is the empty prompt used for guidance dropout
    ids = tok(CAPTIONS + [""], padding="max_length", max_length=MAX_LEN, truncation=True,
              return_tensors="pt").input_ids  # [11, L]
    sched = DDPMScheduler(**SCHEDULE)
    g = torch.Generator().manual_seed(args.seed + 1)
    t0 = time.time()

    def batch_loss(step):
        idx, zt, t, noise = noisy_latents(lat_mean, lat_std, scale, args.batch, sched, g)
        drop = torch.rand(args.batch, generator=g) < args.uncond_prob
        cap = torch.where(drop, torch.full_like(labels[idx], 10), labels[idx])  # [B]
        emb = text_encoder(ids[cap])[0]  # [B, L, D]
        eps = unet(zt, t, encoder_hidden_states=emb).sample  # [B, 4, 4, 4]
        return {"loss": F.mse_loss(eps, noise)}

    def evaluate(step, ema):
        if args.eval_every and step > 0 and step % args.eval_every == 0:
            pipe = make_pipeline(ema["unet"], ema["text_encoder"], tok, vae)
            evaluate_quality(pipe, n_per_class=5, cfg=args.cfg, seed=args.seed, clf=clf)

    ema = train_loop(model, list(model.parameters()), batch_loss, args.steps, args.lr, warmup=100, name="t2i",
                     log_every=200, clip=1.0, ema_decay=args.ema, on_step=evaluate)
    minutes = (time.time() - t0) / 60
    print(f"training done in {minutes:.1f} min")
    return ema, minutes


def check_tokenizer(tok):
    """Save/load round trip gives the same caption ids; unknown words and symbols do not crash."""
    from transformers import CLIPTokenizer
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        tok2 = CLIPTokenizer.from_pretrained(d)
    for text in CAPTIONS + ["", "A Handwritten DIGIT 3!", "blurry, low quality"]:
        a = tok(text, padding="max_length", max_length=MAX_LEN, truncation=True).input_ids
        b = tok2(text, padding="max_length", max_length=MAX_LEN, truncation=True).input_ids
        assert a == b and len(a) == MAX_LEN, (text, a, b)
    assert tok2.model_max_length == MAX_LEN
    print(f"tokenizer: {len(tok)} tokens; '{CAPTIONS[3]}' -> {tok(CAPTIONS[3]).input_ids}")


def save(pipe, meta, out_dir):
    pipe.save_pretrained(out_dir, safe_serialization=True)
    with open(os.path.join(out_dir, "training.json"), "w") as f:
        json.dump(meta, f, indent=2)
    total = 0
    for root, _, files in os.walk(out_dir):
        for name in sorted(files):
            size = os.path.getsize(os.path.join(root, name))
            total += size
            print(f"  {os.path.relpath(os.path.join(root, name), out_dir)}: {size / 1e6:.3f} MB")
    print(f"  total {total / 1e6:.2f} MB")


def report(pipe_dir, clf, cfg, seed, evaluate=None, sampler="ddim"):
    """Agreement at 50 and 100 steps of the pipeline's own sampler (evaluate: its evaluate_quality)."""
    evaluate = evaluate or evaluate_quality
    r50 = evaluate(pipe_dir, steps=50, cfg=cfg, seed=seed, clf=clf)
    r100 = evaluate(pipe_dir, steps=100, cfg=cfg, seed=seed, clf=clf)
    same = (r50["pred"] == r100["pred"]).float().mean().item()
    print(f"  {sampler.upper()}-50 vs {sampler.upper()}-100 (same noise) predicted-label agreement {same:.3f}")
    return {f"{sampler}50": r50["agreement"], f"{sampler}50_per_class": r50["per_class"],
            f"{sampler}100": r100["agreement"], f"{sampler}100_per_class": r100["per_class"],
            f"{sampler}50_vs_100_same_label": same, "cfg": cfg}


def main(args):
    torch.set_num_threads(args.threads)
    from diffusers import AutoencoderKL
    clf = digits.train_digit_classifier(seed=0)
    if args.eval_only:
        for cfg in args.eval_cfgs or [args.cfg]:
            report(args.out, clf, cfg, args.seed)
        return
    tok = make_tokenizer()
    check_tokenizer(tok)
    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    print(f"VAE from {args.vae}: scaling_factor {vae.config.scaling_factor:.4f}")
    ema, minutes = train(args, vae, tok, clf)
    pipe = make_pipeline(ema["unet"], ema["text_encoder"], tok, vae)
    res = report(pipe, clf, args.cfg, args.seed)
    meta = dict(seed=args.seed, threads=args.threads, steps=args.steps, batch=args.batch, lr=args.lr, ema=args.ema,
                uncond_prob=args.uncond_prob, unet_channels=args.unet_channels, text_hidden=args.text_hidden,
                text_layers=args.text_layers, vae=os.path.relpath(args.vae, digits.EMBEDDED_DIR),
                train_minutes=round(minutes, 1), default_cfg=args.cfg, quality=res, schedule=SCHEDULE)
    save(pipe, meta, args.out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vae", default=digits.VAE_DIR)
    parser.add_argument("--out", default=OUT_DIR)
    parser.add_argument("--text-hidden", type=int, default=64)
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--text-heads", type=int, default=4)
    parser.add_argument("--unet-channels", type=int, nargs=2, default=[64, 64])
    parser.add_argument("--unet-heads", type=int, default=4)
    parser.add_argument("--norm-groups", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--uncond-prob", type=float, default=0.1)
    parser.add_argument("--cfg", type=float, default=DEFAULT_CFG)
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--eval-only", action="store_true")
    parser.add_argument("--eval-cfgs", type=float, nargs="*")
    main(parser.parse_args())
