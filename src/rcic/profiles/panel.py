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

Scale (62,755 wells, HUVEC alone ~20,000 labelled wells), as scIB benchmarks are usually run:

- one exact k-nearest-neighbour graph per correction and cell type, shared by every kNN metric
  (graph connectivity, kBET, iLISI, cLISI, Leiden: scib-metrics takes precomputed neighbours);
- silhouette label and isolated labels (scib-metrics' silhouette over every pair of wells) on a
  stratified subsample of about ``SILHOUETTE_WELLS`` wells per cell type: each siRNA keeps its
  share of wells (two at least), spread over as many experiments as it can, drawn with a fixed
  seed. The isolated labels are chosen on all wells. A cell type at or under the cap is scored
  whole (then both equal scib-metrics' full values). Silhouette batch is computed within each
  siRNA, so its cost is the sum of the squared siRNA sizes: it is computed on every well;
- kBET (scib-metrics' ``kbet_per_label``: a diffusion map and a pynndescent search per siRNA,
  ~0.1 s each) on at most ``KBET_LABELS`` siRNAs per cell type, drawn at random (fixed seed) from
  those scib-metrics scores (10 wells or more, in two experiments or more; it skips the others):
  kBET is the mean over siRNAs, so the drawn siRNAs estimate it without bias. Each drawn siRNA's
  value is scib-metrics' own: the connectivities of the whole cell type's graph, restricted to the
  drawn siRNAs' wells, hold every edge between two wells of one siRNA, the subgraph it scores;
- Leiden at the fixed resolutions ``LEIDEN_RESOLUTIONS`` (scib-metrics searches ten, 0.2-2.0),
  the best NMI and its ARI as scib-metrics picks them, with scib-metrics' fixed seed; the igraph
  graph (which scib-metrics builds from the connectivities in a Python loop per resolution) is
  built once and clustered at each resolution with scib-metrics' calls: the same clusters;
- graph connectivity without scib-metrics' per-label slices of the whole graph, to the same value
  (tested against scib-metrics): one connected-components pass over the graph's within-label edges.

Two cores: the methods are independent, so ``workers`` processes share them, each correcting and
scoring whole methods (pca with harmony: one SVD), the longest first, with its share of the cores'
threads; ``phenomic`` adds each output's phenomic-map row (``rcic.profiles.score_correction``) to its
job. A fresh (spawned) process pays the imports and the first-call compilations (numba, jax) once.

Every number is deterministic for a seed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from rcic.errors import DataError
from rcic.profiles.correct import PANEL_METHODS, check_controls, correct, principal_components

BATCH_METRICS = ("silhouette batch", "iLISI", "kBET", "graph connectivity")
BIO_METRICS = ("replicate mAP", "consistency mAP", "Leiden NMI", "Leiden ARI", "silhouette label", "cLISI",
               "isolated labels")
N_NEIGHBOURS = 90  # scib-metrics' Benchmarker default
BATCH_WEIGHT = 0.4  # scIB's and Arevalo et al.'s weighting
# the silhouette's cost grows with the square of a cell type's wells (x 2: silhouette label, isolated labels)
SILHOUETTE_WELLS = 5000
LEIDEN_RESOLUTIONS = (0.5, 1.0, 2.0)  # a subset of scib-metrics' search grid (0.2, 0.4, ..., 2.0)
KBET_LABELS = 200  # siRNAs per cell type in kBET (scib-metrics: ~0.1 s each, per correction that mixes batches)
KBET_MIN_WELLS = 10  # scib-metrics' kbet_per_label skips a label with fewer wells (or a single batch)

log = logging.getLogger(__name__)


@dataclass
class PanelResult:
    table: pd.DataFrame  # one row per method: metrics, batch, bio, overall, rank, rank interval
    seconds: dict[str, float] = field(default_factory=dict)  # "method: step" -> seconds
    corrected: dict[str, np.ndarray] = field(default_factory=dict)  # method -> its output (rcic map reuses it)
    note: str = ""  # how the panel was computed at this size (subsample, resolutions), one line
    phenomic: object = None  # rcic.profiles.MapResult of the corrected outputs, when the panel was asked for it


def _need_scib():
    try:
        import scib_metrics
    except ImportError:
        raise DataError("rcic map --panel needs the optional packages of the panel (scib-metrics, inmoose, "
                        "scanorama): pip install 'rcic[panel]'") from None
    # scib-metrics logs a line per skipped label at INFO through its own rich handler (on stderr)
    logging.getLogger("scib_metrics").setLevel(logging.WARNING)
    return scib_metrics


def neighbours(x: np.ndarray, k: int = N_NEIGHBOURS, block: int = 2048):
    """Exact Euclidean k nearest neighbours, self included and first (what scib-metrics expects), in
    torch blocks. The distances are symmetric, so each pair of row blocks is multiplied once: block
    (i, j) offers its columns to the rows of i and, transposed, its rows to those of j (half the
    multiplications of a row-by-row search); each row keeps its k nearest candidates so far."""
    import torch
    from scib_metrics.nearest_neighbors import NeighborsResults

    k = min(k, len(x))
    feats = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    norms = (feats * feats).sum(1)
    starts = list(range(0, len(x), block))
    best: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(starts)

    def offer(b: int, d2: torch.Tensor, index: torch.Tensor) -> None:
        if best[b] is not None:
            d2, index = torch.cat([best[b][0], d2], 1), torch.cat([best[b][1], index], 1)
        values, where = d2.topk(min(k, d2.shape[1]), dim=1, largest=False)
        best[b] = values, index.gather(1, where)

    for i, row in enumerate(starts):
        a = feats[row:row + block]
        for j in range(i, len(starts)):
            col = starts[j]
            b = feats[col:col + block]
            d2 = (norms[row:row + block, None] + norms[None, col:col + block] - 2 * a @ b.T).clamp_min(0)
            if i == j:
                d2.fill_diagonal_(-1.0)  # self first
            offer(i, d2, torch.arange(col, col + len(b)).expand(len(a), -1))
            if i != j:
                offer(j, d2.T, torch.arange(row, row + len(a)).expand(len(b), -1))
    return NeighborsResults(indices=torch.cat([index for _, index in best]).numpy(),
                            distances=torch.cat([values for values, _ in best]).clamp_min(0).sqrt().numpy())


@dataclass
class _Parts:
    """One cell type's scores: full-data values and the per-siRNA pieces the bootstrap resamples."""

    wells: int
    fixed: dict[str, float | None]
    per_label: dict[str, pd.Series]  # metric -> values indexed by siRNA (per siRNA, or per well for silhouette label)
    lisi: dict[str, tuple[pd.Series, int]]  # iLISI/cLISI -> (per-well LISI indexed by siRNA, count for scaling)
    kbet_labels: tuple[int, int] = (0, 0)  # (siRNAs kBET scored, siRNAs scib-metrics would score)


def stratified_subsample(labels: np.ndarray, batches: np.ndarray, max_wells: int, seed: int = 0) -> np.ndarray:
    """Sorted row indices of at most ~``max_wells`` wells: each label keeps its share of the wells
    (``round(n_label x max_wells / n)``, two at least: a silhouette needs a neighbour of its own label),
    taken round-robin over its batches in a random order, so that it spans as many batches as it can.
    Every row when there are ``max_wells`` or fewer. Deterministic for a seed."""
    n = len(labels)
    if n <= max_wells:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"label": labels, "batch": batches, "key": rng.random(n)})
    frame["turn"] = frame.groupby(["label", "batch"])["key"].rank(method="first")  # the well's round
    frame = frame.sort_values(["label", "turn", "key"], kind="stable")
    size = frame.groupby("label")["label"].transform("size").to_numpy()
    share = np.minimum(size, np.maximum(2, np.round(size * max_wells / n)))
    keep = frame.groupby("label").cumcount().to_numpy() < share
    return np.sort(frame.index.to_numpy()[keep])


def leiden_nmi_ari(nn, labels: np.ndarray, resolutions: tuple[float, ...] = LEIDEN_RESOLUTIONS,
                   seed: int = 42) -> tuple[float, float]:
    """scib-metrics' Leiden NMI/ARI with its resolution search on ``resolutions``: the best NMI, and the
    ARI at that resolution (scib-metrics' ``nmi_ari_cluster_labels_leiden`` over its own grid, seed 42).

    scib-metrics' ``_compute_clustering_leiden`` builds the igraph graph from the connectivities (a
    Python loop over every edge) for each resolution; here it is built once, with its calls, and its
    clustering call runs at each resolution from the same random state: the same clusters."""
    import random

    import igraph
    from sklearn.metrics.cluster import adjusted_rand_score, normalized_mutual_info_score

    graph = igraph.Graph.Weighted_Adjacency(nn.knn_graph_connectivities, mode="directed")
    graph.to_undirected(mode="each")
    out = []
    for resolution in resolutions:
        igraph.set_random_number_generator(random.Random(seed))
        clusters = np.asarray(graph.community_leiden(objective_function="modularity", weights="weight",
                                                     resolution=resolution).membership)
        out.append((normalized_mutual_info_score(labels, clusters, average_method="arithmetic"),
                    adjusted_rand_score(labels, clusters)))
    best = int(np.argmax([nmi for nmi, _ in out]))  # first of the ties, as scib-metrics' argmax
    return float(out[best][0]), float(out[best][1])


def graph_connectivity(nn, codes: np.ndarray) -> float:
    """scib-metrics' ``graph_connectivity``: the mean over labels of the share of a label's wells in the
    largest strongly connected component of the kNN graph restricted to that label.

    scib-metrics slices the whole graph once per label (each slice reads every edge: ~1,100 labels x
    1.8 million edges per cell type). The graph keeping only the edges within a label has, as its
    strongly connected components, exactly those of every label's subgraph (no edge joins two labels),
    so one ``connected_components`` on it gives every label's components (tested equal)."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    graph = nn.knn_graph_distances.tocsr()
    rows = np.repeat(np.arange(graph.shape[0]), np.diff(graph.indptr))
    within = codes[rows] == codes[graph.indices]  # stored entries, explicit zeros (self) included, as a slice
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows[within], minlength=graph.shape[0]))])
    restricted = csr_matrix((graph.data[within], graph.indices[within], indptr), shape=graph.shape)
    _, component = connected_components(restricted, connection="strong")
    component_size = np.bincount(component)
    largest = np.zeros(int(codes.max()) + 1, dtype=np.int64)
    np.maximum.at(largest, codes, component_size[component])
    size = np.bincount(codes)
    present = size > 0
    return float(np.mean(largest[present] / size[present]))


class _Connectivities:
    """What scib-metrics' ``kbet_per_label`` reads of a ``NeighborsResults`` (its row count and its
    connectivity graph), for the rows ``rows`` of ``nn``: the graph restricted to those rows and columns."""

    def __init__(self, nn, rows: np.ndarray):
        self.indices = nn.indices[rows]
        self.knn_graph_connectivities = nn.knn_graph_connectivities.tocsr()[rows][:, rows]


def kbet_labels(codes: np.ndarray, batch_codes: np.ndarray, max_labels: int = KBET_LABELS, seed: int = 0
                ) -> tuple[np.ndarray, int]:
    """The label codes kBET scores, sorted, and how many scib-metrics' ``kbet_per_label`` would score (those
    with ``KBET_MIN_WELLS`` wells or more in two batches or more): all of them, or ``max_labels`` drawn at
    random from them. Deterministic for a seed."""
    frame = pd.DataFrame({"label": codes, "batch": batch_codes}).groupby("label")["batch"]
    scored = ((frame.size() >= KBET_MIN_WELLS) & (frame.nunique() > 1)).pipe(lambda ok: ok.index[ok].to_numpy())
    if len(scored) <= max_labels:
        return scored, len(scored)
    return np.sort(np.random.default_rng(seed).choice(scored, max_labels, replace=False)), len(scored)


def kbet_per_label(nn, batch_codes: np.ndarray, codes: np.ndarray, chosen: np.ndarray) -> pd.Series:
    """scib-metrics' ``kbet_per_label`` value of each label code in ``chosen``, indexed by code (NaN ones
    dropped: scib-metrics' mean skips them). Only the chosen labels' wells are passed: each label's
    subgraph, all scib-metrics reads, is unchanged."""
    import scib_metrics

    if not len(chosen):
        return pd.Series(dtype=float)
    rows = np.flatnonzero(np.isin(codes, chosen))
    _, values = scib_metrics.kbet_per_label(_Connectivities(nn, rows), batch_codes[rows], codes[rows],
                                            return_df=True)
    values = values.set_index("cluster")["kBET"].astype(float).dropna()
    return pd.Series(values.to_numpy(), index=values.index.to_numpy(int))


def scib_parts(x: np.ndarray, labels: np.ndarray, batches: np.ndarray, max_wells: int = SILHOUETTE_WELLS,
               resolutions: tuple[float, ...] = LEIDEN_RESOLUTIONS, seed: int = 0,
               seconds: dict[str, float] | None = None, max_kbet_labels: int = KBET_LABELS) -> _Parts:
    """scib-metrics' scores of one cell type's labelled wells, with their per-siRNA decomposition
    (module docstring: one neighbour graph, silhouettes on a subsample of ``max_wells``, kBET on at
    most ``max_kbet_labels`` siRNAs)."""
    scib = _need_scib()
    from scib_metrics.metrics._isolated_labels import _get_isolated_labels
    from scib_metrics.utils import silhouette_samples

    seconds = {} if seconds is None else seconds
    clock = [time.perf_counter()]

    def lap(step: str) -> None:
        now = time.perf_counter()
        seconds[step] = seconds.get(step, 0.0) + now - clock[0]
        clock[0] = now

    # scib-metrics compares labels with == in per-label loops: integer codes do it ~100x faster than
    # strings, and every metric depends on the labels only through equality
    names, codes = np.unique(labels, return_inverse=True)
    _, batch_codes = np.unique(batches, return_inverse=True)
    nn = neighbours(x)
    lap("neighbours")
    n_batches, n_labels = len(np.unique(batches)), len(names)
    fixed: dict[str, float | None] = {}
    per_label: dict[str, pd.Series] = {}
    fixed["graph connectivity"] = graph_connectivity(nn, codes)
    lap("graph connectivity")
    chosen, scoreable = kbet_labels(codes, batch_codes, max_kbet_labels, seed)
    kbet = kbet_per_label(nn, batch_codes, codes, chosen)
    per_label["kBET"] = pd.Series(kbet.to_numpy(), index=names[kbet.index.to_numpy(int)])
    lap("kBET")
    fixed["Leiden NMI"], fixed["Leiden ARI"] = leiden_nmi_ari(nn, codes, resolutions)
    lap("Leiden")
    lisi = {"iLISI": (pd.Series(np.asarray(scib.lisi_knn(nn, batch_codes)), index=labels), n_batches),
            "cLISI": (pd.Series(np.asarray(scib.lisi_knn(nn, codes)), index=labels), n_labels)}
    lap("LISI")
    # one silhouette for silhouette label and isolated labels (scib-metrics computes it in each)
    rows = stratified_subsample(codes, batch_codes, max_wells, seed)
    sil = (np.asarray(silhouette_samples(x[rows], codes[rows])) + 1) / 2  # scib's rescaling
    per_label["silhouette label"] = pd.Series(sil, index=labels[rows])  # per well: scib averages over wells
    isolated = _get_isolated_labels(codes, batch_codes, None)  # on every well, as scib-metrics' isolated_labels
    fixed["isolated labels"] = float(pd.Series([sil[codes[rows] == code].mean() for code in isolated],
                                               dtype=float).mean())
    lap("silhouette label, isolated labels")
    per_label["silhouette batch"] = _silhouette_batch_per_label(x, codes, batch_codes, names)
    lap("silhouette batch")
    return _Parts(len(x), fixed, per_label, lisi, (len(chosen), scoreable))


def _silhouette_batch_per_label(x: np.ndarray, codes: np.ndarray, batch_codes: np.ndarray, names: np.ndarray
                                ) -> pd.Series:
    """scib-metrics' ``silhouette_batch`` of each label alone (its value is the mean of these), by label name."""
    import scib_metrics

    values = {}
    for code, rows in pd.Series(np.arange(len(codes))).groupby(codes).indices.items():
        n_batches = len(np.unique(batch_codes[rows]))
        if n_batches == 1 or n_batches == len(rows):  # scib-metrics skips these labels
            continue
        values[names[code]] = float(scib_metrics.silhouette_batch(x[rows], codes[rows], batch_codes[rows]))
    return pd.Series(values, dtype=float)


def _lisi_score(metric: str, median: float, count: int) -> float:
    """scib-metrics' scaling of the median LISI: iLISI (median - 1) / (batches - 1), cLISI
    (labels - median) / (labels - 1)."""
    if count < 2:
        return float("nan")
    return (median - 1) / (count - 1) if metric == "iLISI" else (count - median) / (count - 1)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, float32 (zero rows stay zero)."""
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """copairs' cosine similarity for rows already of unit length (``_unit_rows``): their dot product.
    copairs stores similarities as float32, so float32 unit rows give its ``cosine`` to float32
    rounding at a third of the memory traffic of its pair loop (which gathers two rows per pair:
    two million pairs for HUVEC's replicate mAP). copairs batches and threads it as its own."""
    return np.einsum("ij,ij->i", a, b)


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
    ap = average_precision(sub, _unit_rows(x[rows.to_numpy()]), pos_sameby=["label"], pos_diffby=["experiment"],
                           neg_sameby=[], neg_diffby=["well_type", "label"], distance=_dot,
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
    ap = average_precision(sub, _unit_rows(profiles.to_numpy()), pos_sameby=["gene"], pos_diffby=["label"],
                           neg_sameby=[], neg_diffby=["gene"], distance=_dot,
                           progress_bar=False).dropna(subset=["average_precision"])
    if ap.empty:
        return None
    per_gene = mean_average_precision(ap, sameby=["gene"], null_size=null_size, threshold=0.05, seed=0,
                                      progress_bar=False, cache_dir=_null_cache())
    return float(per_gene["mean_average_precision"].mean())


class _Draws:
    """How often each label is drawn in a bootstrap resample, looked up by a series' label index. The
    positions of each index among the labels are found once and reused by every resample (pandas'
    ``reindex`` per metric, cell type, method and resample took most of the bootstrap's time)."""

    def __init__(self, labels: pd.Index, counts: np.ndarray):
        self.labels, self.counts = labels, np.asarray(counts, float)
        self._positions: dict[int, tuple[pd.Index, np.ndarray]] = {}

    def weights(self, index: pd.Index) -> np.ndarray:
        """The draws of each entry of ``index`` (0 for a label not drawn)."""
        cached = self._positions.get(id(index))
        if cached is None or cached[0] is not index:  # the index is kept: its id cannot be reused meanwhile
            cached = self._positions[id(index)] = (index, self.labels.get_indexer(index))
        positions = cached[1]
        return np.where(positions >= 0, self.counts[positions], 0.0)


def _scores(parts: list[_Parts], maps: list[pd.Series], counts: pd.Series | _Draws | None = None
            ) -> dict[str, float]:
    """Metric values over cell types (weighted by wells); ``counts``: how often each siRNA is drawn in a
    bootstrap resample (None: the data as they are)."""
    if isinstance(counts, pd.Series):
        counts = _Draws(counts.index, counts.to_numpy(float))
    values: dict[str, float] = {}
    weights = np.array([p.wells for p in parts], float)

    def mean(series: pd.Series) -> float | None:
        if not len(series):
            return None
        if counts is None:
            return float(series.mean())
        w = counts.weights(series.index)
        return float((series.to_numpy() * w).sum() / w.sum()) if w.sum() else None

    for metric in ("kBET", "silhouette label", "silhouette batch"):
        values[metric] = _weighted([mean(p.per_label[metric]) for p in parts], weights)
    for metric in ("iLISI", "cLISI"):
        scores = []
        for p in parts:
            lisi, count = p.lisi[metric]
            w = None if counts is None else counts.weights(lisi.index)
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


# the panel's jobs, longest first, so that the last job to finish on two workers is a short one; pca and
# harmony share one job (they start from the same SVD of the wells)
JOB_ORDER = ("harmony", "pca", "scanorama", "combat", "center", "standardize", "spherize", "tvn", "none")


def panel_jobs(methods: list[str] | tuple[str, ...]) -> list[tuple[str, ...]]:
    """``methods`` grouped into the panel's jobs (one per method; pca with harmony), longest first."""
    rank = {method: i for i, method in enumerate(JOB_ORDER)}
    jobs = [(m,) for m in sorted(dict.fromkeys(methods), key=lambda m: rank.get(m, -1)) if m not in ("pca", "harmony")]
    shared = tuple(m for m in ("pca", "harmony") if m in methods)
    return ([shared] if shared else []) + jobs


@dataclass
class _Scored:
    """One method's outputs from a job (in process or in a worker)."""

    method: str
    corrected: np.ndarray
    parts: list[_Parts]
    maps: list[pd.Series]
    seconds: dict[str, float]
    sampled: dict[str, tuple[int, int]]
    kbet_sampled: dict[str, tuple[int, int]]
    phenomic: tuple[dict, pd.DataFrame, float] | None  # (scores, per-siRNA table, seconds) of the phenomic map


@dataclass
class _Settings:
    controls: str
    genes: pd.DataFrame | None
    null_size: int
    seed: int
    source: object
    max_wells: int
    resolutions: tuple[float, ...]
    max_kbet_labels: int
    phenomic: dict | None  # score_correction's keywords (relationships, probe), or None: no phenomic map


def _score_job(meta: pd.DataFrame, x: np.ndarray, job: tuple[str, ...], settings: _Settings,
               tick: Callable[[], None] = lambda: None) -> list[_Scored]:
    """Correct with each method of ``job`` and score its output on every cell type (and on the phenomic map's
    metrics when ``settings.phenomic``); ``tick`` after each step."""
    from rcic.profiles import score_correction

    labelled = (meta["label"] != "").to_numpy()
    cell_types = sorted(meta.loc[labelled, "cell_type"].unique())
    pcs = None  # pca and harmony start from the same principal components: one SVD
    out = []
    for method in job:
        start = time.perf_counter()
        if method in ("pca", "harmony") and pcs is None:
            pcs = principal_components(np.asarray(x, np.float64))
        z = correct(meta, x, method, settings.source, settings.controls,
                    pcs=pcs if method in ("pca", "harmony") else None)
        seconds = {"correction": time.perf_counter() - start}
        tick()
        parts, maps, sampled, kbet_sampled = [], [], {}, {}
        for cell_type in cell_types:
            rows = labelled & (meta["cell_type"] == cell_type).to_numpy()
            sub = meta[rows].reset_index(drop=True)
            if sub["experiment"].nunique() < 2:
                tick()
                continue
            labels, batches = sub["label"].to_numpy(), sub["experiment"].to_numpy()
            part = scib_parts(z[rows], labels, batches, settings.max_wells, settings.resolutions, settings.seed,
                              seconds, settings.max_kbet_labels)
            kbet_sampled[cell_type] = part.kbet_labels
            sampled[cell_type] = (min(len(sub), len(stratified_subsample(labels, batches, settings.max_wells,
                                                                         settings.seed))), len(sub))
            t = time.perf_counter()
            part.fixed["consistency mAP"] = consistency_map(sub, z[rows], settings.genes, settings.null_size)
            seconds["consistency mAP"] = seconds.get("consistency mAP", 0.0) + time.perf_counter() - t
            t = time.perf_counter()
            maps.append(replicate_map_negcon(sub, z[rows], settings.null_size))
            seconds["replicate mAP"] = seconds.get("replicate mAP", 0.0) + time.perf_counter() - t
            parts.append(part)
            tick()
        phenomic = None
        if settings.phenomic is not None:
            t = time.perf_counter()
            scores, per_sirna = score_correction(meta, z, settings.genes, null_size=settings.null_size, tick=tick,
                                                 **settings.phenomic)
            seconds["phenomic map"] = time.perf_counter() - t
            phenomic = (scores, per_sirna, seconds["correction"] + seconds["phenomic map"])
        out.append(_Scored(method, z, parts, maps, seconds, sampled, kbet_sampled, phenomic))
    return out


_WORKER: dict = {}  # a worker process's copy of the wells and settings (sent once, by the pool's initializer)


def _start_worker(meta: pd.DataFrame, x: np.ndarray, settings: _Settings, threads: int) -> None:
    """A panel worker: dies with rcic, ignores Ctrl-C (rcic.parallel), keeps to ``threads`` threads in its
    numerical libraries (two workers on two cores: one each, instead of four threads fighting), holds the data."""
    import os

    from rcic.parallel import die_with_parent

    die_with_parent()
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[name] = str(threads)
    # jax reads its flags when its CPU backend starts (the first silhouette), after this
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                               f"intra_op_parallelism_threads={threads}").strip()
    import torch
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads)
    torch.set_num_threads(threads)
    _WORKER.update(meta=meta, x=x, settings=settings)


def _worker_job(job: tuple[str, ...]) -> list[_Scored]:
    return _score_job(_WORKER["meta"], _WORKER["x"], job, _WORKER["settings"])


def _run_jobs(meta: pd.DataFrame, x: np.ndarray, jobs: list[tuple[str, ...]], settings: _Settings, workers: int,
              tick: Callable[[int], None], job_fn: Callable[[tuple[str, ...]], list] = _worker_job):
    """Each job's ``_Scored`` list, as the jobs finish: in this process (``workers`` 1), or ``job_fn(job)`` in
    ``workers`` fresh processes (spawned: jax's and torch's threads do not survive a fork) that each receive
    the wells once and take the next job, in order, whenever they are free."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield _score_job(meta, x, job, settings, lambda: tick(1))
        return
    import multiprocessing
    import os
    from concurrent.futures import FIRST_COMPLETED, wait

    from rcic.parallel import worker_pool

    workers = min(workers, len(jobs))
    threads = max(1, (os.cpu_count() or 1) // workers)
    with worker_pool(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                     initargs=(meta, x, settings, threads)) as pool:
        pending = {pool.submit(job_fn, job) for job in jobs}  # taken in this order as workers free up
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                scored = future.result()
                tick(sum(_job_steps(settings, meta) for _ in scored))
                yield scored


def _job_steps(settings: _Settings, meta: pd.DataFrame) -> int:
    """Progress steps of one method: its correction, each cell type, the phenomic map's four."""
    cell_types = meta.loc[meta["label"] != "", "cell_type"].nunique()
    return 1 + cell_types + (4 if settings.phenomic is not None else 0)


def correction_panel(meta: pd.DataFrame, x: np.ndarray, methods: list[str] | tuple[str, ...] = PANEL_METHODS,
                     controls: str = "within", genes: pd.DataFrame | None = None, null_size: int = 1000,
                     bootstrap: int = 200, seed: int = 0, source=None,
                     progress: Callable[[int, int], None] | None = None, max_wells: int = SILHOUETTE_WELLS,
                     resolutions: tuple[float, ...] = LEIDEN_RESOLUTIONS, max_kbet_labels: int = KBET_LABELS,
                     workers: int = 1, phenomic: dict | None = None) -> PanelResult:
    """Correct with each method and score every output on the panel's metrics (module docstring).

    ``workers``: processes that share the methods (each corrects and scores whole methods; the results do
    not depend on it). ``phenomic``: also score each output on the phenomic map's metrics, in the same
    job (``rcic.profiles.score_correction``'s keywords: ``relationships``, ``probe``); they come back as
    ``PanelResult.phenomic``, the ``MapResult`` of ``phenomic_map`` with the panel's corrected outputs."""
    from rcic.profiles import MapResult

    if workers <= 1:
        _need_scib()  # in workers it is imported there; here only its absence is checked
    else:
        import importlib.util

        if importlib.util.find_spec("scib_metrics") is None:
            _need_scib()
    methods = list(dict.fromkeys(methods))
    # bad input stops here, before any job starts: too few controls for a method, no cell type to score
    for method in methods:
        check_controls(meta, x, method, controls, source)
    labelled = (meta["label"] != "").to_numpy()
    if not (meta[labelled].groupby("cell_type")["experiment"].nunique() >= 2).any():
        raise DataError("the panel needs a cell type with labelled wells in two experiments or more", source)
    settings = _Settings(controls, genes, null_size, seed, source, max_wells, resolutions, max_kbet_labels, phenomic)
    steps = len(methods) * _job_steps(settings, meta)
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, steps)

    scored: dict[str, _Scored] = {}
    for job_result in _run_jobs(meta, x, panel_jobs(methods), settings, workers, tick):
        scored |= {s.method: s for s in job_result}
    scored = {method: scored[method] for method in methods}  # the caller's order
    seconds = {f"{s.method}: {step}": value for s in scored.values() for step, value in s.seconds.items()}
    sampled = {k: v for s in scored.values() for k, v in s.sampled.items()}
    kbet_sampled = {k: v for s in scored.values() for k, v in s.kbet_sampled.items()}
    parts_by_method = {method: (s.parts, s.maps) for method, s in scored.items()}
    rows = []
    for method, (parts, maps) in parts_by_method.items():
        values = _scores(parts, maps)
        rows.append({"correction": method, **values, **dict(zip(("batch", "bio", "overall"), aggregate(values)))})
    table = pd.DataFrame(rows)
    table["rank"] = table["overall"].rank(ascending=False, method="min").astype(int)
    start = time.perf_counter()
    low, high = _bootstrap_ranks(parts_by_method, meta.loc[labelled & (meta["well_type"] == "treatment").to_numpy(),
                                                           "label"].unique(), bootstrap, seed)
    seconds["bootstrap of the ranks"] = time.perf_counter() - start
    table["rank 95% low"], table["rank 95% high"] = low, high
    corrected = {method: s.corrected for method, s in scored.items()}
    result = None
    if phenomic is not None:
        result = MapResult(scores={m: s.phenomic[0] for m, s in scored.items()}, corrected=corrected,
                           per_sirna={m: s.phenomic[1] for m, s in scored.items()},
                           seconds={m: s.phenomic[2] for m, s in scored.items()})
    return PanelResult(table, seconds, corrected, _note(sampled, resolutions, seed, kbet_sampled), result)


def _note(sampled: dict[str, tuple[int, int]], resolutions: tuple[float, ...], seed: int,
          kbet_sampled: dict[str, tuple[int, int]] | None = None) -> str:
    """One line saying which scores come from a subsample, and Leiden's resolutions."""
    cut = {cell_type: counts for cell_type, counts in sampled.items() if counts[0] < counts[1]}
    where = ("silhouette label and isolated labels on every labelled well" if not cut else
             "silhouette label and isolated labels on a stratified subsample (seed " + str(seed) + ") of "
             + ", ".join(f"{used:,} of {total:,} {cell_type} wells" for cell_type, (used, total) in cut.items()))
    cut = {cell_type: counts for cell_type, counts in (kbet_sampled or {}).items() if counts[0] < counts[1]}
    if cut:
        where += ("; kBET on a random (seed " + str(seed) + ") " + ", ".join(
            f"{used:,} of the {total:,} {cell_type} siRNAs scib-metrics scores" for cell_type, (used, total)
            in cut.items()))
    return f"panel: {where}; Leiden at resolutions {', '.join(f'{r:g}' for r in resolutions)}"


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
    # controls are no siRNA under study: kept once in every resample
    draws = _Draws(pd.Index(list(sirnas) + controls), np.concatenate([np.zeros(len(sirnas)), np.ones(len(controls))]))
    for b in range(bootstrap):
        # rng.choice(sirnas, n) draws these same positions (rng.integers(0, n, n)), without the strings
        draws.counts[:len(sirnas)] = np.bincount(rng.choice(len(sirnas), len(sirnas)), minlength=len(sirnas))
        overall = [aggregate(_scores(*parts_by_method[m], counts=draws))[2] for m in methods]
        ranks[b] = pd.Series(overall).rank(ascending=False, method="min").to_numpy()
    return (np.quantile(ranks, 0.025, axis=0).round().astype(int).tolist(),
            np.quantile(ranks, 0.975, axis=0).round().astype(int).tolist())
