"""RxRx3-core's images: a site table from the metadata, and sites read from the parquet shards.

A well is one site of six 512 x 512 JPEG 2000 images, rows ``{experiment}/Plate{plate}/{address}_s1_{c}``
of the shards ``data/*.parquet``. The shards are indexed once per process (their ``__key__`` column
only); a site's six images are read from their row group, which is cached, so packing in key order
reads every row group once.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from rcic.errors import DataError
from rcic.io.metadata import SITE_COLUMNS, Dataset
from rcic.rxrx3.formats import METADATA_FILE, N_CHANNELS, image_key, profiles_metadata, read_metadata

LAYOUT = "rxrx3-core"


@lru_cache(maxsize=4)
def shard_index(root: str) -> pd.DataFrame:
    """key -> (file, row group, row in group) over every shard of ``root/data``."""
    import pyarrow.parquet as pq

    files = sorted((Path(root) / "data").glob("*.parquet"))
    if not files:
        raise DataError("no image shards (data/*.parquet)", root)
    parts = []
    for f, path in enumerate(files):
        try:
            handle = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises its own types for a file that is not parquet
            raise DataError(f"not a readable parquet file ({type(err).__name__})", path) from None
        if "__key__" not in handle.schema_arrow.names or "jp2" not in handle.schema_arrow.names:
            raise DataError("an image shard has the columns __key__ and jp2", path)
        for g in range(handle.num_row_groups):
            keys = handle.read_row_group(g, columns=["__key__"]).column(0).to_numpy(zero_copy_only=False)
            parts.append(pd.DataFrame({"key": keys, "file": f, "group": g, "row": np.arange(len(keys))}))
    index = pd.concat(parts, ignore_index=True)
    index.attrs["files"] = [str(p) for p in files]
    return index.set_index("key")


_group_cache: dict = {}


def _row_group(path: str, group: int) -> list[bytes]:
    """The JPEG 2000 bytes of one row group (the last one read is kept: sites are read in key order)."""
    import pyarrow.parquet as pq

    if _group_cache.get("id") != (path, group):
        column = pq.ParquetFile(path).read_row_group(group, columns=["jp2"]).column(0)
        values = column.to_pylist()
        _group_cache.update(id=(path, group), values=[v["bytes"] if isinstance(v, dict) else v for v in values])
    return _group_cache["values"]


def load_site(root: str | Path, id_code: str, site: int = 1, channels=tuple(range(1, N_CHANNELS + 1)),
              experiment: str | None = None, plate: int | None = None, well: str | None = None) -> np.ndarray:
    """One well's site as (C, 512, 512) uint8, decoded from the shards."""
    import imagecodecs

    if experiment is None:
        experiment, plate_text, well = str(id_code).rsplit("_", 2)
        plate = int(plate_text)
    index = shard_index(str(root))
    files = index.attrs["files"]
    planes = []
    for c in channels:
        key = image_key(experiment, plate, well, c, site)
        try:
            f, group, row = index.loc[key, ["file", "group", "row"]]
        except KeyError:
            raise DataError(f"image {key} is in no shard", Path(root) / "data") from None
        data = _row_group(files[int(f)], int(group))[int(row)]
        try:
            plane = imagecodecs.jpeg2k_decode(data)
        except Exception as err:  # imagecodecs raises its own error types
            raise DataError(f"image {key} is not a readable JPEG 2000 ({type(err).__name__})", files[int(f)]) from None
        planes.append(np.asarray(plane, np.uint8))
    if len({p.shape for p in planes}) != 1:
        raise DataError(f"channels of {id_code} differ in size", Path(root) / "data")
    return np.stack(planes)


def read_dataset(root: str | Path) -> Dataset:
    """The site table of a download (one site per well), in the shards' key order."""
    root = Path(root)
    metadata = read_metadata(root / METADATA_FILE)
    meta = profiles_metadata(metadata)
    sites = meta.assign(site=1, split="train", plate=metadata["plate"].to_numpy())
    index = shard_index(str(root))
    keys = [image_key(e, p, w, 1) for e, p, w in zip(sites["experiment"], sites["plate"], sites["well"])]
    position = index.index.get_indexer(keys)
    if (position < 0).any():
        missing = int((position < 0).sum())
        raise DataError(f"{missing} wells of the metadata have no image in the shards (first "
                        f"{keys[int(np.argmax(position < 0))]})", root / "data")
    sites = sites.iloc[np.argsort(position, kind="stable")][SITE_COLUMNS].reset_index(drop=True)
    return Dataset(root=root, layout=LAYOUT, sites=sites)
