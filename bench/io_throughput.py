"""Full-site read throughput: PNG folder versus packed store, side by side, on one core.

    python bench/io_throughput.py --data DATA            # a Kaggle-layout folder with images
    python bench/io_throughput.py --real-shared          # the 12 real 512x512 sites in ../shared

Packs DATA into temporary stores (none / lz4 / zstd; packing is not timed), then reads the same
sites from each source in turn, in rounds, and reports sites/s and bytes per site. The last line
is ``speedup: X`` (lz4 store over PNG).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from rcic.store import PackedStore, PngSource, pack  # noqa: E402

cv2.setNumThreads(1)
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "realdata" / "rxrx1"


def real_shared_folder(tmp: Path) -> Path:
    """A Kaggle-layout folder over the real PNGs in ../shared (site 1 of 12 B02 wells is complete)."""
    controls = pd.read_csv(SHARED / "kaggle_v2019" / "train_controls.csv")
    plates = {(p.parent.name, int(p.name[5:])) for p in (SHARED / "images" / "train").glob("*/Plate*")}
    keep = controls[[(e, p) in plates and w == "B02" for e, p, w in
                     zip(controls.experiment, controls.plate, controls.well)]]
    keep.to_csv(tmp / "train_controls.csv", index=False)
    for name in ("train.csv", "test.csv", "test_controls.csv"):
        pd.read_csv(SHARED / "kaggle_v2019" / name, nrows=0).to_csv(tmp / name, index=False)
    (tmp / "train").symlink_to(SHARED / "images" / "train")
    return tmp


def time_reads(read, rows: list[dict], seconds: float) -> float:
    """Sites per second over at least ``seconds`` of whole passes."""
    read(rows[0])  # warm caches and lazy opens
    n, start = 0, time.perf_counter()
    while True:
        for row in rows:
            image = read(row)
            assert image.shape[0] == 6
            n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--real-shared", action="store_true", help="use the real PNGs in ../shared")
    ap.add_argument("--sites", type=int, default=64, help="distinct sites read per pass")
    ap.add_argument("--seconds", type=float, default=3.0, help="time per source and round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (best of)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rcic-io-"))
    if args.real_shared:
        (tmp / "real").mkdir()
    data = real_shared_folder(tmp / "real") if args.real_shared else args.data
    if data is None:
        ap.error("give --data DATA or --real-shared")
    png = PngSource(data)
    stores = {}
    for compression in ("none", "lz4", "zstd"):
        result = pack(data, tmp / f"{compression}.zarr", compression=compression, skip_missing=True, workers=2)
        stores[compression] = PackedStore(result.path)
    store_sites = stores["lz4"].dataset.sites
    rows = store_sites.head(args.sites).to_dict("records")
    size = stores["lz4"].size
    readers = {"png": png.read_site} | {f"store-{c}": (lambda row, s=s: s.read(row["store_index"]))
                                        for c, s in stores.items()}
    best = dict.fromkeys(readers, 0.0)
    for _ in range(args.rounds):  # interleaved rounds: machine noise hits every source alike
        for name, read in readers.items():
            best[name] = max(best[name], time_reads(read, rows, args.seconds))
    png_bytes = np.mean([sum(Path(png.root, row["split"], row["experiment"], f"Plate{row['plate']}",
                                  f"{row['well']}_s{row['site']}_w{c}.png").stat().st_size for c in range(1, 7))
                         for row in rows])
    print(f"data: {data} ({len(rows)} sites of {size}x{size}, one core, best of {args.rounds} rounds)")
    print(f"{'source':<12} {'sites/s':>10} {'MiB/s':>8} {'bytes/site':>12} {'full RxRx1 (125,510 sites)':>28}")
    for name, rate in best.items():
        per_site = png_bytes if name == "png" else stores[name.split("-")[1]].nbytes_stored() / len(store_sites)
        print(f"{name:<12} {rate:>10.1f} {rate * 6 * size * size / 2**20:>8.1f} {per_site:>12,.0f} "
              f"{per_site * 125_510 / 2**30:>24.1f} GiB")
    print(f"speedup: {best['store-lz4'] / best['png']:.1f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
