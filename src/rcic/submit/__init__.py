"""Submission writer and validator (plate leak or arg-max), pseudo-labels, scoring."""

from rcic.submit.submission import (
    Submission,
    leak_pseudo_labels,
    make_submission,
    read_submission_csv,
    score,
    validate_submission,
    write_submission,
)

__all__ = ["Submission", "leak_pseudo_labels", "make_submission", "read_submission_csv", "score",
           "validate_submission", "write_submission"]
