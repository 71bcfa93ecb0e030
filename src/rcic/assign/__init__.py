"""The plate leak: rotation choice per experiment and linear assignment per plate; scoring; pseudo-labels."""

from rcic.assign.balance import BALANCES, sinkhorn
from rcic.assign.plates import (
    CENTERINGS,
    ROTATION_SCORES,
    RotationChoice,
    assign_plates,
    center_log_probs,
    choose_rotations,
    group_masks,
    plate_lean,
    pseudo_labels,
    treatment_log_probs,
)
from rcic.assign.scoring import assignment_agreement, mean_by_well, score_wells

__all__ = ["BALANCES", "CENTERINGS", "ROTATION_SCORES", "RotationChoice", "assign_plates", "assignment_agreement",
           "center_log_probs", "choose_rotations", "group_masks", "plate_lean",
           "mean_by_well", "pseudo_labels", "score_wells", "sinkhorn", "treatment_log_probs"]
