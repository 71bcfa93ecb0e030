"""Profiles: well embeddings, batch correction with the controls, and phenomic-map benchmarks.

``rcic embed`` writes the embeddings (``rcic.profiles.embeddings``); ``rcic map`` corrects them
(``rcic.profiles.correct``) and scores each correction (``rcic.profiles.metrics``) with
``phenomic_map``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rcic.errors import DataError
from rcic.profiles.correct import CONTROLS, METHODS, PANEL_METHODS, correct
from rcic.profiles.embeddings import (
    ALIGNMENTS,
    META_COLUMNS,
    SEEN,
    apply_map,
    embed_wells,
    embedding_frame,
    embedding_runs,
    procrustes_maps,
    read_embeddings,
    write_embeddings,
)
from rcic.profiles.metrics import NULL_SIZE, known_recall, map_from_average_precision, probe_accuracy, similarity_scores

__all__ = ["ALIGNMENTS", "CONTROLS", "DEFAULT_CONTROLS", "META_COLUMNS", "METHODS", "PANEL_METHODS", "MapResult",
           "SEEN", "apply_map", "correct", "embed_wells", "embedding_frame", "embedding_runs", "phenomic_map",
           "procrustes_maps", "read_embeddings", "read_gene_tables", "score_correction", "scored_wells",
           "write_embeddings"]

# measured on model-free features of the synthetic gene layer and on synthetic embeddings with
# RxRx1's well structure (BENCHMARKS.md, "Which controls"): 4-5 negative controls per experiment
# make noisy statistics (TVN on them leaves replicate mAP at chance); within-siRNA residuals of all
# controls give TVN the lowest batch leakage at the same mAP as all controls
DEFAULT_CONTROLS = "within"


def scored_wells(meta: pd.DataFrame, include_seen: bool = False) -> tuple[np.ndarray, str]:
    """(mask of the wells to score, one line saying which): the wells no model trained on, unless
    ``include_seen``; every well of a table without ``seen_in_training``."""
    n = len(meta)
    if SEEN not in meta.columns:
        return np.ones(n, bool), (f"no {SEEN} column: all {n:,} wells are treated as unseen by the model that "
                                  "made them (rcic embed records it)")
    seen = meta[SEEN].to_numpy(bool)
    if include_seen:
        return np.ones(n, bool), (f"scoring all {n:,} wells, {int(seen.sum()):,} of them seen in training "
                                  "(--include-seen)")
    if seen.all():
        raise DataError(f"all {n:,} wells were seen in training by the model that embedded them: embed held-out "
                        "experiments (rcic embed RUN... --split val) or pass --include-seen")
    return ~seen, (f"scoring {int((~seen).sum()):,} wells unseen in training ({int(seen.sum()):,} seen wells left out; "
                   "--include-seen keeps them)")


@dataclass
class MapResult:
    scores: dict[str, dict]  # method -> the --json object's entries
    corrected: dict[str, np.ndarray] = field(default_factory=dict)  # method -> corrected embeddings
    per_sirna: dict[str, pd.DataFrame] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def read_gene_tables(genes: str | Path, relationships: str | Path, meta: pd.DataFrame
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``genes``: label,gene (which gene each siRNA targets); ``relationships``: gene_a,gene_b."""
    from rcic.io.metadata import read_csv_strict

    gene_table = read_csv_strict(Path(genes), ["label", "gene"])
    pairs = read_csv_strict(Path(relationships), ["gene_a", "gene_b"])
    labels = set(meta["label"][meta["label"] != ""])
    if not gene_table["label"].isin(labels).any():
        raise DataError(f"no label of the gene table is a label of the embeddings (e.g. {gene_table['label'].iloc[0]!r}"
                        f" vs {next(iter(labels), '')!r}): another dataset or label spelling?", genes)
    known = set(gene_table["gene"])
    if not (pairs["gene_a"].isin(known) & pairs["gene_b"].isin(known)).any():
        raise DataError("no relationship joins two genes of the gene table", relationships)
    return gene_table, pairs


def phenomic_map(meta: pd.DataFrame, x: np.ndarray, methods: list[str], genes: pd.DataFrame | None = None,
                 relationships: pd.DataFrame | None = None, null_size: int = NULL_SIZE, probe: bool = True,
                 source=None, progress: Callable[[int, int], None] | None = None,
                 controls: str = DEFAULT_CONTROLS, corrected: dict[str, np.ndarray] | None = None) -> MapResult:
    """Correct the embeddings with each method (control-based ones on ``controls``) and score them
    (see ``rcic.profiles.metrics``); ``corrected``: outputs already computed on these wells (the panel's)."""
    for method in methods:
        if method not in METHODS:
            raise DataError(f"unknown correction {method!r}; choose from {', '.join(METHODS)}")
    result = MapResult(scores={})
    steps, done = len(methods) * 5, 0

    def tick():
        nonlocal done
        done += 1
        if progress:
            progress(done, steps)

    for method in dict.fromkeys(methods):
        start = time.perf_counter()
        z = corrected[method] if corrected and method in corrected else correct(meta, x, method, source, controls)
        tick()
        scores, per_sirna = score_correction(meta, z, genes, relationships, null_size, probe, tick)
        result.scores[method] = scores
        result.corrected[method] = z
        result.per_sirna[method] = per_sirna
        result.seconds[method] = time.perf_counter() - start
    return result


def score_correction(meta: pd.DataFrame, z: np.ndarray, genes: pd.DataFrame | None = None,
                     relationships: pd.DataFrame | None = None, null_size: int = NULL_SIZE, probe: bool = True,
                     tick: Callable[[], None] | None = None) -> tuple[dict, pd.DataFrame]:
    """One correction's row of the phenomic map (``phenomic_map``): (the --json object's entries, the
    per-siRNA mAP table); ``tick`` after each of its four steps."""
    tick = tick or (lambda: None)
    similarity = similarity_scores(meta, z)
    tick()
    mean_ap, fraction, per_sirna = map_from_average_precision(similarity.average_precision, null_size)
    leakage, expected = similarity.batch_leakage, similarity.batch_leakage_expected
    tick()
    recall, interval, pairs = (None, None, 0)
    if genes is not None and relationships is not None:
        recall, interval, pairs = known_recall(meta, z, genes, relationships)
    tick()
    probe_acc = probe_accuracy(meta, z) if probe else None
    tick()
    return {"replicate_map": mean_ap, "replicate_fraction": fraction, "batch_leakage": leakage,
            "batch_leakage_expected": expected, "known_recall": recall,
            "known_recall_ci": list(interval) if interval else None, "known_pairs": pairs,
            "probe_acc": probe_acc}, per_sirna
