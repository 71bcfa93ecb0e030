"""The submission writer (with or without the plate leak), its validation, and scoring."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rcic.assign import assign_plates, choose_rotations, pseudo_labels, treatment_log_probs
from rcic.atomic import atomic_write_text
from rcic.errors import DataError
from rcic.io.metadata import Dataset
from rcic.predict.logits import Logits

# ----------------------------------------------------------------------------------------------
# Submission
# ----------------------------------------------------------------------------------------------


@dataclass
class Submission:
    frame: pd.DataFrame  # id_code, sirna
    experiments: pd.DataFrame  # per-experiment summary (rotation, confidence, wells)
    notes: list[str]


def _wells_for(dataset: Dataset, logits: Logits) -> tuple[pd.DataFrame, bool]:
    """The wells the logits cover, in output order; True when they are the test set."""
    wells = dataset.wells.set_index("id_code")
    unknown = [i for i in logits.id_code if i not in wells.index]
    if unknown:
        raise DataError(f"{len(unknown)} logits ids are not wells of this data (first {unknown[0]!r})",
                        dataset.root)
    test_ids = dataset.test_ids
    is_test = set(logits.id_code) <= set(test_ids)
    if is_test:
        if len(logits.id_code) != len(test_ids):
            raise DataError(f"logits cover {len(logits.id_code)} of the {len(test_ids)} test wells", dataset.root)
        order = test_ids
    else:
        order = list(logits.id_code)
    types = wells.loc[order, "well_type"]
    if (types != "treatment").any():
        raise DataError(f"logits include control well {types[types != 'treatment'].index[0]!r}; "
                        "submissions are for treatment wells", dataset.root)
    return wells.loc[order].reset_index(), is_test


def make_submission(dataset: Dataset, logits: Logits, leak: bool = True) -> Submission:
    """Labels for every well of ``logits``: plate-leak assignment, or plain arg-max (``leak=False``)."""
    vocab = dataset.vocab
    unknown = [c for c in logits.classes if c not in set(vocab.labels)]
    if unknown:
        raise DataError(f"logits classes are not labels of this data (first {unknown[0]!r})", dataset.root)
    wells, _ = _wells_for(dataset, logits)
    row_of = {k: i for i, k in enumerate(logits.id_code)}
    raw = logits.logits[[row_of[i] for i in wells["id_code"]]]
    log_probs, classes = treatment_log_probs(raw, logits.classes, set(vocab.treatment_labels))
    if not classes:
        raise DataError("logits have no treatment classes", dataset.root)
    notes: list[str] = []
    groups = dataset.plate_groups
    if leak and not groups.usable:
        notes.append(f"plate leak not applied: {len(groups.groups)} plate groups found in the labels, not 4")
        leak = False
    if leak:
        choices = choose_rotations(wells, log_probs, classes, groups)
        assigned = assign_plates(wells, log_probs, classes, groups, choices)
        summary = pd.DataFrame([{
            "experiment": c.experiment, "wells": c.wells, "order": "".join(str(g) for g in c.order),
            "rotation": "-" if c.rotation is None else c.rotation, "confidence": round(c.margin, 4),
            "permutations_agree": c.permutations_agree} for c in choices.values()])
        for c in choices.values():
            if not c.permutations_agree:
                notes.append(f"{c.experiment}: the best of all 24 group orders is not a cyclic rotation; "
                             f"kept rotation {c.rotation} (confidence {c.margin:.3f})")
    else:
        assigned = log_probs.argmax(1)
        summary = wells.groupby("experiment").size().rename("wells").reset_index()
        summary["rotation"] = "-"
    labels = np.asarray(classes)[assigned]
    frame = pd.DataFrame({"id_code": wells["id_code"], "sirna": labels})
    validate_submission(frame, dataset)
    return Submission(frame, summary, notes)


def validate_submission(frame: pd.DataFrame, dataset: Dataset) -> None:
    """Every id once, known treatment labels; for a test submission, exactly the test wells in order."""
    if frame["id_code"].duplicated().any():
        raise DataError(f"submission repeats id_code {frame['id_code'][frame['id_code'].duplicated()].iloc[0]!r}")
    bad = ~frame["sirna"].astype(str).isin(set(dataset.vocab.treatment_labels))
    if bad.any():
        raise DataError(f"submission label {frame['sirna'][bad].iloc[0]!r} is not a treatment of this data")
    test = dataset.test_ids
    if set(frame["id_code"]) <= set(test) and frame["id_code"].tolist() != test:
        raise DataError("test submission must list every test well once, in sample_submission order")


def write_submission(path: str | Path, submission: Submission) -> None:
    atomic_write_text(path, submission.frame.to_csv(index=False))


def leak_pseudo_labels(dataset: Dataset, logits: Logits, fraction: float) -> pd.DataFrame:
    """Most confident test wells after the plate assignment, as (id_code, label, confidence)."""
    if not 0 < fraction <= 1:
        raise DataError(f"--pseudo-fraction must be in (0, 1], got {fraction}")
    wells, is_test = _wells_for(dataset, logits)
    if not is_test:
        raise DataError("pseudo-labels come from test-set logits (rcic predict --split test)")
    row_of = {k: i for i, k in enumerate(logits.id_code)}
    raw = logits.logits[[row_of[i] for i in wells["id_code"]]]
    log_probs, classes = treatment_log_probs(raw, logits.classes, set(dataset.vocab.treatment_labels))
    groups = dataset.plate_groups
    if groups.usable:
        assigned = assign_plates(wells, log_probs, classes, groups, choose_rotations(wells, log_probs, classes, groups))
    else:
        assigned = log_probs.argmax(1)
    return pseudo_labels(wells, log_probs, assigned, classes, fraction)


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------


def read_submission_csv(path: str | Path, what: str = "submission") -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file not found", path)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in ("id_code", "sirna") if c not in frame.columns]
    if missing:
        raise DataError(f"missing column(s) {', '.join(missing)}", path)
    if frame["id_code"].duplicated().any():
        raise DataError(f"duplicate id_code {frame['id_code'][frame['id_code'].duplicated()].iloc[0]!r}", path)
    return frame


def score(submission: pd.DataFrame, answers: pd.DataFrame, dataset: Dataset | None = None) -> dict:
    """Accuracy overall, by cell type and by experiment, over the submission's wells.

    ``answers`` may hold more wells than the submission (e.g. train.csv for validation wells);
    every submitted well must have an answer.
    """
    merged = submission.merge(answers[["id_code", "sirna"]], on="id_code", how="left", suffixes=("", "_true"))
    missing = merged["sirna_true"].isna()
    if missing.any():
        first = merged["id_code"][missing].iloc[0]
        raise DataError(f"{int(missing.sum())} submitted wells have no answer (first {first!r})")
    correct = merged["sirna"].astype(str) == merged["sirna_true"].astype(str)
    experiment = merged["id_code"].str.rsplit("_", n=2).str[0]
    cell_type = experiment.str.split("-").str[0]
    return {
        "accuracy": float(correct.mean()),
        "wells": int(len(merged)),
        "by_cell_type": {k: float(v) for k, v in correct.groupby(cell_type).mean().items()},
        "by_experiment": {k: float(v) for k, v in correct.groupby(experiment).mean().items()},
    }
