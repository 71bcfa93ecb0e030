"""One interface over a PNG folder and a packed store, so training and prediction read both alike."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from rcic.errors import DataError
from rcic.io.images import load_site
from rcic.io.metadata import Dataset, read_dataset
from rcic.store.packed import PackedStore, is_store


class ImageSource(Protocol):
    dataset: Dataset

    def read_site(self, row: pd.Series | dict) -> np.ndarray: ...

    def channel_stats(self, progress: Callable[[int, int], None] | None = None) -> np.ndarray: ...


class PngSource:
    """Sites read from the PNG layout (six decodes per site)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.dataset = read_dataset(self.root)
        self.image_size: int | None = None
        self._stats: np.ndarray | None = None

    def read_site(self, row) -> np.ndarray:
        return load_site(self.root, row["id_code"], int(row["site"]), row["split"], layout=self.dataset.layout)

    def channel_stats(self, progress=None) -> np.ndarray:
        """(n_sites, C, 2) per-channel mean and std, by reading every site once (pack to avoid this).

        Cached: training, validation and every run of an ensemble share one pass over the PNGs.
        """
        if self._stats is not None:
            return self._stats
        sites = self.dataset.sites
        channels = self.dataset.channels
        out = np.zeros((len(sites), channels, 2), np.float32)
        for i, row in enumerate(sites.to_dict("records")):
            flat = self.read_site(row).reshape(channels, -1).astype(np.float32)
            out[i, :, 0], out[i, :, 1] = flat.mean(-1), flat.std(-1)
            if progress:
                progress(i + 1, len(sites))
        self._stats = out
        return out


class StoreSource:
    """Sites read from a packed zarr store."""

    def __init__(self, path: str | Path):
        self.store = PackedStore(path)
        self.dataset = self.store.dataset
        self.image_size = self.store.size

    def read_site(self, row) -> np.ndarray:
        return self.store.read(int(row["store_index"]))

    def channel_stats(self, progress=None) -> np.ndarray:
        return self.store.channel_stats()


def open_source(path: str | Path) -> PngSource | StoreSource:
    """A packed store (folder or object-store URL) if ``path`` is one, else a PNG download in any layout."""
    from rcic.store.location import is_url, normalize

    path = normalize(path)
    if is_url(path):
        from rcic.store.location import Location

        Location(path).check_bucket()
    if is_store(path):
        return StoreSource(path)
    if is_url(path):
        raise DataError("not an rcic packed store (only packed stores are read from object storage; pack the "
                        "PNG download with rcic pack --out URL)", path)
    return PngSource(path)
