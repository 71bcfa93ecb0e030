"""Batch correction of well embeddings, experiment (batch) by experiment.

Methods that learn from control wells use the controls chosen by ``controls``:

- ``negative``: the negative-control wells only (EFAAR's and pycytominer's convention: wells whose
  variation is technical by construction). RxRx1 has 4-5 per experiment (one per plate).
- ``all``: every non-treatment well. In RxRx1 ~96% of them are the 30 positive-control siRNAs,
  whose strong phenotypes then count as nuisance directions.
- ``within``: every control well, with each control siRNA's per-experiment mean removed before
  the spread (variance, covariance) is estimated; the location stays the mean of the experiment's
  controls. Whitening then learns the controls' technical variation, not their phenotypes.

Methods:

- ``none``: the embeddings as they are.
- ``pca``: no correction, the first ``HARMONY_COMPONENTS`` principal components (the input Harmony
  and Scanorama reduce to): whatever they gain over ``pca`` is their correction, not denoising.
- ``center``: subtract each experiment's mean control profile.
- ``standardize``: z-score each experiment on its controls (scikit-learn's ``StandardScaler``, as
  pycytominer's ``normalize``).
- ``spherize``: ZCA-whiten each experiment on its controls, regularised by ``SPHERIZE_EPSILON`` x
  the controls' mean variance.
- ``tvn``: typical variation normalisation exactly as EFAAR's ``tvn_on_controls`` (Celik et al.
  2024, recursionpharma/EFAAR_benchmarking): standardise on all the chosen controls, PCA fitted on
  them (every component), standardise again on them, then per experiment multiply by
  (C_e + 0.5 I)^(-1/2), C_e the covariance of that experiment's controls.
- ``harmony``: Harmony (harmonypy) on the first ``HARMONY_COMPONENTS`` principal components.
- ``combat``: ComBat (inmoose's ``pycombat_norm``, parametric priors), experiment as the batch.
- ``scanorama``: Scanorama (``scanorama.integrate``) to ``HARMONY_COMPONENTS`` dimensions.

Harmony, ComBat and Scanorama use every well and no controls.
"""

from __future__ import annotations

import contextlib
import io
import logging

import numpy as np
import pandas as pd

from rcic.errors import DataError

PANEL_METHODS = ("none", "pca", "center", "standardize", "spherize", "tvn", "harmony", "combat", "scanorama")
METHODS = PANEL_METHODS
CONTROLS = ("negative", "all", "within")
# the fewest reference wells per experiment each method can estimate its statistics from
NEEDS_CONTROLS = {"center": 1, "standardize": 2, "spherize": 2, "tvn": 2}
SPHERIZE_EPSILON = 0.1  # x the controls' mean variance: a few controls in many dimensions stay invertible
HARMONY_COMPONENTS = 50
TVN_RIDGE = 0.5  # EFAAR's regularisation of each experiment's control covariance

log = logging.getLogger(__name__)

_WELL_WORD = {"negative": "negative-control", "all": "control", "within": "control (in a siRNA with 2+ wells)"}


def is_control(meta: pd.DataFrame, controls: str = "all") -> np.ndarray:
    """The wells ``controls`` picks: negative controls, or every non-treatment well (``all``, ``within``)."""
    if controls == "negative":
        return (meta["well_type"] == "negative_control").to_numpy()
    return (meta["well_type"] != "treatment").to_numpy()


def reference_wells(meta: pd.DataFrame, x: np.ndarray, controls: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows that estimate the statistics, the experiment of each row).

    ``negative``/``all``: the control wells themselves. ``within``: each control well minus the mean
    of its (experiment, siRNA) group plus the mean of its experiment's controls, for groups of two
    wells or more (a single well has no within-siRNA spread). These rows keep each experiment's
    control mean but carry only the controls' variation around their own siRNA.
    """
    if controls not in CONTROLS:
        raise DataError(f"--controls must be one of {', '.join(CONTROLS)}, got {controls!r}")
    mask = is_control(meta, controls)
    ref = np.asarray(x, np.float64)[mask]
    experiments = meta["experiment"].to_numpy()[mask]
    if controls != "within":
        return ref, experiments
    frame = pd.DataFrame(ref)
    keys = [experiments, meta["label"].to_numpy()[mask]]
    group_mean = frame.groupby(keys).transform("mean").to_numpy()
    experiment_mean = frame.groupby(experiments).transform("mean").to_numpy()
    size = frame.groupby(keys)[0].transform("size").to_numpy()
    keep = size >= 2
    return (ref - group_mean + experiment_mean)[keep], experiments[keep]


def check_controls(meta: pd.DataFrame, x: np.ndarray, method: str, controls: str, source=None) -> None:
    """One line naming the first experiment with too few reference wells for ``method``."""
    minimum = NEEDS_CONTROLS.get(method)
    if minimum is None:
        return
    _, experiments = reference_wells(meta, x[:, :1], controls)
    counts = pd.Series(experiments).value_counts().reindex(sorted(meta["experiment"].unique()), fill_value=0)
    short = counts[counts < minimum]
    if len(short):
        experiment, count = short.index[0], int(short.iloc[0])
        raise DataError(f"--controls {controls}: experiment {experiment} has {count} {_WELL_WORD[controls]} "
                        f"well(s); correction {method} needs at least {minimum} per experiment "
                        f"({len(short)} experiment(s) short; try --controls all or within)", source)


def correct(meta: pd.DataFrame, x: np.ndarray, method: str, source=None, controls: str = "negative",
            pcs: np.ndarray | None = None) -> np.ndarray:
    """Corrected embeddings (wells x features; ``pca``, ``harmony`` and ``scanorama`` return
    ``HARMONY_COMPONENTS`` dimensions). ``pcs``: ``principal_components(x)`` when already computed (the
    panel computes them once for ``pca`` and ``harmony``: an SVD of every well)."""
    if method not in METHODS:
        raise DataError(f"unknown correction {method!r}; choose from {', '.join(METHODS)}")
    if controls not in CONTROLS:
        raise DataError(f"--controls must be one of {', '.join(CONTROLS)}, got {controls!r}")
    x = np.asarray(x, np.float64)
    check_controls(meta, x, method, controls, source)
    match method:
        case "none":
            return x
        case "pca":
            return principal_components(x) if pcs is None else pcs.copy()
        case "center":
            return _per_experiment(meta, x, controls, lambda xe, re: xe - re.mean(0))
        case "standardize":
            return _per_experiment(meta, x, controls, _standardize)
        case "spherize":
            return _per_experiment(meta, x, controls, _spherize)
        case "tvn":
            return typical_variation_normalization(meta, x, controls)
        case "harmony":
            return _harmony(meta, x, None if pcs is None else pcs.copy())
        case "combat":
            return _combat(meta, x)
        case "scanorama":
            return _scanorama(meta, x)


def _per_experiment(meta: pd.DataFrame, x: np.ndarray, controls: str, fn) -> np.ndarray:
    """``fn(wells of the experiment, its reference rows)`` for each experiment."""
    ref, ref_experiment = reference_wells(meta, x, controls)
    out = np.empty_like(x)
    for experiment, rows in meta.groupby("experiment", sort=True).indices.items():
        out[rows] = fn(x[rows], ref[ref_experiment == experiment])
    return out


def _standardize(xe: np.ndarray, re: np.ndarray) -> np.ndarray:
    from sklearn.preprocessing import StandardScaler

    return StandardScaler().fit(re).transform(xe)


def _matrix_power(cov: np.ndarray, power: float) -> np.ndarray:
    """A symmetric positive-definite matrix to a power, through its eigendecomposition (what scipy's
    ``fractional_matrix_power`` gives for such a matrix, ~50x faster at 512 dimensions)."""
    values, vectors = np.linalg.eigh(cov)
    return (vectors * np.maximum(values, 1e-12) ** power) @ vectors.T


def _spherize(xe: np.ndarray, re: np.ndarray) -> np.ndarray:
    """ZCA: (x - mean) (C + eps I)^(-1/2), C the reference rows' covariance.

    Not pycytominer's ``Spherize``: it refuses rank-deficient references, and within-siRNA residuals
    always are (each group's mean takes a degree of freedom); without regularisation both agree (tested).
    """
    mean = re.mean(0)
    cov = np.atleast_2d(np.cov(re, rowvar=False))
    epsilon = SPHERIZE_EPSILON * max(float(np.trace(cov)) / len(cov), 1e-12)
    return (xe - mean) @ _matrix_power(cov + epsilon * np.eye(len(cov)), -0.5)


def typical_variation_normalization(meta: pd.DataFrame, x: np.ndarray, controls: str = "negative",
                                    ridge: float = TVN_RIDGE) -> np.ndarray:
    """EFAAR's ``tvn_on_controls`` with the experiment as the batch, on the chosen controls' reference
    rows (``reference_wells``). Its PCA keeps every component: with fewer controls than features the
    output has (controls) dimensions, as EFAAR's."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    ref, ref_experiment = reference_wells(meta, x, controls)
    scaler = StandardScaler().fit(ref)
    pca = PCA().fit(scaler.transform(ref))
    rotate = lambda a: pca.transform(scaler.transform(a))  # noqa: E731
    rescale = StandardScaler().fit(rotate(ref))
    z, zref = rescale.transform(rotate(x)), rescale.transform(rotate(ref))
    eye = np.eye(z.shape[1])
    out = np.empty_like(z)
    for experiment, rows in meta.groupby("experiment", sort=True).indices.items():
        cov = np.cov(zref[ref_experiment == experiment], rowvar=False, ddof=1).reshape(eye.shape)
        out[rows] = z[rows] @ _matrix_power(cov + ridge * eye, -0.5)
    return out


def principal_components(x: np.ndarray, k: int = HARMONY_COMPONENTS) -> np.ndarray:
    """The first ``k`` principal components (scores) of the wells."""
    centred = x - x.mean(0)
    k = min(k, x.shape[1], x.shape[0] - 1)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    return u[:, :k] * s[:k]


def _harmony(meta: pd.DataFrame, x: np.ndarray, pcs: np.ndarray | None = None) -> np.ndarray:
    import harmonypy

    pcs = principal_components(x) if pcs is None else pcs
    batches = meta[["experiment"]].reset_index(drop=True)
    if batches["experiment"].nunique() < 2:
        return pcs
    result = harmonypy.run_harmony(pcs, batches, ["experiment"], verbose=False, random_state=0)
    z = np.asarray(result.Z_corr)
    return z.T if z.shape[0] == pcs.shape[1] and z.shape[1] == len(x) else z


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"this correction needs the optional package {module.split('.')[0]}: "
                        "pip install 'rcic[panel]'") from None


def _combat(meta: pd.DataFrame, x: np.ndarray) -> np.ndarray:
    pycombat = _need("inmoose.pycombat")
    batches = meta["experiment"].to_numpy()
    if len(set(batches)) < 2:
        return x
    # ComBat divides by each feature's variance within each batch: features constant in a batch stay as they are
    keep = pd.DataFrame(x).groupby(batches).std(ddof=0).min(0).to_numpy() > 1e-12
    out = x.copy()
    corrected = pycombat.pycombat_norm(x[:, keep].T, list(batches))
    out[:, keep] = np.asarray(corrected, np.float64).T
    return out


def _scanorama(meta: pd.DataFrame, x: np.ndarray) -> np.ndarray:
    scanorama = _need("scanorama")
    groups = meta.groupby("experiment", sort=True).indices
    if len(groups) < 2:
        return principal_components(x)
    names = [f"f{i}" for i in range(x.shape[1])]
    parts = [np.ascontiguousarray(x[rows]) for rows in groups.values()]
    k = min(HARMONY_COMPONENTS, x.shape[1], len(x) - 1)
    with contextlib.redirect_stdout(io.StringIO()):  # scanorama prints its progress; library code does not
        integrated, _ = scanorama.integrate(parts, [names] * len(parts), dimred=k, verbose=0, seed=0)
    out = np.empty((len(x), integrated[0].shape[1]))
    for rows, z in zip(groups.values(), integrated):
        out[rows] = z
    return out
