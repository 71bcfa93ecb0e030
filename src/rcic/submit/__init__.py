"""Submission writer and validator (plate leak or arg-max), pseudo-labels, scoring."""

from rcic.submit.evaluation import evaluate_logits, wilds_scores
from rcic.submit.submission import (
    Submission,
    leak_pseudo_labels,
    make_submission,
    read_submission_csv,
    score,
    validate_submission,
    write_submission,
)

__all__ = ["Submission", "evaluate_logits", "leak_pseudo_labels", "make_submission", "read_submission_csv", "score",
           "validate_submission", "wilds_scores", "write_submission"]
