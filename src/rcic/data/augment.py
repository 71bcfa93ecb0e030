"""Normalisation and augmentation as batched torch kernels with explicit random parameters.

One implementation serves both places augmentation can run (recipe key ``augment.on``):

- ``workers``: each DataLoader worker calls ``prepare(image[None], ...)`` on the CPU for one site,
  with parameters drawn from that sample's own generator (seed, epoch, index);
- ``device``: workers hand over uint8 sites and the LightningModule calls the same functions on a
  whole batch on the accelerator, with parameters drawn from the per-step generator.

Both draw from ``draw_params`` and apply ``apply_params``, so identical parameters give identical
outputs on either path (tested), and the two paths sample the same distribution. Randomness only
ever comes from a generator that is passed in, so a resumed run replays the same augmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rcic.config import AugmentConfig

NORMALIZATIONS = ("none", "image", "experiment", "experiment_controls", "plate", "plate_controls")
MIN_STD = 1.0  # on the 0-255 scale: a flat channel is not blown up into noise


def step_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, batch or sample index, rank, ...)."""
    return int(np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(1, np.uint64)[0]) % 2**63


def generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(step_seed(*parts))


# ----------------------------------------------------------------------------------------------
# Normalisation
# ----------------------------------------------------------------------------------------------


def normalize(images: torch.Tensor, mode: str, stats: torch.Tensor | None = None) -> torch.Tensor:
    """(N, C, H, W) uint8 or float -> float32 normalised per channel.

    ``image``: each image by its own channel statistics; group modes (experiment, plate, ...): by
    the given (N, C, 2) mean/std of the sample's group; ``none``: scaled to [0, 1].
    """
    x = images.float()
    if mode == "none":
        return x / 255.0
    if mode == "image":
        std, mean = torch.std_mean(x, dim=(-2, -1), correction=0, keepdim=True)
    else:
        if stats is None:
            raise ValueError(f"normalisation {mode!r} needs group statistics")
        stats = stats.to(x.device, torch.float32)
        mean, std = stats[..., 0, None, None], stats[..., 1, None, None]
    return (x - mean) / std.clamp_min(MIN_STD)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Square resize of (N, C, H, W) float images (antialiased when shrinking)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    shrink = images.shape[-1] > size
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


# ----------------------------------------------------------------------------------------------
# Random parameters and their kernels
# ----------------------------------------------------------------------------------------------


@dataclass
class AugmentParams:
    """Per-sample parameters: D4 element, crop box (fractions of the side), channel gain and shift."""

    d4: torch.Tensor  # (N,) int64 in 0..7
    crop: torch.Tensor | None = None  # (N, 4) float: top, left, height, width in [0, 1]
    gain: torch.Tensor | None = None  # (N, C)
    shift: torch.Tensor | None = None  # (N, C)

    def to(self, device) -> AugmentParams:
        return AugmentParams(*(None if t is None else t.to(device) for t in (self.d4, self.crop, self.gain,
                                                                             self.shift)))


def draw_params(config: AugmentConfig, n: int, channels: int, gen: torch.Generator) -> AugmentParams:
    """Draw the parameters of ``n`` samples from ``gen`` (on the CPU; cheap, then moved)."""
    d4 = torch.randint(0, 8, (n,), generator=gen) if config.d4 else torch.zeros(n, dtype=torch.long)
    crop = None
    if config.random_resized_crop is not None:
        crop = _crop_boxes(config.random_resized_crop.scale, config.random_resized_crop.ratio, n, gen)
    gain = shift = None
    if config.intensity_jitter > 0:
        j = config.intensity_jitter
        gain = 1 + (torch.rand((n, channels), generator=gen) * 2 - 1) * j
        shift = (torch.rand((n, channels), generator=gen) * 2 - 1) * j
    return AugmentParams(d4, crop, gain, shift)


def _crop_boxes(scale, ratio, n: int, gen: torch.Generator, attempts: int = 10) -> torch.Tensor:
    """Random-resized-crop boxes as in torchvision: area and log-aspect uniform, first box that fits."""
    area = torch.empty(n, attempts).uniform_(scale[0], scale[1], generator=gen)
    log_ratio = torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    r = torch.exp(log_ratio)
    w, h = torch.sqrt(area * r), torch.sqrt(area / r)
    fits = (w <= 1) & (h <= 1)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.zeros(n, dtype=torch.long))
    w = torch.where(fits.any(1), w.gather(1, first[:, None])[:, 0], torch.ones(n))
    h = torch.where(fits.any(1), h.gather(1, first[:, None])[:, 0], torch.ones(n))
    top = torch.rand(n, generator=gen) * (1 - h)
    left = torch.rand(n, generator=gen) * (1 - w)
    return torch.stack([top, left, h, w], dim=1)


def d4_transform(images: torch.Tensor, k: int) -> torch.Tensor:
    """Element k (0-7) of the dihedral group D4 on (..., H, W): k % 4 quarter turns, then a flip if k >= 4."""
    out = torch.rot90(images, k % 4, dims=(-2, -1))
    return torch.flip(out, dims=(-1,)) if k >= 4 else out


TTA_SETS = {1: (0,), 2: (0, 4), 4: (0, 1, 2, 3), 8: tuple(range(8))}


def apply_params(images: torch.Tensor, params: AugmentParams, size: int) -> torch.Tensor:
    """Crop + resize to ``size``, D4, then channel gain/shift, on (N, C, H, W) float images."""
    if params.crop is not None:
        side_h, side_w = images.shape[-2:]
        out = []
        for image, (top, left, h, w) in zip(images, params.crop.tolist()):
            y0, x0 = int(round(top * side_h)), int(round(left * side_w))
            y1 = min(max(y0 + int(round(h * side_h)), y0 + 1), side_h)
            x1 = min(max(x0 + int(round(w * side_w)), x0 + 1), side_w)
            out.append(resize(image[None, :, y0:y1, x0:x1], size))
        images = torch.cat(out)
    else:
        images = resize(images, size)
    if bool((params.d4 != 0).any()):
        result = torch.empty_like(images)
        for k in params.d4.unique().tolist():
            chosen = params.d4 == k
            result[chosen] = d4_transform(images[chosen], k)
        images = result
    if params.gain is not None:
        images = images * params.gain[:, :, None, None] + params.shift[:, :, None, None]
    return images


def prepare(images: torch.Tensor, mode: str, stats: torch.Tensor | None, size: int,
            config: AugmentConfig | None = None, gen: torch.Generator | None = None) -> torch.Tensor:
    """Normalise, then (with ``config``) augment a batch: the one entry point of both paths."""
    x = normalize(images, mode, stats)
    if config is None:
        return resize(x, size)
    params = draw_params(config, x.shape[0], x.shape[1], gen).to(x.device)
    return apply_params(x, params, size)


# ----------------------------------------------------------------------------------------------
# Batch-level mixing
# ----------------------------------------------------------------------------------------------


def mix_batch(images: torch.Tensor, targets: torch.Tensor, config: AugmentConfig, rng: np.random.Generator):
    """CutMix or mixup on a batch; returns (images, targets_a, targets_b, lam). All draws from ``rng``."""
    roll = rng.random()
    if roll >= config.cutmix + config.mixup or images.shape[0] < 2:
        return images, targets, targets, 1.0
    lam = float(rng.beta(config.mix_alpha, config.mix_alpha))
    perm = torch.as_tensor(rng.permutation(images.shape[0]), device=images.device)
    if roll < config.cutmix:
        h, w = images.shape[-2:]
        cut = math.sqrt(1 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        images = images.clone()
        images[..., y0:y1, x0:x1] = images[perm][..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        images = lam * images + (1 - lam) * images[perm]
    return images, targets, targets[perm], lam
