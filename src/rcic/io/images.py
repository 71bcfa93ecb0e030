"""Site images: read a site's channel PNGs, and map a site to an RGB composite.

PNG layouts:
- Kaggle: ``{root}/{train|test}/{experiment}/Plate{plate}/{well}_s{site}_w{channel}.png``
- RxRx1 release: ``{root}/images/{experiment}/Plate{plate}/{well}_s{site}_w{channel}.png``
- WILDS release: ``{root}/images/{experiment}/Plate{plate}/{well}_s{site}.png`` (one RGB composite)
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
# rcic reports a bad image itself, in one line; OpenCV's own log lines would come before it on stderr
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_SIDE = 8192  # RxRx1's sites are 512 px; a larger header is a damaged or foreign file, refused before decoding


def parse_id_code(id_code: str) -> tuple[str, int, str]:
    """``HEPG2-01_1_B03`` -> (``HEPG2-01``, 1, ``B03``); anything that could leave the data folder is refused."""
    from rcic.io.metadata import _WELL_RE, NAME_RE

    parts = str(id_code).rsplit("_", 2)
    if (len(parts) != 3 or not parts[1].isdigit() or not NAME_RE.fullmatch(parts[0])
            or not _WELL_RE.fullmatch(parts[2])):
        raise DataError(f"id_code {id_code!r} is not of the form EXPERIMENT_PLATE_WELL (e.g. HEPG2-01_1_B03)")
    return parts[0], int(parts[1]), parts[2]


def image_folder(root: str | Path, experiment: str, split: str | None = None) -> Path:
    """The folder holding an experiment's plates: ``train/``, ``test/`` (Kaggle) or ``images/`` (releases).

    ``split=None`` finds the experiment wherever it is on disk (train/, test/, then images/).
    """
    root = Path(root)
    if split in ("train", "test") and (root / split).is_dir():
        return root / split
    candidates = ["train", "test", "images"] if split is None else ["images", "train", "test"]
    for name in candidates:
        if (root / name / experiment).is_dir():
            return root / name
    return root / (split if split in ("train", "test") else "images")


def site_png_path(root: str | Path, id_code: str, site: int, channel: int | None, split: str | None = None) -> Path:
    """Path of one channel PNG (``channel=None``: the WILDS release's RGB composite of the site)."""
    experiment, plate, well = parse_id_code(id_code)
    name = f"{well}_s{site}.png" if channel is None else f"{well}_s{site}_w{channel}.png"
    return image_folder(root, experiment, split) / experiment / f"Plate{plate}" / name


def read_png(path: Path, colour: bool = False) -> np.ndarray:
    """One channel as (H, W) uint8 (``colour``: an RGB image as (H, W, 3)); a clear error names a bad file.

    The header is checked before decoding (a PNG, at most ``MAX_SIDE`` pixels a side), and only a
    regular file is opened (a FIFO would block). A 16-bit PNG whose values fit in 8 bits (8-bit data
    stored wide) is read as it is; one with larger values is refused rather than rescaled, because no
    single scale is right for every channel of a site.
    """
    import stat

    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError
        if not stat.S_ISREG(info.st_mode):
            raise DataError("is not a regular file (a FIFO, socket or device): not an image", path)
        with open(path, "rb") as f:
            raw = np.frombuffer(f.read(), dtype=np.uint8)
    except FileNotFoundError:
        raise DataError("channel image not found", path) from None
    except PermissionError:
        raise DataError("cannot read the image (permission denied)", path) from None
    except IsADirectoryError:
        raise DataError("is a folder, not an image", path) from None
    except OSError as err:
        raise DataError(f"cannot read the image ({err.strerror or err})", path) from None
    head = raw[:33].tobytes()
    if len(head) < 33 or not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR":
        raise DataError("not a readable PNG image (corrupt, truncated or another format)", path)
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise DataError(f"PNG header claims {width} x {height} pixels; rcic reads sites of at most {MAX_SIDE} px a "
                        "side (RxRx1's are 512): a damaged or foreign file", path)
    _check_chunks(raw, path)
    image = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DataError("not a readable PNG image (corrupt or truncated)", path)
    if image.dtype == np.uint16:
        top = int(image.max())
        if top > 255:
            raise DataError(f"16-bit PNG with values up to {top}: rcic reads 8-bit intensities (RxRx1's PNGs are "
                            "8-bit); convert the images to 8-bit", path)
        image = image.astype(np.uint8)  # 8-bit values stored wide: the same intensities
    elif image.dtype != np.uint8:
        raise DataError(f"PNG of {image.dtype} pixels: rcic reads 8-bit images", path)
    if colour:
        if image.ndim == 2:
            raise DataError("expected a colour (RGB) image, found a single channel", path)
        return cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2RGB)
    if image.ndim != 2:
        raise DataError(f"expected a single-channel image, found shape {image.shape}", path)
    return image


def _check_chunks(raw: np.ndarray, path: Path) -> None:
    """Every PNG chunk whole and its CRC right, up to IEND: a cut or damaged file is refused here, before libpng
    would print its own complaint on stderr (a line outside rcic's one-line error)."""
    import zlib

    data = memoryview(raw)
    offset = len(PNG_SIGNATURE)
    while offset + 12 <= len(data):
        length = int.from_bytes(data[offset:offset + 4], "big")
        end = offset + 12 + length
        if end > len(data):
            break
        if zlib.crc32(data[offset + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            kind = bytes(data[offset + 4:offset + 8]).decode("latin1")
            raise DataError(f"not a readable PNG image (a damaged {kind!r} chunk: checksum mismatch)", path)
        if bytes(data[offset + 4:offset + 8]) == b"IEND":
            return
        offset = end
    raise DataError("not a readable PNG image (truncated: it ends before its last chunk)", path)


def load_site(
    root: str | Path,
    id_code: str,
    site: int = 1,
    split: str | None = None,
    channels: Sequence[int] = CHANNELS,
    layout: str | None = None,
) -> np.ndarray:
    """Load one site from the PNG layout as a (C, H, W) uint8 array.

    C = 6 channel PNGs (Kaggle and RxRx1 layouts), or 3 for the WILDS release's RGB composite
    (``layout="wilds"``, or found on disk when ``layout`` is None). ``split`` (train/test) picks
    the Kaggle folder; None finds the experiment on disk.
    """
    if layout == "wilds" or (layout is None and _is_composite(root, id_code, site, split)):
        return read_png(site_png_path(root, id_code, site, None, split), colour=True).transpose(2, 0, 1).copy()
    planes = [read_png(site_png_path(root, id_code, site, c, split)) for c in channels]
    shapes = {p.shape for p in planes}
    if len(shapes) != 1:
        path = site_png_path(root, id_code, site, channels[0], split)
        raise DataError(f"channels of site {id_code}_s{site} differ in size: {sorted(shapes)}", path.parent)
    return np.stack(planes)


def _is_composite(root, id_code: str, site: int, split: str | None) -> bool:
    return (not site_png_path(root, id_code, site, 1, split).exists()
            and site_png_path(root, id_code, site, None, split).exists())


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
