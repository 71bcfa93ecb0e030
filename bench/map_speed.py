"""``rcic map`` at the scale of RxRx1: 62,755 wells (treatments and controls) x 512 dimensions.

    python bench/map_speed.py [--dims 512] [--fraction 1.0] [--out bench/out/map_speed]

Synthetic embeddings on the real well structure (the Kaggle 2019 CSVs in ../shared; the same
counts synthesised where they are absent): each siRNA a direction, each experiment a batch shift
and scaling, noise; genes of 1-2 siRNAs in complexes of 2-5 for the known-relationship recall.
Times the installed ``rcic map`` with its default corrections (none, tvn) end to end, and reports
the time of each step in process. Goal (issue #10): under 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("RCIC_REALDATA", ROOT.parent / "shared" / "realdata" / "rxrx1")) / "kaggle_v2019"


def wells_table() -> pd.DataFrame:
    if (REAL / "train.csv").is_file():
        from rcic.io import read_dataset

        return read_dataset(REAL).wells
    from rcic.synth.generator import design_plates, preset

    wells, labels = design_plates(preset("small", n_classes=1108, n_positive=30, train_experiments=8,
                                         test_experiments=5))
    wells["label"] = [labels[c] if s == "train" or t != "treatment" else "" for c, s, t in
                      zip(wells["cls"], wells["split"], wells["well_type"])]
    wells["cell_type"] = wells["experiment"].str.split("-").str[0]
    return wells


def synthetic_embeddings(wells: pd.DataFrame, dims: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    truth = wells["label"].where(wells["label"] != "", "test-" + wells["id_code"])  # test wells: their own class
    labels = truth.unique()
    direction = {label: rng.normal(size=dims) for label in labels}
    x = np.stack([direction[label] for label in truth]) * 0.6
    for _, rows in wells.groupby("experiment").indices.items():
        x[rows] = x[rows] * rng.uniform(0.7, 1.3, dims) + rng.normal(scale=1.0, size=dims)
    x += rng.normal(size=x.shape)
    treat = sorted(set(wells.loc[wells.well_type == "treatment", "label"]) - {""})
    genes = pd.DataFrame({"label": treat, "gene": [f"G{i // 2 if i % 5 == 0 else i}" for i in range(len(treat))]})
    names = sorted(set(genes.gene))
    pairs = [(names[i], names[j]) for k in range(0, len(names) - 4, 4) for i in range(k, k + 3)
             for j in range(i + 1, k + 3)]
    return x.astype(np.float32), genes, pd.DataFrame(pairs, columns=["gene_a", "gene_b"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, default=512)
    ap.add_argument("--fraction", type=float, default=1.0, help="share of the experiments")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "map_speed")
    args = ap.parse_args()
    from rcic.profiles import embedding_frame, write_embeddings
    from rcic.profiles.correct import correct
    from rcic.profiles.metrics import known_recall, map_from_average_precision, probe_accuracy, similarity_scores

    wells = wells_table()
    keep = sorted(wells.experiment.unique())
    wells = wells[wells.experiment.isin(keep[: max(2, round(len(keep) * args.fraction))])].reset_index(drop=True)
    x, genes, pairs = synthetic_embeddings(wells, args.dims)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "embeddings.parquet"
    write_embeddings(path, embedding_frame(wells, x))
    genes.to_csv(args.out / "genes.csv", index=False)
    pairs.to_csv(args.out / "relationships.csv", index=False)
    report = args.out / "map"
    if report.exists():
        import shutil

        shutil.rmtree(report)
    start = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).with_name("rcic")), "map", str(path), "--out", str(report),
                           "--genes", str(args.out / "genes.csv"), "--relationships",
                           str(args.out / "relationships.csv"), "--json"], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    scores = json.loads(proc.stdout)
    meta = wells[["id_code", "experiment", "plate", "well", "cell_type", "well_type", "label"]].reset_index(drop=True)
    steps = {}
    for method in ("none", "tvn"):
        t = time.perf_counter()
        z = correct(meta, x, method)
        steps[f"{method}: correction"] = time.perf_counter() - t
        t = time.perf_counter()
        similarity = similarity_scores(meta, z)
        steps[f"{method}: similarities (replicate APs, batch leakage)"] = time.perf_counter() - t
        t = time.perf_counter()
        map_from_average_precision(similarity.average_precision)
        steps[f"{method}: mAP p-values (copairs)"] = time.perf_counter() - t
        t = time.perf_counter()
        known_recall(meta, z, genes, pairs)
        steps[f"{method}: known recall"] = time.perf_counter() - t
        t = time.perf_counter()
        probe_accuracy(meta, z)
        steps[f"{method}: linear probe"] = time.perf_counter() - t
    print(f"rcic map on {len(wells):,} wells x {args.dims} dims (corrections none, tvn): {wall:.1f} s "
          f"(goal < 120 s)")
    for name, seconds in steps.items():
        print(f"  {name:<52} {seconds:6.1f} s")
    print(json.dumps(scores, indent=1))


if __name__ == "__main__":
    main()
