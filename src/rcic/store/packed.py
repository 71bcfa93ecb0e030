"""The packed store: every site as uint8 (6, S, S) in one zarr array, plus the site table.

Reading a site from the store is one chunk read (optionally LZ4/Zstd-compressed) instead of
six PNG decodes. Layout of a store folder:

- ``images`` (N, 6, S, S) uint8, one chunk per site; ``stats`` (N, 6, 2) float32 per-channel
  mean and std (for per-experiment / per-plate normalisation without touching pixels again);
  ``ok`` (N,) bool (False: left out by ``--skip-missing``); ``done`` one flag per block (resume).
- ``sites.csv``: the site table in store order; ``submission_order.csv``; ``missing.csv``.
- attrs: ``rcic_store`` version, ``fingerprint`` of the source dataset, ``complete``.

A pack runs in blocks; a block's flag is set only after all its sites are written, so an
interrupted pack resumes at the first unfinished block. A store never holds two datasets:
packing a different dataset (or size) into an existing store is refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numcodecs
import numpy as np
import pandas as pd
import zarr
from zarr.codecs import BloscCodec

from rcic.atomic import atomic_write_text
from rcic.errors import DataError
from rcic.io.images import load_site
from rcic.io.metadata import Dataset, read_dataset

STORE_VERSION = 1
COMPRESSIONS = ("none", "lz4", "zstd")
BLOCK = 32  # sites per pack task; one `done` flag each


def _compressors(name: str):
    match name:
        case "none":
            return None
        # Measured on real 512 px sites (BENCHMARKS.md): bit-shuffling costs ~10x in decode speed for
        # ~3% smaller files, so no shuffle. "lz4" uses the LZ4HC encoder (slower packing, same fast
        # LZ4 decoding, ~1.2x smaller than LZ4's default encoder on these noisy images).
        case "lz4":
            return [BloscCodec(cname="lz4hc", clevel=5, shuffle="noshuffle", blocksize=0)]
        case "zstd":
            return [BloscCodec(cname="zstd", clevel=3, shuffle="noshuffle", blocksize=0)]
    raise DataError(f"unknown compression {name!r}; choose one of {', '.join(COMPRESSIONS)}")


def is_store(path: str | Path) -> bool:
    path = Path(path)
    meta = path / "zarr.json"
    if not meta.is_file():
        return False
    try:
        return "rcic_store" in json.loads(meta.read_text()).get("attributes", {})
    except (json.JSONDecodeError, OSError):
        return False


def _fingerprint(dataset: Dataset, size: int) -> str:
    table = dataset.sites.to_csv(index=False).encode()
    return hashlib.sha256(table + f"|{size}".encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackResult:
    path: Path
    sites: int
    packed: int
    missing: int
    resumed_blocks: int


def _pack_block(args) -> tuple[int, list[tuple[int, str]]]:
    """Worker: read, resize and write one block of sites; returns (block, failures)."""
    root, store_path, block, rows, size, skip_missing, layout = args
    group = zarr.open_group(store_path, mode="r+")
    images, stats = group["images"], group["stats"]
    start = rows[0]["index"]
    channels = images.shape[1]
    data = np.zeros((len(rows), channels, size, size), np.uint8)
    failed = []
    for k, row in enumerate(rows):
        try:
            image = load_site(root, row["id_code"], row["site"], row["split"], layout=layout)
        except DataError as err:
            if not skip_missing:
                raise
            failed.append((row["index"], str(err)))
            continue
        if image.shape[1:] != (size, size):
            if image.shape[1] < size or image.shape[2] < size:
                raise DataError(f"site is {image.shape[1]}x{image.shape[2]}, smaller than --size {size}",
                                f"{root}/{row['split']}/{row['id_code']}_s{row['site']}")
            image = np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_AREA) for c in image])
        data[k] = image
    images[start:start + len(rows)] = data
    flat = data.reshape(len(rows), channels, -1).astype(np.float32)
    stats[start:start + len(rows)] = np.stack([flat.mean(-1), flat.std(-1)], axis=-1)
    return block, failed


def pack(
    data: str | Path,
    out: str | Path,
    size: int | None = None,
    compression: str = "lz4",
    workers: int = 1,
    skip_missing: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> PackResult:
    """Pack every site of the PNG dataset ``data`` into a zarr store at ``out`` (resumable)."""
    dataset = read_dataset(data)
    sites = dataset.sites
    if size is None:
        size = _probe_size(data, sites, skip_missing, dataset.layout)
    if not 8 <= size <= 4096:
        raise DataError(f"--size must be in 8-4096, got {size}")
    out = Path(out)
    fingerprint = _fingerprint(dataset, size)
    n_blocks = (len(sites) + BLOCK - 1) // BLOCK
    if out.exists() and any(out.iterdir()):
        if not is_store(out):
            raise DataError("exists and is not an rcic store; choose another --out", out)
        group = zarr.open_group(out, mode="r+")
        if group.attrs.get("fingerprint") != fingerprint:
            raise DataError(
                f"holds another dataset or size (store of {group.attrs.get('source')} at "
                f"{group.attrs.get('size')} px); choose another --out or delete it", out)
    else:
        group = _create_store(out, dataset, size, compression, fingerprint, n_blocks)
    done, ok = group["done"][:], group["ok"][:]
    resumed = int(done.sum())
    records = sites.assign(index=np.arange(len(sites)))[["index", "id_code", "site", "split"]]
    records = records.to_dict("records")
    todo = [b for b in range(n_blocks) if not done[b]]
    jobs = [(str(data), str(out), b, records[b * BLOCK:(b + 1) * BLOCK], size, skip_missing, dataset.layout)
            for b in todo]
    finished = resumed * BLOCK
    missing_rows: list[tuple[int, str]] = _read_missing(out)
    if progress:
        progress(min(finished, len(sites)), len(sites))

    def collect(result):
        nonlocal finished
        block, failed = result
        for index, why in failed:
            ok[index] = False
            missing_rows.append((index, why))
        group["ok"][:] = ok
        _write_missing(out, sites, missing_rows)
        done[block] = True
        group["done"][:] = done  # flag the block only after its sites (and failures) are saved
        finished += len(records[block * BLOCK:(block + 1) * BLOCK])
        if progress:
            progress(finished, len(sites))

    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            for result in pool.map(_pack_block, jobs):
                collect(result)
    else:
        for job in jobs:
            collect(_pack_block(job))
    group.attrs["complete"] = True
    return PackResult(out, len(sites), int(ok.sum()), int((~ok).sum()), resumed)


def _probe_size(data, sites: pd.DataFrame, skip_missing: bool, layout: str) -> int:
    """The stored site size: that of the first readable site (``--size`` defaults to it)."""
    for row in sites.head(1000 if skip_missing else 1).to_dict("records"):
        try:
            return load_site(data, row["id_code"], int(row["site"]), row["split"], channels=(1,),
                             layout=layout).shape[-1]
        except DataError:
            if not skip_missing:
                raise
    raise DataError("no readable site images among the first 1000 sites", data)


def _create_store(out: Path, dataset: Dataset, size: int, compression: str, fingerprint: str, n_blocks: int):
    compressors = _compressors(compression)
    out.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(out, mode="w")
    n, c = len(dataset.sites), dataset.channels
    group.create_array("images", shape=(n, c, size, size), chunks=(1, c, size, size), dtype="uint8",
                       compressors=compressors, fill_value=0)
    # one stats chunk per pack block: each worker writes only its own chunks (no shared chunk races)
    group.create_array("stats", shape=(n, c, 2), chunks=(BLOCK, c, 2), dtype="float32", fill_value=0.0)
    group.create_array("ok", shape=(n,), chunks=(max(n, 1),), dtype="bool", fill_value=True)
    group.create_array("done", shape=(n_blocks,), chunks=(max(n_blocks, 1),), dtype="bool", fill_value=False)
    atomic_write_text(out / "sites.csv", dataset.sites.to_csv(index=False))
    if dataset.submission_order is not None:
        atomic_write_text(out / "submission_order.csv", "id_code\n" + "\n".join(dataset.submission_order) + "\n")
    group.attrs.update({
        "rcic_store": STORE_VERSION, "fingerprint": fingerprint, "layout": dataset.layout,
        "source": str(Path(dataset.root).resolve()), "size": size, "compression": compression,
        "complete": False,
    })
    return group


def _read_missing(out: Path) -> list[tuple[int, str]]:
    path = out / "missing.csv"
    if not path.is_file():
        return []
    frame = pd.read_csv(path, dtype={"reason": str})
    return list(zip(frame["index"].astype(int), frame["reason"]))


def _write_missing(out: Path, sites: pd.DataFrame, rows: list[tuple[int, str]]) -> None:
    if not rows:
        return
    index = [i for i, _ in rows]
    report = sites.iloc[index][["id_code", "site", "split"]].assign(index=index, reason=[r for _, r in rows])
    atomic_write_text(out / "missing.csv", report.to_csv(index=False))


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


class PackedStore:
    """A finished store: ``dataset`` (site table of the packed sites) and ``read(index)``.

    Arrays open lazily, so an instance can be sent to DataLoader worker processes.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not is_store(self.path):
            raise DataError("not an rcic packed store (run `rcic pack` first)", self.path)
        group = zarr.open_group(self.path, mode="r")
        attrs = dict(group.attrs)
        if not attrs.get("complete"):
            raise DataError("store is incomplete (an interrupted pack): run the same `rcic pack` again "
                            "to resume", self.path)
        self.size = int(attrs["size"])
        self.layout = attrs["layout"]
        self.compression = attrs.get("compression", "none")
        sites = pd.read_csv(self.path / "sites.csv", dtype=str, keep_default_na=False)
        sites["plate"], sites["site"] = sites["plate"].astype(int), sites["site"].astype(int)
        sites["store_index"] = np.arange(len(sites))
        sites = sites[group["ok"][:]].reset_index(drop=True)
        order = None
        if (self.path / "submission_order.csv").is_file():
            order = pd.read_csv(self.path / "submission_order.csv", dtype=str)["id_code"].tolist()
        self.dataset = Dataset(root=self.path, layout=self.layout, sites=sites, submission_order=order)
        self._images = None
        self._direct = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_images"] = None
        state["_direct"] = None
        return state

    @property
    def images(self):
        if self._images is None:
            numcodecs.blosc.set_nthreads(1)  # one decoding thread per reader (DataLoader workers read in parallel)
            self._images = zarr.open_array(self.path / "images", mode="r")
        return self._images

    def read(self, store_index: int) -> np.ndarray:
        """One site as (6, S, S) uint8."""
        if self._direct is None:
            self._direct = self._direct_reader() or False
        if self._direct:
            return self._direct(int(store_index))
        return self.images[int(store_index)]

    def _direct_reader(self):
        """Read a site's chunk file and decode it in one call, skipping zarr's per-read machinery.

        zarr's generic read path costs ~0.4 ms per site, as much as decoding an LZ4 chunk; for the
        one layout rcic writes (one chunk per site, bytes + optional blosc) the chunk file *is* the
        site. The store stays a plain zarr array; this path is checked against zarr on first use
        and not used where they disagree (another layout or zarr version).
        """
        meta = json.loads((self.path / "images" / "zarr.json").read_text())
        codecs = [c["name"] for c in meta.get("codecs", [])]
        key = meta.get("chunk_key_encoding", {})
        chunk = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
        if (codecs not in (["bytes"], ["bytes", "blosc"]) or key.get("name") != "default"
                or key.get("configuration", {}).get("separator") != "/"
                or chunk[:1] + chunk[2:] != [1, self.size, self.size]):
            return None
        channels = meta["shape"][1]
        folder, shape = self.path / "images" / "c", (channels, self.size, self.size)
        blosc = codecs[-1] == "blosc"

        def read(index: int) -> np.ndarray:
            try:
                raw = (folder / str(index) / "0" / "0" / "0").read_bytes()
            except FileNotFoundError:  # an all-zero site (fill value) is not stored
                return np.zeros(shape, np.uint8)
            return np.frombuffer(numcodecs.blosc.decompress(raw) if blosc else raw, np.uint8).reshape(shape)

        numcodecs.blosc.set_nthreads(1)
        probe = int(self.dataset.sites["store_index"].iloc[0]) if len(self.dataset.sites) else 0
        return read if np.array_equal(read(probe), self.images[probe]) else None

    def channel_stats(self) -> np.ndarray:
        """(n_sites, 6, 2) per-channel mean and std of each packed site, in site-table order."""
        stats = zarr.open_array(self.path / "stats", mode="r")[:]
        return stats[self.dataset.sites["store_index"].to_numpy()]

    def nbytes_stored(self) -> int:
        folder = self.path / "images"
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
