"""Training input-pipeline overhead: full pipeline versus batches already in memory, side by side.

    python bench/pipeline_overhead.py [--store STORE] [--size 128] [--workers 2] [--steps 30]

The same model (resnet18, 6 channels, 128x128) and optimiser take training steps (a) from the
real DataLoader of ``rcic train`` (packed store, normalisation, D4 + intensity augmentation,
worker processes) and (b) from batches prepared beforehand in memory. Rounds alternate so that
machine noise hits both alike. Reports images/s of each and ``overhead: X`` (memory / pipeline;
goal <= 1.15).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from rcic.config import load_recipe
from rcic.data.dataset import RxRxDataModule
from rcic.models.net import RcicNet, loss_per_sample
from rcic.store import open_source, pack
from rcic.synth import generate, preset


def make_store(size: int) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="rcic-pipe-"))
    data = generate(tmp / "data", preset("small", image_size=size), workers=2)
    return pack(data, tmp / "store.zarr", workers=2).path


def run_steps(net, opt, batches, steps: int, recipe) -> float:
    """Images per second over ``steps`` training steps drawn from ``batches`` (an iterator)."""
    net.train()
    n, start = 0, None
    for i in range(steps + 2):
        batch = next(batches)
        if i == 2:  # two warm-up steps
            start = time.perf_counter()
        out = net(batch["image"], batch["cell_type"])
        loss = loss_per_sample(out, batch["label"], recipe.loss).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:
            n += len(batch["label"])
    return n / (time.perf_counter() - start)


def cycle(loader):
    while True:
        yield from loader


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    store = args.store or make_store(args.size)
    recipe = load_recipe("cpu-demo", [f"data.num_workers={args.workers}", f"data.batch_size={args.batch}",
                                      "model.backbone=resnet18", "model.head=linear", "loss.arcface=0", "loss.ce=1",
                                      "augment.d4=true", "augment.intensity_jitter=0.1", "augment.on=workers"])
    dm = RxRxDataModule(open_source(store), recipe.data, recipe.augment, recipe.seed, augment_on="workers")
    dm.setup("fit")
    loader = dm.train_dataloader()
    torch.manual_seed(0)
    net = RcicNet(recipe.model, len(dm.classes), len(dm.cell_types))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    pipeline = cycle(loader)
    memory_batches = [next(pipeline) for _ in range(8)]
    memory = cycle(memory_batches)
    best = {"pipeline": 0.0, "memory": 0.0}
    for _ in range(args.rounds):
        best["memory"] = max(best["memory"], run_steps(net, opt, memory, args.steps, recipe))
        best["pipeline"] = max(best["pipeline"], run_steps(net, opt, pipeline, args.steps, recipe))
    print(f"store: {store} ({dm.input_size}px, batch {args.batch}, {args.workers} DataLoader workers, "
          f"torch threads {torch.get_num_threads()}, best of {args.rounds} rounds of {args.steps} steps)")
    for name, rate in best.items():
        print(f"{name:<10} {rate:8.1f} images/s")
    print(f"overhead: {best['memory'] / best['pipeline']:.3f}")


if __name__ == "__main__":
    main()
