"""The plate leak: choose each experiment's group order, then assign siRNAs per plate.

Every plate carries one of 4 treatment groups (derived from the training labels, see
``rcic.io.metadata.derive_plate_groups``) and the groups rotate cyclically over plates 1-4.
For each experiment we score every group order by the summed log-probability mass that its
wells put on their plate's group (after removing each plate's lean towards some classes, see
``choose_rotations``), take the best cyclic rotation (reporting the margin to the
runner-up as its confidence, and whether the best of all 24 permutations agrees), then solve
one linear assignment per plate (``scipy.optimize.linear_sum_assignment``) so each treatment is
used at most once per plate, maximising the summed log-probability; or, with ``balance="sinkhorn"``,
the summed probability of the plate's Sinkhorn-balanced matrix (``rcic.assign.balance``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from scipy.special import logsumexp

from rcic.assign.balance import BALANCES, sinkhorn
from rcic.io.metadata import PlateGroups


@dataclass(frozen=True)
class RotationChoice:
    experiment: str
    order: tuple[int, ...]  # group on plates 1..4
    rotation: int | None  # cyclic shift, None for an order seen in train that is not a shift
    score: float  # mean (plate-centred) log-probability mass of a well on its plate's group
    margin: float  # score minus the runner-up's: the confidence of the choice
    permutations_agree: bool  # the best of all 24 permutations is this order
    wells: int


def group_masks(groups: PlateGroups, classes: list[str]) -> np.ndarray:
    """(n_groups, n_classes) boolean: which class columns belong to each group."""
    return np.array([[c in g for c in classes] for g in groups.groups], dtype=bool)


def treatment_log_probs(logits: np.ndarray, classes: list[str], treatments: set[str]) -> tuple[np.ndarray, list[str]]:
    """Log-softmax over the treatment columns only: control classes are never given to a treatment well."""
    keep = [i for i, c in enumerate(classes) if c in treatments]
    x = logits[:, keep].astype(np.float64)
    x -= x.max(axis=1, keepdims=True)  # plain numpy: ~4x faster than scipy's log_softmax here
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    return x, [classes[i] for i in keep]


ROTATION_SCORES = ("plate_centered", "mass")
CENTERINGS = ("plate", "none")


def plate_lean(plate_log_probs: np.ndarray) -> np.ndarray:
    """A plate's lean towards each class, as a per-class shift of its wells' log-probabilities.

    A plate effect makes a model lean towards the same classes on every well of the plate. A plate
    of RxRx1 holds each of its siRNAs once, so the lean is estimated by each class's mean over the
    plate's wells, shrunk towards zero by the share of the means' spread that sampling noise alone
    would give (James-Stein: ``1 - within / between``). Without a plate effect the shrinkage is ~1
    and nothing is removed (subtracting noisy means would cost a weak model its evidence); with one
    it is ~0 and the lean is removed. Per-row constants (an un-normalised log-softmax) cancel.
    """
    x = np.asarray(plate_log_probs, dtype=np.float64)
    if len(x) < 2:
        return np.zeros(x.shape[1])
    x = x - x.mean(axis=1, keepdims=True)
    mean = x.mean(axis=0)
    between, within = mean.var(), x.var(axis=0).mean() / len(x)
    keep = max(0.0, 1.0 - within / between) if between > 0 else 0.0
    return keep * mean


def center_log_probs(wells: pd.DataFrame, log_probs: np.ndarray, by: str = "plate") -> np.ndarray:
    """Log-probabilities with each plate's lean towards some classes (``plate_lean``) removed.

    Like AdaBN, this uses the wells being predicted: all of a test plate's wells are known at
    submission time. A per-row constant stays a per-row constant, so arg-max and assignment still
    ignore it. ``by="none"`` returns ``log_probs``.
    """
    if by not in CENTERINGS:
        raise ValueError(f"centering must be one of {CENTERINGS}, got {by!r}")
    if by == "none":
        return log_probs
    centered = np.array(log_probs, dtype=np.float64)
    for rows in wells.groupby(["experiment", "plate"], sort=True).indices.values():
        centered[rows] -= plate_lean(centered[rows])
    return centered


def choose_rotations(wells: pd.DataFrame, log_probs: np.ndarray, classes: list[str], groups: PlateGroups,
                     method: str = "plate_centered") -> dict[str, RotationChoice]:
    """The group order of every experiment in ``wells`` (columns experiment, plate).

    ``method``: ``mass`` sums, per plate and group, each well's log-probability mass on the group.
    ``plate_centered`` (the default) first removes the plate's lean towards some classes
    (``plate_lean``). Summed over a plate's wells, a plate effect's lean outweighs the wells' own
    evidence and picks a wrong order for a weak model (bench/learning.py, set E: every experiment
    wrong, leak accuracy 0 against 5.7% arg-max); without the lean, what is left is whether single
    wells stand out on the group's classes, as only the plate's true group lets them.
    """
    if method not in ROTATION_SCORES:
        raise ValueError(f"method must be one of {ROTATION_SCORES}, got {method!r}")
    masks = group_masks(groups, classes)
    candidates = groups.candidate_orders
    n_groups = len(groups.groups)
    choices = {}
    all_plates = wells["plate"].to_numpy()
    for experiment, idx in wells.groupby("experiment", sort=True).indices.items():
        plates = all_plates[idx]
        per_plate = np.zeros((4, n_groups))  # summed mass of plate p's wells on group g
        for p in range(1, 5):
            rows = log_probs[idx[plates == p]]
            if method == "plate_centered" and len(rows):
                rows = rows - plate_lean(rows)
            per_plate[p - 1] = [logsumexp(rows[:, np.flatnonzero(m)], axis=1).sum() for m in masks]

        def score(order, per_plate=per_plate, n=max(len(idx), 1)):
            return sum(per_plate[p, g] for p, g in enumerate(order)) / n

        ranked = sorted(((score(o), o) for o in candidates), reverse=True)
        best_all = max(itertools.permutations(range(n_groups)), key=score)
        (best_score, best), runner_up = ranked[0], ranked[1][0] if len(ranked) > 1 else -np.inf
        choices[experiment] = RotationChoice(
            experiment=experiment, order=tuple(best), rotation=groups.rotation(tuple(best)),
            score=float(best_score), margin=float(best_score - runner_up),
            permutations_agree=tuple(best_all) == tuple(best), wells=len(idx))
    return choices


def assign_plates(wells: pd.DataFrame, log_probs: np.ndarray, classes: list[str], groups: PlateGroups,
                  choices: dict[str, RotationChoice], balance: str = "none") -> np.ndarray:
    """Column index assigned to each well: per plate, a linear assignment restricted to its group.

    ``balance``: ``none`` (maximise summed log-probability) or ``sinkhorn`` (balance the plate's
    matrix over its group, then maximise the summed balanced probability).
    """
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
    masks = group_masks(groups, classes)
    assigned = np.full(len(wells), -1, dtype=np.int64)
    for (experiment, plate), rows in wells.groupby(["experiment", "plate"], sort=True).indices.items():
        allowed = np.flatnonzero(masks[choices[experiment].order[plate - 1]])
        scores = log_probs[np.ix_(rows, allowed)]
        if balance == "sinkhorn":
            scores = sinkhorn(scores)
        r, c = linear_sum_assignment(-scores)
        assigned[rows[r]] = allowed[c]
        left = np.setdiff1d(np.arange(len(rows)), r)  # more wells than group members: best in group
        if len(left):
            assigned[rows[left]] = allowed[scores[left].argmax(1)]
    return assigned


def pseudo_labels(wells: pd.DataFrame, log_probs: np.ndarray, assigned: np.ndarray, classes: list[str],
                  fraction: float) -> pd.DataFrame:
    """The most confident ``fraction`` of assigned wells, as (id_code, label, confidence).

    After the plate assignment every class is used at most once per plate, so the chosen wells
    carry one label per class per plate, as the 1st place solution did.
    """
    confidence = np.exp(log_probs[np.arange(len(assigned)), assigned])
    order = np.argsort(-confidence, kind="stable")[: int(round(fraction * len(assigned)))]
    return pd.DataFrame({"id_code": wells["id_code"].to_numpy()[order],
                         "label": [classes[assigned[i]] for i in order], "confidence": confidence[order]})
