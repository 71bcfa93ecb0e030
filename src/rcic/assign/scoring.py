"""Scoring wells as the leaderboard does: arg-max and the plate-leak assignment, overall and by group.

One function, ``score_wells``, serves validation inside Lightning, ``rcic evaluate`` and the
benchmarks, so the number that picks a checkpoint is the number a submission gets: one
prediction per well (its sites averaged), treatment wells scored among treatment classes only,
and ``acc_leak`` after the rotation choice and per-plate assignment of ``rcic.assign.plates``,
applied to whole held-out experiments exactly as ``rcic submit`` applies it to the test set.
``assignment_agreement`` needs no labels: it measures how well predictions fit the layout.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from rcic.assign.plates import assign_plates, center_log_probs, choose_rotations
from rcic.io.metadata import PlateGroups


def mean_by_well(id_codes: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of per-site rows over the sites of each well: (sorted id_codes, means)."""
    codes, inverse = np.unique(np.asarray(id_codes), return_inverse=True)
    sums = np.zeros((len(codes), values.shape[1]), np.float64)
    np.add.at(sums, inverse, values)
    counts = np.bincount(inverse, minlength=len(codes))[:, None]
    return codes, (sums / counts).astype(np.float32)


def assignment_agreement(wells: pd.DataFrame, log_probs: np.ndarray, classes: list[str] | tuple[str, ...],
                         groups: PlateGroups) -> float:
    """Fraction of treatment wells whose arg-max class is the one the plate assignment gives them.

    No labels are needed. The assignment enforces what the layout guarantees (each siRNA once per
    plate, from the plate's group): predictions that already respect it agree with it, noisy ones
    are corrected by it. So among predictions of the same model under different test-time
    settings, the one with the highest agreement is the most consistent with the plate design;
    ``rcic.predict`` weighs AdaBN's priors by it (``--adabn-prior auto``; BENCHMARKS.md measures it
    against accuracy). It needs the plate groups (``groups.usable``), as the leak does.
    """
    if groups is None or not groups.usable:
        raise ValueError("the agreement with the plate assignment needs 4 usable plate groups")
    wells = wells.reset_index(drop=True)
    if not len(wells) or not len(classes):
        raise ValueError("no treatment wells or classes to measure the agreement on")
    choices = choose_rotations(wells, log_probs, list(classes), groups)
    assigned = assign_plates(wells, log_probs, list(classes), groups, choices)
    return float((assigned == log_probs.argmax(1)).mean())


def _accuracy(correct: np.ndarray | None, mask: np.ndarray) -> float | None:
    if correct is None or not mask.any():
        return None
    return float(correct[mask].mean())


def score_wells(wells: pd.DataFrame, log_probs: np.ndarray, classes: list[str] | tuple[str, ...],
                groups: PlateGroups | None, balance: str = "none", center: str = "none") -> dict:
    """Accuracy of treatment wells from their treatment-class log-probabilities.

    ``wells`` has ``experiment``, ``plate``, ``cell_type`` and the true ``label`` (one row per
    well, aligned with ``log_probs`` (wells x ``classes``)). Returns ``acc`` (arg-max), ``acc_leak``
    (plate-leak assignment; None where the data has no usable plate groups), ``wells``,
    ``per_cell_type`` ``{cell type: {"acc", "acc_leak"}}`` and ``experiments``
    ``{experiment: {"acc", "acc_leak", "wells"}}``. ``balance``: the plates' balancing before the
    assignment (``rcic.assign.plates.assign_plates``). ``center``: ``plate`` scores the plate-centred
    log-probabilities (``rcic.assign.plates.center_log_probs``), as ``rcic submit --center plate``
    predicts; ``none`` (default, as ``rcic submit``) the model's own.
    """
    wells = wells.reset_index(drop=True)
    log_probs = center_log_probs(wells, log_probs, center)
    classes = np.asarray(classes)
    truth = wells["label"].to_numpy().astype(str)
    correct = classes[log_probs.argmax(1)] == truth
    correct_leak = None
    if groups is not None and groups.usable and len(wells):
        choices = choose_rotations(wells, log_probs, list(classes), groups)
        correct_leak = classes[assign_plates(wells, log_probs, list(classes), groups, choices, balance)] == truth
    everything = np.ones(len(wells), bool)
    cell_types = wells["cell_type"].to_numpy()
    experiments = wells["experiment"].to_numpy()
    return {
        "acc": _accuracy(correct, everything),
        "acc_leak": _accuracy(correct_leak, everything),
        "wells": int(len(wells)),
        "per_cell_type": {c: {"acc": _accuracy(correct, cell_types == c),
                              "acc_leak": _accuracy(correct_leak, cell_types == c)}
                          for c in sorted(set(cell_types))},
        "experiments": {e: {"acc": _accuracy(correct, experiments == e),
                            "acc_leak": _accuracy(correct_leak, experiments == e),
                            "wells": int((experiments == e).sum())}
                        for e in sorted(set(experiments))},
    }
