"""A plain small CNN (~0.4M parameters) in plain PyTorch, trained on every labelled experiment for a
fixed wall time: the yardstick a newcomer would write, which ``cpu-demo`` must beat.

    python bench/baseline_cnn.py --data STORE --seconds 300 --out baseline_test.npz

Per-image channel standardisation, random D4, Adam, cross-entropy over the treatments; the test
wells' logits (both sites averaged) are written as an rcic logits file for ``rcic submit``.
"""

import argparse
import time

import numpy as np
import torch
from torch import nn

from rcic.predict import Logits, save_logits
from rcic.store import open_source


def block(cin, cout):
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))


def standardize(images):
    x = torch.as_tensor(np.stack(images)).float()
    return (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True).clamp_min(1.0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    source = open_source(args.data)
    sites, classes = source.dataset.sites, list(source.dataset.vocab.treatment_labels)
    column = {c: i for i, c in enumerate(classes)}
    train = sites[(sites.split == "train") & sites.label.isin(column)].reset_index(drop=True)
    images = [source.read_site(r) for r in train.to_dict("records")]  # small data: held in memory
    targets = torch.tensor(train.label.map(column).to_numpy())
    net = nn.Sequential(block(images[0].shape[0], 32), block(32, 64), block(64, 128), block(128, 256),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(256, len(classes)))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    start, rng, steps = time.perf_counter(), np.random.default_rng(args.seed), 0
    while time.perf_counter() - start < args.seconds:
        for batch in np.array_split(rng.permutation(len(images)), max(len(images) // 64, 1)):
            x = standardize([images[i] for i in batch])
            x = torch.rot90(x, int(rng.integers(4)), (2, 3))
            x = torch.flip(x, (3,)) if rng.random() < 0.5 else x
            loss = nn.functional.cross_entropy(net(x), targets[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if time.perf_counter() - start > args.seconds:
                break
    net.eval()
    test = sites[(sites.split == "test") & (sites.well_type == "treatment")].reset_index(drop=True)
    with torch.no_grad():
        logits = torch.cat([net(standardize([source.read_site(r) for r in chunk.to_dict("records")]))
                            for chunk in (test.iloc[i:i + 128] for i in range(0, len(test), 128))]).numpy()
    ids, inverse = np.unique(test.id_code.to_numpy(), return_inverse=True)
    well = np.zeros((len(ids), len(classes)))
    np.add.at(well, inverse, logits)
    save_logits(args.out, Logits(ids, (well / np.bincount(inverse)[:, None]).astype(np.float32), classes))
    print(f"baseline: {steps} steps in {time.perf_counter() - start:.0f} s, "
          f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, wrote {args.out}")


if __name__ == "__main__":
    main()
