"""The plate leak: rotation choice per experiment and linear assignment per plate; pseudo-labels."""

from rcic.assign.plates import (
    RotationChoice,
    assign_plates,
    choose_rotations,
    group_masks,
    pseudo_labels,
    treatment_log_probs,
)

__all__ = ["RotationChoice", "assign_plates", "choose_rotations", "group_masks", "pseudo_labels",
           "treatment_log_probs"]
