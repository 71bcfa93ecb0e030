"""Full-scale metadata: does every step stay linear in the number of sites?

    python bench/scale.py [--fraction 1.0] [--images 0.01] [--out bench/out/scale]

Builds the real 2019 CSV structure (the CSVs in ../shared: 125,510 sites; a synthetic structure of
the same size where they are absent) with tiny 8x8 images for ``--images`` of the sites (a partial
download), then times, through the installed ``rcic`` command: ``info``, ``pack --skip-missing``,
``eda`` on the store, one DataLoader epoch over the index (in process), the private memory of a
forked DataLoader worker that has read every site's row (``worker MiB``, ``--worker-memory`` alone),
and ``submit`` of random logits for every test well (plate leak). Each step runs at a quarter and at
the whole structure, side by side: ``growth`` is time(1) / time(1/4); 4 is linear, 16 quadratic. Goals on 2 cores
(issue #11): pack of the partial download < 60 s, info < 5 s, submit < 10 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("RCIC_REALDATA", ROOT.parent / "shared" / "realdata" / "rxrx1")) / "kaggle_v2019"
FILES = ("train.csv", "test.csv", "train_controls.csv", "test_controls.csv", "sample_submission.csv")


def structure(out: Path, fraction: float, images: float, seed: int = 0) -> Path:
    """A Kaggle-2019 folder with the real structure (the first ``fraction`` of the train and of the test
    experiments) and 8x8 PNGs for a random ``images`` share of its sites."""
    out.mkdir(parents=True, exist_ok=True)
    frames = {name: pd.read_csv(REAL / name, dtype=str) for name in FILES} if (REAL / "train.csv").is_file() \
        else _synthetic_structure()
    keep = set()  # the first ``fraction`` of the train and of the test experiments: both splits are present
    for name in ("train.csv", "test.csv"):
        experiments = sorted(set(frames[name].experiment))
        keep |= set(experiments[: max(1, int(round(len(experiments) * fraction)))])
    test_ids = set()
    for name, frame in frames.items():
        if name == "sample_submission.csv":
            continue
        part = frame[frame.experiment.isin(keep)]
        part.to_csv(out / name, index=False)
        if name == "test.csv":
            test_ids = set(part.id_code)
    sample = frames["sample_submission.csv"]
    sample[sample.id_code.isin(test_ids)].to_csv(out / "sample_submission.csv", index=False)
    rng = np.random.default_rng(seed)
    wells = pd.concat([pd.read_csv(out / n, dtype=str).assign(split=n.split("_")[0].split(".")[0])
                       for n in FILES[:4]])
    tile = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    for row in wells.itertuples():
        for site in (1, 2):
            if rng.random() < images:
                folder = out / row.split / row.experiment / f"Plate{row.plate}"
                folder.mkdir(parents=True, exist_ok=True)
                for c in range(1, 7):
                    cv2.imwrite(str(folder / f"{row.well}_s{site}_w{c}.png"), tile)
    return out


def _synthetic_structure() -> dict[str, pd.DataFrame]:
    """The real counts without the real files: 4 cell types, 1,108 treatments on 4 rotating plate groups."""
    from rcic.synth.generator import design_plates
    from rcic.synth.generator import preset as make_preset

    config = make_preset("small", n_classes=1108, n_positive=30, train_experiments=8, test_experiments=5)
    wells, labels = design_plates(config)
    wells["sirna"] = [labels[c] for c in wells["cls"]]
    keys = ["id_code", "experiment", "plate", "well"]
    treat = wells.well_type == "treatment"
    out = {"train.csv": wells[(wells.split == "train") & treat][keys + ["sirna"]],
           "test.csv": wells[(wells.split == "test") & treat][keys],
           "train_controls.csv": wells[(wells.split == "train") & ~treat][keys + ["sirna", "well_type"]],
           "test_controls.csv": wells[(wells.split == "test") & ~treat][keys + ["sirna", "well_type"]]}
    out["sample_submission.csv"] = out["test.csv"][["id_code"]].assign(sirna=labels[0])
    return {k: v.astype(str) for k, v in out.items()}


def rcic(*args) -> float:
    start = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).with_name("rcic")), *map(str, args)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"rcic {' '.join(map(str, args))} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def dataloader_epoch(store: Path) -> float:
    from rcic.config import load_recipe
    from rcic.data.dataset import RxRxDataModule
    from rcic.store import open_source

    start = time.perf_counter()
    recipe = load_recipe("cpu-demo", ["data.num_workers=0", "data.fold=all", "data.batch_size=256"])
    dm = RxRxDataModule(open_source(store), recipe.data, recipe.augment, recipe.seed)
    dm.setup("fit")
    for _ in dm.train_dataloader():
        pass
    return time.perf_counter() - start


def _private_mib() -> float:
    """This process's private memory (pages it owns alone: a forked worker's copies), MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
    return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty")) / 1024


class _NoPixels:
    """A source with the dataset's table and a blank 8x8 site: what is measured is the rows, not images."""

    def __init__(self, dataset):
        self.dataset = dataset

    def read_site(self, row) -> np.ndarray:
        return np.zeros((self.dataset.channels, 8, 8), np.uint8)


def worker_memory(folder: Path, workers: int = 2, dicts: bool = False, freeze: bool = True) -> float:
    """Private memory (MiB) a forked DataLoader worker gains while it reads every site's row once (its
    private memory after the last batch minus after its first one, the busiest worker): rows kept as
    Python objects are copied page by page into each worker (reference counts, the garbage collector),
    columns of numpy arrays stay shared. ``dicts``: the rows as one dict per row, as rcic kept them;
    ``freeze``: ``gc.freeze()`` before the workers fork, as ``rcic.training.fit`` does."""
    import gc

    import torch
    from torch.utils.data import DataLoader, default_collate, get_worker_info

    from rcic.data.dataset import SiteDataset
    from rcic.io import read_dataset

    ds = read_dataset(folder)
    rows = ds.sites.assign(target=0, cell_type_index=0, experiment_index=0)
    dataset = SiteDataset(_NoPixels(ds), rows, "none", None, 8)
    if dicts:
        dataset.records = dataset.rows.to_dict("records")
    first: dict[int, float] = {}
    peak: dict[int, float] = {}

    def collate(batch):  # runs in the worker: report its private memory with the batch
        return default_collate(batch)["index"], get_worker_info().id, _private_mib()

    if freeze:
        gc.freeze()
    torch.manual_seed(0)
    loader = DataLoader(dataset, batch_size=1024, num_workers=workers, collate_fn=collate,
                        multiprocessing_context="fork")
    try:
        for _, worker, private in loader:
            first.setdefault(worker, private)
            peak[worker] = max(peak.get(worker, 0.0), private)
    finally:
        gc.unfreeze()
    return max(peak[w] - first[w] for w in peak)


def submit_random(folder: Path, out: Path) -> float:
    """``rcic submit`` of random logits for every test well and every class of the full metadata."""
    from rcic.io import read_dataset
    from rcic.predict import Logits, save_logits

    ds = read_dataset(folder)
    rng = np.random.default_rng(0)
    ids = np.array(ds.test_ids)
    save_logits(out / "logits.npz", Logits(ids, rng.normal(size=(len(ids), len(ds.vocab))).astype(np.float32),
                                           list(ds.vocab.labels)))
    return rcic("submit", "--data", folder, "--logits", out / "logits.npz", "--out", out / "submission.csv")


def run(scale_dir: Path, fraction: float, images: float) -> dict:
    if scale_dir.exists():
        shutil.rmtree(scale_dir)
    folder = structure(scale_dir / "data", fraction, images)
    sites = 2 * sum(len(pd.read_csv(folder / n)) for n in FILES[:4])
    times = {"sites": sites}
    times["info"] = rcic("info", folder)
    store = scale_dir / "store.zarr"
    times["pack --skip-missing"] = rcic("pack", folder, "--out", store, "--skip-missing", "--workers", "2")
    times["eda"] = rcic("eda", store, "--out", scale_dir / "eda")
    times["dataloader epoch"] = dataloader_epoch(store)
    times["worker gain MiB"] = worker_memory(folder)
    times["submit"] = submit_random(folder, scale_dir)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fraction", type=float, default=1.0, help="share of the experiments (1 = all of RxRx1)")
    ap.add_argument("--images", type=float, default=0.01, help="share of the sites with images")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "scale")
    ap.add_argument("--worker-memory", action="store_true",
                    help="only the DataLoader workers' private memory on the whole structure")
    args = ap.parse_args()
    if args.worker_memory:
        folder = structure(args.out / "rows", args.fraction, 0.0)
        sites = 2 * sum(len(pd.read_csv(folder / n)) for n in FILES[:4])
        print(f"{sites} sites: private memory (MiB) a DataLoader worker gains reading every row once")
        for freeze in (False, True):
            for label, dicts in (("one dict per row", True), ("numpy columns (RowColumns)", False)):
                gain = worker_memory(folder, dicts=dicts, freeze=freeze)
                print(f"  rows as {label:<28} gc.freeze() before the fork: {'yes' if freeze else 'no ':<4} {gain:8.1f}")
        return
    quarter = run(args.out / "quarter", args.fraction / 4, args.images)
    whole = run(args.out / "whole", args.fraction, args.images)
    steps = [k for k in whole if k != "sites"]
    heads = f"1/4: {quarter['sites']} sites", f"all: {whole['sites']} sites"
    print(f"{'step':<22} {heads[0]:>22} {heads[1]:>22} {'growth':>8}")
    for step in steps:
        unit = "" if step.endswith("MiB") else "s"
        print(f"{step:<22} {quarter[step]:>20.1f} {unit:1} {whole[step]:>20.1f} {unit:1} "
              f"{whole[step] / quarter[step]:>8.2f}")
    print(f"(linear growth: {whole['sites'] / quarter['sites']:.2f})")
    (args.out / "scale.json").write_text(json.dumps({"quarter": quarter, "whole": whole}, indent=2))


if __name__ == "__main__":
    main()
