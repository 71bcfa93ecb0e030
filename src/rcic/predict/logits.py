"""Logits files: what ``rcic predict`` writes and ``rcic submit`` reads.

An ``.npz`` with ``id_code`` (one per well), ``logits`` (wells x classes, float32) and
``classes`` (labels as spelled in the data); optionally ``embeddings`` (pooled features),
``labels`` (true labels of validation wells) and ``runs`` (what made it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rcic.atomic import atomic_path
from rcic.errors import DataError


@dataclass
class Logits:
    id_code: np.ndarray
    logits: np.ndarray
    classes: list[str]
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    wells: pd.DataFrame | None = None  # the wells' metadata where prediction made them (not stored)
    site_logits: np.ndarray | None = None  # (wells, 2, classes) where asked for (not stored)


def save_logits(path: str | Path, logits: Logits) -> None:
    path = Path(path)
    if path.suffix != ".npz":
        raise DataError("logits files end in .npz", path)
    with atomic_path(path) as tmp:
        np.savez(tmp, id_code=np.asarray(logits.id_code, dtype=str), logits=logits.logits.astype(np.float32),
                 classes=np.asarray(logits.classes, dtype=str), **logits.extra)


def load_logits(path: str | Path) -> Logits:
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise DataError("logits file not found" if not path.exists() else "is not a regular file", path)
    if path.stat().st_size == 0:
        raise DataError("empty file (0 bytes): not a logits file", path)
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic == b"\x93NUMPY":
            raise DataError("a single .npy array, not an .npz logits archive (id_code, logits, classes)", path)
        _check_npz_headers(path)
        with np.load(path, allow_pickle=False) as f:
            if not hasattr(f, "files"):
                raise ValueError("a single array, not an .npz archive")
            data = {k: f[k] for k in f.files}
    except PermissionError:
        raise DataError("cannot read the file (permission denied)", path) from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, MemoryError) as err:
        raise DataError(f"not a readable .npz logits file (truncated or another format: {type(err).__name__})",
                        path) from None
    missing = [k for k in ("id_code", "logits", "classes") if k not in data]
    if missing:
        raise DataError(f"missing array(s) {', '.join(missing)}", path)
    ids, logits, classes = data.pop("id_code").astype(str), data.pop("logits"), data.pop("classes").astype(str)
    if ids.ndim != 1 or classes.ndim != 1:
        raise DataError(f"id_code and classes must be lists (1-D), not arrays of shape {ids.shape} and "
                        f"{classes.shape}", path)
    if not len(ids) or not len(classes):
        raise DataError(f"logits of {len(ids)} wells x {len(classes)} classes: nothing to submit or evaluate", path)
    if logits.dtype.kind not in "fiu":
        raise DataError(f"logits are not numbers (dtype {logits.dtype})", path)
    if logits.ndim != 2 or logits.shape != (len(ids), len(classes)):
        raise DataError(f"logits shape {logits.shape} does not match {len(ids)} ids x {len(classes)} classes", path)
    if not np.isfinite(logits).all():
        bad = ids[~np.isfinite(logits).all(axis=1)][0]
        raise DataError(f"NaN or infinite logits (first at well {bad})", path)
    with np.errstate(over="ignore"):
        single = logits.astype(np.float32)
    if not np.isfinite(single).all():
        bad = ids[~np.isfinite(single).all(axis=1)][0]
        raise DataError(f"logits too large for float32 (first at well {bad}; |value| above 3.4e38)", path)
    if len(set(ids)) != len(ids):
        first = next(i for i in ids if (ids == i).sum() > 1)
        raise DataError(f"duplicate id_code {first!r} in logits", path)
    if len(set(classes)) != len(classes):
        first = next(c for c in classes if (classes == c).sum() > 1)
        raise DataError(f"class {first!r} appears twice in the logits' classes: a label must name one column", path)
    return Logits(ids, single, classes.tolist(), data)


MAX_ARRAY_BYTES = 16 << 30  # far above any RxRx1 logits or embeddings (~62,755 wells x 1139 classes)


def _check_npz_headers(path: Path) -> None:
    """Each array's header, read before numpy allocates it: a shape its stored bytes cannot hold is refused."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(member)
            if dtype.hasobject:
                raise DataError(f"array {info.filename[:-4]} holds Python objects: not a logits file", path)
            count = int(np.prod(shape, dtype=object))
            nbytes = count * dtype.itemsize
            if nbytes > info.file_size or nbytes > MAX_ARRAY_BYTES:
                raise DataError(f"array {info.filename[:-4]} claims shape {tuple(shape)} ({nbytes:,} bytes), more than "
                                f"its {info.file_size:,} stored bytes: a damaged or forged file", path)


def average_logits(paths: list[str | Path]) -> Logits:
    """Mean of several logits files (an ensemble); ids are aligned, classes must match."""
    files = [load_logits(p) for p in paths]
    first = files[0]
    order = {k: i for i, k in enumerate(first.id_code)}
    total = first.logits.astype(np.float64)
    for path, other in zip(paths[1:], files[1:]):
        if other.classes != first.classes:
            raise DataError("classes differ from the first logits file", path)
        if set(other.id_code) != set(order):
            raise DataError("wells differ from the first logits file", path)
        total[[order[i] for i in other.id_code]] += other.logits
    return Logits(first.id_code, (total / len(files)).astype(np.float32), first.classes)
