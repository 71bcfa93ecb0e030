"""Phenomic-map benchmarks of (corrected) well embeddings.

- ``replicate_map``: mean average precision of a siRNA's wells retrieving its wells in *other
  experiments of the same cell type* (positives: same label, another experiment; negatives:
  another label, same cell type), cosine similarity; ``replicate_fraction``: the share of siRNAs
  whose mAP is significant (copairs' permutation p-value, Benjamini-Hochberg corrected, < 0.05).
  The per-well average precisions are computed in blocks of a cell type's similarity matrix
  (copairs' own pair enumeration needs ~N^2 pairs in memory: 7 GB for RxRx1); they equal copairs'
  ``average_precision`` (tested), and copairs computes the mAP, p-values and FDR from them.
- ``batch_leakage``: the share of a well's 10 nearest neighbours (cosine, among the wells of its
  cell type) that come from its own experiment, beside the share expected without batch effects.
- ``known_recall``: EFAAR's recall of known relationships: siRNA profiles averaged into gene
  profiles; the fraction of known gene pairs whose cosine similarity lies in the top or bottom 5%
  of all gene pairs (chance 0.10), with a bootstrap 95% interval over the pairs.
- ``probe_acc``: held-out-experiment accuracy of a logistic regression (scikit-learn) on the
  embeddings: standardised and reduced to 64 principal components on the training wells, trained
  on two thirds of each cell type's experiments, scored on the rest.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from rcic.errors import DataError

K_NEIGHBOURS = 10
RECALL_TAIL = 0.05
PROBE_COMPONENTS = 64
BLOCK_ROWS = 1024

log = logging.getLogger(__name__)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def labelled_treatments(meta: pd.DataFrame) -> np.ndarray:
    return ((meta["well_type"] == "treatment") & (meta["label"] != "")).to_numpy()


# ----------------------------------------------------------------------------------------------
# Replicate retrieval and batch leakage: one pass over each cell type's similarity blocks
# ----------------------------------------------------------------------------------------------


def replicate_average_precision(meta: pd.DataFrame, x: np.ndarray) -> pd.DataFrame:
    """Per labelled treatment well: ``label``, ``cell_type``, ``average_precision``, ``n_pos_pairs``,
    ``n_total_pairs`` (wells without a positive in another experiment are left out)."""
    rows = []
    for _, frame in meta[labelled_treatments(meta)].groupby("cell_type", sort=True):
        index = frame.index.to_numpy()
        feats = _unit(x[index])
        labels = pd.factorize(frame["label"])[0]
        experiments = pd.factorize(frame["experiment"])[0]
        n = len(index)
        for start in range(0, n, BLOCK_ROWS):
            block = np.arange(start, min(start + BLOCK_ROWS, n))
            sims = feats[block] @ feats.T  # (b, n)
            same_label = labels[block, None] == labels[None, :]
            same_exp = experiments[block, None] == experiments[None, :]
            positive = same_label & ~same_exp
            valid = ~(same_label & same_exp)  # neither itself nor its own experiment's replicate
            aps, n_pos, n_total = _average_precision(sims, positive, valid)
            keep = n_pos > 0
            rows.append(pd.DataFrame({"row": index[block][keep], "average_precision": aps[keep],
                                      "n_pos_pairs": n_pos[keep], "n_total_pairs": n_total[keep]}))
    if not rows:
        return pd.DataFrame(columns=["row", "label", "cell_type", "average_precision", "n_pos_pairs",
                                     "n_total_pairs"])
    out = pd.concat(rows, ignore_index=True)
    out["label"] = meta["label"].to_numpy()[out["row"]]
    out["cell_type"] = meta["cell_type"].to_numpy()[out["row"]]
    return out


def _average_precision(sims: np.ndarray, positive: np.ndarray, valid: np.ndarray):
    """AP of each row: candidates ranked by similarity; mean over positives of (positives so far) / rank."""
    b = len(sims)
    s = np.where(valid, sims, -np.inf)
    n_total = valid.sum(1)
    n_pos = positive.sum(1)
    ranked = np.sort(s, axis=1)[:, ::-1]  # descending, invalid (-inf) last
    pos_sims = np.where(positive, sims, -np.inf)
    pos_sorted = np.sort(pos_sims, axis=1)[:, ::-1][:, : max(int(n_pos.max()), 1)]
    # rank of each positive = 1 + number of valid candidates with a higher similarity
    offsets = np.arange(b)[:, None] * 8.0  # similarities lie in [-1, 1]: rows do not overlap
    flat_desc = np.where(np.isfinite(ranked), ranked, -4.0)
    ascending = (flat_desc[:, ::-1] + offsets).ravel()
    width = ranked.shape[1]
    query = np.where(np.isfinite(pos_sorted), pos_sorted, -4.0) + offsets
    higher = width - (np.searchsorted(ascending, query.ravel(), side="right").reshape(query.shape)
                      - np.arange(b)[:, None] * width)
    rank = higher + 1
    found = np.arange(1, pos_sorted.shape[1] + 1)[None, :]
    precision = np.where(np.isfinite(pos_sorted), found / rank, 0.0)
    aps = precision.sum(1) / np.maximum(n_pos, 1)
    return aps, n_pos, n_total


def replicate_map(meta: pd.DataFrame, x: np.ndarray, null_size: int = 10000, seed: int = 0
                  ) -> tuple[float | None, float | None, pd.DataFrame]:
    """(mAP over siRNAs, share of siRNAs with a significant mAP, per-siRNA table) via copairs."""
    from copairs.map import mean_average_precision
    from copairs.map.normalization import normalize_ap

    ap = replicate_average_precision(meta, x)
    if ap.empty:
        return None, None, ap
    m = ap["n_pos_pairs"].to_numpy()
    ap["normalized_average_precision"] = normalize_ap(ap["average_precision"].to_numpy(), m,
                                                      ap["n_total_pairs"].to_numpy() - m)
    per_label = mean_average_precision(ap, sameby=["label"], null_size=null_size, threshold=0.05, seed=seed,
                                       progress_bar=False)
    return (float(per_label["mean_average_precision"].mean()), float(per_label["below_corrected_p"].mean()),
            per_label.drop(columns=["indices"], errors="ignore"))


def batch_leakage(meta: pd.DataFrame, x: np.ndarray, k: int = K_NEIGHBOURS) -> tuple[float, float]:
    """(observed, expected) share of a well's k nearest neighbours (same cell type) from its own experiment."""
    shares, expected = [], []
    for _, frame in meta.groupby("cell_type", sort=True):
        index = frame.index.to_numpy()
        n = len(index)
        if n <= k:
            continue
        feats = _unit(x[index])
        experiments = pd.factorize(frame["experiment"])[0]
        sizes = np.bincount(experiments)
        expected.append((sizes[experiments] - 1) / (n - 1))
        for start in range(0, n, BLOCK_ROWS):
            block = np.arange(start, min(start + BLOCK_ROWS, n))
            sims = feats[block] @ feats.T
            sims[np.arange(len(block)), block] = -np.inf  # not its own neighbour
            nearest = np.argpartition(-sims, k, axis=1)[:, :k]
            shares.append((experiments[nearest] == experiments[block, None]).mean(1))
    if not shares:
        raise DataError(f"too few wells for {k} nearest neighbours within a cell type")
    return float(np.concatenate(shares).mean()), float(np.concatenate(expected).mean())


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
    """Logistic-regression accuracy on held-out experiments (a third of each cell type's)."""
    from sklearn.decomposition import PCA
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
    seen = np.isin(labels[test], labels[~test])
    scaler = StandardScaler().fit(xs[~test])
    pca = PCA(n_components=min(PROBE_COMPONENTS, xs.shape[1], int((~test).sum()) - 1), random_state=0)
    train = pca.fit_transform(scaler.transform(xs[~test]))
    model = LogisticRegression(max_iter=200, C=1.0)
    model.fit(train, labels[~test])
    predicted = model.predict(pca.transform(scaler.transform(xs[test])))
    return float((predicted[seen] == labels[test][seen]).mean()) if seen.any() else None
