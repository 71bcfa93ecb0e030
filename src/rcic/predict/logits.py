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
        raise DataError("logits file not found" if not path.exists() else "is not a file", path)
    if path.stat().st_size == 0:
        raise DataError("empty file (0 bytes): not a logits file", path)
    try:
        with np.load(path, allow_pickle=False) as f:
            if not hasattr(f, "files"):
                raise ValueError("a single array, not an .npz archive")
            data = {k: f[k] for k in f.files}
    except PermissionError:
        raise DataError("cannot read the file (permission denied)", path) from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise DataError(f"not a readable .npz logits file (truncated or another format: {type(err).__name__})",
                        path) from None
    missing = [k for k in ("id_code", "logits", "classes") if k not in data]
    if missing:
        raise DataError(f"missing array(s) {', '.join(missing)}", path)
    ids, logits, classes = data.pop("id_code").astype(str), data.pop("logits"), data.pop("classes").astype(str)
    if logits.dtype.kind not in "fiu":
        raise DataError(f"logits are not numbers (dtype {logits.dtype})", path)
    if logits.ndim != 2 or logits.shape != (len(ids), len(classes)):
        raise DataError(f"logits shape {logits.shape} does not match {len(ids)} ids x {len(classes)} classes", path)
    if not np.isfinite(logits).all():
        bad = ids[~np.isfinite(logits).all(axis=1)][0]
        raise DataError(f"NaN or infinite logits (first at well {bad})", path)
    if len(set(ids)) != len(ids):
        raise DataError("duplicate id_code in logits", path)
    return Logits(ids, logits.astype(np.float32), classes.tolist(), data)


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
