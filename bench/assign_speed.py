"""Plate assignment on the full real structure: time on one core, and objective versus the optimum.

    python bench/assign_speed.py [--csv ../shared/realdata/rxrx1/kaggle_v2019]

Noisy logits for the 19,897 real test wells (x 1,108 treatments; a hidden "truth" drawn inside
each plate's group under one of the 4 rotations) go through the rotation choice and the per-plate
linear assignment. The optimum is the best, per experiment, over all 4 rotations of the summed
per-plate assignment optima (brute force over rotations); the gap is reported.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402

from rcic.assign import assign_plates, choose_rotations, treatment_log_probs  # noqa: E402
from rcic.io import read_dataset  # noqa: E402
from rcic.io.metadata import PlateGroups  # noqa: E402
from rcic.predict import Logits  # noqa: E402
from rcic.submit import make_submission  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", type=Path, default=ROOT.parent / "shared" / "realdata" / "rxrx1" / "kaggle_v2019")
    ap.add_argument("--signal", type=float, default=2.0)
    args = ap.parse_args()
    ds = read_dataset(args.csv)
    wells = ds.wells.set_index("id_code").loc[ds.test_ids].reset_index()
    classes = list(ds.vocab.labels)
    rng = np.random.default_rng(0)
    groups: PlateGroups = ds.plate_groups
    logits = rng.normal(0, 1, (len(wells), len(classes))).astype(np.float32)
    for idx in wells.groupby("experiment").indices.values():  # a hidden truth per plate
        r = rng.integers(4)
        for p in range(1, 5):
            rows = idx[wells.plate.to_numpy()[idx] == p]
            members = sorted(groups.groups[(p - 1 + r) % 4], key=int)
            truth = rng.choice([classes.index(m) for m in members], size=len(rows), replace=False)
            logits[rows, truth] += args.signal

    start = time.perf_counter()
    sub = make_submission(ds, Logits(wells.id_code.to_numpy(), logits, classes), leak=True)
    seconds = time.perf_counter() - start

    log_probs, tclasses = treatment_log_probs(logits, classes, set(ds.vocab.treatment_labels))
    choices = choose_rotations(wells, log_probs, tclasses, groups)
    chosen = assign_plates(wells, log_probs, tclasses, groups, choices)
    ours = log_probs[np.arange(len(wells)), chosen].sum()
    optimum = 0.0
    for exp, c in choices.items():
        best = -np.inf
        for order in groups.candidate_orders[:4]:
            forced = {exp: type(c)(exp, order, None, 0, 0, True, c.wells)}
            part = wells[wells.experiment == exp].reset_index(drop=True)
            rows = wells.index[wells.experiment == exp].to_numpy()
            a = assign_plates(part, log_probs[rows], tclasses, groups, forced)
            best = max(best, log_probs[rows][np.arange(len(rows)), a].sum())
        optimum += best
    print(f"wells: {len(wells)} x {len(tclasses)} treatments, {len(choices)} experiments, one core")
    plates = wells.groupby(["experiment", "plate"]).ngroups
    print(f"submission with plate leak: {seconds:.2f} s (rotation choice + {plates} linear assignments + validation)")
    print(f"objective: {ours:.1f}  optimum over rotations: {optimum:.1f}  gap: {optimum - ours:.3f}")
    print(f"rows: {len(sub.frame)}")


if __name__ == "__main__":
    main()
