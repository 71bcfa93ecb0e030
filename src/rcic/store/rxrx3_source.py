"""RxRx3-core beside the PNG layouts when packing: the same two calls, ``read_dataset`` and ``load_site``,
dispatched on the download (``rcic.rxrx3.images`` reads its parquet shards of JPEG 2000 images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rcic.io import images as png
from rcic.io import metadata as png_metadata
from rcic.io.metadata import Dataset


def read_dataset(root: str | Path) -> Dataset:
    from rcic.rxrx3.formats import is_rxrx3_core_folder

    if is_rxrx3_core_folder(root):
        from rcic.rxrx3.images import read_dataset as read_rxrx3

        return read_rxrx3(root)
    return png_metadata.read_dataset(root)


def load_site(root, id_code: str, site: int = 1, split: str | None = None, channels=png.CHANNELS,
              layout: str | None = None) -> np.ndarray:
    if layout == "rxrx3-core":
        from rcic.rxrx3.images import load_site as load_rxrx3

        return load_rxrx3(root, id_code, site, channels)
    return png.load_site(root, id_code, site, split, channels=channels, layout=layout)


LAYOUTS = (*png_metadata.LAYOUTS, "rxrx3-core")


def check_site_table(frame, layout: str, path: Path | str):
    """A stored site table checked as its layout's: RxRx1's rules, or RxRx3-core's (1,536-well plates 1-48,
    one site per well, experiments named gene-NNN / compound-NNN, cell type HUVEC)."""
    if layout != "rxrx3-core":
        return png_metadata.check_site_table(frame, layout, path)
    from rcic.errors import DataError
    from rcic.io.metadata import SITE_COLUMNS, WELL_TYPES
    from rcic.rxrx3.formats import ADDRESS_RE

    if list(frame.columns) != SITE_COLUMNS:
        raise DataError(f"columns {', '.join(map(str, frame.columns))} are not the site table's "
                        f"({', '.join(SITE_COLUMNS)})", path)
    plate = frame["plate"].where(frame["plate"].str.fullmatch(r"[1-9]\d?"), "0").astype(int)
    checks = [(~plate.between(1, 48), "plate", "outside 1-48"),
              (~frame["well"].str.fullmatch(ADDRESS_RE), "well", "is not a 1,536-well address"),
              (frame["site"] != "1", "site", "is not 1 (RxRx3-core has one site per well)"),
              (~frame["well_type"].isin(WELL_TYPES), "well_type", "is unknown"),
              (frame["id_code"] != frame["experiment"] + "_" + frame["plate"] + "_" + frame["well"], "id_code",
               "disagrees with its experiment, plate and well")]
    for bad, column, what in checks:
        if bad.any():
            row = int(np.argmax(bad.to_numpy()))
            raise DataError(f"{column} {frame[column].iloc[row]!r} {what} (row {row + 2})", path)
    return frame.assign(plate=plate, site=1)
