"""Balancing a plate's probability matrix (Sinkhorn-Knopp), as the 7th place of RxRx1 did before assigning.

Each plate holds every treatment of its group once, so the well x treatment probabilities of a
plate should have rows summing to one (each well is one treatment) and columns summing to one
(each treatment is on one well). A model biased towards some treatments breaks the second;
Sinkhorn-Knopp rescales rows and columns alternately until both hold. With fewer wells than
treatments (wells missing from the plate) every column sums to wells / treatments instead.

Row and column scaling adds a constant to the summed log-probability of every complete
assignment, so a log-probability assignment would not change: the balanced plate is assigned by
its summed balanced probabilities, the expected number of correct wells under the balanced matrix.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

BALANCES = ("none", "sinkhorn")


def sinkhorn(log_probs: np.ndarray, iterations: int = 1000, tolerance: float = 1e-9) -> np.ndarray:
    """The balanced probabilities of one plate: rows sum to one, columns to rows / columns.

    ``log_probs``: (wells, treatments) log-probabilities (any row offsets: rows are normalised
    first). Works in log space, so probabilities of 1e-300 neither underflow nor divide by zero;
    stops when no row or column sum is off by more than ``tolerance``.
    """
    x = np.asarray(log_probs, dtype=np.float64)
    rows, cols = x.shape
    if rows == 0 or cols == 0:
        return np.exp(x)
    log_col_target = np.log(rows / cols)
    x = x - logsumexp(x, axis=1, keepdims=True)
    for _ in range(iterations):
        x = x + (log_col_target - logsumexp(x, axis=0, keepdims=True))
        x = x - logsumexp(x, axis=1, keepdims=True)
        if np.abs(np.exp(logsumexp(x, axis=0)) - rows / cols).max() <= tolerance:
            break
    return np.exp(x)
