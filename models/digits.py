# Helpers for the embedded CPU model: scikit-learn's 8x8 digits (offline), a digit
# classifier used as the quality metric, and loaders for models/embedded.
import json
import os

import numpy as np
import torch
import torch.nn.functional as F

EMBEDDED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded")
VAE_DIR = os.path.join(EMBEDDED_DIR, "vae")
DIT_WEIGHTS = os.path.join(EMBEDDED_DIR, "dit_digits.safetensors")
DIT_CONFIG = os.path.join(EMBEDDED_DIR, "dit_digits.json")
DIGIT_MAX = 16.0  # load_digits pixels are integers 0..16
EMBEDDED_IMAGE_SIZE = 8  # the embedded models make 8x8 images (4x4 latents)
EMBEDDED_CLASSES = 10


def load_digit_images():
    """All 1797 digits as ([N, 3, 8, 8] float32 in [-1, 1], [N] int64 labels)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32)) / DIGIT_MAX * 2 - 1  # [N, 8, 8]
    x = x.unsqueeze(1).repeat(1, 3, 1, 1)  # [N, 3, 8, 8] gray replicated to RGB
    return x, torch.from_numpy(d.target.astype(np.int64))


def train_digit_classifier(seed=0, holdout=0.0):
    """LogisticRegression on the native 0..16 features. With holdout > 0 it is fit on a
    seeded split and the held-out accuracy is stored as clf.holdout_accuracy_."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    d = load_digits()
    X, y = d.data, d.target  # [N, 64] in 0..16
    clf = LogisticRegression(max_iter=5000, random_state=seed)
    if holdout > 0:
        Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=holdout, random_state=seed, stratify=y)
        clf.fit(Xtr, ytr)
        clf.holdout_accuracy_ = float(clf.score(Xte, yte))
    else:
        clf.fit(X, y)
    return clf


def images_to_features(images):
    """[N, 3, H, W] in [-1, 1] -> [N, 64] grayscale on the dataset's 0..16 scale."""
    x = images.detach().float().cpu().mean(dim=1, keepdim=True)  # [N, 1, H, W]
    if x.shape[-2:] != (8, 8):
        x = F.interpolate(x, size=(8, 8), mode="area")  # [N, 1, 8, 8]
    x = ((x + 1) / 2 * DIGIT_MAX).clamp(0, DIGIT_MAX)
    return x.reshape(x.shape[0], -1).numpy()  # [N, 64]


def classify_images(clf, images):
    """Predicted digit labels ([N] int64 tensor) for decoded images in [-1, 1]."""
    return torch.from_numpy(clf.predict(images_to_features(images)).astype(np.int64))


def load_embedded_config():
    with open(DIT_CONFIG) as f:
        return json.load(f)


def load_embedded_dit(device="cpu", dtype=torch.float32):
    """The trained EMA DiT-Digits in eval mode."""
    from safetensors.torch import load_file
    from models.dit import DiT_models
    cfg = load_embedded_config()
    kwargs = {k: v for k, v in cfg.items() if k not in ("model", "training")}
    model = DiT_models[cfg["model"]](**kwargs)
    model.load_state_dict(load_file(DIT_WEIGHTS), strict=True)
    return model.to(device=device, dtype=dtype).eval()


def load_embedded_vae(device="cpu", dtype=torch.float32):
    """The digits AutoencoderKL; latents are scaled by vae.config.scaling_factor."""
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(VAE_DIR, dtype=dtype)  # .to(dtype) would warn
    return vae.to(device).eval()
