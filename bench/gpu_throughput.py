"""GPU training throughput of the winning recipe (6-channel DenseNet-121, 512x512) with the full pipeline.

    python bench/gpu_throughput.py [--steps 40] [--batch 32] [--workers 12] [--store STORE]
    python bench/gpu_throughput.py --smoke      # the same code path on CPU, 64 px, a few steps

Trains ``winning.yaml`` through ``rcic.training.fit`` (Lightning) from a packed store of synthetic
512 px sites, for each of: precision bf16-mixed / fp32 x augmentation in the DataLoader workers /
batched on the device. Reports images/s over the steps after warm-up and the fraction of step time
spent waiting for data (from one batch's end to the next batch's start). Goal on one H200: >= 400
img/s with the full pipeline and data wait < 5% of step time (issue #11).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from rcic.config import load_recipe
from rcic.store import open_source, pack
from rcic.synth import generate, preset
from rcic.training import fit


class StepClock(L.Callback):
    """Wall time of the steps after ``warmup``, and the part of it spent waiting for the next batch."""

    def __init__(self, warmup: int):
        self.warmup, self.images, self.wait, self.start, self.last_end = warmup, 0, 0.0, None, None

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        now = time.perf_counter()
        if batch_idx == self.warmup:
            self.start = now
        elif batch_idx > self.warmup and self.last_end is not None:
            self.wait += now - self.last_end

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self._sync()
        self.last_end = time.perf_counter()
        if batch_idx >= self.warmup:
            self.images += len(batch["label"])
            self.end = self.last_end


def make_store(size: int, out: Path) -> Path:
    data = generate(out / "data", preset("tiny", image_size=size, n_classes=32, train_experiments=4,
                                         cell_types=("HEPG2", "HUVEC", "RPE", "U2OS")), workers=16)
    return pack(data, out / "store.zarr", workers=16).path


def measure(source, args, precision: str, augment_on: str, out: Path) -> dict:
    overrides = ["model.pretrained=false", f"data.batch_size={args.batch}", f"data.num_workers={args.workers}",
                 f"trainer.precision={precision}", f"augment.on={augment_on}", "trainer.epochs=1",
                 f"trainer.limit_train_batches={args.steps + args.warmup}", "data.folds=2", "data.fold=all",
                 f"data.image_size={args.size}"]
    if args.smoke:
        overrides += ["model.backbone=test_resnet", "trainer.accelerator=cpu"]
    clock = StepClock(args.warmup)
    fit(source, load_recipe("winning", overrides), out / f"{precision}-{augment_on}", progress=False,
        extra_callbacks=[clock])
    seconds = clock.end - clock.start
    return {"precision": precision, "augment": augment_on, "images_per_s": round(clock.images / seconds, 1),
            "data_wait": round(clock.wait / seconds, 4), "images": clock.images}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--store", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--smoke", action="store_true", help="CPU, 64 px, 3 steps: checks the code path")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.warmup, args.batch, args.workers, args.size = 3, 1, 8, 2, 64
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on a GPU machine (or --smoke to check the code path on CPU)")
    out = args.out or Path(tempfile.mkdtemp(prefix="rcic-gpu-"))
    store = args.store or make_store(args.size, out)
    source = open_source(store)
    rows = []
    precisions = ["32-true"] if args.smoke else ["bf16-mixed", "32-true"]
    for precision in precisions:
        for augment_on in ("device", "workers"):
            rows.append(measure(source, args, precision, augment_on, out))
            print(json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\n{device}, winning recipe ({'test_resnet, smoke' if args.smoke else 'densenet121'}), {args.size} px, "
          f"batch {args.batch}, {args.workers} workers, {args.steps} steps after {args.warmup} warm-up")
    print(f"{'precision':<11} {'augment':<8} {'images/s':>9} {'data wait':>10}")
    for r in rows:
        print(f"{r['precision']:<11} {r['augment']:<8} {r['images_per_s']:>9.1f} {r['data_wait']:>9.1%}")
    (out / "gpu_throughput.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
