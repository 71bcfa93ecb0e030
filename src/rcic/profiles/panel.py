"""A panel of batch corrections scored as the field benchmarks them (Arevalo et al., Nat Commun 2024).

Every correction receives the same input (the embeddings); each is scored on its output with:

- batch removal (scib-metrics): silhouette batch, iLISI, kBET (per label), graph connectivity;
- biology: replicate mAP against negative controls (copairs: a siRNA's wells in other experiments
  against the negative-control wells, Arevalo's ``negcon`` mAP), consistency mAP (copairs: siRNA
  median profiles retrieving the other siRNAs of their gene; needs a gene table), Leiden NMI and
  ARI, silhouette label, cLISI, isolated labels (scib-metrics).

The label is the siRNA, the batch the experiment. Experiments are nested in cell types, so every
metric is computed within each cell type (wells that carry a label: labelled treatments and the
controls) and averaged over cell types, weighted by their wells: mixing HUVEC with HEPG2 wells is
not batch removal.

Aggregate, as Arevalo et al. compute it (their ``plot/data.py:pivot_scores``): batch = the mean of
the batch metrics, bio = the mean of the bio metrics, overall = 0.4 x batch + 0.6 x bio, on the raw
metric values (each in [0, 1]). scib-metrics' ``Benchmarker`` min-max scales each metric across
the methods first; Arevalo et al. do not, and neither do we: a scaled score depends on which other
methods are in the panel, and a metric on which all methods tie would swing the ranking.

Rank: by overall score; its interval is the 2.5-97.5% range over ``bootstrap`` resamples of the
siRNAs, recomputing the metrics that decompose over siRNAs (replicate mAP, silhouette batch, kBET,
silhouette label, iLISI, cLISI); graph connectivity, Leiden NMI/ARI, isolated labels and
consistency mAP keep their full-data values in every resample.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from rcic.errors import DataError
from rcic.profiles.correct import PANEL_METHODS, correct

BATCH_METRICS = ("silhouette batch", "iLISI", "kBET", "graph connectivity")
BIO_METRICS = ("replicate mAP", "consistency mAP", "Leiden NMI", "Leiden ARI", "silhouette label", "cLISI",
               "isolated labels")
N_NEIGHBOURS = 90  # scib-metrics' Benchmarker default
BATCH_WEIGHT = 0.4  # scIB's and Arevalo et al.'s weighting

log = logging.getLogger(__name__)


@dataclass
class PanelResult:
    table: pd.DataFrame  # one row per method: metrics, batch, bio, overall, rank, rank interval
    seconds: dict[str, float] = field(default_factory=dict)


def _need_scib():
    try:
        import scib_metrics
    except ImportError:
        raise DataError("rcic map --panel needs the optional packages of the panel (scib-metrics, inmoose, "
                        "scanorama): pip install 'rcic[panel]'") from None
    # scib-metrics logs a line per skipped label at INFO through its own rich handler (on stderr)
    logging.getLogger("scib_metrics").setLevel(logging.WARNING)
    return scib_metrics


def neighbours(x: np.ndarray, k: int = N_NEIGHBOURS):
    """Exact Euclidean k nearest neighbours, self included (what scib-metrics expects), in torch blocks."""
    import torch
    from scib_metrics.nearest_neighbors import NeighborsResults

    k = min(k, len(x))
    feats = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    norms = (feats * feats).sum(1)
    indices, distances = [], []
    for start in range(0, len(x), 1024):
        block = feats[start:start + 1024]
        d2 = (norms[start:start + 1024, None] + norms[None, :] - 2 * block @ feats.T).clamp_min(0)
        d2[torch.arange(len(block)), torch.arange(start, start + len(block))] = -1.0  # self first
        values, index = d2.topk(k, dim=1, largest=False)
        indices.append(index.numpy())
        distances.append(values.clamp_min(0).sqrt().numpy())
    return NeighborsResults(indices=np.concatenate(indices), distances=np.concatenate(distances))


@dataclass
class _Parts:
    """One cell type's scores: full-data values and the per-siRNA pieces the bootstrap resamples."""

    wells: int
    fixed: dict[str, float | None]
    per_label: dict[str, pd.Series]  # metric -> values indexed by siRNA (per siRNA, or per well for silhouette label)
    lisi: dict[str, tuple[pd.Series, int]]  # iLISI/cLISI -> (per-well LISI indexed by siRNA, count for scaling)


def scib_parts(x: np.ndarray, labels: np.ndarray, batches: np.ndarray) -> _Parts:
    """scib-metrics' scores of one cell type's labelled wells, with their per-siRNA decomposition."""
    scib = _need_scib()
    from scib_metrics.utils import silhouette_samples

    nn = neighbours(x)
    n_batches, n_labels = len(np.unique(batches)), len(np.unique(labels))
    fixed: dict[str, float | None] = {}
    per_label: dict[str, pd.Series] = {}
    fixed["graph connectivity"] = float(scib.graph_connectivity(nn, labels))
    leiden = scib.nmi_ari_cluster_labels_leiden(nn, labels, optimize_resolution=True, n_jobs=1)
    fixed["Leiden NMI"], fixed["Leiden ARI"] = float(leiden["nmi"]), float(leiden["ari"])
    fixed["isolated labels"] = float(scib.isolated_labels(x, labels, batches))
    _, kbet = scib.kbet_per_label(nn, batches, labels, return_df=True)
    per_label["kBET"] = kbet.set_index("cluster")["kBET"].astype(float).dropna()  # scib's nanmean skips them
    sil = (np.asarray(silhouette_samples(x, labels)) + 1) / 2  # scib's silhouette_label, per well
    per_label["silhouette label"] = pd.Series(sil, index=labels)  # per well: scib averages over wells
    per_label["silhouette batch"] = _silhouette_batch_per_label(x, labels, batches)
    lisi = {"iLISI": (pd.Series(np.asarray(scib.lisi_knn(nn, batches)), index=labels), n_batches),
            "cLISI": (pd.Series(np.asarray(scib.lisi_knn(nn, labels)), index=labels), n_labels)}
    return _Parts(len(x), fixed, per_label, lisi)


def _silhouette_batch_per_label(x: np.ndarray, labels: np.ndarray, batches: np.ndarray) -> pd.Series:
    """scib-metrics' ``silhouette_batch`` of each label alone (its value is the mean of these)."""
    import scib_metrics

    values = {}
    for label in np.unique(labels):
        rows = labels == label
        n_batches = len(np.unique(batches[rows]))
        if n_batches == 1 or n_batches == rows.sum():
            continue
        values[label] = float(scib_metrics.silhouette_batch(x[rows], labels[rows], batches[rows]))
    return pd.Series(values, dtype=float)


def _lisi_score(metric: str, median: float, count: int) -> float:
    """scib-metrics' scaling of the median LISI: iLISI (median - 1) / (batches - 1), cLISI
    (labels - median) / (labels - 1)."""
    if count < 2:
        return float("nan")
    return (median - 1) / (count - 1) if metric == "iLISI" else (count - median) / (count - 1)


def replicate_map_negcon(meta: pd.DataFrame, x: np.ndarray, null_size: int = 1000) -> pd.Series:
    """copairs mAP per siRNA: each labelled treatment well's wells of the same siRNA in other
    experiments (positives) against the negative-control wells (negatives), Arevalo's ``negcon``
    protocol (negative controls get their own ids so that they have no positives)."""
    from copairs.map import average_precision, mean_average_precision

    from rcic.profiles.metrics import _null_cache

    rows = ((meta["well_type"] == "treatment") & (meta["label"] != "")) | (meta["well_type"] == "negative_control")
    sub = meta.loc[rows, ["label", "experiment", "well_type"]].reset_index(drop=True)
    negcon = (sub["well_type"] == "negative_control").to_numpy()
    if not negcon.any() or negcon.all():
        return pd.Series(dtype=float)
    sub.loc[negcon, "label"] = [f"negcon-{i}" for i in range(int(negcon.sum()))]
    ap = average_precision(sub, np.asarray(x[rows.to_numpy()], np.float64), pos_sameby=["label"],
                           pos_diffby=["experiment"], neg_sameby=[], neg_diffby=["well_type", "label"],
                           progress_bar=False)
    ap = ap[(ap["well_type"] == "treatment")].dropna(subset=["average_precision"])
    if ap.empty:
        return pd.Series(dtype=float)
    per_label = mean_average_precision(ap, sameby=["label"], null_size=null_size, threshold=0.05, seed=0,
                                       progress_bar=False, cache_dir=_null_cache())
    return per_label.set_index("label")["mean_average_precision"].astype(float)


def consistency_map(meta: pd.DataFrame, x: np.ndarray, genes: pd.DataFrame | None, null_size: int = 1000
                    ) -> float | None:
    """Arevalo's consistency mAP: siRNA median profiles retrieving the other siRNAs of their gene
    (copairs), the mean over genes; None without a gene table or a gene with two siRNAs."""
    if genes is None:
        return None
    from copairs.map import average_precision, mean_average_precision

    from rcic.profiles.metrics import _null_cache

    treat = ((meta["well_type"] == "treatment") & (meta["label"] != "")).to_numpy()
    profiles = pd.DataFrame(x[treat]).groupby(meta["label"].to_numpy()[treat]).median()
    gene_of = genes.drop_duplicates("label").set_index("label")["gene"]
    profiles = profiles[profiles.index.isin(gene_of.index)]
    sub = pd.DataFrame({"label": profiles.index, "gene": gene_of.loc[profiles.index].to_numpy()})
    if not sub["gene"].duplicated().any():
        return None
    ap = average_precision(sub, profiles.to_numpy(np.float64), pos_sameby=["gene"], pos_diffby=["label"],
                           neg_sameby=[], neg_diffby=["gene"], progress_bar=False).dropna(subset=["average_precision"])
    if ap.empty:
        return None
    per_gene = mean_average_precision(ap, sameby=["gene"], null_size=null_size, threshold=0.05, seed=0,
                                      progress_bar=False, cache_dir=_null_cache())
    return float(per_gene["mean_average_precision"].mean())


def _scores(parts: list[_Parts], maps: list[pd.Series], counts: pd.Series | None = None) -> dict[str, float]:
    """Metric values over cell types (weighted by wells); ``counts``: how often each siRNA is drawn in a
    bootstrap resample (None: the data as they are)."""
    values: dict[str, float] = {}
    weights = np.array([p.wells for p in parts], float)

    def mean(series: pd.Series) -> float | None:
        if not len(series):
            return None
        if counts is None:
            return float(series.mean())
        w = counts.reindex(series.index, fill_value=0).to_numpy(float)
        return float((series.to_numpy() * w).sum() / w.sum()) if w.sum() else None

    for metric in ("kBET", "silhouette label", "silhouette batch"):
        values[metric] = _weighted([mean(p.per_label[metric]) for p in parts], weights)
    for metric in ("iLISI", "cLISI"):
        scores = []
        for p in parts:
            lisi, count = p.lisi[metric]
            w = None if counts is None else counts.reindex(lisi.index, fill_value=0).to_numpy(float)
            scores.append(_lisi_score(metric, _weighted_median(lisi.to_numpy(), w), count))
        values[metric] = _weighted(scores, weights)
    for metric in ("graph connectivity", "Leiden NMI", "Leiden ARI", "isolated labels", "consistency mAP"):
        values[metric] = _weighted([p.fixed.get(metric) for p in parts], weights)
    values["replicate mAP"] = _weighted([mean(m) for m in maps], weights)
    return values


def _weighted_median(values: np.ndarray, weights: np.ndarray | None) -> float:
    """``np.nanmedian`` of the values, each repeated ``weights`` times (a bootstrap's draws)."""
    ok = np.isfinite(values)
    if weights is None:
        return float(np.median(values[ok])) if ok.any() else float("nan")
    values, weights = values[ok], weights[ok]
    order = np.argsort(values, kind="stable")
    values, cumulative = values[order], np.cumsum(weights[order])
    total = cumulative[-1] if len(cumulative) else 0
    if total == 0:
        return float("nan")
    # the median of the repeated sample: mean of the two middle order statistics
    low = values[np.searchsorted(cumulative, (total + 1) // 2, side="left")]
    high = values[np.searchsorted(cumulative, total // 2 + 1, side="left")]
    return float((low + high) / 2)


def _weighted(values: list, weights: np.ndarray) -> float:
    v = np.array([np.nan if value is None else value for value in values], float)
    ok = np.isfinite(v)
    return float(np.average(v[ok], weights=weights[ok])) if ok.any() else float("nan")


def aggregate(values: dict[str, float]) -> tuple[float, float, float]:
    """(batch, bio, overall) as Arevalo et al.: means of the available metrics, 0.4 x batch + 0.6 x bio."""
    batch = np.nanmean([values[m] for m in BATCH_METRICS])
    bio = np.nanmean([values[m] for m in BIO_METRICS if np.isfinite(values.get(m, np.nan))])
    return float(batch), float(bio), float(BATCH_WEIGHT * batch + (1 - BATCH_WEIGHT) * bio)


def correction_panel(meta: pd.DataFrame, x: np.ndarray, methods: list[str] | tuple[str, ...] = PANEL_METHODS,
                     controls: str = "within", genes: pd.DataFrame | None = None, null_size: int = 1000,
                     bootstrap: int = 200, seed: int = 0, source=None,
                     progress: Callable[[int, int], None] | None = None) -> PanelResult:
    """Correct with each method and score every output on the panel's metrics (module docstring)."""
    _need_scib()
    labelled = (meta["label"] != "").to_numpy()
    cell_types = sorted(meta.loc[labelled, "cell_type"].unique())
    parts_by_method: dict[str, tuple[list[_Parts], list[pd.Series]]] = {}
    seconds: dict[str, float] = {}
    steps = len(methods) * (1 + len(cell_types))
    done = 0
    for method in methods:
        start = time.perf_counter()
        z = correct(meta, x, method, source, controls)
        done += 1
        if progress:
            progress(done, steps)
        parts, maps = [], []
        for cell_type in cell_types:
            rows = labelled & (meta["cell_type"] == cell_type).to_numpy()
            sub = meta[rows].reset_index(drop=True)
            if sub["experiment"].nunique() < 2:
                continue
            part = scib_parts(z[rows], sub["label"].to_numpy(), sub["experiment"].to_numpy())
            part.fixed["consistency mAP"] = consistency_map(sub, z[rows], genes, null_size)
            parts.append(part)
            maps.append(replicate_map_negcon(sub, z[rows], null_size))
            done += 1
            if progress:
                progress(done, steps)
        if not parts:
            raise DataError("the panel needs a cell type with labelled wells in two experiments or more", source)
        parts_by_method[method] = (parts, maps)
        seconds[method] = time.perf_counter() - start
    rows = []
    for method, (parts, maps) in parts_by_method.items():
        values = _scores(parts, maps)
        rows.append({"correction": method, **values, **dict(zip(("batch", "bio", "overall"), aggregate(values)))})
    table = pd.DataFrame(rows)
    table["rank"] = table["overall"].rank(ascending=False, method="min").astype(int)
    low, high = _bootstrap_ranks(parts_by_method, meta.loc[labelled & (meta["well_type"] == "treatment").to_numpy(),
                                                           "label"].unique(), bootstrap, seed)
    table["rank 95% low"], table["rank 95% high"] = low, high
    return PanelResult(table, seconds)


def _bootstrap_ranks(parts_by_method: dict, sirnas: np.ndarray, bootstrap: int, seed: int
                     ) -> tuple[list[int], list[int]]:
    """2.5 and 97.5% quantiles of each method's rank over resamples of the siRNAs."""
    methods = list(parts_by_method)
    if bootstrap < 1 or len(sirnas) < 2:
        return [np.nan] * len(methods), [np.nan] * len(methods)
    rng = np.random.default_rng(seed)
    ranks = np.empty((bootstrap, len(methods)))
    controls = sorted({label for parts, _ in parts_by_method.values() for p in parts
                       for label in p.per_label["silhouette label"].index.unique()} - set(sirnas))
    for b in range(bootstrap):
        drawn = pd.Series(rng.choice(sirnas, len(sirnas))).value_counts()
        counts = pd.concat([drawn, pd.Series(1, index=controls)])  # controls are no siRNA under study: kept
        overall = [aggregate(_scores(*parts_by_method[m], counts=counts))[2] for m in methods]
        ranks[b] = pd.Series(overall).rank(ascending=False, method="min").to_numpy()
    return (np.quantile(ranks, 0.025, axis=0).round().astype(int).tolist(),
            np.quantile(ranks, 0.975, axis=0).round().astype(int).tolist())
