"""Phenomic-map benchmarks of (corrected) well embeddings.

- ``replicate_map``: mean average precision of a siRNA's wells retrieving its wells in *other
  experiments of the same cell type* (positives: same label, another experiment; negatives:
  another label, same cell type), cosine similarity; ``replicate_fraction``: the share of siRNAs
  whose mAP is significant (copairs' permutation p-value, Benjamini-Hochberg corrected, < 0.05).
  The per-well average precisions are computed in blocks of a cell type's similarity matrix
  (copairs' own pair enumeration needs ~N^2 pairs in memory: 7 GB for RxRx1), for the wells with a
  replicate in another experiment only, by counting the negatives above each positive; they equal
  copairs' ``average_precision`` (tested, ties included), and copairs computes the mAP, p-values
  and FDR from them.
- ``batch_leakage``: the share of a well's 10 nearest neighbours (cosine, among the wells of its
  cell type) that come from its own experiment, beside the share expected without batch effects.
- ``known_recall``: EFAAR's recall of known relationships: siRNA profiles averaged into gene
  profiles; the fraction of known gene pairs whose cosine similarity lies in the top or bottom 5%
  of all gene pairs (chance 0.10), with a bootstrap 95% interval over the pairs.
- ``probe_acc``: held-out-experiment accuracy of a logistic regression (scikit-learn) on the
  embeddings: standardised and reduced to 32 principal components on the training wells, trained
  on two thirds of each cell type's experiments, scored on the rest.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rcic.errors import DataError

K_NEIGHBOURS = 10
RECALL_TAIL = 0.05
PROBE_COMPONENTS = 32
BLOCK_ROWS = 512
BLOCK_ELEMENTS = 2**26  # similarities per block of the replicate-only pass: 256 MB of float32
COUNT_PASSES = 12  # up to this many positives, a comparison pass each beats sorting the row
NULL_SIZE = 1000  # permutations behind each p-value (p >= 1/1001); rcic map --null-size raises it
PROBE_WELLS_PER_CLASS = 8  # training wells per siRNA for the probe: a fixed, affordable protocol

log = logging.getLogger(__name__)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def labelled_treatments(meta: pd.DataFrame) -> np.ndarray:
    return ((meta["well_type"] == "treatment") & (meta["label"] != "")).to_numpy()


# ----------------------------------------------------------------------------------------------
# Replicate retrieval and batch leakage: one pass over each cell type's similarity blocks
# ----------------------------------------------------------------------------------------------


@dataclass
class SimilarityScores:
    """What one pass over the similarities gives: per-well APs and the batch leakage."""

    average_precision: pd.DataFrame  # row, label, cell_type, average_precision, n_pos_pairs, n_total_pairs
    batch_leakage: float | None
    batch_leakage_expected: float | None


def similarity_scores(meta: pd.DataFrame, x: np.ndarray, k: int = K_NEIGHBOURS) -> SimilarityScores:
    """Cosine similarities of the wells of each cell type, in row blocks, computed once and used twice:
    replicate APs among the labelled treatment wells, and each well's k nearest neighbours.

    With neighbours (``k`` below the wells of a cell type) every row block is a matmul against all the
    wells: torch's ``topk`` takes the neighbours; the block's wells with a replicate elsewhere get their
    APs from its labelled columns. Without (``replicate_average_precision``), only those wells are rows
    and only the labelled wells are columns: the other wells and the wells without a positive (on
    RxRx3-core, every knockout: each gene sits in one experiment) cost nothing.
    """
    labelled = labelled_treatments(meta)
    ap_rows, shares, expected = [], [], []
    for _, frame in meta.groupby("cell_type", sort=True):
        index = frame.index.to_numpy()
        unit = _unit(x[index])
        n = len(index)
        experiments = pd.factorize(frame["experiment"])[0]
        lab_cols = np.flatnonzero(labelled[index])
        replicates = _Replicates(frame["label"].to_numpy()[lab_cols], experiments[lab_cols])
        found = []  # (lab positions of the queries, APs, positives, candidates)
        if n > k:
            import torch

            feats, exp_t = torch.from_numpy(unit), torch.from_numpy(experiments)
            sizes = torch.bincount(exp_t)
            expected.append(((sizes[exp_t] - 1) / (n - 1)).numpy())
            query_of_well = np.full(n, -1)  # a query's position among the labelled wells, else -1
            query_of_well[lab_cols[replicates.queries]] = replicates.queries
            for start in range(0, n, BLOCK_ROWS):
                block = torch.arange(start, min(start + BLOCK_ROWS, n))
                sims = feats[block] @ feats.T  # (b, n): the one matmul of this block
                rows = np.flatnonzero(query_of_well[start:start + len(block)] >= 0)
                if len(rows):
                    queries = query_of_well[start + rows]
                    found.append((queries, *replicates.average_precision(sims.numpy()[np.ix_(rows, lab_cols)],
                                                                         queries)))
                sims[torch.arange(len(block)), block] = -torch.inf  # not its own neighbour
                nearest = sims.topk(k, dim=1).indices
                shares.append((exp_t[nearest] == exp_t[block, None]).float().mean(1).numpy())
        elif replicates.queries.size:
            lab_unit = np.ascontiguousarray(unit[lab_cols])
            rows_per_block = int(np.clip(BLOCK_ELEMENTS // len(lab_cols), 1, BLOCK_ROWS))
            for start in range(0, len(replicates.queries), rows_per_block):
                queries = replicates.queries[start:start + rows_per_block]
                found.append((queries, *replicates.average_precision(lab_unit[queries] @ lab_unit.T, queries)))
        if found:
            queries, aps, n_pos, n_total = (np.concatenate(part) for part in zip(*found))
            order = np.argsort(queries, kind="stable")  # row order, whichever order the blocks took
            ap_rows.append(pd.DataFrame({"row": index[lab_cols[queries[order]]], "average_precision": aps[order],
                                         "n_pos_pairs": n_pos[order], "n_total_pairs": n_total[order]}))
    columns = ["row", "average_precision", "n_pos_pairs", "n_total_pairs"]
    ap = pd.concat(ap_rows, ignore_index=True) if ap_rows else pd.DataFrame(columns=columns)
    ap["label"] = meta["label"].to_numpy()[ap["row"].astype(int)]
    ap["cell_type"] = meta["cell_type"].to_numpy()[ap["row"].astype(int)]
    if not shares:
        return SimilarityScores(ap, None, None)
    return SimilarityScores(ap, float(np.concatenate(shares).mean()), float(np.concatenate(expected).mean()))


class _Replicates:
    """The labelled wells of one cell type, for copairs' replicate AP: a well's positives are the wells
    of its label in other experiments, its candidates every labelled well but those of its label in its
    own experiment (itself included); the rest are negatives. Queries: the wells with a positive,
    ordered by the size of their label so that a block's padded label arrays stay narrow."""

    def __init__(self, labels: np.ndarray, experiments: np.ndarray):
        label_codes = pd.factorize(labels)[0]
        same_label = np.bincount(label_codes)[label_codes]
        pairs = label_codes.astype(np.int64) * (int(experiments.max(initial=0)) + 1) + experiments
        pair_codes = np.unique(pairs, return_inverse=True)[1].reshape(-1)
        same_both = np.bincount(pair_codes)[pair_codes]
        self.label_codes, self.experiments = label_codes, experiments
        self.n_pos = same_label - same_both
        self.n_total = len(labels) - same_both
        self.queries = np.flatnonzero(self.n_pos > 0)
        self.queries = self.queries[np.argsort(same_label[self.queries], kind="stable")]
        self.members = np.argsort(label_codes, kind="stable")  # the wells of each label, contiguous
        self.group_size = np.bincount(label_codes)
        self.group_start = np.concatenate([[0], np.cumsum(self.group_size)[:-1]]).astype(int)

    def average_precision(self, sims: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(AP, positives, candidates) of ``queries`` (positions among the labelled wells), from their
        similarities to every labelled well (rows of ``sims``).

        copairs ranks a query's candidates by similarity, a positive before the negatives it ties. So
        the r-th best positive, of similarity t, sits at rank r + (negatives above t), and the
        negatives above t are the labelled wells above t less the wells of the query's label above t:
        counts, without sorting a row. AP: the mean over positives of r / rank."""
        sims = np.asarray(sims, np.float32)
        label = self.label_codes[queries]
        width = int(self.group_size[label].max())
        offset = np.arange(width)
        in_group = offset < self.group_size[label][:, None]
        members = self.members[np.where(in_group, self.group_start[label][:, None] + offset, 0)]
        group_sims = np.where(in_group, np.take_along_axis(sims, members, 1), -np.inf).astype(np.float32)
        positive = in_group & (self.experiments[members] != self.experiments[queries][:, None])
        n_pos = self.n_pos[queries]
        most = int(n_pos.max())
        # each row's positive similarities, best first; -inf pads after them
        best = -np.sort(-np.where(positive, group_sims, -np.inf), axis=1)[:, :most].astype(np.float32)
        negatives_above = _count_above(sims, best) - _count_above(group_sims, best)
        r = np.arange(1, most + 1)
        precision = np.where(r <= n_pos[:, None], r / (r + negatives_above), 0.0)
        return precision.sum(1) / n_pos, n_pos, self.n_total[queries]


def _count_above(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """counts[i, j]: the entries of ``values[i]`` strictly above ``thresholds[i, j]`` (0 for a -inf pad).

    Narrow rows: one broadcast comparison. Long rows and a few thresholds: a 1-D comparison pass per
    threshold (numpy counts a 1-D mask ~4 times faster than along an axis: ~0.2 ns an entry); many
    thresholds: each row sorted once (~10 ns an entry) and the thresholds located in it."""
    if thresholds.shape[1] * values.shape[1] <= 4096:
        return np.where(thresholds > -np.inf, (values[:, None, :] > thresholds[:, :, None]).sum(2), 0)
    counts = np.zeros(thresholds.shape, np.int64)
    few = thresholds.shape[1] <= COUNT_PASSES
    for i, (row, limits) in enumerate(zip(values if few else np.sort(values, axis=1), thresholds)):
        used = np.flatnonzero(limits > -np.inf)
        if few:
            counts[i, used] = [np.count_nonzero(row > t) for t in limits[used]]
        else:
            counts[i, used] = len(row) - np.searchsorted(row, limits[used], side="right")
    return counts


def replicate_average_precision(meta: pd.DataFrame, x: np.ndarray) -> pd.DataFrame:
    """Per labelled treatment well: ``label``, ``cell_type``, ``average_precision``, ``n_pos_pairs``,
    ``n_total_pairs`` (wells without a positive in another experiment are left out)."""
    return similarity_scores(meta, x, k=len(meta)).average_precision


def map_from_average_precision(ap: pd.DataFrame, null_size: int = NULL_SIZE, seed: int = 0
                               ) -> tuple[float | None, float | None, pd.DataFrame]:
    """(mAP over siRNAs, share with a significant mAP, per-siRNA table): copairs' p-values and FDR."""
    from copairs.map import mean_average_precision

    if ap.empty:
        return None, None, ap
    ap = ap.copy()
    m = ap["n_pos_pairs"].to_numpy()
    ap["normalized_average_precision"] = normalized_average_precision(ap["average_precision"].to_numpy(), m,
                                                                      ap["n_total_pairs"].to_numpy() - m)
    per_label = mean_average_precision(ap, sameby=["label"], null_size=null_size, threshold=0.05, seed=seed,
                                       progress_bar=False, cache_dir=_null_cache())
    return (float(per_label["mean_average_precision"].mean()), float(per_label["below_corrected_p"].mean()),
            per_label.drop(columns=["indices"], errors="ignore"))


def normalized_average_precision(ap: np.ndarray, n_pos: np.ndarray, n_neg: np.ndarray) -> np.ndarray:
    """copairs' ``normalize_ap``, (AP - E[AP]) / (1 - E[AP]) clipped to [-1, 1], with copairs'
    ``expected_ap`` evaluated once per distinct (positives, negatives) pair: copairs evaluates it per
    well, a pure-Python harmonic sum over every candidate (30 s for RxRx1's wells), though the wells
    of a cell type share a handful of configurations."""
    from copairs.map.normalization import expected_ap

    confs, inverse = np.unique(np.stack([n_pos, n_neg], axis=1), axis=0, return_inverse=True)
    mu0 = np.array([expected_ap(int(a), int(b)) for a, b in confs])[inverse.reshape(-1)]
    return np.clip((np.asarray(ap, float) - mu0) / np.maximum(1 - mu0, 1e-10), -1.0, 1.0)


def _null_cache() -> Path:
    """copairs caches its null distributions: under the user's cache folder, not the home folder."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "rcic" / "copairs"


def replicate_map(meta: pd.DataFrame, x: np.ndarray, null_size: int = NULL_SIZE, seed: int = 0
                  ) -> tuple[float | None, float | None, pd.DataFrame]:
    return map_from_average_precision(replicate_average_precision(meta, x), null_size, seed)


def batch_leakage(meta: pd.DataFrame, x: np.ndarray, k: int = K_NEIGHBOURS) -> tuple[float, float]:
    """(observed, expected) share of a well's k nearest neighbours (same cell type) from its own experiment."""
    scores = similarity_scores(meta.assign(label=""), x, k)
    if scores.batch_leakage is None:
        raise DataError(f"too few wells for {k} nearest neighbours within a cell type")
    return scores.batch_leakage, scores.batch_leakage_expected


# ----------------------------------------------------------------------------------------------
# Known relationships (EFAAR recall)
# ----------------------------------------------------------------------------------------------


def gene_profiles(meta: pd.DataFrame, x: np.ndarray, genes: pd.DataFrame) -> pd.DataFrame:
    """Mean embedding of each gene: siRNA profiles (mean of their wells) averaged per gene."""
    chosen = labelled_treatments(meta)
    frame = pd.DataFrame(x[chosen], index=meta["label"].to_numpy()[chosen])
    sirna = frame.groupby(level=0).mean()
    gene_of = genes.drop_duplicates("label").set_index("label")["gene"]
    sirna = sirna[sirna.index.isin(gene_of.index)]
    return sirna.groupby(gene_of.loc[sirna.index].to_numpy()).mean()


def known_recall(meta: pd.DataFrame, x: np.ndarray, genes: pd.DataFrame, relationships: pd.DataFrame,
                 tail: float = RECALL_TAIL, bootstrap: int = 1000, seed: int = 0
                 ) -> tuple[float | None, tuple[float, float] | None, int]:
    """(recall, bootstrap 95% interval, known pairs used); chance is 2 x ``tail``."""
    profiles = gene_profiles(meta, x, genes)
    if len(profiles) < 3:
        return None, None, 0
    unit = _unit(profiles.to_numpy())
    sims = unit @ unit.T
    upper = sims[np.triu_indices(len(unit), k=1)]
    low, high = np.quantile(upper, [tail, 1 - tail])
    position = {g: i for i, g in enumerate(profiles.index)}
    pairs = [(position[a], position[b]) for a, b in zip(relationships["gene_a"], relationships["gene_b"])
             if a in position and b in position and a != b]
    if not pairs:
        return None, None, 0
    a, b = np.array(pairs).T
    hit = ((sims[a, b] >= high) | (sims[a, b] <= low)).astype(float)
    rng = np.random.default_rng(seed)
    draws = hit[rng.integers(0, len(hit), (bootstrap, len(hit)))].mean(1)
    return float(hit.mean()), (float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975))), len(pairs)


# ----------------------------------------------------------------------------------------------
# Linear probe
# ----------------------------------------------------------------------------------------------


def probe_accuracy(meta: pd.DataFrame, x: np.ndarray, split_seed: int = 0) -> float | None:
    """Logistic-regression accuracy on held-out experiments (a third of each cell type's).

    Protocol (fixed, so the number compares across models and feature sets): standardise and
    reduce to 32 principal components on the training wells; train on at most 8 wells per siRNA
    of the training experiments (seeded), L2 C=1, lbfgs; score every well of the held-out ones.
    """
    from sklearn.decomposition import PCA
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from rcic.data.dataset import experiment_folds

    chosen = labelled_treatments(meta)
    wells = meta[chosen].assign(split="train")
    if wells["experiment"].nunique() < 2:
        return None
    folds = experiment_folds(wells, 3, split_seed)
    test = wells["experiment"].map(folds).to_numpy() == 0
    if test.all() or not test.any():
        return None
    xs, labels = x[chosen], wells["label"].to_numpy()
    # labels are strings: numpy's isin sorts Python objects (seconds per call at RxRx1's scale), pandas hashes them
    seen = pd.Series(labels[test]).isin(set(labels[~test])).to_numpy()
    rng = np.random.default_rng(split_seed)
    order = rng.permutation(int((~test).sum()))
    train_rows = np.flatnonzero(~test)[order]
    capped = pd.Series(labels[train_rows]).groupby(labels[train_rows]).cumcount().to_numpy() < PROBE_WELLS_PER_CLASS
    train_rows = np.sort(train_rows[capped])
    scaler = StandardScaler().fit(xs[train_rows])
    pca = PCA(n_components=min(PROBE_COMPONENTS, xs.shape[1], len(train_rows) - 1), random_state=0)
    train = pca.fit_transform(scaler.transform(xs[train_rows]))
    model = LogisticRegression(max_iter=100, tol=1e-3, C=1.0)
    with warnings.catch_warnings():  # 100 iterations is the protocol, not a fault to report per run
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(train, labels[train_rows])
    predicted = model.predict(pca.transform(scaler.transform(xs[test])))
    return float((predicted[seen] == labels[test][seen]).mean()) if seen.any() else None
