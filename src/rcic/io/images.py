"""Site images: read the 6 channel PNGs of a site, and map a site to an RGB composite.

PNG layouts:
- Kaggle: ``{root}/{train|test}/{experiment}/Plate{plate}/{well}_s{site}_w{channel}.png``
- RxRx1 release: ``{root}/images/{experiment}/Plate{plate}/{well}_s{site}_w{channel}.png``
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from rcic.errors import DataError

CHANNELS = (1, 2, 3, 4, 5, 6)

# Recursion's reference colour map (rxrx1 utilities): colour and intensity range [0, hi] per channel.
RGB_MAP = {
    1: ((19, 0, 249), 51),
    2: ((42, 255, 31), 107),
    3: ((255, 0, 25), 64),
    4: ((45, 255, 252), 191),
    5: ((250, 0, 253), 89),
    6: ((254, 255, 40), 191),
}

cv2.setNumThreads(1)  # decoding runs in DataLoader / pack workers: one thread each


def parse_id_code(id_code: str) -> tuple[str, int, str]:
    """``HEPG2-01_1_B03`` -> (``HEPG2-01``, 1, ``B03``)."""
    parts = str(id_code).rsplit("_", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        raise DataError(f"id_code {id_code!r} is not of the form EXPERIMENT_PLATE_WELL")
    return parts[0], int(parts[1]), parts[2]


def site_png_path(root: str | Path, id_code: str, site: int, channel: int, split: str = "train") -> Path:
    """Path of one channel PNG, in the Kaggle layout or the RxRx1 release layout."""
    root = Path(root)
    experiment, plate, well = parse_id_code(id_code)
    base = root / split
    if not base.is_dir() and (root / "images").is_dir():
        base = root / "images"
    return base / experiment / f"Plate{plate}" / f"{well}_s{site}_w{channel}.png"


def read_png(path: Path) -> np.ndarray:
    """One channel as a (H, W) uint8 array; a clear error names a missing or corrupt file."""
    if not path.is_file():
        raise DataError("channel image not found", path)
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DataError("not a readable PNG image (corrupt or truncated)", path)
    if image.ndim != 2:
        raise DataError(f"expected a single-channel image, found shape {image.shape}", path)
    if image.dtype == np.uint16:  # some re-exports are 16-bit; keep rcic's uint8 contract
        image = (image >> 8).astype(np.uint8)
    return image


def load_site(
    root: str | Path,
    id_code: str,
    site: int,
    split: str = "train",
    channels: Sequence[int] = CHANNELS,
) -> np.ndarray:
    """Load one site from the PNG layout as a (C, H, W) uint8 array (C = 6 by default)."""
    planes = [read_png(site_png_path(root, id_code, site, c, split)) for c in channels]
    shapes = {p.shape for p in planes}
    if len(shapes) != 1:
        path = site_png_path(root, id_code, site, channels[0], split)
        raise DataError(f"channels of site {id_code}_s{site} differ in size: {sorted(shapes)}", path.parent)
    return np.stack(planes)


def to_rgb(image: np.ndarray, channels: Sequence[int] = CHANNELS, vmax: float = 255) -> np.ndarray:
    """Colour composite of a (H, W, C) image, pixel for pixel equal to Recursion's reference.

    Channel ``channels[i]`` of the map colours plane ``i``: x = min((t / vmax) / (hi / 255), 1),
    contribution ``int(x * colour)`` per RGB component, summed and clipped at 255.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != len(channels):
        raise DataError(f"to_rgb expects (H, W, {len(channels)}), got {image.shape}")
    colours = np.array([RGB_MAP[c][0] for c in channels], dtype=np.float64)  # (C, 3)
    scale = np.array([RGB_MAP[c][1] / 255 for c in channels], dtype=np.float64)
    x = (image / vmax) / scale + 0.0  # same float64 operations as the reference, so same rounding
    x = np.where(x > 1.0, 1.0, x)
    contrib = (x[..., None] * colours).astype(np.int64)  # (H, W, C, 3), truncated toward zero
    return np.minimum(contrib.sum(axis=2), 255).astype(np.uint8)
