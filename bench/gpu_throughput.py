"""GPU training throughput of the winning recipe (6-channel DenseNet-121, 512x512): bf16-mixed vs fp32.

    python bench/gpu_throughput.py [--batch 32] [--steps 20] [--backbone densenet121]

Steps on in-memory batches (the model's ceiling; the input pipeline is measured separately by
bench/pipeline_overhead.py), alternating precisions so noise hits both alike. Needs CUDA.
"""

from __future__ import annotations

import argparse
import time

import torch

from rcic.config import load_recipe
from rcic.models.net import RcicNet, loss_per_sample


def images_per_second(net, opt, recipe, batch, steps, dtype) -> float:
    images = torch.randn(batch, 6, 512, 512, device="cuda").contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1139, (batch,), device="cuda")
    cells = torch.randint(0, 4, (batch,), device="cuda")
    for i in range(steps + 3):
        if i == 3:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            loss = loss_per_sample(net(images, cells), labels, recipe.loss).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--backbone", default="densenet121")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on a GPU machine")
    recipe = load_recipe("winning", ["model.pretrained=false", f"model.backbone={args.backbone}"])
    torch.backends.cudnn.benchmark = True
    net = RcicNet(recipe.model, 1139, 4, scale=recipe.loss.scale).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    best = {"bf16-mixed": 0.0, "fp32": 0.0}
    for _ in range(args.rounds):
        best["bf16-mixed"] = max(best["bf16-mixed"], images_per_second(net, opt, recipe, args.batch, args.steps,
                                                                       torch.bfloat16))
        best["fp32"] = max(best["fp32"], images_per_second(net, opt, recipe, args.batch, args.steps, None))
    print(f"{torch.cuda.get_device_name()} {args.backbone} 512x512 batch {args.batch}")
    for name, rate in best.items():
        print(f"{name:<11} {rate:8.1f} images/s  (an epoch of 81,224 train sites: {81224 / rate / 60:.1f} min)")
    print(f"bf16 speedup: {best['bf16-mixed'] / best['fp32']:.2f}")


if __name__ == "__main__":
    main()
