"""Normalisation, CPU augmentation (albumentations, 6 channels), and the D4 kernels used for TTA.

Images travel as float32 (H, W, C) numpy arrays on the CPU side, as (N, C, H, W) tensors after.
"""

from __future__ import annotations

from collections.abc import Callable

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch

from rcic.config import AugmentConfig

# ----------------------------------------------------------------------------------------------
# Normalisation
# ----------------------------------------------------------------------------------------------


def group_channel_stats(sites: pd.DataFrame, stats: np.ndarray, by: list[str], mask: np.ndarray | None = None
                        ) -> np.ndarray:
    """Per-site (mean, std) of its group (experiment or plate), pooled from per-site statistics.

    ``stats`` is (n_sites, 6, 2) per-site channel mean/std; ``mask`` picks the sites that define
    a group's statistics (e.g. control wells only); groups with none fall back to all their sites.
    Returns (n_sites, 6, 2).
    """
    mean, var = stats[..., 0].astype(np.float64), stats[..., 1].astype(np.float64) ** 2
    keys = sites[by].astype(str).agg("|".join, axis=1).to_numpy()
    out = np.zeros_like(stats, dtype=np.float32)
    use = np.ones(len(sites), bool) if mask is None else np.asarray(mask, bool)
    for key in np.unique(keys):
        members = keys == key
        pick = members & use
        if not pick.any():
            pick = members
        m = mean[pick].mean(0)
        second = (var[pick] + mean[pick] ** 2).mean(0)
        out[members, :, 0] = m
        out[members, :, 1] = np.sqrt(np.maximum(second - m**2, 1e-6))
    return out


def normalize(image: np.ndarray, mode: str, stats: np.ndarray | None = None) -> np.ndarray:
    """(H, W, C) uint8 -> float32 normalised per channel.

    ``image``: by the image's own statistics; group modes: by the given (C, 2) mean/std;
    ``none``: scaled to [0, 1].
    """
    x = image.astype(np.float32)
    if mode == "none":
        return x / 255.0
    if mode == "image":
        mean = x.mean(axis=(0, 1))
        std = x.std(axis=(0, 1))
    else:
        mean, std = stats[:, 0], stats[:, 1]
    return (x - mean) / np.maximum(std, 1.0)


# ----------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------


def build_augment(config: AugmentConfig | None, size: int, train: bool
                  ) -> Callable[[np.ndarray, np.random.Generator | None], np.ndarray]:
    """The CPU transform ``apply(image, rng)`` for one (H, W, C) float32 image: D4, crop/resize, jitter.

    All randomness comes from ``rng``: a sample's augmentation is a function of (seed, epoch,
    index), the same with any number of workers, on any rank, and after a resume.
    """
    ops = []
    if train and config is not None:
        if config.d4:
            ops.append(A.D4(p=1.0))
        if config.random_resized_crop is not None:
            crop = config.random_resized_crop
            ops.append(A.RandomResizedCrop(size=(size, size), scale=tuple(crop.scale), ratio=tuple(crop.ratio),
                                           interpolation=cv2.INTER_LINEAR, p=1.0))
    compose = A.Compose(ops) if ops else None
    jitter = config.intensity_jitter if (train and config is not None) else 0.0

    def apply(image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        rng = rng if rng is not None else np.random.default_rng()
        if compose is not None:
            compose.set_random_seed(int(rng.integers(2**31)))
            image = compose(image=image)["image"]
        if image.shape[0] != size or image.shape[1] != size:
            image = _resize(image, size)
        if jitter > 0:
            c = image.shape[-1]
            gain = 1 + rng.uniform(-jitter, jitter, c).astype(np.float32)
            shift = rng.uniform(-jitter, jitter, c).astype(np.float32)
            image = image * gain + shift
        return np.ascontiguousarray(image)

    return apply


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    interp = cv2.INTER_AREA if image.shape[0] > size else cv2.INTER_LINEAR
    # cv2 resizes at most 4 channels reliably in one call on every build: go channel by channel
    return np.stack([cv2.resize(image[..., c], (size, size), interpolation=interp)
                     for c in range(image.shape[-1])], axis=-1)


# ----------------------------------------------------------------------------------------------
# Batch-level mixing (on the device) and D4 kernels (TTA)
# ----------------------------------------------------------------------------------------------


def mix_batch(images: torch.Tensor, targets: torch.Tensor, config: AugmentConfig, generator=None):
    """CutMix or mixup on a batch; returns (images, targets_a, targets_b, lam)."""
    roll = torch.rand((), generator=generator).item()
    if roll >= config.cutmix + config.mixup:
        return images, targets, targets, 1.0
    lam = float(np.random.beta(config.mix_alpha, config.mix_alpha))
    perm = torch.randperm(images.shape[0], device=images.device)
    if roll < config.cutmix:
        h, w = images.shape[-2:]
        cut = np.sqrt(1 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = np.random.randint(h), np.random.randint(w)
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        images = images.clone()
        images[..., y0:y1, x0:x1] = images[perm][..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        images = lam * images + (1 - lam) * images[perm]
    return images, targets, targets[perm], lam


def d4_transform(images: torch.Tensor, k: int) -> torch.Tensor:
    """Element k (0-7) of the dihedral group D4 on (..., H, W): k % 4 quarter turns, then a flip if k >= 4."""
    out = torch.rot90(images, k % 4, dims=(-2, -1))
    return torch.flip(out, dims=(-1,)) if k >= 4 else out


TTA_SETS = {1: (0,), 2: (0, 4), 4: (0, 1, 2, 3), 8: tuple(range(8))}
