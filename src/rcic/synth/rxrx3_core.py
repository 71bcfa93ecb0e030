"""A synthetic RxRx3-core in the format of the download, with known answers.

Writes into ``out``:

- ``metadata_rxrx3_core.csv``: the 10 columns of the real file, rows in shuffled order; gene
  experiments (every gene's guides and ``EMPTY_control`` wells) and compound experiments
  (compounds at the 8 standard concentrations, one stray 0.26 µM well each, ``EMPTY_control`` and
  ``CRISPR_control`` wells), 1,536-well addresses (``A01`` ... ``AF48``), SMILES with a quoted
  ChemAxon ``|c:...|`` suffix;
- ``OpenPhenom_rxrx3_core_embeddings.parquet``: ``well_id`` then ``feature_0..feature_{d-1}``
  (float32), sorted by ``well_id``;
- ``data/train-000NN-of-000MM.parquet``: ``__key__`` and ``jp2`` (the Hugging Face ``Image``
  struct of ``bytes`` and ``path``), one real JPEG 2000 image per channel, key-sorted;
- ``compound_gene_interactions.csv``: the ground truth of the compound-gene benchmark (EFAAR's
  columns), and ``complexes.csv``: which gene belongs to which complex.

The genes are real HGNC symbols of ten well-known complexes (proteasome, exosome, mediator, ...),
all present in the relationship sources of efaar-benchmarking. Phenotypes: each complex has a
random unit direction; a gene's direction is ``sqrt(s) * complex + sqrt(1 - s) * own`` (normalised),
so two genes of one complex have an expected cosine of ``s`` (``complex_strength``). A guide's
effect is its gene's direction times ``effect_size`` and an efficiency; a compound phenocopies
its target gene with a dose response (EC50 1 µM). Wells add noise and an affine batch effect per
experiment. ``shuffle=True`` deals the phenotypes to random genes: complexes no longer share one,
and recall of known pairs falls to chance.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from rcic.atomic import atomic_path, atomic_write_text
from rcic.errors import DataError

COMPLEXES = {
    "proteasome-alpha": "PSMA1 PSMA2 PSMA3 PSMA4 PSMA5 PSMA6 PSMA7",
    "exosome": "EXOSC1 EXOSC2 EXOSC3 EXOSC4 EXOSC5 EXOSC7 EXOSC8 EXOSC9",
    "mediator": "MED4 MED6 MED7 MED8 MED10 MED11 MED14 MED17",
    "COPI": "COPA COPB1 COPB2 COPE COPG1 COPZ1 ARCN1",
    "CCT": "CCT2 CCT3 CCT4 CCT5 CCT6A CCT7 CCT8 TCP1",
    "MCM": "MCM2 MCM3 MCM4 MCM5 MCM6 MCM7",
    "NUP107-160": "NUP85 NUP107 NUP133 NUP160 SEH1L SEC13 NUP43",
    "RNA-polymerase-II": "POLR2A POLR2B POLR2C POLR2D POLR2E POLR2G",
    "ARP2/3": "ACTR2 ACTR3 ARPC1B ARPC2 ARPC3 ARPC4 ARPC5",
    "mTOR": "MTOR RPTOR MLST8 RICTOR AKT1 RPS6KB1",
}
COMPOUNDS = [  # name, SMILES (some with a ChemAxon suffix, which holds commas)
    ("Phloretin", "Oc1ccc(CCC(=O)c2c(O)cc(O)cc2O)cc1"),
    ("Clozapine", "CN1CCN(CC1)C1=Nc2cc(Cl)ccc2Nc2ccccc12"),
    ("Dequalinium", "Cc1cc(N)c2ccccc2[n+]1CCCCCCCCCC[n+]1c(C)cc(N)c2ccccc21 |c:3,t:5|"),
    ("Bortezomib", "CC(C)C[C@H](NC(=O)[C@H](Cc1ccccc1)NC(=O)c1cnccn1)B(O)O"),
    ("Rapamycin", "CO[C@@H]1C[C@@H]2CC[C@@H](C)[C@@](O)(O2)C(=O)C(=O)N2CCCC[C@H]2C(=O)O |c:12,t:4,7|"),
    ("Torin-1", "CCC(=O)N1CCN(CC1)c1ccc(cc1C(F)(F)F)-n1c(=O)ccc2cnc3ccc(cc3c12)-c1cnc2ccccc2c1"),
    ("Triptolide", "CC(C)[C@@]12O[C@H]1[C@@H]1O[C@]13[C@]1(O[C@@H]1C[C@H]1C4=C(CC[C@@]31C)C(=O)OC4)C2O"),
    ("CK-666", "Cc1ccc(cc1)C(=O)NCCc1c([nH]c2ccccc12)C |c:8|"),
    ("Pladienolide-B", "CC[C@H](C)[C@@H](O)[C@@H](C)[C@@H]1O[C@@]1(C)C=CC(C)=CC1OC(=O)CC(O)CCC1(C)OC(C)=O"),
    ("Brefeldin-A", "C[C@H]1CCCC=C[C@@H]2C[C@H](O)C[C@H]2[C@H](O)C=CC(=O)O1 |t:5,15|"),
    ("Ciclopirox", "Cc1cc(C2CCCCC2)n(O)c(=O)c1"),
    ("Everolimus", "CO[C@@H]1C[C@@H]2CC[C@@H](C)[C@@](O)(O2)C(=O)C(=O)N2CCCC[C@H]2C(=O)OCCO"),
    ("Narciclasine", "O[C@@H]1C=C2[C@@H]([C@@H](O)[C@H]1O)NC(=O)c1c(O)c3OCOc3cc21"),
    ("Emetine", "CC[C@H]1CN2CCc3cc(OC)c(OC)cc3[C@@H]2C[C@@H]1C[C@H]1NCCc2cc(OC)c(OC)cc12"),
    ("Thapsigargin", "CCCCCCCC(=O)O[C@H]1[C@H](OC(=O)C(C)=CC)C(C)=C2[C@@H]3OC(=O)[C@@](C)(O)[C@]3(O)C12 |c:17|"),
    ("Cycloheximide", "C[C@H]1C[C@H](C)C(=O)[C@@H](C1)[C@H](O)CC1CC(=O)NC(=O)C1"),
]
CONCENTRATIONS = (0.0025, 0.01, 0.025, 0.1, 0.25, 1.0, 2.5, 10.0)
STRAY_CONCENTRATION = 0.26
EC50 = 1.0  # µM
ROWS = [chr(ord("A") + i) for i in range(26)] + [f"A{chr(ord('A') + i)}" for i in range(6)]  # 32 rows
COLUMNS = 48
METADATA_FILE = "metadata_rxrx3_core.csv"
EMBEDDINGS_FILE = "OpenPhenom_rxrx3_core_embeddings.parquet"


@dataclass(frozen=True)
class Rxrx3CoreConfig:
    seed: int = 0
    gene_experiments: int = 2
    compound_experiments: int = 2
    plates: int = 2  # per experiment, wells dealt round-robin
    guides: int = 2
    wells_per_guide: int = 2
    controls: int = 32  # EMPTY_control wells per experiment (RxRx3: ~20% of a gene experiment)
    crispr_controls: int = 4  # per compound experiment
    compounds: int = 16
    dims: int = 32
    complex_strength: float = 0.8  # expected cosine of two genes of one complex
    effect_size: float = 3.0  # length of a full effect, in units of the per-dimension noise SD
    noise: float = 1.0
    batch_effect: float = 1.0
    image_size: int = 64
    images: bool = True
    shards: int = 2
    shuffle: bool = False


PRESETS = {
    "tiny": Rxrx3CoreConfig(dims=16, image_size=32, controls=8, compounds=12),
    "small": Rxrx3CoreConfig(),
    "medium": Rxrx3CoreConfig(gene_experiments=4, compound_experiments=4, guides=3, wells_per_guide=2, dims=384,
                              image_size=128, shards=4),
}


def rxrx3_preset(name: str, **overrides) -> Rxrx3CoreConfig:
    if name not in PRESETS:
        raise DataError(f"unknown preset {name!r} for the rxrx3-core layout; choose from {', '.join(PRESETS)}")
    config = replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
    if not 0 <= config.complex_strength <= 1:
        raise DataError(f"complex strength must be in 0-1, got {config.complex_strength}")
    if not 16 <= config.image_size <= 512:
        raise DataError(f"--image-size must be in 16-512 for rxrx3-core, got {config.image_size}")
    if config.compounds > len(COMPOUNDS):
        raise DataError(f"at most {len(COMPOUNDS)} compounds")
    return config


def genes() -> list[str]:
    return [g for members in COMPLEXES.values() for g in members.split()]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _address(i: int) -> str:
    return f"{ROWS[i // COLUMNS]}{i % COLUMNS + 1:02d}"


def _phenotypes(config: Rxrx3CoreConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    names = genes()
    directions = {}
    for members in COMPLEXES.values():
        shared = _unit(rng.normal(size=config.dims))
        for gene in members.split():
            own = _unit(rng.normal(size=config.dims))
            directions[gene] = _unit(np.sqrt(config.complex_strength) * shared
                                     + np.sqrt(1 - config.complex_strength) * own)
    if config.shuffle:
        dealt = rng.permutation(len(names))
        directions = {g: directions[names[k]] for g, k in zip(names, dealt)}
    return directions


def _wells(config: Rxrx3CoreConfig, rng: np.random.Generator) -> tuple[pd.DataFrame, dict[str, str]]:
    """The metadata (one row per well) and each compound's target gene."""
    names = genes()
    rows = []

    def add(experiment: str, items: list[dict]) -> None:
        for i, k in enumerate(rng.permutation(len(items))):
            plate = 1 + i % config.plates
            address = _address(i // config.plates)
            rows.append({"well_id": f"{experiment}_{plate}_{address}", "experiment_name": experiment, "plate": plate,
                         "address": address, "cell_type": "HUVEC", **items[k]})

    control = {"gene": "EMPTY_control", "treatment": "EMPTY_control", "SMILES": "", "concentration": np.nan,
               "perturbation_type": "CRISPR"}
    # as in RxRx3, each gene is knocked out in one gene experiment (all its guides there): without a
    # correction, genes of one experiment look alike
    experiment_of = rng.permutation(len(names)) % config.gene_experiments
    for e in range(config.gene_experiments):
        items = [{"gene": g, "treatment": f"{g}_guide_{k + 1}", "SMILES": "", "concentration": np.nan,
                  "perturbation_type": "CRISPR"}
                 for g, ge in zip(names, experiment_of) if ge == e
                 for k in range(config.guides) for _ in range(config.wells_per_guide)]
        add(f"gene-{e + 1:03d}", items + [dict(control)] * config.controls)
    chosen = COMPOUNDS[:config.compounds]
    targets = {name: names[int(k)] for (name, _), k in zip(chosen, rng.choice(len(names), len(chosen), False))}
    for e in range(config.compound_experiments):
        items = [{"gene": "", "treatment": name, "SMILES": smiles, "concentration": c, "perturbation_type": "COMPOUND"}
                 for name, smiles in chosen for c in CONCENTRATIONS]
        items.append({**items[0], "concentration": STRAY_CONCENTRATION})
        items += [{**control, "gene": "", "perturbation_type": "COMPOUND"}] * config.controls
        items += [{"gene": "", "treatment": "CRISPR_control", "SMILES": "", "concentration": np.nan,
                   "perturbation_type": "COMPOUND"}] * config.crispr_controls
        add(f"compound-{e + 1:03d}", items)
    columns = ["well_id", "experiment_name", "plate", "address", "gene", "treatment", "SMILES", "concentration",
               "perturbation_type", "cell_type"]
    frame = pd.DataFrame(rows)[columns]
    return frame.iloc[rng.permutation(len(frame))].reset_index(drop=True), targets


def _embeddings(config: Rxrx3CoreConfig, meta: pd.DataFrame, directions: dict[str, np.ndarray],
                targets: dict[str, str], rng: np.random.Generator) -> np.ndarray:
    d = config.dims
    efficiency = {}
    effect = np.zeros((len(meta), d))
    crispr_control = _unit(rng.normal(size=d))
    for i, row in enumerate(meta.itertuples(index=False)):
        if row.treatment == "EMPTY_control":
            continue
        if row.treatment == "CRISPR_control":
            effect[i] = config.effect_size * crispr_control
        elif row.perturbation_type == "CRISPR":
            k = efficiency.setdefault(row.treatment, 0.7 + 0.3 * rng.random())
            effect[i] = config.effect_size * k * directions[row.gene]
        else:
            dose = row.concentration / (row.concentration + EC50)
            effect[i] = config.effect_size * dose * directions[targets[row.treatment]]
    base = rng.normal(size=d)
    x = base + effect + config.noise * rng.normal(size=(len(meta), d))
    for experiment in sorted(meta["experiment_name"].unique()):  # an affine batch effect per experiment
        rows = (meta["experiment_name"] == experiment).to_numpy()
        scale = np.exp(0.3 * config.batch_effect * rng.normal(size=d))
        shift = config.batch_effect * rng.normal(size=d)
        x[rows] = x[rows] * scale + shift
    return x.astype(np.float32)


def _site_images(x: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """(6, size, size) uint8: a dark background and blob-shaped "cells" whose channel brightness follows
    the well's first six features (so a network can see the phenotype)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    image = rng.normal(12, 3, size=(6, size, size)).astype(np.float32)
    brightness = 90 + 40 * np.tanh(x[:6] / 2)
    for _ in range(max(4, size // 8)):
        cy, cx = rng.uniform(0, size, 2)
        radius = rng.uniform(size / 20, size / 9)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius ** 2))
        image += brightness[:, None, None] * blob[None]
    return np.clip(image, 0, 255).astype(np.uint8)


def _write_shards(out: Path, config: Rxrx3CoreConfig, meta: pd.DataFrame, x: np.ndarray,
                  rng: np.random.Generator) -> None:
    import imagecodecs
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rcic.rxrx3.formats import N_CHANNELS, image_key

    records = []
    for i, row in enumerate(meta.itertuples(index=False)):
        image = _site_images(x[i], config.image_size, rng)
        for c in range(N_CHANNELS):
            key = image_key(row.experiment_name, row.plate, row.address, c + 1)
            records.append((key, imagecodecs.jpeg2k_encode(image[c], level=0)))  # lossless, like a decode check
    records.sort(key=lambda r: r[0])
    folder = out / "data"
    folder.mkdir()
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    per_shard = -(-len(records) // config.shards)
    for s in range(config.shards):
        part = records[s * per_shard:(s + 1) * per_shard]
        table = pa.table({"__key__": pa.array([k for k, _ in part], pa.string()),
                          "jp2": pa.array([{"bytes": b, "path": f"{k}.jp2"} for k, b in part], image_type)})
        with atomic_path(folder / f"train-{s:05d}-of-{config.shards:05d}.parquet") as tmp:
            pq.write_table(table, tmp, row_group_size=600)


def generate_rxrx3_core(out: str | Path, config: Rxrx3CoreConfig) -> dict:
    """Write the synthetic download into ``out`` (new or empty); returns counts a user checks first."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError("exists and is not an empty folder; choose a new output folder", out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed)
    directions = _phenotypes(config, rng)
    meta, targets = _wells(config, rng)
    x = _embeddings(config, meta, directions, targets, rng)
    atomic_write_text(out / METADATA_FILE, meta.to_csv(index=False))
    order = np.argsort(meta["well_id"].to_numpy(), kind="stable")
    frame = pd.DataFrame(x[order], columns=[f"feature_{i}" for i in range(config.dims)])
    frame.insert(0, "well_id", meta["well_id"].to_numpy()[order])
    with atomic_path(out / EMBEDDINGS_FILE) as tmp:
        frame.to_parquet(tmp, index=False)
    names = genes()
    truth = []
    for name, target in targets.items():  # the target active, a grey-zone gene, three inactive ones
        others = [g for g in names if g != target]
        picks = rng.choice(len(others), 4, replace=False)
        truth.append((target, 10.0, "ic50", name))
        truth.append((others[picks[0]], 5000.0, "ic50", name))
        truth += [(others[k], 50000.0, "ec50, ic50", name) for k in picks[1:]]
    truth_frame = pd.DataFrame(truth, columns=["gene_symbol", "nM_value", "measurement_type", "treatment"])
    truth_frame.insert(3, "database", "synthetic (rcic synth)")
    atomic_write_text(out / "compound_gene_interactions.csv", truth_frame.to_csv(index=False))
    atomic_write_text(out / "complexes.csv", pd.DataFrame(
        [(g, c) for c, members in COMPLEXES.items() for g in members.split()],
        columns=["gene", "complex"]).to_csv(index=False))
    if config.images:
        _write_shards(out, config, meta, x, rng)
    return {"wells": len(meta), "genes": len(names), "compounds": len(targets), "dims": config.dims,
            "images": config.images}
