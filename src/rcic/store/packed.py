"""The packed store: every site as uint8 (C, S, S) in one zarr v3 array, plus the site table.

Layout of a store (a local folder, or an object-store URL such as ``s3://bucket/rxrx1.zarr``):

- ``images`` (N, C, S, S) uint8, one chunk per site, every chunk checksummed (zarr's crc32c
  codec after the optional LZ4/Zstd blosc codec). With ``shard`` > 1 (the default, 256) the
  chunks are grouped into zarr shards: one object per ``shard`` sites, so a full RxRx1 is ~500
  objects instead of 125,510, and a site is one byte-range read of its shard.
- ``stats`` (N, C, 2) float32 per-channel mean and std of each site (per-experiment/per-plate
  normalisation without touching pixels again); ``ok`` (N,) bool, False for a site left out by
  ``--skip-missing``.
- ``sites.csv`` (the site table in store order), ``submission_order.csv``, ``missing.csv``.
- attrs: ``rcic_store`` (format version), ``fingerprint`` of the source dataset and size,
  ``layout``, ``size``, ``channels``, ``compression``, ``shard``, ``complete``, ``checksums``
  (SHA-256 of each table and of each array's ``zarr.json``) and ``digest`` (SHA-256 of all the
  other attributes).

Nothing stored is trusted unchecked (format 3): every chunk of ``images``, ``stats`` and ``ok``
carries a CRC-32C and must be there (a missing chunk is an error, never zeros); the tables and
array metadata are checked against their SHA-256, the attributes against their digest, and the
site table then passes the same validation as the CSVs it came from. A store of format 2 (rcic
before these checks) is refused with a one-line message to pack it again: its ``ok`` flags and
tables carry no checksum, so reading it would trust them unchecked.

A pack runs in blocks (one shard each, or 32 sites unsharded); each block is written by one
worker (no two workers touch one object), and its ``ok`` chunk is written last, so an ``ok``
chunk on disk marks a finished block: an interrupted pack resumes at the blocks without one.
A local pack holds an exclusive lock; a store never holds two datasets (another dataset, size,
compression or shard size is refused), and a store is created whole or not at all.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import google_crc32c
import numcodecs
import numpy as np
import pandas as pd
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from rcic.errors import DataError
from rcic.io.metadata import Dataset
from rcic.parallel import imap_processes
from rcic.store.location import Location, NotFound, is_url, remote_errors
from rcic.store.rxrx3_source import LAYOUTS, check_site_table, load_site, read_dataset  # + RxRx3-core's shards

STORE_VERSION = 3
ARRAYS = ("images", "stats", "ok")
COMPRESSIONS = ("none", "lz4", "zstd")
BLOCK = 32  # sites per pack task of an unsharded store
DEFAULT_SHARD = 256
MAX_SHARD_BYTES = 4 << 30
CRC32C_RESIDUE = 0x48674BC7  # CRC-32C of any bytes followed by their own little-endian CRC-32C
_EMPTY = np.uint64(2**64 - 1)  # a shard index entry of a chunk that is not there
# every chunk is stored, also one equal to the fill value: a missing chunk is damage, never zeros, and a
# block's ok chunk on disk marks it as done (zarr's default drops chunks equal to the fill value)
WRITE_EVERY_CHUNK = {"array.write_empty_chunks": True}


def _compressors(name: str) -> list:
    match name:
        case "none":
            codecs = []
        # Measured on real 512 px sites (BENCHMARKS.md): bit-shuffling costs ~10x in decode speed for
        # ~3% smaller files, so no shuffle. "lz4" uses the LZ4HC encoder (slower packing, same fast
        # LZ4 decoding, ~1.2x smaller than LZ4's default encoder on these noisy images).
        case "lz4":
            codecs = [BloscCodec(cname="lz4hc", clevel=5, shuffle="noshuffle", blocksize=0)]
        case "zstd":
            codecs = [BloscCodec(cname="zstd", clevel=3, shuffle="noshuffle", blocksize=0)]
        case _:
            raise DataError(f"unknown compression {name!r}; choose one of {', '.join(COMPRESSIONS)}")
    return [*codecs, Crc32cCodec()]  # a flipped byte is detected, never decoded silently


def _attrs(location: Location) -> dict | None:
    """The group attributes of a store's root, or None where there is no zarr group."""
    try:
        meta = json.loads(location.read("zarr.json"))
    except (FileNotFoundError, NotFound):
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError("zarr.json is not valid JSON: a damaged store", location.root) from None
    if not isinstance(meta, dict):
        raise DataError("zarr.json is not a zarr group's metadata: a damaged store", location.root)
    attrs = meta.get("attributes", {})
    if not isinstance(attrs, dict):
        raise DataError("zarr.json: its attributes are not a mapping: a damaged store", location.root)
    return attrs


def _digest(attrs: dict) -> str:
    """SHA-256 of a store's attributes other than the digest itself (a changed flag or size is detected)."""
    body = {k: v for k, v in attrs.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _seal(group, location: Location, **changes) -> None:
    """Update the group's attributes and their digest in one write of ``zarr.json``."""
    attrs = {**dict(group.attrs), **changes}
    attrs["digest"] = _digest(attrs)
    with remote_errors(str(location.root)):
        group.attrs.put(attrs)


_ATTR_TYPES = {"layout": str, "size": int, "channels": int, "compression": str, "shard": int, "complete": bool,
               "checksums": dict, "fingerprint": str}


def _check_attrs(attrs: dict, root) -> None:
    """A store's attributes: this format, unchanged since written (digest), every key there with its type."""
    version = attrs.get("rcic_store")
    if version != STORE_VERSION:
        if isinstance(version, int) and version < STORE_VERSION:
            raise DataError(f"was packed by an older rcic (store format {version}), whose flags and tables carry no "
                            "checksums: pack the data again into a new store (rcic pack DATA --out NEW)", root)
        raise DataError(f"store format {version!r} is not one this rcic reads (format {STORE_VERSION}): a newer rcic "
                        "or a damaged zarr.json", root)
    if attrs.get("digest") != _digest(attrs):
        raise DataError("zarr.json: the store's attributes changed since they were written (digest mismatch): the "
                        "store is damaged; pack it again", root)
    for key, kind in _ATTR_TYPES.items():
        value = attrs.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise DataError(f"zarr.json: attribute {key} is {'missing' if value is None else repr(value)}: the store "
                            "is damaged; pack it again", root)
    if attrs["layout"] not in LAYOUTS or attrs["compression"] not in COMPRESSIONS or not 8 <= attrs["size"] <= 4096 \
            or attrs["channels"] not in (3, 6) or attrs["shard"] < 1:
        raise DataError("zarr.json: attributes out of range (layout, compression, size, channels or shard): the "
                        "store is damaged; pack it again", root)


def is_store(path: str | Path) -> bool:
    """Whether ``path`` (folder or URL) holds an rcic store (finished or being packed)."""
    if not is_url(path) and not (Path(path) / "zarr.json").is_file():
        return False
    attrs = _attrs(Location(path))
    return attrs is not None and "rcic_store" in attrs


def _fingerprint(dataset: Dataset, size: int) -> str:
    table = dataset.sites.to_csv(index=False).encode()
    return hashlib.sha256(table + f"|{size}|{dataset.channels}".encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackResult:
    path: str | Path
    sites: int
    packed: int
    missing: int
    resumed_blocks: int


def _pack_block(args) -> tuple[int, int]:
    """Worker: read, resize and write one block of sites (images, stats, failures, then ok)."""
    root, store_url, block, start, rows, size, skip_missing, layout = args
    location = Location(store_url)
    with zarr.config.set(WRITE_EVERY_CHUNK):
        return _write_block(location, block, start, rows, root, size, skip_missing, layout)


def _write_block(location: Location, block: int, start: int, rows: list[dict], root, size: int, skip_missing: bool,
                 layout: str) -> tuple[int, int]:
    store_url = str(location.root)
    group = zarr.open_group(location.zarr_store(), mode="r+")
    images, stats, ok = group["images"], group["stats"], group["ok"]
    channels = images.shape[1]
    data = np.zeros((len(rows), channels, size, size), np.uint8)
    good = np.ones(len(rows), bool)
    failed = []
    for k, row in enumerate(rows):
        try:
            image = load_site(root, row["id_code"], row["site"], row["split"], layout=layout)
        except DataError as err:
            if not skip_missing:
                raise
            good[k] = False
            failed.append({"index": start + k, "id_code": row["id_code"], "site": row["site"],
                           "split": row["split"], "reason": str(err)})
            continue
        if image.shape[1:] != (size, size):
            if image.shape[1] < size or image.shape[2] < size:
                raise DataError(f"site is {image.shape[1]}x{image.shape[2]}, smaller than --size {size}",
                                f"{root}/{row['split']}/{row['id_code']}_s{row['site']}")
            image = np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_AREA) for c in image])
        data[k] = image
    with remote_errors(store_url):
        # only the sites that were read: a partial download must not store a zero chunk for every
        # missing site (with --compression none that is the full size of the data set)
        for a, b in _runs(good):
            images[start + a:start + b] = data[a:b]
        flat = data.reshape(len(rows), channels, -1).astype(np.float32)
        stats[start:start + len(rows)] = np.stack([flat.mean(-1), flat.std(-1)], axis=-1)
        if failed:
            location.write(f"missing/{block}.json", json.dumps(failed).encode())
        ok[start:start + len(rows)] = good  # last: its chunk on disk marks the block as done
    return block, len(rows)


def _runs(good: np.ndarray) -> list[tuple[int, int]]:
    """Half-open [a, b) ranges of consecutive True values."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], good.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def check_shard(shard: int, channels: int, size: int) -> int:
    if shard < 1:
        raise DataError(f"--shard must be at least 1 (1: one object per site), got {shard}")
    if shard * channels * size * size > MAX_SHARD_BYTES:
        raise DataError(f"--shard {shard} makes {shard * channels * size * size / 2**30:.1f} GiB shards at {size} px; "
                        f"use at most {MAX_SHARD_BYTES // (channels * size * size)} sites per shard")
    return shard


def pack(
    data: str | Path,
    out: str | Path,
    size: int | None = None,
    compression: str = "lz4",
    workers: int = 1,
    skip_missing: bool = False,
    progress: Callable[[int, int], None] | None = None,
    shard: int = DEFAULT_SHARD,
) -> PackResult:
    """Pack every site of the PNG dataset ``data`` into a store at ``out`` (folder or URL; resumable)."""
    dataset = read_dataset(data)
    sites = dataset.sites
    if compression not in COMPRESSIONS:
        raise DataError(f"unknown compression {compression!r}; choose one of {', '.join(COMPRESSIONS)}")
    stored = _probe_size(data, sites, skip_missing, dataset.layout)
    size = stored if size is None else size
    if not 8 <= size <= 4096:
        raise DataError(f"--size must be in 8-4096, got {size}")
    if size > stored:
        raise DataError(f"--size {size} is larger than the sites ({stored} px); rcic packs at most at full size")
    shard = check_shard(shard, dataset.channels, size)
    location = Location(out)
    location.check_bucket()
    with _lock(location):
        group = _open_or_create(location, dataset, size, compression, shard)
        block = shard if shard > 1 else BLOCK
        n_blocks = (len(sites) + block - 1) // block
        done = {int(name) for name in location.list("ok/c") if name.isdigit()}
        records = sites[["id_code", "site", "split"]].to_dict("records")
        todo = [b for b in range(n_blocks) if b not in done]
        jobs = [(str(data), str(location.root), b, b * block, records[b * block:(b + 1) * block], size,
                 skip_missing, dataset.layout) for b in todo]
        finished = len(sites) - sum(len(j[4]) for j in jobs)
        if progress:
            progress(finished, len(sites))
        for _, count in imap_processes(_pack_block, jobs, workers):
            finished += count
            if progress:
                progress(finished, len(sites))
        missing, report = _write_missing(location, sites)
        checksums = dict(group.attrs["checksums"])
        if report is not None:
            checksums["missing.csv"] = _sha256(report)
        _seal(group, location, complete=True, checksums=checksums)
    return PackResult(location.root, len(sites), len(sites) - missing, missing, len(done))


def _open_or_create(location: Location, dataset: Dataset, size: int, compression: str, shard: int):
    """The store's group: a new one, created whole, or the one to resume (same dataset and settings)."""
    fingerprint = _fingerprint(dataset, size)
    attrs = _attrs(location)
    if attrs is not None and "rcic_store" not in attrs and not attrs.get("rcic_creating"):
        raise DataError("exists and is not an rcic store; choose another --out", location.root)
    if attrs is None and not location.remote and location.root.exists() and any(
            p.name != ".rcic-pack.lock" for p in location.root.iterdir()):
        raise DataError("exists and is not an rcic store; choose another --out", location.root)
    if attrs is None or (attrs.get("rcic_creating") and "rcic_store" not in attrs):
        return _create_store(location, dataset, size, compression, shard, fingerprint)
    _check_attrs(attrs, location.root)
    if attrs.get("fingerprint") != fingerprint:
        raise DataError(f"holds another dataset or size (store of {attrs.get('source')} at {attrs.get('size')} px); "
                        "choose another --out or delete it", location.root)
    for key, value in (("compression", compression), ("shard", shard)):
        if attrs.get(key, 1 if key == "shard" else None) != value:
            raise DataError(f"was packed with --{key} {attrs.get(key)}; resuming with --{key} {value} would mix "
                            f"two {key}s: use --{key} {attrs.get(key)} or another --out", location.root)
    with remote_errors(str(location.root)):
        return zarr.open_group(location.zarr_store(), mode="r+")


def _create_store(location: Location, dataset: Dataset, size: int, compression: str, shard: int, fingerprint: str):
    """Arrays, tables and attributes; ``rcic_store`` is set last, so a killed creation is simply redone."""
    n, c = len(dataset.sites), dataset.channels
    block = shard if shard > 1 else BLOCK
    with remote_errors(str(location.root)):
        # "a", not "w": "w" would clear the folder, and with it the lock file this pack holds
        group = zarr.open_group(location.zarr_store(), mode="a")
        group.attrs["rcic_creating"] = True
        group.create_array("images", shape=(n, c, size, size), chunks=(1, c, size, size),
                           shards=(shard, c, size, size) if shard > 1 else None, dtype="uint8",
                           compressors=_compressors(compression), fill_value=0, overwrite=True)
        group.create_array("stats", shape=(n, c, 2), chunks=(block, c, 2), dtype="float32", fill_value=0.0,
                           compressors=[Crc32cCodec()], overwrite=True)
        group.create_array("ok", shape=(n,), chunks=(block,), dtype="bool", fill_value=True,
                           compressors=[Crc32cCodec()], overwrite=True)
        for stale in ("missing.csv", "submission_order.csv"):
            location.delete(stale)
        tables = {"sites.csv": dataset.sites.to_csv(index=False).encode()}
        if dataset.submission_order is not None:
            tables["submission_order.csv"] = ("id_code\n" + "\n".join(dataset.submission_order) + "\n").encode()
        for name, data in tables.items():
            location.write(name, data)
        checksums = {name: _sha256(data) for name, data in tables.items()}
        checksums.update({f"{a}/zarr.json": _sha256(location.read(f"{a}/zarr.json")) for a in ARRAYS})
    _seal(group, location, rcic_store=STORE_VERSION, fingerprint=fingerprint, layout=dataset.layout,
          source=str(Path(dataset.root).resolve()), size=size, channels=c, compression=compression, shard=shard,
          complete=False, rcic_creating=False, checksums=checksums)
    return group


def _write_missing(location: Location, sites: pd.DataFrame) -> tuple[int, bytes | None]:
    """``missing.csv`` from the blocks' failure records, written once at the end (linear in the blocks)."""
    rows = []
    for name in sorted(location.list("missing")):
        if name.endswith(".json"):
            try:
                records = json.loads(location.read(f"missing/{name}"))
                rows += [{k: r[k] for k in ("id_code", "site", "split", "index", "reason")} for r in records]
            except (ValueError, TypeError, KeyError):
                raise DataError(f"missing/{name} is damaged (a block's record of left-out sites); delete the store "
                                "and pack again", location.root) from None
    if not rows:
        return 0, None
    report = pd.DataFrame(rows, columns=["id_code", "site", "split", "index", "reason"]).sort_values("index")
    data = report.to_csv(index=False).encode()
    location.write("missing.csv", data)
    return len(report), data


class _lock:
    """An exclusive lock on a local store while a pack writes it (object stores have no locks)."""

    def __init__(self, location: Location):
        self.location, self.handle = location, None

    def __enter__(self):
        if self.location.remote:
            return self
        import fcntl

        self.location.root.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.location.root / ".rcic-pack.lock", "a")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            raise DataError("another pack is writing this store; wait for it to finish", self.location.root) from None
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.close()


def _probe_size(data, sites: pd.DataFrame, skip_missing: bool, layout: str) -> int:
    """The sites' size on disk: that of the first readable site."""
    for row in sites.head(1000 if skip_missing else 1).to_dict("records"):
        try:
            return load_site(data, row["id_code"], int(row["site"]), row["split"], channels=(1,),
                             layout=layout).shape[-1]
        except DataError:
            if not skip_missing:
                raise
    raise DataError("no readable site images among the first 1000 sites", data)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


class PackedStore:
    """A finished store: ``dataset`` (site table of the packed sites) and ``read(index)``.

    A site is read straight from its chunk (unsharded) or from a byte range of its shard (the
    shard's index read once and cached), its checksum verified and decoded in one call; this
    path is checked against zarr's own read on first use. A missing or damaged chunk is an error
    that names the site and the store. Clients open lazily, per process (DataLoader workers).
    """

    def __init__(self, path: str | Path):
        self.location = Location(path)
        self.path = self.location.root
        attrs = _attrs(self.location)
        if attrs is None or "rcic_store" not in attrs:
            raise DataError("not an rcic packed store (run `rcic pack` first)", self.path)
        _check_attrs(attrs, self.path)
        if not attrs["complete"]:
            raise DataError("store is incomplete (an interrupted pack): run the same `rcic pack` again "
                            "to resume", self.path)
        self._checksums = attrs["checksums"]
        self.size = attrs["size"]
        self.layout = attrs["layout"]
        self.compression = attrs["compression"]
        self.shard = attrs["shard"]
        self.channels = attrs["channels"]
        self._meta = {a: self._verified_json(f"{a}/zarr.json") for a in ARRAYS}
        sites = self._site_table()
        n = len(sites)
        expected = {"images": [n, self.channels, self.size, self.size], "stats": [n, self.channels, 2], "ok": [n]}
        for name, shape in expected.items():
            if self._meta[name].get("shape") != shape:
                raise DataError(f"{name}/zarr.json: shape {self._meta[name].get('shape')} does not match the store's "
                                f"{n} sites ({shape}): the store is damaged; pack it again", self.path)
        ok = self._read_checked_array("ok")
        sites["store_index"] = np.arange(n)
        sites = sites[ok].reset_index(drop=True)
        order = None
        if "submission_order.csv" in self._checksums:
            order = self._submission_order(sites)
        if "missing.csv" in self._checksums:
            self._verified("missing.csv")  # the report a user reads: damaged, it would misstate what was left out
        self.dataset = Dataset(root=self.path, layout=self.layout, sites=sites, submission_order=order)
        self._images = None
        self._reader = None
        self._index_cache: dict[int, np.ndarray] = {}
        self._pid = os.getpid()

    def _part(self, key: str) -> str | Path:
        return self.location.key(key)

    def _verified(self, key: str) -> bytes:
        """A table or metadata file of the store, checked against the SHA-256 written with it."""
        expected = self._checksums.get(key)
        if not isinstance(expected, str):
            raise DataError("has no checksum in zarr.json for this part: the store is damaged; pack it again",
                            self._part(key))
        try:
            data = self.location.read(key)
        except (FileNotFoundError, NotFound):
            raise DataError("is missing from the store: the store is damaged; pack it again", self._part(key)) from None
        if _sha256(data) != expected:
            raise DataError("changed since it was packed (checksum mismatch; cut or edited?): the store is damaged; "
                            "pack it again", self._part(key))
        return data

    def _verified_json(self, key: str) -> dict:
        try:
            meta = json.loads(self._verified(key))
        except (ValueError, UnicodeDecodeError):
            meta = None
        if not isinstance(meta, dict):
            raise DataError("is not a zarr array's metadata: the store is damaged; pack it again", self._part(key))
        return meta

    def _site_table(self) -> pd.DataFrame:
        data = self._verified("sites.csv")
        try:
            frame = pd.read_csv(_bytes_io(data), dtype=str, keep_default_na=False)
        except (ValueError, UnicodeDecodeError, pd.errors.ParserError):
            raise DataError("is not a readable CSV: the store is damaged; pack it again",
                            self._part("sites.csv")) from None
        return check_site_table(frame, self.layout, str(self._part("sites.csv")))

    def _submission_order(self, sites: pd.DataFrame) -> list[str]:
        where = self._part("submission_order.csv")
        try:
            order = pd.read_csv(_bytes_io(self._verified("submission_order.csv")), dtype=str,
                                keep_default_na=False)["id_code"].tolist()
        except (ValueError, KeyError, UnicodeDecodeError, pd.errors.ParserError):
            raise DataError("is not a readable id_code table: the store is damaged; pack it again", where) from None
        test = sites.loc[(sites["split"] == "test") & (sites["well_type"] == "treatment"), "id_code"]
        if len(order) != len(set(order)) or not set(test) <= set(order):
            raise DataError("does not list the store's test wells once each: the store is damaged; pack it again",
                            where)
        return order

    def _read_checked_array(self, name: str) -> np.ndarray:
        """A small array (``stats``, ``ok``) read chunk by chunk: every chunk there and its CRC-32C right."""
        meta = self._meta[name]
        dtype = {"float32": np.dtype("<f4"), "bool": np.dtype("?")}.get(meta.get("data_type"))
        try:
            codecs = [c["name"] for c in meta["codecs"]]
            chunk = list(meta["chunk_grid"]["configuration"]["chunk_shape"])
        except (KeyError, TypeError):
            codecs, chunk = [], []
        shape = meta["shape"]
        if dtype is None or codecs != ["bytes", "crc32c"] or len(chunk) != len(shape) or chunk[1:] != shape[1:] \
                or not chunk or chunk[0] < 1:
            raise DataError(f"{name}/zarr.json: not the checksummed layout rcic writes (pack it again)", self.path)
        count = -(-shape[0] // chunk[0])
        keys = [f"{name}/c/{i}" + "/0" * (len(shape) - 1) for i in range(count)]
        size = int(np.prod(chunk)) * dtype.itemsize + 4
        parts = []
        for i, raw in enumerate(self.location.read_many(keys)):
            first, last = i * chunk[0], min(shape[0], (i + 1) * chunk[0]) - 1
            if raw is None:
                raise DataError(f"{name} of sites {first}-{last} is missing from the store (chunk {keys[i]} is gone): "
                                "the store is damaged; pack it again", self.path)
            if len(raw) != size or google_crc32c.value(raw) != CRC32C_RESIDUE:
                raise DataError(f"{name} of sites {first}-{last} changed since it was packed (checksum mismatch in "
                                f"{keys[i]}): the store is damaged; pack it again", self.path)
            parts.append(np.frombuffer(memoryview(raw)[:-4], dtype).reshape(chunk))
        return np.concatenate(parts)[: shape[0]] if parts else np.zeros(shape, dtype)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_images=None, _reader=None, _index_cache={}, _pid=None)
        return state

    def _own_process(self) -> None:
        """After a fork (DataLoader workers), open this process's own readers and clients."""
        if self._pid != os.getpid():
            self._images, self._reader, self._pid = None, None, os.getpid()

    @property
    def images(self):
        self._own_process()
        if self._images is None:
            numcodecs.blosc.set_nthreads(1)  # one decoding thread per reader (DataLoader workers read in parallel)
            with remote_errors(str(self.path)):
                group = zarr.open_group(self.location.zarr_store(read_only=True), mode="r")
                self._images = group["images"]
        return self._images

    def _site_name(self, index: int) -> str:
        rows = self.dataset.sites
        hit = rows[rows["store_index"] == index]
        return f"site #{index}" if hit.empty else f"{hit.iloc[0]['id_code']} site {hit.iloc[0]['site']}"

    def read(self, store_index: int) -> np.ndarray:
        """One site as (C, S, S) uint8; a missing or damaged chunk is a ``DataError`` naming it."""
        self._own_process()
        if self._reader is None:
            self._reader = self._direct_reader()
        try:
            return self._reader(int(store_index))
        except (FileNotFoundError, NotFound):
            raise DataError(f"{self._site_name(store_index)} is missing from the store (its chunk is gone): the "
                            "store is damaged; pack it again", self.path) from None
        except (ValueError, RuntimeError) as err:
            raise DataError(f"{self._site_name(store_index)} cannot be decoded ({str(err).splitlines()[0][:120]}): "
                            "the store is damaged; pack it again", self.path) from None

    def _direct_reader(self):
        """Read a site's chunk bytes and decode them in one call, skipping zarr's per-read machinery.

        zarr's generic read path costs ~0.4 ms per site, as much as decoding an LZ4 chunk; for the
        layouts rcic writes (one chunk per site, optionally in shards; bytes + blosc + crc32c) a
        site is one chunk, and zarr's own read would return zeros for a missing one. Checked
        against zarr's read on the first site; any other layout is refused (rcic writes none).
        """
        meta = self._meta["images"]
        unknown = DataError("images/zarr.json: not a layout rcic writes (pack the data again)", self.path)
        try:
            codecs = meta.get("codecs", [])
            shape = meta["shape"]
            channels = shape[1]
            sharded = bool(codecs) and codecs[0]["name"] == "sharding_indexed"
            if sharded:
                config = codecs[0]["configuration"]
                inner = [c["name"] for c in config["codecs"]]
                shard = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
                if config.get("index_location", "end") != "end" or config["chunk_shape"][0] != 1:
                    raise unknown
                index_crc = [c["name"] for c in config["index_codecs"]] == ["bytes", "crc32c"]
            else:
                inner = [c["name"] for c in codecs]
                shard, index_crc = 1, False
                if meta["chunk_grid"]["configuration"]["chunk_shape"][0] != 1:
                    raise unknown
        except (KeyError, TypeError, IndexError, AttributeError):
            raise unknown from None
        if inner not in (["bytes", "crc32c"], ["bytes", "blosc", "crc32c"]) or not index_crc and sharded:
            raise unknown
        if meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator") != "/":
            raise unknown
        blosc, crc = "blosc" in inner, "crc32c" in inner
        site_shape = (channels, self.size, self.size)
        location = self.location

        def index_of(shard_no: int) -> np.ndarray:
            cached = self._index_cache.get(shard_no)
            if cached is None:
                n = shard  # the index covers the whole shard grid, also for the last, partial shard
                size = n * 16 + (4 if index_crc else 0)
                raw = location.read(f"images/c/{shard_no}/0/0/0", start=-size)
                if len(raw) != size:
                    raise ValueError(f"shard {shard_no} is cut short ({len(raw)} bytes, less than its index)")
                body = raw[:-4] if index_crc else raw
                if index_crc and _crc32c(body) != raw[-4:]:
                    raise ValueError("checksum mismatch in the shard index")
                cached = np.frombuffer(body, "<u8").reshape(n, 2)
                self._index_cache[shard_no] = cached
            return cached

        def read(index: int) -> np.ndarray:
            if sharded:
                offset, nbytes = index_of(index // shard)[index % shard]
                if offset == _EMPTY:
                    raise FileNotFoundError(index)
                raw = location.read(f"images/c/{index // shard}/0/0/0", start=int(offset), end=int(offset + nbytes))
            else:
                raw = location.read(f"images/c/{index}/0/0/0")
            if crc:
                # CRC-32C of (bytes + their stored CRC) is a constant: one pass, no copy of the chunk
                if google_crc32c.value(raw) != CRC32C_RESIDUE:
                    raise ValueError("checksum mismatch: the chunk's bytes changed since it was written")
                raw = memoryview(raw)[:-4]
            out = np.empty(site_shape, np.uint8)  # writable: handed to torch as it is
            if blosc:
                numcodecs.blosc.decompress(raw, out)
            else:
                out.reshape(-1)[:] = np.frombuffer(raw, np.uint8)
            return out

        numcodecs.blosc.set_nthreads(1)
        probe = int(self.dataset.sites["store_index"].iloc[0]) if len(self.dataset.sites) else None
        if probe is None:
            return read
        try:
            agrees = np.array_equal(read(probe), self.images[probe])
        except (FileNotFoundError, NotFound, ValueError, RuntimeError):
            return read  # the probed site is damaged: the direct path reports it, site by site
        if not agrees:  # a bug of rcic or zarr, not of the user's data
            raise RuntimeError(f"{self.path}: the direct chunk read disagrees with zarr's on site #{probe}")
        return read

    def channel_stats(self) -> np.ndarray:
        """(n_sites, C, 2) per-channel mean and std of each packed site, in site-table order."""
        stats = self._read_checked_array("stats")
        return stats[self.dataset.sites["store_index"].to_numpy()]

    def nbytes_stored(self) -> int:
        if self.location.remote:
            return int(sum(self.location.fs.du(self.location.key("images"), total=False).values()))
        folder = Path(self.path) / "images"
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _crc32c(data: bytes) -> bytes:
    return np.uint32(google_crc32c.value(data)).tobytes()


def _bytes_io(data: bytes):
    import io

    return io.BytesIO(data)
