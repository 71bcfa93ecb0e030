"""The plate leak: rotation choice per experiment and linear assignment per plate; scoring; pseudo-labels."""

from rcic.assign.balance import BALANCES, sinkhorn
from rcic.assign.plates import (
    RotationChoice,
    assign_plates,
    choose_rotations,
    group_masks,
    pseudo_labels,
    treatment_log_probs,
)
from rcic.assign.scoring import mean_by_well, score_wells

__all__ = ["BALANCES", "RotationChoice", "assign_plates", "choose_rotations", "group_masks", "mean_by_well",
           "pseudo_labels", "score_wells", "sinkhorn", "treatment_log_probs"]
