"""Recursion's RxRx3-core benchmarks (EFAAR), step by step as the published notebook runs them.

1. ``perturbation``: guides pool into their gene, compound names and controls pass unchanged.
2. Correction: PCA-CenterScale (PCA fitted on every ``EMPTY_control`` well, then each experiment
   standardised on its own projected controls), or any correction of ``rcic.profiles`` with the
   ``EMPTY_control`` wells as controls.
3. The compound plates' controls (``EMPTY_control``, ``CRISPR_control``) dropped.
4. Aggregation: mean per (perturbation type, perturbation, concentration); compounds kept at the 8
   standard concentrations only. The real download gives 14,090 map entities.
5. Known relationships: cosine similarity of every pair of entities; the null is every unordered
   pair (N(N-1)/2, 99,257,005 for the real map); a known pair counts when its similarity lies at
   or below the ``lo`` quantile or at or above the ``hi`` quantile of the null (EFAAR's
   ``compute_recall``: left and right percentage ranks); recall = counted / pairs.
   Computed in blocks of rows: the N x N matrix and the sorted null are never held, the counts
   are exact.
6. Compound-gene (with a ground-truth file): per compound, its active genes (<= 1000 nM) against
   sampled negatives (no activity <= 10,000 nM), scored by |cosine|, AP and ROC AUC per
   concentration and for the maximum over concentrations, averaged over compounds (MACRO), beside
   uniform random scores; repeated over seeds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rcic.errors import DataError
from rcic.rxrx3.formats import EMPTY_CONTROL, perturbation

COMPOUND_CONCENTRATIONS = (0.0025, 0.01, 0.025, 0.1, 0.25, 1.0, 2.5, 10.0)
RECALL_THRESHOLDS = ((0.05, 0.95), (0.1, 0.9))
ACTIVITY_NM = 1000.0
INACTIVITY_NM = 10000.0
MIN_NEGATIVES = 20
BLOCK_ROWS = 1024

def correction_methods() -> tuple[str, ...]:
    """PCA-CenterScale (the published method), then every correction of ``rcic map``."""
    from rcic.profiles.correct import METHODS

    return ("pca-centerscale", *METHODS)


log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Correction and aggregation
# ----------------------------------------------------------------------------------------------


def pca_centerscale(x: np.ndarray, experiments: np.ndarray, controls: np.ndarray) -> np.ndarray:
    """PCA fitted on the control wells of every experiment (all components), every well projected, then
    each experiment standardised (mean, population SD) on its own projected controls."""
    from sklearn.decomposition import PCA

    pca = PCA().fit(x[controls])
    z = pca.transform(x)
    out = np.empty_like(z)
    for rows in pd.Series(np.arange(len(z))).groupby(experiments, sort=True).indices.values():
        c = z[rows][controls[rows]]
        if len(c) < 2:
            raise DataError(f"experiment {experiments[rows[0]]} has {len(c)} {EMPTY_CONTROL} wells; "
                            "PCA-CenterScale needs at least 2 per experiment")
        sd = c.std(0)
        # a component without control variance (fewer controls than dimensions) is centred, not blown up
        out[rows] = (z[rows] - c.mean(0)) / np.where(sd > 1e-9 * max(sd.max(), 1e-300), sd, 1.0)
    return out


def correct_wells(metadata: pd.DataFrame, x: np.ndarray, method: str, source=None) -> np.ndarray:
    """Well embeddings corrected with ``method``; the controls are the ``EMPTY_control`` wells."""
    controls = (metadata["treatment"] == EMPTY_CONTROL).to_numpy()
    if method == "pca-centerscale":
        if not controls.any():
            raise DataError(f"no {EMPTY_CONTROL} wells: PCA-CenterScale fits on them", source)
        return pca_centerscale(x, metadata["experiment_name"].to_numpy(), controls)
    from rcic.profiles.correct import METHODS, correct

    if method not in METHODS:
        raise DataError(f"unknown correction {method!r}; choose from {', '.join(correction_methods())}")
    meta = pd.DataFrame({"experiment": metadata["experiment_name"].to_numpy(),
                         "well_type": np.where(controls, "negative_control", "treatment"),
                         "label": np.where(controls, "", perturbation(metadata).to_numpy())})
    return correct(meta, x, method, source, controls="negative")  # EMPTY_control, as the published method


@dataclass
class Map:
    """The aggregated map: one row per entity (gene, or compound at one concentration)."""

    metadata: pd.DataFrame  # perturbation_type, perturbation, concentration, wells
    features: np.ndarray


def aggregate(metadata: pd.DataFrame, x: np.ndarray) -> Map:
    """EFAAR's steps 4-6: compound-plate controls dropped, mean per (type, perturbation, concentration),
    compounds kept at ``COMPOUND_CONCENTRATIONS`` (exact match) or without a concentration."""
    pert = perturbation(metadata).to_numpy()
    kind = metadata["perturbation_type"].to_numpy()
    conc = metadata["concentration"].to_numpy(float)
    keep = ~((kind == "COMPOUND") & pd.Series(pert).str.contains("_control", regex=False).to_numpy())
    keep &= np.isnan(conc) | np.isin(conc, COMPOUND_CONCENTRATIONS)
    keys = pd.DataFrame({"perturbation_type": kind[keep], "perturbation": pert[keep], "concentration": conc[keep]})
    groups = keys.groupby(["perturbation_type", "perturbation", "concentration"], dropna=False, sort=True)
    codes = groups.ngroup().to_numpy()
    counts = np.bincount(codes)
    sums = np.zeros((len(counts), x.shape[1]))
    rows = np.flatnonzero(keep)
    order = np.argsort(codes, kind="stable")
    for a in range(0, len(order), 65536):  # bounded temporaries at full scale (222,601 wells)
        chunk = order[a:a + 65536]
        sub_codes = codes[chunk]
        starts = np.flatnonzero(np.diff(np.concatenate([[-1], sub_codes])))
        sums[sub_codes[starts]] += np.add.reduceat(x[rows[chunk]], starts, axis=0)
    meta = groups.size().reset_index(name="wells")
    return Map(meta, sums / counts[:, None])


# ----------------------------------------------------------------------------------------------
# Known relationships
# ----------------------------------------------------------------------------------------------


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, as scikit-learn's ``cosine_similarity`` does (a zero row stays zero)."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    return x / np.where(norms == 0, 1.0, norms)[:, None]


@dataclass
class RecallResult:
    table: pd.DataFrame  # source, pairs, null, recall_lo_hi ...
    entities: int
    null_size: int
    thresholds: tuple[tuple[float, float], ...]
    quantiles: dict[str, float] = field(default_factory=dict)


def recall_column(lo: float, hi: float) -> str:
    return f"recall_{lo}_{hi}"


def known_relationship_recall(labels: list[str] | np.ndarray, features: np.ndarray,
                              sources: dict[str, pd.DataFrame],
                              thresholds: tuple[tuple[float, float], ...] = RECALL_THRESHOLDS,
                              lookup: np.ndarray | None = None,
                              progress: Callable[[int, int], None] | None = None) -> RecallResult:
    """Recall of each source's pairs among the extreme similarities of all entity pairs (EFAAR).

    ``labels`` name the rows of ``features``; ``lookup`` (bool per row) marks the rows a pair's
    names may refer to (default: every row; the first row of a repeated label). For each query
    value q: left = #(null < q) / |null|, right = #(null <= q) / |null|; a pair counts where right
    <= lo or left >= hi. The counts come from one pass over row blocks of the similarity matrix:
    each block's null values (its part above the diagonal) are located among the sorted query
    values (``searchsorted``), so memory is a block, not N x N.
    """
    labels = np.asarray(labels, dtype=object)
    n = len(labels)
    if n < 2:
        raise DataError("fewer than two map entities: no pairs to compare")
    lookup = np.ones(n, bool) if lookup is None else np.asarray(lookup, bool)
    index = pd.Series(np.flatnonzero(lookup), index=labels[lookup])
    index = index[~index.index.duplicated()]
    per_source, rows_, cols_ = {}, [], []
    for name, pairs in sources.items():
        a = index.reindex(pairs["entity1"].to_numpy()).to_numpy()
        b = index.reindex(pairs["entity2"].to_numpy()).to_numpy()
        found = ~(np.isnan(a) | np.isnan(b))
        per_source[name] = (len(rows_), int(found.sum()))
        rows_.extend(a[found].astype(np.int64))
        cols_.extend(b[found].astype(np.int64))
    q_rows, q_cols = np.asarray(rows_, np.int64), np.asarray(cols_, np.int64)
    unit = unit_rows(np.asarray(features, np.float64))
    query = np.empty(len(q_rows))
    needed = np.unique(q_rows)
    for a in range(0, len(needed), BLOCK_ROWS):  # the queries first, so the null is counted against them sorted
        part = needed[a:a + BLOCK_ROWS]
        sims = unit[part] @ unit.T
        sel = np.flatnonzero(np.isin(q_rows, part))
        query[sel] = sims[np.searchsorted(part, q_rows[sel]), q_cols[sel]]
    order = np.argsort(query, kind="stable")
    sorted_query = query[order]
    below = np.zeros(len(query) + 1, np.int64)  # histogram of searchsorted(Q, v, "right") over null values v
    at_or_below = np.zeros(len(query) + 1, np.int64)  # ... of searchsorted(Q, v, "left")
    null_size = n * (n - 1) // 2
    blocks = [(s, min(s + BLOCK_ROWS, n)) for s in range(0, n - 1, BLOCK_ROWS)]
    for k, (start, stop) in enumerate(blocks):
        sims = unit[start:stop] @ unit[start:].T  # columns from the block's first row: the upper triangle
        upper = np.arange(stop - start)[:, None] < np.arange(n - start)[None, :]
        values = sims[upper]
        del sims, upper
        below += np.bincount(np.searchsorted(sorted_query, values, side="right"), minlength=len(query) + 1)
        at_or_below += np.bincount(np.searchsorted(sorted_query, values, side="left"), minlength=len(query) + 1)
        if progress:
            progress(k + 1, len(blocks))
    less_sorted = np.cumsum(below)[:-1]  # null values v with v < q_j: searchsorted(Q, v, right) <= j
    less_equal_sorted = np.cumsum(at_or_below)[:-1]
    left, right = np.empty(len(query)), np.empty(len(query))
    left[order] = less_sorted / null_size
    right[order] = less_equal_sorted / null_size
    records = []
    for name, (offset, count) in per_source.items():
        if count == 0:
            continue  # EFAAR leaves a source without pairs out of its table
        record = {"source": name, "null_distribution_size": null_size, "query_distribution_size": count}
        sl = slice(offset, offset + count)
        for lo, hi in thresholds:
            lo, hi = min(lo, hi), max(lo, hi)
            record[recall_column(lo, hi)] = float(((right[sl] <= lo) | (left[sl] >= hi)).sum() / count)
        records.append(record)
    columns = ["source", "null_distribution_size", "query_distribution_size",
               *[recall_column(min(p), max(p)) for p in thresholds]]
    return RecallResult(pd.DataFrame(records, columns=columns), n, null_size, tuple(thresholds))


# ----------------------------------------------------------------------------------------------
# Compound-gene
# ----------------------------------------------------------------------------------------------


def read_compound_genes(path, map_genes: set[str]) -> pd.DataFrame:
    """The ground truth (``gene_symbol``, ``nM_value``, ``treatment``; more columns ignored): every gene
    must be a gene of the map, since any of them may be drawn as a negative."""
    path = Path(path)
    if not path.is_file():
        raise DataError("compound-gene file not found" if not path.exists() else "is not a file", path)
    try:
        frame = pd.read_csv(path, dtype={"gene_symbol": str, "treatment": str}, keep_default_na=False,
                            na_values={"nM_value": [""]})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"not a readable CSV ({str(err).splitlines()[0][:120]})", path) from None
    missing = [c for c in ("gene_symbol", "nM_value", "treatment") if c not in frame.columns]
    if missing:
        raise DataError(f"missing column(s) {', '.join(missing)} (gene_symbol, nM_value, treatment)", path)
    values = pd.to_numeric(frame["nM_value"], errors="coerce")
    if values.isna().any():
        row = int(np.argmax(values.isna().to_numpy()))
        raise DataError(f"row {row + 2}: nM_value {frame['nM_value'].iloc[row]!r} is not a number", path)
    frame = frame.assign(nM_value=values.astype(float))[["gene_symbol", "nM_value", "treatment"]]
    absent = sorted(set(frame["gene_symbol"]) - map_genes)
    if absent:
        raise DataError(f"{len(absent)} gene(s) are not in the map (first {absent[0]!r}): every gene of the file "
                        "must be a CRISPR knockout of the embeddings", path)
    return frame


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """scikit-learn's ``average_precision_score`` (step-wise, tied scores one threshold), without its
    per-call validation: the benchmark makes ~300,000 such calls on the real map."""
    order = np.argsort(-scores, kind="mergesort")
    ordered, hits = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(ordered)), len(ordered) - 1]  # the last row of each tied score
    tp = np.cumsum(hits)[last]
    precision = tp / (last + 1)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """scikit-learn's ``roc_auc_score`` for two classes: the Mann-Whitney statistic, ties counted half."""
    from scipy.stats import rankdata

    positive = labels == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass
class CompoundCase:
    compound: str
    genes: np.ndarray  # map rows of the scored genes (actives first)
    labels: np.ndarray  # 1 active, 0 negative


def _cases(truth: pd.DataFrame, gene_rows: dict[str, int], seed: int, activity: float, inactivity: float,
           min_negatives: int) -> list[CompoundCase]:
    all_genes = sorted(set(truth["gene_symbol"]))  # sorted: the reference's set order varies between runs
    cases = []
    for compound, rows in truth.groupby("treatment", sort=False):
        active = sorted(set(rows.loc[rows["nM_value"] <= activity, "gene_symbol"]))
        if not active:
            continue
        grey = set(rows.loc[(rows["nM_value"] > activity) & (rows["nM_value"] <= inactivity), "gene_symbol"])
        eligible = [g for g in all_genes if g not in grey and g not in set(active)]
        n_neg = max(2 * len(active), min_negatives)
        if len(eligible) < n_neg:
            continue
        negatives = np.random.default_rng(seed).choice(eligible, n_neg, replace=False)
        genes = np.array([gene_rows[g] for g in [*active, *negatives]])
        cases.append(CompoundCase(compound, genes, np.r_[np.ones(len(active)), np.zeros(n_neg)]))
    return cases


def compound_gene_benchmark(map_: Map, truth: pd.DataFrame, seeds: int = 10, activity: float = ACTIVITY_NM,
                            inactivity: float = INACTIVITY_NM, min_negatives: int = MIN_NEGATIVES
                            ) -> tuple[pd.DataFrame, int]:
    """(table, compounds scored): per concentration key (the 8 standard ones, then ``max``) the mean and SD
    over seeds of the MACRO-averaged AP and ROC AUC, and of the same with uniform random scores."""
    meta = map_.metadata
    unit = unit_rows(map_.features)
    is_gene = (meta["perturbation_type"] == "CRISPR").to_numpy()
    gene_rows = dict(zip(meta["perturbation"][is_gene], np.flatnonzero(is_gene)))
    compound_rows = meta[(meta["perturbation_type"] == "COMPOUND")]
    by_compound = {c: dict(zip(f["concentration"], f.index)) for c, f in compound_rows.groupby("perturbation")}
    truth = truth[truth["treatment"].isin(by_compound)]
    if truth.empty:
        raise DataError("no compound of the ground truth is in the map")
    keys = [*COMPOUND_CONCENTRATIONS, "max"]
    per_seed, scored = [], 0
    for seed in range(seeds):
        cases = _cases(truth, gene_rows, seed, activity, inactivity, min_negatives)
        scored = len(cases)
        results = {k: {"ap": [], "auc": [], "ap_random": [], "auc_random": []} for k in keys}
        scores = {}
        for case in cases:
            per_conc = {c: np.abs(unit[row] @ unit[case.genes].T) for c, row in by_compound[case.compound].items()}
            per_conc["max"] = np.nanmax(np.stack(list(per_conc.values())), axis=0)
            scores[case.compound] = per_conc
        rng = np.random.default_rng(seed)  # the baseline walks concentrations, then compounds
        for k in keys:
            for case in cases:
                if k not in scores[case.compound]:
                    continue
                random_scores = rng.random(len(case.labels))
                for suffix, values in (("", scores[case.compound][k]), ("_random", random_scores)):
                    results[k][f"ap{suffix}"].append(average_precision(case.labels, values))
                    results[k][f"auc{suffix}"].append(roc_auc(case.labels, values))
        per_seed.append({k: {m: (float(np.mean(v)) if v else (0.5 if "auc" in m else 0.0)) for m, v in r.items()}
                         for k, r in results.items()})
    if scored == 0:
        raise DataError(f"no compound of the ground truth has an active gene (<= {activity:g} nM) and "
                        f"{min_negatives} eligible negatives")
    rows = []
    for k in keys:
        row = {"concentration": k if k == "max" else float(k)}
        for m in ("ap", "ap_random", "auc", "auc_random"):
            values = np.array([s[k][m] for s in per_seed])
            row[m] = float(values.mean())
            row[f"{m}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    return pd.DataFrame(rows), scored


# ----------------------------------------------------------------------------------------------
# The whole benchmark
# ----------------------------------------------------------------------------------------------

# Recursion's stored outputs (EFAAR_benchmarking notebook @66bf5af: OpenPhenom, PCA-CenterScale, 14,090
# entities, 99,257,005 null pairs). Shown beside a run; not reproduced here (the data was out of reach).
PUBLISHED_RECALL = {"CORUM": (0.648470, 1209), "HuMAP": (0.723382, 958), "Reactome": (0.418278, 569),
                    "SIGNOR": (0.385859, 495), "StringDB": (0.579159, 1737)}
PUBLISHED_COMPOUND_GENE = {"max": {"ap": 0.2661, "ap_random": 0.2189, "auc": 0.5409, "auc_random": 0.5020}}


@dataclass
class BenchmarkResult:
    recall: pd.DataFrame  # correction, source, null_distribution_size, query_distribution_size, recall_*
    compound_gene: dict[str, pd.DataFrame]  # correction -> per-concentration table
    scores: dict  # what scores.json holds
    notes: list[str] = field(default_factory=list)


def run_benchmark(metadata_path, embeddings_path, corrections: list[str], sources: list[str],
                  compound_genes=None, seeds: int = 10, thresholds=RECALL_THRESHOLDS,
                  notify: Callable[[str], None] | None = None,
                  progress: Callable[[int, int], None] | None = None) -> BenchmarkResult:
    """The benchmark from the files as downloaded; every input checked before the long work starts."""
    from rcic.rxrx3.formats import read_embeddings, read_metadata
    from rcic.rxrx3.relationships import read_relationships, relationship_sets, source_name, source_path

    for method in corrections:
        if method not in correction_methods():
            raise DataError(f"unknown correction {method!r}; choose from {', '.join(correction_methods())}")
    for name in sources:  # a misspelt source, or a missing package or file, fails before the embeddings are read
        if source_name(name) is not None or (Path(name).suffix == "" and not Path(name).is_file()):
            source_path(name)
        elif not Path(name).is_file():
            read_relationships(name)  # the error: file not found
    metadata = read_metadata(metadata_path)
    embedded = read_embeddings(embeddings_path, metadata, metadata_path)
    notices: list[str] = []  # the licences, shown once the run has succeeded (an error stays one line)
    relationships = relationship_sets(sources, notify=notices.append)
    notes = []
    if embedded.wells_without_embedding:
        notes.append(f"{embedded.wells_without_embedding} wells of the metadata have no embedding (left out)")
    truth = None
    recall_rows, compound_tables, per_correction = [], {}, {}
    steps, done = len(corrections), 0
    for method in dict.fromkeys(corrections):
        z = correct_wells(embedded.metadata, embedded.x, method, embeddings_path)
        map_ = aggregate(embedded.metadata, z)
        del z
        is_gene = (map_.metadata["perturbation_type"] == "CRISPR").to_numpy()
        if compound_genes is not None and truth is None:
            truth = read_compound_genes(compound_genes, set(map_.metadata["perturbation"][is_gene]))
        result = known_relationship_recall(map_.metadata["perturbation"].to_numpy(), map_.features, relationships,
                                           thresholds, lookup=is_gene)
        if result.table.empty:
            raise DataError(f"no known pair of {', '.join(relationships)} joins two genes of the map: are the "
                            "genes HGNC symbols?", metadata_path)
        recall_rows.append(result.table.assign(correction=method))
        entry = {"recall": {r["source"]: {k: r[k] for k in result.table.columns if k != "source"}
                            for r in result.table.to_dict("records")}}
        if truth is not None:
            table, scored = compound_gene_benchmark(map_, truth, seeds)
            compound_tables[method] = table
            entry["compound_gene"] = {"compounds": scored, "seeds": seeds,
                                      "by_concentration": table.to_dict("records")}
        per_correction[method] = entry
        done += 1
        if progress:
            progress(done, steps)
    recall = pd.concat(recall_rows, ignore_index=True)
    recall = recall[["correction", *[c for c in recall.columns if c != "correction"]]]
    head = recall_column(*thresholds[0])
    mean_recall = recall.groupby("correction", sort=False)[head].mean()
    counts = map_.metadata["perturbation_type"].value_counts()
    scores = {
        "dataset": {"metadata": str(metadata_path), "embeddings": str(embeddings_path),
                    "wells": len(embedded.metadata), "wells_without_embedding": embedded.wells_without_embedding,
                    "features": int(embedded.x.shape[1]), "map_entities": int(len(map_.metadata)),
                    "gene_entities": int(counts.get("CRISPR", 0)), "compound_entities": int(counts.get("COMPOUND", 0)),
                    "null_pairs": int(len(map_.metadata) * (len(map_.metadata) - 1) // 2)},
        "corrections": per_correction,
        "mean_recall": {m: float(v) for m, v in mean_recall.items()},
        "best_correction": str(mean_recall.idxmax()),
        "chance": {recall_column(lo, hi): round(lo + 1 - hi, 10) for lo, hi in thresholds},
        "published_openphenom": {"recall_0.05_0.95": {s: v[0] for s, v in PUBLISHED_RECALL.items()},
                                 "compound_gene_max": PUBLISHED_COMPOUND_GENE["max"]},
    }
    for line in notices:
        if notify is not None:
            notify(line)
    return BenchmarkResult(recall, compound_tables, scores, notes)
