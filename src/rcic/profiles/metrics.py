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

    torch does the block arithmetic: its element-wise ops, ``topk`` and batched ``searchsorted``
    run on every core, several times faster than numpy's here (62,755 wells: seconds, not minutes).
    """
    import torch

    labelled = labelled_treatments(meta)
    ap_rows, shares, expected = [], [], []
    for _, frame in meta.groupby("cell_type", sort=True):
        index = frame.index.to_numpy()
        feats = torch.from_numpy(_unit(x[index]))
        n = len(index)
        experiments = torch.from_numpy(pd.factorize(frame["experiment"])[0])
        is_labelled = labelled[index]
        lab_cols = torch.from_numpy(np.flatnonzero(is_labelled))
        labels = torch.from_numpy(pd.factorize(frame["label"].to_numpy()[is_labelled])[0])
        lab_exp = experiments[lab_cols]
        lab_position = torch.full((n,), -1, dtype=torch.long)
        lab_position[lab_cols] = torch.arange(len(lab_cols))
        if n > k:
            sizes = torch.bincount(experiments)
            expected.append(((sizes[experiments] - 1) / (n - 1)).numpy())
        for start in range(0, n, BLOCK_ROWS):
            block = torch.arange(start, min(start + BLOCK_ROWS, n))
            sims = feats[block] @ feats.T  # (b, n): the one matmul of this block
            query = block[torch.from_numpy(is_labelled[block.numpy()])]
            if len(query) and len(lab_cols) > 1:
                q = lab_position[query]
                sub = sims[query - start][:, lab_cols]
                same_label = labels[q][:, None] == labels[None, :]
                same_exp = lab_exp[q][:, None] == lab_exp[None, :]
                aps, n_pos, n_total = _average_precision(sub, same_label & ~same_exp, ~(same_label & same_exp))
                keep = n_pos > 0
                ap_rows.append(pd.DataFrame({"row": index[query[keep].numpy()], "average_precision": aps[keep],
                                             "n_pos_pairs": n_pos[keep], "n_total_pairs": n_total[keep]}))
            if n > k:
                sims[torch.arange(len(block)), block] = -torch.inf  # not its own neighbour
                nearest = sims.topk(k, dim=1).indices
                shares.append((experiments[nearest] == experiments[block, None]).float().mean(1).numpy())
    columns = ["row", "average_precision", "n_pos_pairs", "n_total_pairs"]
    ap = pd.concat(ap_rows, ignore_index=True) if ap_rows else pd.DataFrame(columns=columns)
    ap["label"] = meta["label"].to_numpy()[ap["row"].astype(int)]
    ap["cell_type"] = meta["cell_type"].to_numpy()[ap["row"].astype(int)]
    if not shares:
        return SimilarityScores(ap, None, None)
    return SimilarityScores(ap, float(np.concatenate(shares).mean()), float(np.concatenate(expected).mean()))


def _average_precision(sims, positive, valid):
    """AP of each row (torch tensors): candidates ranked by similarity; mean over positives of
    (positives so far) / rank.

    Without sorting whole rows: each negative is located among its row's sorted positives (batched
    ``searchsorted``), which counts the negatives ranked above every positive.
    """
    import torch

    b = sims.shape[0]
    n_pos, n_total = positive.sum(1), valid.sum(1)
    m = max(int(n_pos.max()), 1)
    pos = torch.where(positive, sims, 3.0).topk(m, dim=1, largest=False).values  # ascending; pads 3.0 last
    negatives = torch.where(valid & ~positive, sims, -5.0)  # others land below every positive: never counted
    below = torch.searchsorted(pos.contiguous(), negatives.contiguous())  # positives this negative outranks
    hist = torch.zeros((b, m + 1), dtype=torch.long).scatter_add_(1, below, torch.ones_like(below))
    above = hist.flip(1).cumsum(1).flip(1)  # above[:, i]: negatives outranking at least i positives
    i = torch.arange(m)[None, :]
    better = n_pos[:, None] - i  # the ascending i-th positive is the (n_pos - i)-th best
    rank = better + torch.cat([above[:, 1:], torch.zeros((b, 1), dtype=torch.long)], dim=1)[:, :m]
    precision = torch.where(i < n_pos[:, None], better / rank.clamp_min(1), 0.0)
    aps = (precision.sum(1) / n_pos.clamp_min(1)).double().numpy()
    return aps, n_pos.numpy(), n_total.numpy()


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
    seen = np.isin(labels[test], labels[~test])
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
