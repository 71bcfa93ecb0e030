"""Batched augmentation on the device: rcic's torch kernels versus kornia's, side by side.

    python bench/device_augment.py [--batch 32] [--size 512] [--rounds 5]

The same work on a batch of 6-channel sites (normalised floats): per-sample D4, random resized crop
back to the input size, per-channel gain and shift. rcic's kernels (``rcic.data.augment``, one
implementation for the worker and the device paths) against kornia.augmentation's
RandomResizedCrop + flips/rotations + a per-channel affine. Reports milliseconds per batch of
each on the machine's device (CUDA where present, else CPU); best of ``--rounds``.
"""

from __future__ import annotations

import argparse
import time

import torch

from rcic.config import load_recipe
from rcic.data.augment import apply_params, draw_params, generator


def timed(fn, device, rounds: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = load_recipe("winning", ["augment.intensity_jitter=0.1"]).augment
    images = torch.randn(args.batch, 6, args.size, args.size, device=device)

    def rcic_kernels():
        params = draw_params(config, args.batch, 6, generator(0)).to(device)
        return apply_params(images, params, args.size)

    import kornia.augmentation as K

    crop = config.random_resized_crop
    kornia_pipeline = torch.nn.Sequential(
        K.RandomResizedCrop((args.size, args.size), scale=tuple(crop.scale), ratio=tuple(crop.ratio), p=1.0),
        K.RandomHorizontalFlip(), K.RandomVerticalFlip(), K.RandomRotation90(times=(0, 3), p=1.0),
    ).to(device)

    def kornia_kernels():
        out = kornia_pipeline(images)
        gain = 1 + (torch.rand(args.batch, 6, 1, 1, device=device) * 2 - 1) * config.intensity_jitter
        shift = (torch.rand(args.batch, 6, 1, 1, device=device) * 2 - 1) * config.intensity_jitter
        return out * gain + shift

    results = {"rcic torch kernels": timed(rcic_kernels, device, args.rounds),
               "kornia.augmentation": timed(kornia_kernels, device, args.rounds)}
    print(f"{device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), batch {args.batch} x 6 x "
          f"{args.size}^2, D4 + random resized crop + channel jitter, best of {args.rounds}:")
    for name, ms in results.items():
        print(f"  {name:<22} {ms:8.1f} ms/batch  ({args.batch / ms * 1000:8.0f} images/s)")
    print(f"kornia / rcic: {results['kornia.augmentation'] / results['rcic torch kernels']:.2f}")


if __name__ == "__main__":
    main()
