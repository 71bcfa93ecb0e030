"""Synthetic RxRx1 in the real Kaggle 2019 layout (CSVs + PNG tree + answers.csv).

Structure mirrors the real data: cell types, experiments, 4 plates, treatments split into 4
plate groups that rotate cyclically across experiments (train uses three rotations, test also
the fourth), positive controls at fixed positions (which control sits where varies by
experiment), a negative control at B02, 2 sites and 6 channels per well.

Images are rendered cell by cell: nucleus (w1), endoplasmic reticulum (w2), actin ring (w3),
nucleoli/RNA spots (w4), mitochondria spots (w5) and a Golgi blob (w6). Each siRNA shifts
morphology (sizes, shape, spot counts, compartment intensity ratios), some strongly and some
subtly; controls strongly. Experiments add batch effects (per-channel gain and offset, uneven
illumination, focus, cell density), plates optionally their own (``plate_effect``: a shift of
morphology, gain and offset, focus), and cell types differ, so a model that does not normalise
generalises worse to unseen experiments and plates. Grey levels follow the real channels of each
cell type (``rcic.synth.intensity``: tone curves matched to the real PNGs). Each site has its own
random stream, so the output is byte-identical for a seed whatever the number of workers.

Biology to find: every siRNA targets a gene (some genes by two siRNAs), genes form complexes
(pathways) whose members share a phenotype direction, so replicate retrieval, batch correction
and known-relationship recall all have a known right answer (``genes.csv``: label,gene;
``relationships.csv``: gene_a,gene_b, the pairs within one complex).

Knobs for what real data varies (``SynthConfig``): batch-effect strength, size and spread of the
siRNA effects, how much of an effect is specific to a cell type, how different the cell types'
morphology is, image size, wells missing from plates, plate effects and negative controls per
plate. ``layout="wilds"`` writes the WILDS
release instead (metadata.csv, 3-channel composite PNGs, sirna_id labels, train/val/test split).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from rcic.errors import DataError
from rcic.io.images import to_rgb
from rcic.parallel import imap_processes
from rcic.synth.intensity import QUANTILES, grey_levels, strictly_increasing, tone_map

ROWS = "BCDEFGHIJKLMNO"
COLS = range(2, 24)
CONTROL_POSITIONS = [f"{r}{c:02d}" for r in "CFHJM" for c in (3, 7, 11, 15, 19, 22)]
NEGATIVE_POSITION = "B02"
CELL_TYPES = ("HEPG2", "HUVEC", "RPE", "U2OS")
# Shape of each cell type: nucleus radius (fraction of image), cytoplasm/nucleus ratio, elongation,
# cells per site, and channel brightness multipliers.
CELL_TYPE_TRAITS = {
    "HEPG2": dict(nucleus=0.050, cyto=1.9, elong=1.15, cells=14, bright=(1.1, 0.9, 0.8, 1.0, 1.2, 0.9)),
    "HUVEC": dict(nucleus=0.045, cyto=2.3, elong=1.50, cells=11, bright=(0.9, 1.1, 1.2, 0.9, 0.9, 1.1)),
    "RPE": dict(nucleus=0.055, cyto=2.1, elong=1.30, cells=10, bright=(1.0, 1.0, 1.0, 1.1, 1.0, 1.0)),
    "U2OS": dict(nucleus=0.060, cyto=2.0, elong=1.20, cells=9, bright=(1.2, 0.8, 1.1, 0.9, 1.1, 1.2)),
}
# Relative brightness of the compartments in the renderer's own units; grey levels come from the tone
# curves matched to the real channels (``rcic.synth.intensity``).
BASE_INTENSITY = np.array([120.0, 45.0, 40.0, 60.0, 90.0, 100.0])
BACKGROUND_TEXTURE = 0.02  # faint out-of-focus background, as a share of BASE_INTENSITY
# Larger images show more, slightly larger cells: nucleus radius grows with sqrt(size), so a 512 px
# site holds ~8x the cells of a 64 px one (about 80-110, as in the real images).
REFERENCE_SIZE = 64
# Real RxRx1 plates (kaggle_v2019 *_controls.csv, 204 plates): one negative control at B02 on 172,
# 2-4 on 32 (mean 1.2); an extra one takes a treatment's well. 30 positive controls per plate.
MAX_NEGATIVE_CONTROLS = 64


@dataclass(frozen=True)
class SynthConfig:
    n_classes: int = 32  # treatments; a multiple of 4 (one group per plate)
    n_positive: int = 4  # positive control classes, at fixed well positions
    cell_types: tuple[str, ...] = CELL_TYPES
    train_experiments: int = 3  # per cell type
    test_experiments: int = 1  # per cell type
    image_size: int = 64
    seed: int = 0
    label_style: str = "kaggle-2019"  # or "kaggle-2023": sirna_<k> / UNTREATED
    layout: str = "kaggle"  # or "wilds": the WILDS release (metadata.csv, RGB composites, val split)
    batch_effect: float = 1.0  # strength of experiment-level effects
    effect_size: float = 0.425  # median strength of a siRNA's morphological effect
    effect_spread: float = 0.65  # strengths spread uniformly over effect_size * (1 +- spread)
    cell_type_effect: float = 0.0  # share of an effect that differs between cell types (0-1)
    morphology: float = 1.0  # how different the cell types look (0: alike, 1: default, 2: more)
    missing_wells: float = 0.0  # fraction of treatment wells missing from each plate
    pathway_weight: float = 0.6  # share of an effect common to a gene's complex (the biology to recover)
    plate_effect: float = 0.0  # strength of plate-level effects on top of the experiment's (0: none)
    negative_controls: int = 1  # negative-control wells per plate: B02, then random treatment positions

    def __post_init__(self):
        if self.n_classes < 4 or self.n_classes % 4:
            raise DataError(f"n_classes must be a positive multiple of 4, got {self.n_classes}")
        if not 1 <= self.n_positive <= len(CONTROL_POSITIONS):
            raise DataError(f"n_positive must be in 1-{len(CONTROL_POSITIONS)}, got {self.n_positive}")
        if self.n_classes // 4 + self.n_positive + 1 > len(ROWS) * len(COLS):
            raise DataError(f"{self.n_classes // 4} treatments per plate do not fit on a 308-well plate")
        unknown = set(self.cell_types) - set(CELL_TYPES)
        if unknown or not self.cell_types:
            raise DataError(f"cell types must be among {', '.join(CELL_TYPES)}, got {sorted(unknown)}")
        if not 16 <= self.image_size <= 512:
            raise DataError(f"image_size must be in 16-512, got {self.image_size}")
        if self.train_experiments < 1 or self.test_experiments < 1:
            raise DataError("need at least one train and one test experiment per cell type")
        if self.label_style not in ("kaggle-2019", "kaggle-2023"):
            raise DataError(f"label_style must be kaggle-2019 or kaggle-2023, got {self.label_style!r}")
        if self.layout not in ("kaggle", "wilds"):
            raise DataError(f"layout must be kaggle or wilds, got {self.layout!r}")
        if self.layout == "wilds" and self.label_style != "kaggle-2019":
            raise DataError("the WILDS layout has integer labels (sirna_id): use label_style kaggle-2019")
        if not 1 <= self.negative_controls <= MAX_NEGATIVE_CONTROLS:
            raise DataError(f"negative_controls must be in 1-{MAX_NEGATIVE_CONTROLS} per plate, "
                            f"got {self.negative_controls}")
        for name, low, high in (("batch_effect", 0, 5), ("effect_size", 0, 5), ("effect_spread", 0, 1),
                                ("cell_type_effect", 0, 1), ("morphology", 0, 3), ("missing_wells", 0, 0.5),
                                ("pathway_weight", 0, 1), ("plate_effect", 0, 5)):
            if not low <= getattr(self, name) <= high:
                raise DataError(f"{name} must be in {low}-{high}, got {getattr(self, name)}")


PRESETS = {
    "tiny": SynthConfig(n_classes=8, n_positive=2, cell_types=("HEPG2", "HUVEC"), train_experiments=2,
                        test_experiments=1, image_size=32),
    "small": SynthConfig(n_classes=32, n_positive=4, train_experiments=3, test_experiments=1, image_size=64),
    "medium": SynthConfig(n_classes=128, n_positive=8, train_experiments=4, test_experiments=2, image_size=128),
    # The real plate: 1,108 treatments in 4 groups of 277, 30 positive controls, plate effects on; small
    # images and few experiments so that it trains on 2 CPU cores.
    "realsize": SynthConfig(n_classes=1108, n_positive=30, train_experiments=2, test_experiments=1, image_size=32,
                            plate_effect=1.0),
}


# ----------------------------------------------------------------------------------------------
# Plate design (the CSVs)
# ----------------------------------------------------------------------------------------------


def design_plates(config: SynthConfig) -> tuple[pd.DataFrame, list[str]]:
    """All wells with their true class index (0..n-1 treatments, then controls); and class labels."""
    rng = np.random.default_rng([config.seed, 1])
    n, npos = config.n_classes, config.n_positive
    groups = rng.permutation(n).reshape(4, n // 4)
    labels = _class_labels(config, rng)
    treatment_positions = [f"{r}{c:02d}" for r in ROWS for c in COLS
                           if f"{r}{c:02d}" not in CONTROL_POSITIONS and f"{r}{c:02d}" != NEGATIVE_POSITION]
    rows = []
    for cell_type in config.cell_types:
        for split, count, first_rotation in (("train", config.train_experiments, 0),
                                             ("test", config.test_experiments, 3)):
            offset = 0 if split == "train" else config.train_experiments
            for i in range(count):
                experiment = f"{cell_type}-{offset + i + 1:02d}"
                # train cycles through rotations 0,1,2; test starts with the 4th, unseen one
                rotation = (first_rotation + i) % (3 if split == "train" else 4)
                controls = rng.permutation(npos)
                for plate in range(1, 5):
                    group = groups[(plate - 1 + rotation) % 4]
                    wells = rng.choice(len(treatment_positions), size=len(group), replace=False)
                    present = rng.random(len(group)) >= config.missing_wells
                    negatives = [NEGATIVE_POSITION] + _extra_negative_positions(config, experiment, plate,
                                                                                treatment_positions)
                    for cls, w, keep in zip(rng.permutation(group), np.sort(wells), present):
                        if keep and treatment_positions[w] not in negatives:
                            rows.append((experiment, plate, treatment_positions[w], split, "treatment", cls))
                    for k, cls in enumerate(controls):
                        rows.append((experiment, plate, CONTROL_POSITIONS[k], split, "positive_control", n + cls))
                    rows += [(experiment, plate, w, split, "negative_control", n + npos) for w in negatives]
    wells = pd.DataFrame(rows, columns=["experiment", "plate", "well", "split", "well_type", "cls"])
    wells = wells.sort_values(["split", "experiment", "plate", "well"], kind="stable").reset_index(drop=True)
    wells.insert(0, "id_code", wells["experiment"] + "_" + wells["plate"].astype(str) + "_" + wells["well"])
    return wells, labels


def _extra_negative_positions(config: SynthConfig, experiment: str, plate: int, positions: list[str]) -> list[str]:
    """Wells of the negative controls beyond B02: random treatment positions (a treatment there is
    displaced, as on the real plates). Their own random stream, so the rest of the design is unchanged."""
    extra = config.negative_controls - 1
    if extra == 0:
        return []
    rng = np.random.default_rng([config.seed, 10, *experiment.encode(), plate])
    return [positions[k] for k in np.sort(rng.choice(len(positions), size=extra, replace=False))]


def _class_labels(config: SynthConfig, rng: np.random.Generator) -> list[str]:
    total = config.n_classes + config.n_positive + 1
    if config.label_style == "kaggle-2019":
        return [str(k) for k in range(total)]
    # 2023 spelling: treatments and positive controls share one sirna_<k> numbering, shuffled
    numbers = rng.permutation(total - 1)
    return [f"sirna_{k}" for k in numbers] + ["UNTREATED"]


def wilds_splits(wells: pd.DataFrame) -> pd.Series:
    """The WILDS split of each well: one val experiment per cell type (the first test experiment where
    there are two or more, else the last train one), the rest as in the Kaggle design."""
    split = wells["split"].copy()
    cell = wells["experiment"].str.split("-").str[0]
    for _, part in wells.groupby(cell):
        tests = sorted(part.loc[part["split"] == "test", "experiment"].unique())
        trains = sorted(part.loc[part["split"] == "train", "experiment"].unique())
        chosen = tests[0] if len(tests) >= 2 else trains[-1]
        split[wells["experiment"] == chosen] = "val"
    return split


def _write_wilds_metadata(wells: pd.DataFrame, out: Path) -> None:
    """``metadata.csv`` as the WILDS release has it: one row per site, sirna_id labels, dataset split."""
    frame = wells.assign(dataset=wilds_splits(wells))
    rows = frame.loc[frame.index.repeat(2)].reset_index(drop=True)
    rows["site"] = np.tile([1, 2], len(frame))
    meta = pd.DataFrame({
        "site_id": rows["id_code"] + "_" + rows["site"].astype(str), "well_id": rows["id_code"],
        "cell_type": rows["experiment"].str.split("-").str[0], "dataset": rows["dataset"],
        "experiment": rows["experiment"], "plate": rows["plate"], "well": rows["well"], "site": rows["site"],
        "well_type": rows["well_type"], "sirna": "s" + (10_000 + rows["cls"]).astype(str),
        "sirna_id": rows["cls"]})
    meta.to_csv(out / "metadata.csv", index=False)


def _write_gene_tables(config: SynthConfig, labels: list[str], out: Path) -> None:
    layer = gene_layer(config)
    pd.DataFrame({"label": labels[: config.n_classes], "gene": [layer.names[g] for g in layer.gene_of]}).to_csv(
        out / "genes.csv", index=False)
    pd.DataFrame(layer.relationships(), columns=["gene_a", "gene_b"]).to_csv(out / "relationships.csv", index=False)


def _write_csvs(wells: pd.DataFrame, labels: list[str], out: Path) -> None:
    frame = wells.assign(sirna=[labels[c] for c in wells["cls"]])
    keys = ["id_code", "experiment", "plate", "well"]
    treat = frame["well_type"] == "treatment"
    for split in ("train", "test"):
        part = frame[frame["split"] == split]
        t = part[part["well_type"] == "treatment"]
        (t[keys + ["sirna"]] if split == "train" else t[keys]).to_csv(out / f"{split}.csv", index=False)
        part[part["well_type"] != "treatment"][keys + ["sirna", "well_type"]].to_csv(
            out / f"{split}_controls.csv", index=False)
    test = frame[(frame["split"] == "test") & treat]
    first = labels[0]
    pd.DataFrame({"id_code": test["id_code"], "sirna": first}).to_csv(out / "sample_submission.csv", index=False)
    test[["id_code", "sirna"]].to_csv(out / "answers.csv", index=False)


# ----------------------------------------------------------------------------------------------
# Image rendering
# ----------------------------------------------------------------------------------------------


EFFECT_DIMS = 9  # morphology traits a siRNA moves (see ``class_effects``)


@dataclass(frozen=True)
class GeneLayer:
    """Which gene each treatment targets and which genes form a complex (pathway)."""

    gene_of: tuple[int, ...]  # per treatment class
    complex_of: tuple[int, ...]  # per gene
    names: tuple[str, ...]  # per gene

    def relationships(self) -> list[tuple[str, str]]:
        """Every pair of genes in one complex (the known relationships a benchmark should recover)."""
        pairs = []
        for c in sorted(set(self.complex_of)):
            members = [g for g, k in enumerate(self.complex_of) if k == c]
            pairs += [(self.names[a], self.names[b]) for i, a in enumerate(members) for b in members[i + 1:]]
        return pairs


@lru_cache(maxsize=64)
def gene_layer(config: SynthConfig) -> GeneLayer:
    """~80% of siRNAs target a gene of their own, the rest a second siRNA's gene; complexes of 2-5 genes."""
    rng = np.random.default_rng([config.seed, 5])
    n = config.n_classes
    n_genes = max(2, int(round(0.8 * n)))
    gene_of = np.concatenate([np.arange(n_genes), rng.integers(0, n_genes, n - n_genes)])[rng.permutation(n)]
    complex_of, c, g = np.zeros(n_genes, int), 0, 0
    while g < n_genes:
        size = int(rng.integers(2, 6))
        complex_of[g:g + size] = c
        g, c = g + size, c + 1
    complex_of = complex_of[rng.permutation(n_genes)]
    names = tuple(f"GENE{k + 1:04d}" for k in range(n_genes))
    return GeneLayer(tuple(int(x) for x in gene_of), tuple(int(x) for x in complex_of), names)


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(EFFECT_DIMS)
    return v / np.linalg.norm(v)


@lru_cache(maxsize=8192)
def class_effects(config: SynthConfig, cls: int, cell_type: str | None = None) -> dict[str, float]:
    """Morphology multipliers of one class in one cell type: strong for controls, strong-to-subtle for siRNAs.

    A treatment's direction mixes its gene's complex (``pathway_weight``), its gene and the siRNA
    itself; ``cell_type_effect`` of it is specific to the cell type.
    """
    rng = np.random.default_rng([config.seed, 2, cls])
    if cls >= config.n_classes:
        strength, direction = 1.6, _unit(rng)
    else:
        spread = config.effect_spread
        strength = config.effect_size * rng.uniform(1 - spread, 1 + spread)
        layer = gene_layer(config)
        gene = layer.gene_of[cls]
        pathway = _unit(np.random.default_rng([config.seed, 6, layer.complex_of[gene]]))
        own_gene = _unit(np.random.default_rng([config.seed, 7, gene]))
        own = _unit(rng)
        w = config.pathway_weight
        direction = w * pathway + (1 - w) * (0.8 * own_gene + 0.45 * own)
        direction /= np.linalg.norm(direction)
    if cell_type is not None and config.cell_type_effect > 0:
        specific = _unit(np.random.default_rng([config.seed, 8, cls, *cell_type.encode()]))
        a = config.cell_type_effect
        direction = (1 - a) * direction + a * specific
        direction /= np.linalg.norm(direction)
    return _morphology_multipliers(direction * np.sqrt(EFFECT_DIMS) * strength)


def _morphology_multipliers(z: np.ndarray) -> dict[str, float]:
    """The multiplier of each morphology trait for a point ``z`` of the effect space."""
    return {
        "nucleus": float(np.exp(0.22 * z[0])),
        "cyto": float(np.exp(0.15 * z[1])),
        "elong": float(np.exp(0.20 * z[2])),
        "nucleoli": float(np.exp(0.6 * z[3])),
        "mito": float(np.exp(0.6 * z[4])),
        "golgi": float(np.exp(0.35 * z[5])),
        "er_ratio": float(np.exp(0.45 * z[6])),  # ER brightness relative to nucleus (survives normalisation)
        "actin": float(np.exp(0.45 * z[7])),
        "density": float(np.exp(0.20 * z[8])),
    }


def cell_type_traits(config: SynthConfig, cell_type: str) -> dict:
    """A cell type's traits, their distance from the average cell scaled by ``config.morphology``."""
    base = CELL_TYPE_TRAITS[cell_type]
    mean = {k: np.mean([np.asarray(t[k], float) for t in CELL_TYPE_TRAITS.values()], axis=0) for k in base}
    m = config.morphology
    out = {}
    for key, value in base.items():
        value = np.asarray(value, float)
        scaled = mean[key] * (value / mean[key]) ** m
        out[key] = tuple(scaled) if value.ndim else float(scaled)
    return out


def experiment_effects(config: SynthConfig, experiment: str) -> dict:
    """Batch effects: per-channel gain and offset (a share of the channel's background level, so a dark
    channel stays dark), illumination, focus, density, and the camera's shot noise."""
    rng = np.random.default_rng([config.seed, 3, *experiment.encode()])
    b = config.batch_effect
    return {
        "gain": np.exp(rng.normal(0, 0.35 * b, 6)),
        "offset": rng.uniform(-0.3 * b, 0.3 * b, 6),
        "tilt": rng.normal(0, 0.25 * b, 2),
        "vignette": rng.uniform(0, 0.35 * b),
        "blur": rng.uniform(0.0, 1.2 * b),
        "density": float(np.exp(rng.normal(0, 0.2 * b))),
        "noise": rng.uniform(0.05, 0.2),  # standard deviation per sqrt(grey level)
    }


NO_PLATE_EFFECT = {"gain": np.ones(6), "offset": np.zeros(6), "blur": 0.0,
                   "morphology": _morphology_multipliers(np.zeros(EFFECT_DIMS))}


def plate_effects(config: SynthConfig, experiment: str, plate: int) -> dict:
    """A plate's effects on top of its experiment's: a shift of morphology (every well of the plate moves
    the same way, as a siRNA of strength ``0.3 * plate_effect`` would), per-channel gain and offset, and
    focus (extra blur). ``plate_effect`` 0 gives exactly no effect."""
    x = config.plate_effect
    if x == 0:
        return NO_PLATE_EFFECT
    rng = np.random.default_rng([config.seed, 9, *experiment.encode(), plate])
    return {
        "gain": np.exp(rng.normal(0, 0.2 * x, 6)),
        "offset": rng.normal(0, 0.2 * x, 6),  # a share of the channel's background level
        "blur": rng.uniform(0, 0.8 * x),
        "morphology": _morphology_multipliers(_unit(rng) * np.sqrt(EFFECT_DIMS) * 0.3 * x),
    }


def render_site(config: SynthConfig, cell_type: str, cls: int, batch: dict, rng: np.random.Generator,
                plate: dict = NO_PLATE_EFFECT) -> np.ndarray:
    """One site as (6, S, S) uint8: the cells of ``cls`` under the experiment's and the plate's effects, in
    grey levels matched to the real channels of ``cell_type``."""
    raw = _render_raw(config, cell_type, cls, batch, plate, rng)
    levels = grey_levels(cell_type, config.morphology)
    return _camera(tone_map(raw, raw_knots(config, cell_type), levels), levels, batch, plate, rng)


@lru_cache(maxsize=32)
def raw_knots(config: SynthConfig, cell_type: str) -> np.ndarray:
    """(6, len(QUANTILES)) raw values of the negative control of ``cell_type`` at each of QUANTILES.

    Measured on reference sites rendered at the config's image size under experiment effects drawn as
    the real experiments' are (no gain, offset or noise: those act on grey levels), so the tone curve
    raw knot -> real grey level matches the real channels whatever the size or the knobs.
    """
    n_sites = int(np.clip(2**17 // config.image_size**2, 16, 48))
    negative = config.n_classes + config.n_positive
    per_site = []
    for k in range(n_sites):
        batch = experiment_effects(config, f"{cell_type}-reference-{k}")
        rng = np.random.default_rng([config.seed, 11, *cell_type.encode(), k])
        raw = _render_raw(config, cell_type, negative, batch, NO_PLATE_EFFECT, rng).reshape(6, -1)
        per_site.append(np.quantile(raw, QUANTILES, axis=1).T)
    # the median site, as REAL_QUANTILES is: a monotone curve maps the median site's raw quantiles to the
    # median real site's grey levels
    return strictly_increasing(np.median(per_site, axis=0))


def _render_raw(config: SynthConfig, cell_type: str, cls: int, batch: dict, plate: dict,
                rng: np.random.Generator) -> np.ndarray:
    """The cells of one site in the renderer's units, under the illumination and focus of experiment and plate."""
    s = config.image_size
    traits = cell_type_traits(config, cell_type)
    fx = {k: v * plate["morphology"][k] for k, v in class_effects(config, cls, cell_type).items()}
    canvas = np.zeros((6, s, s), np.float32)
    zoom = np.sqrt(s / REFERENCE_SIZE)
    n_cells = rng.poisson(max(traits["cells"] * fx["density"] * batch["density"] * s / REFERENCE_SIZE, 0.5)) + 2
    r_nuc = float(traits["nucleus"] * REFERENCE_SIZE * zoom * fx["nucleus"])
    r_cyto = float(r_nuc * traits["cyto"] * fx["cyto"])
    bright = BASE_INTENSITY * np.array(traits["bright"])
    half = int(np.ceil(r_cyto * traits["elong"] * fx["elong"] * 1.6)) + 2
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float32)
    for _ in range(n_cells):
        # Python floats, so that the patch is computed in float32 (a NumPy float64 scalar would promote it)
        cy, cx = (float(v) for v in rng.uniform(0, s, 2))
        theta = float(rng.uniform(0, np.pi))
        elong = float(traits["elong"] * fx["elong"] * rng.uniform(0.85, 1.15))
        size = float(rng.uniform(0.85, 1.15))
        oy, ox = yy - (cy % 1), xx - (cx % 1)
        u = ox * math.cos(theta) + oy * math.sin(theta)
        v = -ox * math.sin(theta) + oy * math.cos(theta)
        d_nuc = np.sqrt((u / (r_nuc * size * math.sqrt(elong))) ** 2 + (v * math.sqrt(elong) / (r_nuc * size)) ** 2)
        d_cyto = np.sqrt((u / (r_cyto * size * elong)) ** 2 + (v / (r_cyto * size)) ** 2)
        nucleus = np.exp(-(d_nuc**4))
        cyto = np.exp(-(d_cyto**2) * 1.5) * (1 - 0.7 * nucleus)
        patch = np.zeros((6, *yy.shape), np.float32)
        patch[0] = nucleus * float(rng.uniform(0.8, 1.2))
        patch[1] = cyto * fx["er_ratio"] * (0.6 + 0.4 * np.exp(-((d_nuc - 1.3) ** 2) * 4))
        patch[2] = np.exp(-(((d_cyto - 0.9) / 0.18) ** 2)) * fx["actin"] * 0.8 + 0.15 * cyto
        patch[3] = 0.25 * cyto + _spots(rng, 3 * fx["nucleoli"], r_nuc * size * 0.6, r_nuc * 0.18, oy, ox)
        patch[4] = 0.15 * cyto + _spots(rng, 10 * fx["mito"], r_cyto * size * 0.8, r_nuc * 0.12, oy, ox) * cyto
        g_angle = theta + float(rng.normal(0, 0.4))
        gy, gx = math.sin(g_angle) * r_nuc * 1.4, math.cos(g_angle) * r_nuc * 1.4
        patch[5] = np.exp(-((oy - gy) ** 2 + (ox - gx) ** 2) / (2 * (r_nuc * 0.45 * fx["golgi"]) ** 2)) + 0.1 * cyto
        _paste(canvas, patch * bright[:, None, None].astype(np.float32), int(cy), int(cx), half)
    return _optics(canvas + _background(rng, s) * bright[:, None, None].astype(np.float32), batch, plate)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A faint, smooth, uneven background (out-of-focus debris and autofluorescence), the same in every channel."""
    field = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), max(size / 16, 1.0))
    return BACKGROUND_TEXTURE * (1 + np.clip(field / (field.std() + 1e-6), -2, 2) * 0.4)


def _spots(rng, mean_count, radius, spot_radius, oy, ox) -> np.ndarray:
    out = np.zeros(oy.shape, np.float32)
    count = rng.poisson(mean_count)
    if count == 0:
        return out
    r = radius * np.sqrt(rng.uniform(0, 1, count))
    a = rng.uniform(0, 2 * np.pi, count)
    py, px = (r * np.sin(a)).astype(np.float32)[:, None, None], (r * np.cos(a)).astype(np.float32)[:, None, None]
    width = float(2 * max(spot_radius, 0.6) ** 2)
    return np.exp(-((oy - py) ** 2 + (ox - px) ** 2) / width).sum(axis=0)


def _paste(canvas: np.ndarray, patch: np.ndarray, cy: int, cx: int, half: int) -> None:
    s = canvas.shape[-1]
    y0, x0 = cy - half, cx - half
    ys, xs = max(0, -y0), max(0, -x0)
    ye, xe = min(patch.shape[1], s - y0), min(patch.shape[2], s - x0)
    if ye > ys and xe > xs:
        canvas[:, y0 + ys:y0 + ye, x0 + xs:x0 + xe] += patch[:, ys:ye, xs:xe]


def _optics(canvas: np.ndarray, batch: dict, plate: dict) -> np.ndarray:
    """Uneven illumination and focus (blur) of the experiment and the plate."""
    s = canvas.shape[-1]
    lin = np.linspace(-1, 1, s, dtype=np.float32)
    gy, gx = np.meshgrid(lin, lin, indexing="ij")
    light = 1 + batch["tilt"][0] * gy + batch["tilt"][1] * gx - batch["vignette"] * (gy**2 + gx**2)
    image = canvas * np.clip(light, 0.2, None)
    blur = float(np.hypot(batch["blur"], plate["blur"]))  # two Gaussian blurs in a row
    if blur > 0.3:
        image = np.stack([cv2.GaussianBlur(c, (0, 0), blur) for c in image])
    return image


def _camera(grey: np.ndarray, levels: np.ndarray, batch: dict, plate: dict, rng: np.random.Generator) -> np.ndarray:
    """Exposure (gain), background offset and shot noise of the experiment and the plate, then 8 bits."""
    background = levels[:, int(np.searchsorted(QUANTILES, 0.05))]
    gain = batch["gain"] * plate["gain"]
    offset = (batch["offset"] + plate["offset"]) * background
    image = grey * gain[:, None, None].astype(np.float32) + offset[:, None, None].astype(np.float32)
    noise = rng.standard_normal(image.shape, dtype=np.float32) * np.sqrt(np.maximum(image, 0))
    image = image + np.float32(batch["noise"]) * noise
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Writing the dataset
# ----------------------------------------------------------------------------------------------


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _render_wells(args) -> int:
    config, out, rows = args
    return sum(_render_well(config, out, row) for row in rows)


def _render_well(config: SynthConfig, out: Path, row: dict) -> int:
    batch = experiment_effects(config, row["experiment"])
    plate = plate_effects(config, row["experiment"], int(row["plate"]))
    cell_type = row["experiment"].split("-")[0]
    top = "images" if config.layout == "wilds" else row["split"]
    folder = out / top / row["experiment"] / f"Plate{row['plate']}"
    folder.mkdir(parents=True, exist_ok=True)
    for site in (1, 2):
        rng = np.random.default_rng([config.seed, 4, *row["id_code"].encode(), site])
        image = render_site(config, cell_type, int(row["cls"]), batch, rng, plate)
        if config.layout == "wilds":  # the WILDS release ships Recursion's RGB composite of the 6 channels
            composite = to_rgb(image.transpose(1, 2, 0))
            cv2.imwrite(str(folder / f"{row['well']}_s{site}.png"), cv2.cvtColor(composite, cv2.COLOR_RGB2BGR))
            continue
        for c in range(6):
            cv2.imwrite(str(folder / f"{row['well']}_s{site}_w{c + 1}.png"), image[c])
    return 2


def generate(
    out: str | Path,
    config: SynthConfig = PRESETS["small"],
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a synthetic dataset to ``out`` (which must not exist or be empty); returns ``out``.

    Written to a temporary sibling folder and renamed at the end, so an interrupted run never
    leaves a half-written dataset under ``out``. ``progress(done_sites, total_sites)`` is called
    as sites are written.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError("output folder exists and is not empty; choose another or remove it", out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        wells, labels = design_plates(config)
        if config.layout == "wilds":
            _write_wilds_metadata(wells, tmp)
            labels = [str(k) for k in range(len(labels))]
        else:
            _write_csvs(wells, labels, tmp)
        _write_gene_tables(config, labels, tmp)
        (tmp / "synth_config.json").write_text(pd.Series(asdict(config)).to_json(indent=2))
        jobs = [(config, tmp, rows) for rows in _chunks(wells.to_dict("records"), 8)]
        total, done = 2 * len(wells), 0
        for n in imap_processes(_render_wells, jobs, workers):
            done += n
            if progress:
                progress(done, total)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def preset(name: str, **overrides) -> SynthConfig:
    """A preset config with some fields replaced (``None`` values are ignored)."""
    if name not in PRESETS:
        raise DataError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
