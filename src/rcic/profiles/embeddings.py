"""Well embeddings as a parquet table: rcic's own (``rcic embed``) or any a user brings.

One row per well, the metadata columns ``META_COLUMNS`` and the features as ``emb_0..emb_{D-1}``.
Any parquet with those columns is accepted (CellProfiler profiles, a foundation model's
features): the other commands read nothing else.

``rcic embed`` adds ``seen_in_training`` (whether a model that made the well's embedding had
trained on its experiment) and records the runs in the parquet's key-value metadata (key
``rcic``). ``--split val`` with the K runs of a K-fold cross-validation embeds every labelled
experiment with the one fold model that held it out: an out-of-fold map.

Each fold model has its own feature space: the same well lands on different coordinates in
each, so replicates embedded by two folds look unrelated, and a correction fitted on a few control
wells per experiment cannot bring the spaces together (BENCHMARKS.md, "Out-of-fold embeddings").
``align="procrustes"`` (the default of ``rcic embed --split val``) therefore embeds a set of anchor
wells with every fold model as well: one test experiment per cell type, which no fold trained on
(``anchor_wells``; every experiment when there is no test split; no labels are used either way).
Each fold's space is then carried onto the first fold's by an orthogonal Procrustes map fitted on
the anchors (``procrustes_maps``): a rotation and a shift, so distances within one fold's wells
are kept.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from rcic.atomic import atomic_path
from rcic.errors import DataError

META_COLUMNS = ["id_code", "experiment", "plate", "well", "cell_type", "well_type", "label"]
SEEN = "seen_in_training"
ALIGNMENTS = ("procrustes", "none")
# anchors of the fold alignment: on RxRx1, one test experiment per cell type is ~4,500 wells, several times
# the features' dimensions, and each fold embeds 4 test experiments instead of all 18
ANCHOR_EXPERIMENTS_PER_CELL_TYPE = 1
WELL_TYPES = ("treatment", "positive_control", "negative_control")
METADATA_KEY = b"rcic"


def embedding_frame(wells: pd.DataFrame, features: np.ndarray, seen: np.ndarray | None = None) -> pd.DataFrame:
    """The table of ``rcic embed``: metadata columns, ``seen_in_training`` (when known), then ``emb_*`` (float32)."""
    meta = wells[META_COLUMNS].reset_index(drop=True).copy()
    meta["plate"] = meta["plate"].astype(int)
    meta["label"] = meta["label"].fillna("").astype(str)
    if seen is not None:
        meta[SEEN] = np.asarray(seen, bool)
    emb = pd.DataFrame(features.astype(np.float32), columns=[f"emb_{i}" for i in range(features.shape[1])])
    return pd.concat([meta, emb], axis=1)


def write_embeddings(path: str | Path, frame: pd.DataFrame, runs: list[dict] | None = None) -> None:
    """Parquet, atomically; ``runs`` (the models that made it) go to the key-value metadata ``rcic``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if path.suffix != ".parquet":
        raise DataError("embeddings are written as parquet: give a file name ending in .parquet", path)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    if runs is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               METADATA_KEY: json.dumps({"runs": runs}).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def embedding_runs(path: str | Path) -> list[dict] | None:
    """The runs recorded by ``rcic embed`` in an embeddings parquet (None for other tables)."""
    import pyarrow.parquet as pq

    metadata = pq.read_schema(path).metadata or {}
    if METADATA_KEY not in metadata:
        return None
    return json.loads(metadata[METADATA_KEY])["runs"]


def trained_experiments(run_dir: str | Path, wells: pd.DataFrame) -> set[str]:
    """The experiments of ``wells`` a run trained on, from its ``run.json``: the labelled experiments
    it did not hold out, and the test experiments too when it trained on pseudo-labels."""
    try:
        info = json.loads((Path(run_dir) / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise DataError("no readable run.json: cannot tell which experiments the run trained on", run_dir) from None
    held_out = set(info.get("val_experiments") or [])
    # A run trained on another dataset (an RxRx1 model embedding RxRx3-core) saw none of these wells:
    # its held-out experiments are not here, or most of its classes are no label of this data.
    classes = set(info.get("classes") or [])
    if not held_out <= set(wells["experiment"]) or len(classes & set(wells["label"].astype(str))) < len(classes) / 2:
        return set()
    trained = set(wells.loc[wells["split"] == "train", "experiment"]) - held_out
    if info.get("pseudo_sites"):
        trained |= set(wells.loc[wells["split"] == "test", "experiment"])
    return trained


def procrustes_maps(anchors: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """For the same anchor wells embedded in K spaces (K arrays, wells x features, rows matched), the maps
    ``x -> (x - mean_k) @ rotation_k + mean_0`` that carry each space onto the first: ``rotation_k`` the
    orthogonal matrix that best fits the centred anchors of space k to those of space 0 (scipy's
    ``orthogonal_procrustes``). The first map is the identity."""
    from scipy.linalg import orthogonal_procrustes

    reference = np.asarray(anchors[0], np.float64)
    mean_0 = reference.mean(0)
    maps = [(mean_0, np.eye(len(mean_0)), mean_0)]
    for space in anchors[1:]:
        space = np.asarray(space, np.float64)
        if space.shape != reference.shape:
            raise DataError(f"anchor embeddings differ in shape: {space.shape} against {reference.shape}")
        mean_k = space.mean(0)
        rotation, _ = orthogonal_procrustes(space - mean_k, reference - mean_0)
        maps.append((mean_k, rotation, mean_0))
    return maps


def apply_map(x: np.ndarray, space_map: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    mean_k, rotation, mean_0 = space_map
    return (np.asarray(x, np.float64) - mean_k) @ rotation + mean_0


def anchor_wells(wells: pd.DataFrame, per_cell_type: int = ANCHOR_EXPERIMENTS_PER_CELL_TYPE
                 ) -> tuple[str, list[str]]:
    """The experiments every fold embeds to fit the alignment: ``per_cell_type`` test experiments of each cell
    type (the first by name), which no fold trained on; every experiment's when there is no test split."""
    test = wells["split"] == "test"
    if not test.any():
        return "all", sorted(wells["experiment"].unique())
    experiments = wells[test].drop_duplicates("experiment").sort_values("experiment")
    firsts = experiments.groupby("cell_type").head(per_cell_type)
    return "test", sorted(firsts["experiment"])


def embed_wells(runs: list[Path], source, split: str, progress: Callable[[int, int], None] | None = None,
                align: str = "procrustes", **predict_options) -> tuple[pd.DataFrame, list[dict]] | None:
    """The embeddings table of ``rcic embed`` and the runs behind it (None on a non-zero DDP rank).

    ``split`` ``val``: runs are grouped by the experiments they held out (runs of one fold are
    ensembled); each group embeds its own held-out experiments, so every labelled experiment is
    embedded by models that never trained on it. Two groups may not hold out the same experiment.
    With two groups or more and ``align="procrustes"``, every group's space is carried onto the first
    group's (module docstring). ``all``, ``train``, ``test``: every run embeds every chosen well.
    """
    from rcic.predict import predict, run_val_experiments

    if align not in ALIGNMENTS:
        raise DataError(f"--align must be one of {', '.join(ALIGNMENTS)}, got {align!r}")
    runs = [Path(r) for r in runs]
    groups: dict[tuple[str, ...], list[Path]] = {}
    if split == "val":
        for run in runs:
            groups.setdefault(tuple(run_val_experiments(run)), []).append(run)
        seen_where: dict[str, Path] = {}
        for held_out, members in groups.items():
            for experiment in held_out:
                if experiment in seen_where:
                    raise DataError(f"experiment {experiment} is held out by two different folds "
                                    f"({seen_where[experiment]} and {members[0]}): give one run (or one ensemble) "
                                    "per fold", members[0])
                seen_where[experiment] = members[0]
    else:
        groups[()] = runs
    wells_all = source.dataset.wells
    aligning = align == "procrustes" and len(groups) > 1
    anchor_split, anchor_experiments = anchor_wells(wells_all)
    steps = len(groups) * (2 if aligning else 1)
    made, anchors, child_rank, anchor_ids = [], [], False, None
    for i, members in enumerate(groups.values()):
        # any_classes: a model embeds data whose treatments it never saw (an RxRx1 model on RxRx3-core)
        for anchor in (False, True) if aligning else (False,):
            step = i * (2 if aligning else 1) + anchor
            sub = None if progress is None else (lambda d, n, step=step: progress(step * n + d, steps * n))
            logits = predict(members, source, split="val" if anchor else split, embeddings=True, controls=True,
                             progress=sub, any_classes=True, experiments=anchor_experiments if anchor else None,
                             **predict_options)
            if logits is None:  # a non-zero DDP rank: it takes part in every prediction, rank 0 assembles
                child_rank = True
                continue
            if anchor:
                order = np.argsort(logits.wells["id_code"].to_numpy(), kind="stable")
                ids = logits.wells["id_code"].to_numpy()[order]
                if anchor_ids is not None and not np.array_equal(ids, anchor_ids):
                    raise DataError("the folds embedded different anchor wells", members[0])
                anchor_ids = ids
                anchors.append(np.asarray(logits.extra["embeddings"])[order])
            else:
                made.append((members, logits))
    if child_rank:
        return None
    if len({logits.extra["embeddings"].shape[1] for _, logits in made}) > 1:
        raise DataError("the folds' embeddings differ in width (--combine concat with a different number of runs "
                        "per fold?)")
    maps = procrustes_maps(anchors) if aligning else [None] * len(made)
    frames, records = [], []
    for (members, logits), space_map in zip(made, maps, strict=True):
        features = logits.extra["embeddings"] if space_map is None else apply_map(logits.extra["embeddings"],
                                                                                   space_map)
        trained = set().union(*(trained_experiments(r, wells_all) for r in members))
        seen = logits.wells["experiment"].isin(trained).to_numpy()
        frames.append(embedding_frame(logits.wells, features, seen))
        for run in members:
            info = json.loads((run / "run.json").read_text())
            record = {"run": str(run.resolve()), "recipe_digest": info.get("recipe_digest"),
                      "val_experiments": info.get("val_experiments") or [],
                      "embedded_experiments": sorted(set(logits.wells["experiment"]))}
            if aligning:
                record["alignment"] = {"method": "procrustes", "onto": str(made[0][0][0].resolve()),
                                       "anchor_split": anchor_split, "anchor_experiments": anchor_experiments,
                                       "anchor_wells": len(anchors[0])}
            records.append(record)
    frame = pd.concat(frames, ignore_index=True)
    return frame.sort_values("id_code", kind="stable").reset_index(drop=True), records


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
    if SEEN in frame.columns:
        if frame[SEEN].dtype != bool:
            raise DataError(f"column {SEEN} must be true/false", path)
        meta[SEEN] = frame[SEEN].to_numpy()
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
