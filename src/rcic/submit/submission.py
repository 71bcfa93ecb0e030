"""The submission writer (with or without the plate leak), its validation, and scoring."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rcic.assign import (
    BALANCES,
    CENTERINGS,
    assign_plates,
    center_log_probs,
    choose_rotations,
    pseudo_labels,
    treatment_log_probs,
)
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
    test_set = set(test_ids)
    is_test = set(logits.id_code) <= test_set
    outside = [i for i in logits.id_code if i not in test_set]
    if not is_test and len(outside) < len(logits.id_code):  # a test submission must never carry another well
        raise DataError(f"logits mix {len(logits.id_code) - len(outside)} test wells with {len(outside)} wells that "
                        f"are not test treatment wells (first {outside[0]!r}): predict --split test for a "
                        "submission", dataset.root)
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


def make_submission(dataset: Dataset, logits: Logits, leak: bool = True, balance: str = "none",
                    center: str = "none") -> Submission:
    """Labels for every well of ``logits``: plate-leak assignment, or plain arg-max (``leak=False``).

    ``balance``: ``sinkhorn`` balances each plate's probabilities before its assignment.
    ``center``: ``none`` (default) predicts from the model's own log-probabilities, ``plate`` from
    plate-centred ones (``rcic.assign.center_log_probs``: each plate's lean towards some classes
    removed). With AdaBN per plate and per-plate normalisation (cpu-demo, winning) centring never
    helped on the learning benchmark's sets (BENCHMARKS.md); it helps models without them.
    """
    if balance not in BALANCES:
        raise DataError(f"--balance must be one of {', '.join(BALANCES)}, got {balance!r}")
    if center not in CENTERINGS:
        raise DataError(f"--center must be one of {', '.join(CENTERINGS)}, got {center!r}")
    if balance != "none" and not leak:
        raise DataError(f"--balance {balance} balances the plates before the plate assignment; --no-leak has none")
    vocab = dataset.vocab
    unknown = [c for c in logits.classes if c not in set(vocab.labels)]
    if unknown:
        raise DataError(f"logits classes are not labels of this data (first {unknown[0]!r})", dataset.root)
    lacking = [c for c in vocab.treatment_labels if c not in set(logits.classes)]
    if lacking:  # the assignment would have fewer siRNAs than wells on a plate and repeat some
        raise DataError(f"the logits lack {len(lacking)} of this data's {vocab.n_treatments} treatment classes "
                        f"(first {lacking[0]!r}): they come from a model of other data", dataset.root)
    wells, _ = _wells_for(dataset, logits)
    row_of = {k: i for i, k in enumerate(logits.id_code)}
    raw = logits.logits[[row_of[i] for i in wells["id_code"]]]
    log_probs, classes = treatment_log_probs(raw, logits.classes, set(vocab.treatment_labels))
    if not classes:
        raise DataError("logits have no treatment classes", dataset.root)
    log_probs = center_log_probs(wells, log_probs, center)
    notes: list[str] = []
    groups = dataset.plate_groups
    if leak and not groups.usable:
        notes.append(f"plate leak not applied: {len(groups.groups)} plate groups found in the labels, not 4")
        leak = False
    if leak:
        choices = choose_rotations(wells, log_probs, classes, groups)
        assigned = assign_plates(wells, log_probs, classes, groups, choices, balance)
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
    from rcic.io.metadata import read_csv_strict

    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"empty {what} file (0 bytes)", path)
    frame = read_csv_strict(path, ["id_code", "sirna"])
    if frame.empty:
        raise DataError(f"the {what} file has a header but no rows", path)
    if frame["id_code"].duplicated().any():
        raise DataError(f"duplicate id_code {frame['id_code'][frame['id_code'].duplicated()].iloc[0]!r}", path)
    return frame


def _spelling(labels: pd.Series) -> str:
    return "integers" if labels.str.fullmatch(r"0|[1-9]\d*").all() else (
        "sirna_<k>" if labels.str.fullmatch(r"sirna_\d+|UNTREATED").all() else "other")


def score(submission: pd.DataFrame, answers: pd.DataFrame, dataset: Dataset | None = None,
          submission_path: str | Path | None = None) -> dict:
    """Accuracy overall, by cell type and by experiment, over whole experiments.

    ``answers`` may hold more experiments than the submission (e.g. train.csv for a validation
    submission), but every experiment the submission touches must be submitted whole: a partial
    one would report accuracy over a subset. Labels must be spelt as the answers' (and, with
    ``dataset``, be treatment labels of that data): a foreign spelling is an error, not a miss.
    """
    where = submission_path
    merged = submission.merge(answers[["id_code", "sirna"]], on="id_code", how="left", suffixes=("", "_true"))
    missing = merged["sirna_true"].isna()
    if missing.any():
        first = merged["id_code"][missing].iloc[0]
        raise DataError(f"{int(missing.sum())} submitted wells have no answer (first {first!r})", where)
    if dataset is not None:
        known = set(dataset.wells["id_code"])
        unknown = [i for i in submission["id_code"] if i not in known]
        if unknown:
            raise DataError(f"{len(unknown)} submitted wells are not wells of {dataset.root} (first {unknown[0]!r})",
                            where)
        treatments = set(dataset.vocab.treatment_labels)
        bad = ~submission["sirna"].isin(treatments)
        if bad.any():
            raise DataError(f"label {submission['sirna'][bad].iloc[0]!r} is not a treatment label of "
                            f"{dataset.root}", where)
    spelling = _spelling(answers["sirna"])
    if spelling != "other" and _spelling(merged["sirna"]) != spelling:
        bad = merged["sirna"][~merged["sirna"].str.fullmatch(
            r"0|[1-9]\d*" if spelling == "integers" else r"sirna_\d+|UNTREATED")].iloc[0]
        raise DataError(f"label {bad!r} is not spelt as the answers' labels ({spelling})", where)
    experiment = merged["id_code"].str.rsplit("_", n=2).str[0]
    answer_experiment = answers["id_code"].str.rsplit("_", n=2).str[0]
    scored = sorted(experiment.unique())
    expected = answers[answer_experiment.isin(scored)]
    absent = sorted(set(expected["id_code"]) - set(merged["id_code"]))
    if absent:
        exp = absent[0].rsplit("_", 2)[0]
        total = int((answer_experiment == exp).sum())
        have = int((experiment == exp).sum())
        raise DataError(f"covers {have} of the {total} wells of experiment {exp}: accuracy is scored over whole "
                        "experiments (submit every well of each, as a validation or test submission does)", where)
    correct = merged["sirna"] == merged["sirna_true"]
    cell_type = experiment.str.split("-").str[0]
    return {
        "accuracy": float(correct.mean()),
        "wells": int(len(merged)),
        "experiments": scored,
        "by_cell_type": {k: float(v) for k, v in correct.groupby(cell_type).mean().items()},
        "by_experiment": {k: float(v) for k, v in correct.groupby(experiment).mean().items()},
    }
