"""Channel intensities of the synthetic sites, matched per cell type to the real RxRx1 PNGs.

The renderer draws cells in arbitrary units; a monotone tone curve per cell type and channel then
maps those values to grey levels so that a site of the negative control, with no batch effect, has
the pixel distribution of the real sites of its cell type (quantile matching: the raw value at
quantile q becomes the real grey level at quantile q). The morphology is untouched; mean, median,
dark and bright tails and the share of saturated pixels follow the real channels. Batch effects
(gain, offset, camera noise) act after the curve, so experiments and plates still differ.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

# Quantiles at which the real and the synthetic distributions are matched (the extreme 0.1% are
# left out: a site's single brightest pixel says little about its cell type).
QUANTILES = np.array([.001, .01, .02, .05, .1, .2, .3, .4, .5, .6, .7, .8, .9, .95, .98, .99, .995, .999])

# Grey level at each of QUANTILES per channel w1-w6 of a typical real site of each cell type: the median over
# the real sites in ../shared/realdata/rxrx1/images (well B02, a negative control, of plates 1-4 of HEPG2-01,
# HUVEC-01 and RPE-01) of their quantiles; made with ``real_quantiles``. HEPG2 is confluent and bright (w1 and
# w5 saturate); HUVEC and RPE show cells on a dark background.
REAL_QUANTILES = {
    "HEPG2": np.array([
        [5, 6, 6.5, 8, 9.5, 13, 17.5, 24.5, 36.5, 50.5, 63.5, 78, 99.5, 119.5, 146.5, 168, 190, 235.9],
        [5, 8, 10, 13, 15.5, 19, 22, 24.5, 27.5, 30, 34, 37.5, 43, 48.5, 55.5, 60.5, 66.5, 76.9],
        [9.5, 14, 16.5, 20.5, 24.5, 29.5, 35, 39.5, 45, 50.5, 57.5, 66.5, 81.5, 96.5, 116, 132, 147.5, 192.5],
        [9, 13.5, 16, 21.5, 26, 31.5, 36, 40, 45, 50, 56, 63.5, 73.5, 82.5, 94.5, 104, 113, 131.5],
        [15, 23, 27, 34, 40, 49, 57, 65.5, 74, 83, 94, 108.5, 132, 157, 196, 233, 255, 255],
        [11.5, 16, 18.5, 22.5, 26.5, 31.5, 35.5, 39.5, 43.5, 48, 53, 60, 69, 77.5, 89, 100, 115, 150.5]], float),
    "HUVEC": np.array([
        [1, 1, 1, 1, 1, 1, 2, 2, 2.5, 3, 4, 7, 17.5, 20, 24, 27, 30, 47.5],
        [6, 7, 7, 8, 9, 10.5, 12.5, 15, 18, 20.5, 25, 32, 42, 53, 69.5, 83.5, 101, 161.5],
        [2, 3, 3.5, 6, 7, 8.5, 9.5, 10.5, 11.5, 12.5, 13.5, 15, 17, 20, 24.5, 28, 31, 41.5],
        [3, 3, 4, 4, 5, 6, 7, 9, 11, 13, 15, 18, 23, 28.5, 37, 44.5, 54.6, 91.5],
        [1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 3, 4, 5, 7, 9, 12.5, 26],
        [4.5, 5.5, 6, 7.5, 8.5, 10, 11, 12.5, 13.5, 14.5, 17, 20.5, 25.5, 29, 34.5, 37.5, 42, 54.5]], float),
    "RPE": np.array([
        [1, 1, 1, 1.5, 2, 2, 3, 3, 3.5, 4, 5, 7, 13.5, 16.5, 20, 22, 25, 32.5],
        [2, 2, 2.5, 3.5, 4.5, 6, 7.5, 9, 10.5, 12.5, 14.5, 17.5, 23, 27.5, 34.5, 40.5, 47.5, 63.5],
        [2, 2.5, 3.5, 7.5, 10, 12, 14, 15.5, 17.5, 19, 21, 23.5, 27.5, 31.5, 37, 40.5, 44.5, 53],
        [1.5, 2, 2, 3, 5, 6, 7, 8.5, 9.5, 10.5, 12.5, 14, 17.5, 20.5, 25, 29, 32.5, 41],
        [0, 0, 0, 1, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 9.5, 12, 15, 18, 20.5, 27.5],
        [3, 3, 3, 7.5, 9, 11.5, 13.5, 14.5, 15.5, 17.5, 19.5, 21.5, 25.5, 28.5, 32, 35, 38.5, 48]], float),
}
# No real U2OS PNGs here. Real U2OS composites are dark like HUVEC's and RPE's (issue #18: mean composite
# brightness 72-92 of 255 for all three), so U2OS takes the mean of their quantiles.
REAL_QUANTILES["U2OS"] = (REAL_QUANTILES["HUVEC"] + REAL_QUANTILES["RPE"]) / 2

STATISTICS = ("mean", "p1", "p50", "p99", "saturated")  # per channel; saturated: share of pixels at 255


def channel_statistics(image: np.ndarray) -> np.ndarray:
    """(C, 5) statistics of a (C, H, W) uint8 site: mean, 1st/50th/99th percentile, share of saturated pixels."""
    planes = np.asarray(image).reshape(len(image), -1)
    p1, p50, p99 = np.percentile(planes, [1, 50, 99], axis=1)
    return np.stack([planes.mean(axis=1), p1, p50, p99, (planes == 255).mean(axis=1)], axis=1)


def real_channel_planes(images: str | Path) -> Iterator[tuple[str, str, int, int, np.ndarray]]:
    """Every real channel PNG under ``images`` (the Kaggle tree: {split}/{experiment}/Plate{p}/{well}_s{s}_w{c}.png)
    as (cell type, experiment, plate, channel, 2-D uint8 plane)."""
    for path in sorted(Path(images).glob("*/*/Plate*/*_s[12]_w[1-6].png")):
        experiment = path.parent.parent.name
        plane = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if plane is not None:
            yield (experiment.split("-")[0], experiment, int(path.parent.name.removeprefix("Plate")),
                   int(path.stem[-1]), plane)


def real_quantiles(images: str | Path) -> dict[str, np.ndarray]:
    """(6, len(QUANTILES)) grey levels per cell type: the median over the real sites of each site's quantiles
    (how REAL_QUANTILES was made). A median of per-site quantiles, not quantiles of the pooled pixels, so
    that a typical synthetic site matches a typical real site (the curve is monotone: medians commute)."""
    per_site: dict[tuple[str, int], list[np.ndarray]] = {}
    for cell_type, _, _, channel, plane in real_channel_planes(images):
        per_site.setdefault((cell_type, channel), []).append(np.quantile(plane, QUANTILES))
    cell_types = sorted({cell_type for cell_type, _ in per_site})
    return {ct: np.stack([np.median(per_site[ct, c], axis=0) for c in range(1, 7)])
            for ct in cell_types if all((ct, c) in per_site for c in range(1, 7))}


def grey_levels(cell_type: str, morphology: float = 1.0) -> np.ndarray:
    """(6, len(QUANTILES)) target grey levels of a cell type. ``morphology`` scales its distance from the
    average cell type as it scales the shapes (geometrically): 1 gives the real levels, 0 the same levels
    for every cell type, 2 exaggerated differences."""
    if morphology == 1:
        return REAL_QUANTILES[cell_type]
    own = REAL_QUANTILES[cell_type] + 1
    mean = np.exp(np.mean([np.log(q + 1) for q in REAL_QUANTILES.values()], axis=0))
    return np.clip(mean * (own / mean) ** morphology - 1, 0, 255)


def tone_map(raw: np.ndarray, raw_knots: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Grey levels (float) of a (6, H, W) raw site: channel c through the curve raw_knots[c] -> levels[c]."""
    return np.stack([np.interp(raw[c], raw_knots[c], levels[c]) for c in range(len(raw))]).astype(np.float32)


def strictly_increasing(knots: np.ndarray) -> np.ndarray:
    """Raw quantiles made strictly increasing along the last axis (ties, e.g. empty background, break interp)."""
    step = 1e-6 * (1 + np.abs(knots).max(axis=-1, keepdims=True))
    return np.maximum.accumulate(knots + step * np.arange(knots.shape[-1]), axis=-1)


def real_sites(images: str | Path, per_cell_type: int = 8) -> dict[str, list[tuple[str, np.ndarray]]]:
    """Up to ``per_cell_type`` complete sites (all 6 channel PNGs) of each cell type under a real image tree
    ({split}/{experiment}/Plate{p}/... or {experiment}/Plate{p}/...), as (name, (6, H, W) uint8)."""
    root = Path(images)
    found: dict[str, list[tuple[str, np.ndarray]]] = {}
    for w1 in sorted([*root.glob("*/*/Plate*/*_s[12]_w1.png"), *root.glob("*/Plate*/*_s[12]_w1.png")]):
        experiment = w1.parent.parent.name
        sites = found.setdefault(experiment.split("-")[0], [])
        paths = [w1.with_name(f"{w1.name[:-5]}{c}.png") for c in range(1, 7)]
        if len(sites) >= per_cell_type or not all(p.is_file() for p in paths):
            continue
        planes = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in paths]
        if all(p is not None and p.shape == planes[0].shape for p in planes):
            sites.append((f"{experiment} {w1.parent.name} {w1.name[:-7]}", np.stack(planes)))
    return {cell_type: sites for cell_type, sites in found.items() if sites}
