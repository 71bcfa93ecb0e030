"""Full-site read throughput: PNG folder versus packed stores, side by side, on one core.

    python bench/io_throughput.py --data DATA            # a Kaggle-layout folder with images
    python bench/io_throughput.py --real-shared          # the 12 real 512x512 sites in ../shared
    python bench/io_throughput.py --real-shared --s3     # + the sharded store on a local S3 server

Packs DATA into temporary stores (packing is not timed): one object per site with no / lz4 / zstd
compression, and the default sharded layout (lz4, 256 sites per object); with ``--s3`` also the
sharded store on a local S3-compatible server (moto, on 127.0.0.1: it measures the request path,
not a network). Then reads the same sites from each source in turn, in rounds, and reports sites/s
and bytes per site. The last lines are ``speedup: X`` (one object per site, lz4, over PNG) and
``sharded speedup: X`` (sharded lz4 over PNG).
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
    ap.add_argument("--s3", action="store_true", help="also read the sharded store from a local S3 server")
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
        result = pack(data, tmp / f"{compression}.zarr", compression=compression, skip_missing=True, workers=2,
                      shard=1)
        stores[compression] = PackedStore(result.path)
    stores["lz4-sharded"] = PackedStore(pack(data, tmp / "sharded.zarr", skip_missing=True, workers=2).path)
    server = None
    if args.s3:
        server, url = start_s3()
        stores["lz4-sharded-s3"] = PackedStore(pack(data, url, skip_missing=True, workers=2).path)
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
        per_site = png_bytes if name == "png" else stores[name[6:]].nbytes_stored() / len(store_sites)
        print(f"{name:<22} {rate:>10.1f} {rate * 6 * size * size / 2**20:>8.1f} {per_site:>12,.0f} "
              f"{per_site * 125_510 / 2**30:>24.1f} GiB")
    print(f"speedup: {best['store-lz4'] / best['png']:.1f}")
    print(f"sharded speedup: {best['store-lz4-sharded'] / best['png']:.1f}")
    if server is not None:
        print(f"sharded on the local S3 server: {best['store-lz4-sharded-s3'] / best['png']:.1f}x PNG")
        server.stop()
    sys.stdout.flush()


def start_s3():
    """A local S3-compatible server (moto) and the standard AWS environment pointing at it."""
    import logging

    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request would be timed too
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_EC2_METADATA_DISABLED="true")
    s3fs.S3FileSystem().mkdir("rcic-bench")
    return server, "s3://rcic-bench/sharded.zarr"


if __name__ == "__main__":
    main()
