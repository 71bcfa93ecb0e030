"""Sinkhorn balancing before the plate assignment, on simulated logits at the real plate size.

    python bench/plate_balance.py [--per-plate 277] [--experiments 8] [--seeds 3]

Each experiment has 4 plates of ``per-plate`` treatments (one well each, one group per plate,
rotated). A well's logits are ``signal`` on its true treatment, N(0, 1) noise, and a per-treatment
bias shared by every plate (a model that favours some siRNAs: what balancing is meant to remove).
Reported: arg-max accuracy and plate-leak accuracy with ``--balance none`` and ``sinkhorn``
(``rcic.assign.choose_rotations`` + ``assign_plates``, the code ``rcic submit`` runs), mean over seeds.
Simulated logits, not a model's: this says how the two assignments differ, not what a run gains.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from rcic.assign import assign_plates, choose_rotations  # noqa: E402
from rcic.io.metadata import PlateGroups  # noqa: E402


def simulate(per_plate: int, experiments: int, signal: float, bias: float, seed: int):
    rng = np.random.default_rng(seed)
    classes = [str(i) for i in range(4 * per_plate)]
    groups = PlateGroups(tuple(frozenset(classes[g * per_plate:(g + 1) * per_plate]) for g in range(4)))
    class_bias = rng.normal(0, bias, len(classes))
    rows, truth = [], []
    for e in range(experiments):
        rotation = int(rng.integers(4))
        for p in range(1, 5):
            members = [int(c) for c in groups.groups[(p - 1 + rotation) % 4]]
            for c in rng.permutation(members):
                rows.append({"experiment": f"X-{e:02d}", "plate": p})
                truth.append(c)
    truth = np.array(truth)
    logits = rng.normal(0, 1, (len(rows), len(classes))) + class_bias
    logits[np.arange(len(rows)), truth] += signal
    shifted = logits - logits.max(1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    return pd.DataFrame(rows), log_probs, classes, groups, truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-plate", type=int, default=277)
    parser.add_argument("--experiments", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    print("| signal | class bias (sd) | arg-max | leak, balance none | leak, balance sinkhorn |")
    print("|---|---|---|---|---|")
    for signal, bias in ((2.0, 0.0), (2.0, 1.0), (3.0, 0.0), (3.0, 1.0), (3.0, 2.0)):
        scores = []
        for seed in range(args.seeds):
            wells, log_probs, classes, groups, truth = simulate(args.per_plate, args.experiments, signal, bias, seed)
            choices = choose_rotations(wells, log_probs, classes, groups)
            row = [(log_probs.argmax(1) == truth).mean()]
            for balance in ("none", "sinkhorn"):
                row.append((assign_plates(wells, log_probs, classes, groups, choices, balance) == truth).mean())
            scores.append(row)
        mean = np.mean(scores, axis=0)
        print(f"| {signal} | {bias} | {mean[0]:.3f} | {mean[1]:.3f} | {mean[2]:.3f} |")


if __name__ == "__main__":
    main()
