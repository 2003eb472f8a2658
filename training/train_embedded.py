"""Trains the embedded CPU model in models/embedded: a tiny AutoencoderKL on sklearn's 8x8 digits (8x8x3 -> 4x4x4
latents), then a class-conditional DiT-Digits on the scaled latents. Seeded, CPU only, no downloads.

    python -m training.train_embedded            (train both, write models/embedded)
    python -m training.train_embedded --eval-only
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # allow `python training/...py`
from models import digits  # noqa: E402
from models.dit import DiT_models  # noqa: E402
from training.loop import noisy_latents, train  # noqa: E402

# Training/sampling schedule shared with the rest of the repo (DiT's linear betas).
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def make_vae(args):
    from diffusers import AutoencoderKL
    # two blocks -> one downsample: 8x8 images map to 4x4 latents
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=tuple(args.vae_channels), layers_per_block=1, latent_channels=4,
        norm_num_groups=16, sample_size=8,
    )


def train_vae(args, images, labels, clf):
    torch.manual_seed(args.seed)
    vae = make_vae(args).train()
    print(f"VAE params: {sum(p.numel() for p in vae.parameters()):,}")
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()

    def batch_loss(step):
        x = images[torch.randint(0, len(images), (args.vae_batch,), generator=g)]  # [B, 3, 8, 8]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample  # [B, 3, 8, 8]
        # per-image sums so the KL weight is relative to the whole image's error
        rec_loss = (rec - x).pow(2).flatten(1).sum(1).mean()
        kl = post.kl().mean()
        return {"loss": rec_loss + args.kl_weight * kl, "rec(sse/img)": rec_loss.detach(), "kl": kl.detach()}

    train(vae, list(vae.parameters()), batch_loss, args.vae_steps, args.vae_lr, warmup=50, name="vae", log_every=250)
    vae.eval()
    with torch.no_grad():
        post = vae.encode(images).latent_dist
        mean, std = post.mean, post.std  # [N, 4, 4, 4]
        rec = vae.decode(mean).sample.clamp(-1, 1)
    scale = 1.0 / mean.std().item()
    # stored in the config so loaders and samplers scale latents to unit std
    vae.register_to_config(scaling_factor=scale)
    acc = (digits.classify_images(clf, rec) == labels).float().mean().item()
    print(f"VAE done in {time.time() - t0:.0f}s: recon mse {F.mse_loss(rec, images).item():.4f}, "
          f"recon agreement {acc:.4f}, latent std {mean.std().item():.3f} mean {mean.mean().item():.3f} "
          f"-> scaling_factor {scale:.4f}, posterior std (scaled) {std.mean().item() * scale:.4f}")
    return vae, mean, std, acc


def dit_kwargs(args):
    return dict(input_size=4, patch_size=1, in_channels=4, hidden_size=args.hidden, depth=args.depth,
                num_heads=args.heads, mlp_ratio=4.0, num_classes=10, class_dropout_prob=0.1, learn_sigma=True)


def train_dit(args, lat_mean, lat_std, scale, labels, vae, clf):
    from diffusers import DDPMScheduler
    torch.manual_seed(args.seed)
    model = DiT_models["DiT-Digits"](**dit_kwargs(args)).train()
    print(f"DiT params: {sum(p.numel() for p in model.parameters()):,}")
    sched = DDPMScheduler(**SCHEDULE)
    params = [p for p in model.parameters() if p.requires_grad]  # pos_embed stays fixed
    g = torch.Generator().manual_seed(args.seed + 1)
    t0 = time.time()

    def batch_loss(step):
        idx, zt, t, noise = noisy_latents(lat_mean, lat_std, scale, args.batch, sched, g)
        out = model(zt, t, labels[idx])  # [B, 8, 4, 4]; dropout to the null class happens inside
        return {"loss": F.mse_loss(out[:, :4], noise)}  # variance half unused

    def evaluate(step, ema):
        if args.eval_every and step > 0 and step % args.eval_every == 0:
            evaluate_quality(ema, vae, clf, n_per_class=5, seed=args.seed, verbose=False)

    ema = train(model, params, batch_loss, args.steps, args.lr, warmup=100, name="dit", log_every=200, clip=1.0,
                ema_decay=args.ema, on_step=evaluate)
    print(f"DiT done in {time.time() - t0:.0f}s")
    return model, ema


@torch.no_grad()
def ddim_sample(model, vae, labels, steps=50, cfg_scale=4.0, guide_all=False, seed=0):
    """Sequential DDIM (eta 0) with classifier-free guidance; returns decoded images [N, 3, 8, 8].
    guide_all=False uses forward_with_cfg (reference: first 3 channels guided);
    guide_all=True guides every latent channel."""
    from diffusers import DDIMScheduler
    sched = DDIMScheduler(**SCHEDULE, set_alpha_to_one=True, timestep_spacing="linspace", clip_sample=False)
    sched.set_timesteps(steps)
    dev = next(model.parameters()).device
    c = model.in_channels
    n = len(labels)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, model.x_embedder.img_size[0], model.x_embedder.img_size[1], generator=g).to(dev)
    y = torch.cat([labels.to(dev), torch.full_like(labels.to(dev), model.num_classes)])  # [2N] cond; null
    for t in sched.timesteps:
        zz = torch.cat([z, z])  # [2N, C, h, w]
        tt = torch.full((2 * n,), int(t), device=dev)
        if guide_all:
            out = model(zz, tt, y)[:, :c]
            cond, uncond = out.chunk(2)
            eps = uncond + cfg_scale * (cond - uncond)  # [N, C, h, w]
        else:
            eps = model.forward_with_cfg(zz, tt, y, cfg_scale)[:n, :c]  # [N, C, h, w]
        z = sched.step(eps.float(), t, z).prev_sample
    return vae.decode(z.to(vae.dtype) / vae.config.scaling_factor).sample.clamp(-1, 1)


@torch.no_grad()
def evaluate_quality(model, vae, clf, n_per_class=10, steps=50, cfg_scale=4.0, seed=0, verbose=True):
    """Classifier agreement of DDIM-`steps`, cfg `cfg_scale` samples with their conditioning label,
    for both the reference (first-3-channel) guidance and guidance on all channels."""
    labels = torch.arange(10).repeat_interleave(n_per_class)  # [10 * n_per_class]
    res = {}
    for guide_all in (False, True):
        imgs = ddim_sample(model, vae, labels, steps, cfg_scale, guide_all, seed)
        pred = digits.classify_images(clf, imgs)
        key = "all_channels" if guide_all else "reference_3ch"
        res[key] = (pred == labels).float().mean().item()
        per_class = [(pred[labels == k] == k).float().mean().item() for k in range(10)]
        res[key + "_per_class"] = per_class
        print(f"  DDIM-{steps} cfg {cfg_scale} ({key}) agreement {res[key]:.3f}"
              + ("  per class " + " ".join(f"{a:.1f}" for a in per_class) if verbose else ""), flush=True)
    return res


def save(args, vae, ema, meta):
    from safetensors.torch import save_file
    os.makedirs(digits.EMBEDDED_DIR, exist_ok=True)
    vae.save_pretrained(digits.VAE_DIR, safe_serialization=True)
    sd = {k: v.contiguous() for k, v in ema.state_dict().items()}
    save_file(sd, digits.DIT_WEIGHTS)
    cfg = dict(model="DiT-Digits", **dit_kwargs(args), training=meta)
    with open(digits.DIT_CONFIG, "w") as f:
        json.dump(cfg, f, indent=2)
    total = 0
    for root, _, files in os.walk(digits.EMBEDDED_DIR):
        for name in files:
            size = os.path.getsize(os.path.join(root, name))
            total += size
            print(f"  {os.path.relpath(os.path.join(root, name), digits.EMBEDDED_DIR)}: {size / 1e6:.2f} MB")
    print(f"  total {total / 1e6:.2f} MB")


def main(args):
    torch.set_num_threads(args.threads)
    clf = digits.train_digit_classifier(seed=0, holdout=0.25)
    print(f"classifier held-out accuracy {clf.holdout_accuracy_:.4f} (refitting on all digits)")
    clf = digits.train_digit_classifier(seed=0)
    if args.eval_only:
        dit, vae = digits.load_embedded_dit(), digits.load_embedded_vae()
        evaluate_quality(dit, vae, clf, seed=args.seed)
        return
    images, labels = digits.load_digit_images()
    t0 = time.time()
    vae, lat_mean, lat_std, rec_acc = train_vae(args, images, labels, clf)
    _, ema = train_dit(args, lat_mean, lat_std, vae.config.scaling_factor, labels, vae, clf)
    minutes = (time.time() - t0) / 60
    print(f"total training time {minutes:.1f} min")
    print("final quality (EMA):")
    res = evaluate_quality(ema, vae, clf, seed=args.seed)
    meta = dict(seed=args.seed, vae_steps=args.vae_steps, kl_weight=args.kl_weight, steps=args.steps,
                batch=args.batch, lr=args.lr, ema=args.ema, train_minutes=round(minutes, 1),
                vae_recon_agreement=rec_acc, ddim50_cfg4_agreement=res, schedule=SCHEDULE)
    save(args, vae, ema, meta)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vae-channels", type=int, nargs=2, default=[32, 64])
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--vae-batch", type=int, default=128)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--eval-only", action="store_true")
    main(parser.parse_args())
