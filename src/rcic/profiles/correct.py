"""Batch correction of well embeddings with the control wells, experiment by experiment.

Methods (each usable alone; controls are the wells whose ``well_type`` is not ``treatment``):

- ``none``: the embeddings as they are.
- ``center``: subtract each experiment's mean control profile.
- ``standardize``: z-score each experiment on its controls (pycytominer ``normalize``).
- ``spherize``: ZCA-whiten each experiment on its controls (pycytominer ``normalize``, method
  ``spherize``/``ZCA``), regularised by a fraction of the controls' mean variance.
- ``tvn``: typical variation normalisation as in EFAAR (Celik et al. 2024): standardise on the
  controls, rotate onto the controls' principal axes, standardise each experiment on its own
  controls, then CORAL: each experiment's control covariance mapped onto the pooled one.
- ``harmony``: Harmony (harmonypy) on the first principal components, experiment as the batch.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from rcic.errors import DataError

METHODS = ("none", "center", "standardize", "tvn", "spherize", "harmony")
NEEDS_CONTROLS = ("center", "standardize", "tvn", "spherize")
SPHERIZE_EPSILON = 0.1  # x the controls' mean variance: a few controls in many dimensions stay invertible
HARMONY_COMPONENTS = 50
TVN_RIDGE = 0.5  # EFAAR's regularisation of the covariances in CORAL

log = logging.getLogger(__name__)


def is_control(meta: pd.DataFrame) -> np.ndarray:
    return (meta["well_type"] != "treatment").to_numpy()


def _check_controls(meta: pd.DataFrame, method: str, source=None, minimum: int = 2) -> None:
    controls = pd.Series(is_control(meta), index=meta.index)
    per_experiment = controls.groupby(meta["experiment"]).sum()
    short = per_experiment[per_experiment < minimum]
    if len(short):
        raise DataError(f"correction {method} needs at least {minimum} control wells per experiment; experiment "
                        f"{short.index[0]} has {int(short.iloc[0])}", source)


def correct(meta: pd.DataFrame, x: np.ndarray, method: str, source=None) -> np.ndarray:
    """Corrected embeddings (wells x features; ``harmony`` returns its principal components)."""
    if method not in METHODS:
        raise DataError(f"unknown correction {method!r}; choose from {', '.join(METHODS)}")
    if method in NEEDS_CONTROLS:
        _check_controls(meta, method, source, minimum=2)
    x = np.asarray(x, np.float64)
    match method:
        case "none":
            return x
        case "center":
            return _per_experiment(meta, x, lambda xe, ce: xe - xe[ce].mean(0))
        case "standardize":
            return _pycytominer(meta, x, "standardize")
        case "spherize":
            return _pycytominer(meta, x, "spherize")
        case "tvn":
            return typical_variation_normalization(meta, x)
        case "harmony":
            return _harmony(meta, x)


def _per_experiment(meta: pd.DataFrame, x: np.ndarray, fn) -> np.ndarray:
    out = np.empty_like(x)
    controls = is_control(meta)
    for rows in meta.groupby("experiment", sort=True).indices.values():
        out[rows] = fn(x[rows], controls[rows])
    return out


def _pycytominer(meta: pd.DataFrame, x: np.ndarray, method: str) -> np.ndarray:
    """pycytominer's ``normalize`` on each experiment, its statistics from the experiment's controls."""
    from pycytominer import normalize

    features = [f"f{i}" for i in range(x.shape[1])]

    def one(xe: np.ndarray, ce: np.ndarray) -> np.ndarray:
        frame = pd.DataFrame(xe, columns=features)
        frame.insert(0, "Metadata_control", ce)
        kwargs = {}
        if method == "spherize":
            variance = xe[ce].var(axis=0).mean()
            kwargs = {"spherize_method": "ZCA", "spherize_center": True,
                      "spherize_epsilon": float(SPHERIZE_EPSILON * max(variance, 1e-12))}
        out = normalize(frame, features=features, meta_features=["Metadata_control"],
                        samples="Metadata_control == True", method=method, **kwargs)
        return out[features].to_numpy(np.float64)

    return _per_experiment(meta, x, one)


def _standardize_on(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    mean, std = x[rows].mean(0), x[rows].std(0)
    return (x - mean) / np.where(std > 1e-12, std, 1.0)


def _matrix_power(cov: np.ndarray, power: float) -> np.ndarray:
    values, vectors = np.linalg.eigh(cov)
    return (vectors * np.maximum(values, 1e-10) ** power) @ vectors.T


def typical_variation_normalization(meta: pd.DataFrame, x: np.ndarray, ridge: float = TVN_RIDGE) -> np.ndarray:
    """EFAAR's TVN: standardise on all controls, rotate to the controls' principal axes (no reduction),
    standardise each experiment on its controls, then CORAL: each experiment's control covariance
    (+ ``ridge`` I, which keeps a few controls in many dimensions invertible) is mapped onto the
    pooled controls' covariance (+ ``ridge`` I)."""
    controls = is_control(meta)
    z = _standardize_on(x, controls)
    c = z[controls]
    _, _, vt = np.linalg.svd(c - c.mean(0), full_matrices=False)
    z = (z - c.mean(0)) @ vt.T
    z = _per_experiment(meta, z, lambda ze, ce: _standardize_on(ze, ce))
    eye = np.eye(z.shape[1])
    target = _matrix_power(np.cov(z[controls], rowvar=False).reshape(eye.shape) + ridge * eye, 0.5)

    def coral(ze: np.ndarray, ce: np.ndarray) -> np.ndarray:
        source = np.cov(ze[ce], rowvar=False).reshape(eye.shape) + ridge * eye
        return ze @ _matrix_power(source, -0.5) @ target

    return _per_experiment(meta, z, coral)


def _harmony(meta: pd.DataFrame, x: np.ndarray) -> np.ndarray:
    import harmonypy

    centred = x - x.mean(0)
    k = min(HARMONY_COMPONENTS, x.shape[1], x.shape[0] - 1)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    pcs = u[:, :k] * s[:k]
    batches = meta[["experiment"]].reset_index(drop=True)
    if batches["experiment"].nunique() < 2:
        return pcs
    result = harmonypy.run_harmony(pcs, batches, ["experiment"], verbose=False, random_state=0)
    z = np.asarray(result.Z_corr)
    return z.T if z.shape[0] == k and z.shape[1] == len(x) else z
