"""Well embeddings as a parquet table: rcic's own (``rcic embed``) or any a user brings.

One row per well, the metadata columns ``META_COLUMNS`` and the features as ``emb_0..emb_{D-1}``.
Any parquet with those columns is accepted (CellProfiler profiles, a foundation model's
features): the other commands read nothing else.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from rcic.atomic import atomic_path
from rcic.errors import DataError

META_COLUMNS = ["id_code", "experiment", "plate", "well", "cell_type", "well_type", "label"]
WELL_TYPES = ("treatment", "positive_control", "negative_control")


def embedding_frame(wells: pd.DataFrame, features: np.ndarray) -> pd.DataFrame:
    """The table of ``rcic embed``: metadata columns, then ``emb_*`` (float32)."""
    meta = wells[META_COLUMNS].reset_index(drop=True).copy()
    meta["plate"] = meta["plate"].astype(int)
    meta["label"] = meta["label"].fillna("").astype(str)
    emb = pd.DataFrame(features.astype(np.float32), columns=[f"emb_{i}" for i in range(features.shape[1])])
    return pd.concat([meta, emb], axis=1)


def write_embeddings(path: str | Path, frame: pd.DataFrame) -> None:
    path = Path(path)
    if path.suffix != ".parquet":
        raise DataError("embeddings are written as parquet: give a file name ending in .parquet", path)
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def read_embeddings(path: str | Path) -> tuple[pd.DataFrame, np.ndarray]:
    """(metadata, features) of an embeddings parquet; anything unusable is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise DataError("embeddings file not found" if not path.exists() else "is not a file", path)
    try:
        frame = pd.read_parquet(path)
    except PermissionError:
        raise DataError("cannot read the file (permission denied)", path) from None
    except Exception as err:  # pyarrow raises its own types for a file that is not parquet
        raise DataError(f"not a readable parquet file ({type(err).__name__})", path) from None
    missing = [c for c in META_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"missing metadata column(s) {', '.join(missing)} (an embeddings table has "
                        f"{', '.join(META_COLUMNS)} and emb_0, emb_1, ...)", path)
    features = [c for c in frame.columns if str(c).startswith("emb_")]
    if not features:
        raise DataError("no emb_* columns: the features must be columns emb_0, emb_1, ...", path)
    features = sorted(features, key=lambda c: int(c[4:]) if c[4:].isdigit() else 10**9)
    try:
        x = frame[features].to_numpy(np.float64)
    except (TypeError, ValueError):
        raise DataError("the emb_* columns are not all numbers", path) from None
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise DataError(f"{int(bad.sum())} wells have NaN or infinite embeddings (first "
                        f"{frame['id_code'].iloc[int(np.argmax(bad))]!r})", path)
    meta = frame[META_COLUMNS].copy()
    for column in META_COLUMNS:
        meta[column] = meta[column].astype(str).str.strip() if column != "plate" else meta[column]
    meta["label"] = meta["label"].replace({"nan": "", "None": ""})
    unknown = ~meta["well_type"].isin(WELL_TYPES)
    if unknown.any():
        raise DataError(f"unknown well_type {meta['well_type'][unknown].iloc[0]!r} (expected "
                        f"{', '.join(WELL_TYPES)})", path)
    if meta["id_code"].duplicated().any():
        raise DataError(f"duplicate id_code {meta['id_code'][meta['id_code'].duplicated()].iloc[0]!r}", path)
    if len(meta) < 2:
        raise DataError("fewer than two wells", path)
    return meta.reset_index(drop=True), x
