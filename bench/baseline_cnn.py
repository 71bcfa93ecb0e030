"""The honest yardstick: what an experienced competitor writes in an afternoon, in plain PyTorch.

    python bench/baseline_cnn.py --data STORE --seconds 300 --out baseline_test.npz
    python bench/baseline_cnn.py --data STORE --cpu-seconds 600 --out baseline_test.npz

- per-experiment channel statistics (mean and std of every site of the experiment, train or test:
  what most top-50 kernels did), not per-image standardisation, which erases intensity phenotypes;
- a 4-block CNN (~0.4M parameters) with BatchNorm, AdamW, label smoothing 0.1, random D4;
- a one-cycle schedule over the time budget (warm-up 30%, cosine down), so it trains for exactly
  ``--seconds`` of wall time, or ``--cpu-seconds`` of CPU time (all threads of this one process:
  what ``bench/learning.py`` hands it, because CPU time does not depend on what else the machine runs);
- D4 test-time augmentation (8 views) and both sites of a well averaged (mean log-softmax).
The test wells' scores are written as an rcic logits file: score it with ``rcic submit`` (with and
without ``--no-leak``) and ``rcic score``, as ``bench/learning.py`` does.
"""

import argparse
import math
import time

import numpy as np
import torch
from torch import nn

from rcic.predict import Logits, save_logits
from rcic.store import open_source


def block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.MaxPool2d(2))


def d4(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 symmetries of the square (4 rotations, each optionally mirrored)."""
    x = torch.rot90(x, k % 4, (2, 3))
    return torch.flip(x, (3,)) if k >= 4 else x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--seconds", type=float, default=None, help="wall-time budget (default 300)")
    budget.add_argument("--cpu-seconds", type=float, default=None, help="CPU-time budget, all threads")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    clock = time.process_time if args.cpu_seconds is not None else time.perf_counter
    args.seconds = args.cpu_seconds if args.cpu_seconds is not None else (args.seconds or 300.0)
    torch.manual_seed(args.seed)
    source = open_source(args.data)
    sites, classes = source.dataset.sites.reset_index(drop=True), list(source.dataset.vocab.treatment_labels)
    column = {c: i for i, c in enumerate(classes)}
    images = np.stack([source.read_site(r) for r in sites.to_dict("records")]).astype(np.float32)  # small data
    for _, rows in sites.groupby("experiment").groups.items():  # per-experiment channel statistics
        rows = np.asarray(rows)
        mean = images[rows].mean((0, 2, 3), keepdims=True)
        std = images[rows].std((0, 2, 3), keepdims=True) + 1e-3
        images[rows] = (images[rows] - mean) / std
    images = torch.from_numpy(images)
    train = np.flatnonzero(((sites.split == "train") & sites.label.isin(column)).to_numpy())
    targets = torch.tensor(sites.label.map(column).to_numpy()[train].astype(np.int64))
    net = nn.Sequential(block(images.shape[1], 32), block(32, 64), block(64, 128), block(128, 256),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(256, len(classes)))
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    start, rng, steps, epochs = clock(), np.random.default_rng(args.seed), 0, 0
    while (elapsed := clock() - start) < args.seconds:
        for batch in np.array_split(rng.permutation(len(train)), max(len(train) // 64, 1)):
            pct = min(elapsed / args.seconds, 1.0)  # one-cycle on the time budget
            lr = args.lr * (pct / 0.3 if pct < 0.3 else 0.5 * (1 + math.cos(math.pi * (pct - 0.3) / 0.7)))
            for group in opt.param_groups:
                group["lr"] = max(lr, args.lr * 1e-3)
            x = d4(images[train[batch]], int(rng.integers(8)))
            loss = loss_fn(net(x), targets[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if (elapsed := clock() - start) >= args.seconds:
                break
        epochs += 1
    net.eval()
    test = np.flatnonzero(((sites.split == "test") & (sites.well_type == "treatment")).to_numpy())
    with torch.no_grad():  # D4 TTA: mean log-softmax over the 8 views, then over the well's sites
        scores = torch.cat([torch.stack([net(d4(images[chunk], k)).log_softmax(1) for k in range(8)]).mean(0)
                            for chunk in np.array_split(test, max(len(test) // 128, 1))]).numpy()
    ids, inverse = np.unique(sites.id_code.to_numpy()[test], return_inverse=True)
    well = np.zeros((len(ids), len(classes)))
    np.add.at(well, inverse, scores)
    save_logits(args.out, Logits(ids, (well / np.bincount(inverse)[:, None]).astype(np.float32), classes))
    print(f"baseline: {steps} steps ({epochs} epochs) in {clock() - start:.0f} "
          f"{'CPU ' if args.cpu_seconds is not None else ''}s, "
          f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, wrote {args.out}")


if __name__ == "__main__":
    main()
