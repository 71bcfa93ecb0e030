"""Properties of the code that decides a submission's score and a map's numbers, on random inputs (hypothesis).

Each test states what a user relies on and checks it against an independent computation (brute force,
a loop, the definition of the statistic), never a range. Examples stay few (``max_examples``) and
small, so the file runs in seconds; numbers come from a numpy generator seeded by hypothesis, so a
failure prints the seed that reproduces it.
"""

from __future__ import annotations

import itertools
import os
import sys

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp

from rcic.assign import assign_plates, choose_rotations, mean_by_well
from rcic.errors import DataError
from rcic.io import read_dataset
from rcic.io.metadata import Dataset, PlateGroups
from rcic.predict import Logits
from rcic.profiles import correct
from rcic.profiles.correct import SPHERIZE_EPSILON
from rcic.submit import evaluate_logits, make_submission, score, validate_submission

# no example database: nothing is written into the checkout, and every run draws the same examples
# (bench/mutation.py draws fewer: it runs these tests once per mutant)
EXAMPLES = int(os.environ.get("RCIC_PROPERTY_EXAMPLES", 15))
FAST = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
FEW = settings(FAST, max_examples=max(EXAMPLES // 3, 3))  # checks that cost ~0.5 s an example
seeds = st.integers(0, 2**32 - 1)


# ----------------------------------------------------------------------------------------------
# Plate assignment and rotation choice
# ----------------------------------------------------------------------------------------------


def _plates(k: int, wells_per_plate: list[int], experiments: int, seed: int, seen: tuple[int, ...] | None = None):
    """Experiments of 4 plates, ``wells_per_plate[p]`` wells on plate p + 1, 4 groups of ``k`` classes;
    log-probabilities over all 4k classes (random, every row normalised)."""
    rng = np.random.default_rng(seed)
    classes = [f"c{i}" for i in range(4 * k)]
    groups = PlateGroups(tuple(frozenset(classes[g * k:(g + 1) * k]) for g in range(4)),
                         orders={} if seen is None else {"seen-in-train": seen})
    rows = [{"id_code": f"E{e}_{p}_W{w:02d}", "experiment": f"E{e}", "plate": p}
            for e in range(experiments) for p in range(1, 5) for w in range(wells_per_plate[p - 1])]
    logits = rng.normal(0, 2, (len(rows), len(classes)))
    log_probs = logits - logsumexp(logits, axis=1, keepdims=True)
    order = rng.permutation(len(rows))  # wells of a plate are not contiguous in a real table
    return pd.DataFrame(rows).iloc[order].reset_index(drop=True), log_probs[order], classes, groups


def _columns(groups: PlateGroups, classes: list[str], g: int) -> list[int]:
    return [i for i, c in enumerate(classes) if c in groups.groups[g]]


@FAST
@given(k=st.integers(2, 5), data=st.data(), seed=seeds)
def test_assignment_is_a_permutation_within_each_plate_and_optimal(k, data, seed):
    """Each treatment once per plate, only its plate's group, and no other assignment scores higher."""
    wells_per_plate = data.draw(st.lists(st.integers(1, k), min_size=4, max_size=4))
    wells, log_probs, classes, groups = _plates(k, wells_per_plate, 2, seed)
    choices = choose_rotations(wells, log_probs, classes, groups)
    assigned = assign_plates(wells, log_probs, classes, groups, choices)
    for (experiment, plate), rows in wells.groupby(["experiment", "plate"]).indices.items():
        allowed = _columns(groups, classes, choices[experiment].order[plate - 1])
        got = assigned[rows]
        assert len(set(got)) == len(rows) and set(got) <= set(allowed)
        best = max(log_probs[rows, list(perm)].sum() for perm in itertools.permutations(allowed, len(rows)))
        assert np.isclose(log_probs[rows, got].sum(), best, rtol=0, atol=1e-9)


@FAST
@given(k=st.integers(2, 4), extra=st.integers(1, 2), seed=seeds)
def test_more_wells_than_group_members_still_get_members_of_their_group(k, extra, seed):
    wells, log_probs, classes, groups = _plates(k, [k + extra, k, 1, k], 1, seed)
    choices = choose_rotations(wells, log_probs, classes, groups)
    assigned = assign_plates(wells, log_probs, classes, groups, choices)
    rows = np.flatnonzero(wells["plate"].to_numpy() == 1)
    allowed = set(_columns(groups, classes, choices["E0"].order[0]))
    assert set(assigned[rows]) == allowed  # every member used, nothing from outside the group


@FAST
@given(k=st.integers(2, 5), data=st.data(), seed=seeds)
def test_assignment_and_rotation_are_invariant_to_a_per_row_constant(k, data, seed):
    """A well's scores shifted by a constant (an un-normalised log-softmax) decide the same labels."""
    wells_per_plate = data.draw(st.lists(st.integers(1, k), min_size=4, max_size=4))
    wells, log_probs, classes, groups = _plates(k, wells_per_plate, 2, seed)
    shifted = log_probs + np.random.default_rng(seed + 1).normal(0, 10, (len(wells), 1))
    a = choose_rotations(wells, log_probs, classes, groups)
    b = choose_rotations(wells, shifted, classes, groups)
    assert {e: c.order for e, c in a.items()} == {e: c.order for e, c in b.items()}
    assert np.array_equal(assign_plates(wells, log_probs, classes, groups, a),
                          assign_plates(wells, shifted, classes, groups, b))


def _lean_by_hand(rows: np.ndarray) -> np.ndarray:
    """A plate's lean, written out: per-class means of the row-centred log-probabilities, kept by the
    share of their variance that exceeds the sampling variance of a mean (James-Stein)."""
    n, c = rows.shape
    if n < 2:
        return np.zeros(c)
    x = np.array([[rows[i, j] - sum(rows[i]) / c for j in range(c)] for i in range(n)])
    means = [sum(x[:, j]) / n for j in range(c)]
    between = sum((m - sum(means) / c) ** 2 for m in means) / c
    within = sum(sum((x[i, j] - means[j]) ** 2 for i in range(n)) / n for j in range(c)) / c / n
    return max(0.0, 1 - within / between) * np.array(means) if between > 0 else np.zeros(c)


def _brute_force_rotation(wells: pd.DataFrame, log_probs: np.ndarray, classes: list[str], groups: PlateGroups):
    """The rotation choice of one experiment, written out: each plate's lean removed, then the mass of each
    well on each group, summed per plate."""
    plate = wells["plate"].to_numpy()
    log_probs = log_probs.copy()
    for p in range(1, 5):
        log_probs[plate == p] -= _lean_by_hand(log_probs[plate == p])
    mass = np.array([[logsumexp(log_probs[i, _columns(groups, classes, g)]) for g in range(4)]
                     for i in range(len(wells))])

    def score(order):
        return sum(mass[plate == p + 1, g].sum() for p, g in enumerate(order)) / len(wells)

    cyclic = [tuple((p + r) % 4 for p in range(4)) for r in range(4)]
    candidates = cyclic + [o for o in groups.orders.values() if o not in cyclic]
    scores = sorted((score(o) for o in candidates), reverse=True)
    best = max(candidates, key=score)
    every = max(itertools.permutations(range(4)), key=score)
    return best, scores[0], scores[0] - scores[1], every == best, cyclic.index(best) if best in cyclic else None


@FAST
@given(k=st.integers(2, 4), data=st.data(), seed=seeds, seen=st.none() | st.permutations(range(4)).map(tuple))
def test_rotation_choice_is_the_best_candidate_order(k, data, seed, seen):
    """Order, rotation, score, margin to the runner-up and the 24-permutation check, per experiment."""
    wells_per_plate = data.draw(st.lists(st.integers(1, k), min_size=4, max_size=4))  # no ties: no empty plate
    wells, log_probs, classes, groups = _plates(k, wells_per_plate, 2, seed, seen)
    choices = choose_rotations(wells, log_probs, classes, groups)
    assert sorted(choices) == ["E0", "E1"]
    for experiment, rows in wells.groupby("experiment").indices.items():
        order, best, margin, agree, rotation = _brute_force_rotation(wells.iloc[rows], log_probs[rows], classes,
                                                                     groups)
        choice = choices[experiment]
        assert choice.order == order and choice.rotation == rotation and choice.permutations_agree == agree
        assert np.isclose(choice.score, best) and np.isclose(choice.margin, margin) and choice.wells == len(rows)


@FAST
@given(rotation=st.integers(0, 3), k=st.integers(2, 5), seed=seeds)
def test_rotation_choice_recovers_a_planted_rotation(rotation, k, seed):
    """Wells that favour their own siRNA, one of their plate's group (rotation r), give back r, whichever r
    it is, with or without a plate effect (every well of a plate leaning towards the same classes)."""
    wells, log_probs, classes, groups = _plates(k, [k] * 4, 1, seed)
    rng = np.random.default_rng(seed)
    plates = wells["plate"].to_numpy()
    for plate in range(1, 5):
        rows = np.flatnonzero(plates == plate)
        log_probs[rows, rng.permutation(_columns(groups, classes, (plate - 1 + rotation) % 4))] += 8.0
    for lean in (0.0, 3.0):
        leaning = log_probs.copy()
        for plate in range(1, 5):  # the plate effect: a random lean, shared by the plate's wells
            leaning[plates == plate] += lean * rng.normal(0, 1, len(classes))
        choice = choose_rotations(wells, leaning, classes, groups)["E0"]
        assert choice.rotation == rotation and choice.order == tuple((p + rotation) % 4 for p in range(4))
        assert choice.margin > 0


# ----------------------------------------------------------------------------------------------
# Well averaging of sites
# ----------------------------------------------------------------------------------------------


@FAST
@given(sites=st.lists(st.integers(1, 3), min_size=1, max_size=12), seed=seeds)
def test_well_average_is_the_mean_of_each_wells_sites(sites, seed):
    rng = np.random.default_rng(seed)
    codes = np.repeat([f"W{i:02d}" for i in range(len(sites))], sites)
    values = rng.normal(0, 5, (len(codes), 3))
    order = rng.permutation(len(codes))
    wells, means = mean_by_well(codes[order], values[order])
    assert wells.tolist() == sorted(set(codes)) and means.dtype == np.float32
    for well, mean in zip(wells, means):
        np.testing.assert_allclose(mean, values[codes == well].mean(0), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Corrections: each one's defining property on the controls
# ----------------------------------------------------------------------------------------------


def _embeddings(seed: int, experiments: int, controls: int, treatments: int, features: int):
    """Wells of several experiments, each with its own offset and scale (a batch effect); the first
    two controls of an experiment are negative controls, the others positive controls."""
    rng = np.random.default_rng(seed)
    meta, blocks = [], []
    for e in range(experiments):
        n = controls + treatments
        types = ["negative_control"] * 2 + ["positive_control"] * (controls - 2) + ["treatment"] * treatments
        meta += [{"experiment": f"E{e}", "well_type": t, "label": f"s{i % 3}"} for i, t in enumerate(types)]
        blocks.append(rng.normal(rng.normal(0, 5, features), rng.uniform(0.5, 4), (n, features))
                      @ rng.normal(0, 1, (features, features)))
    order = rng.permutation(len(meta))  # experiments interleaved, as rows come from a merged table
    return pd.DataFrame(meta).iloc[order].reset_index(drop=True), np.concatenate(blocks)[order]


embedding_shapes = st.tuples(seeds, st.integers(1, 3), st.integers(3, 8), st.integers(0, 6), st.integers(1, 4))
reference = st.sampled_from(["negative", "all"])


def _references(meta: pd.DataFrame, controls: str):
    """(reference rows, all rows) of each experiment: its negative controls, or all its controls."""
    types = meta["well_type"].to_numpy()
    chosen = types == "negative_control" if controls == "negative" else types != "treatment"
    for _, rows in meta.groupby("experiment").indices.items():
        yield rows[chosen[rows]], rows


@FAST
@given(shape=embedding_shapes, controls=reference)
def test_center_zeroes_each_experiments_control_mean_and_shifts_every_well_alike(shape, controls):
    meta, x = _embeddings(*shape)
    z = correct(meta, x, "center", controls=controls)
    for ref, rows in _references(meta, controls):
        np.testing.assert_allclose(z[ref].mean(0), 0, atol=1e-9)
        np.testing.assert_allclose(x[rows] - z[rows], np.broadcast_to(x[ref].mean(0), z[rows].shape), atol=1e-9)


@FEW  # scikit-learn's scaler per experiment: the slowest of the corrections here
@given(shape=embedding_shapes, controls=reference)
def test_standardize_gives_each_experiments_controls_mean_0_and_std_1(shape, controls):
    meta, x = _embeddings(*shape)
    z = correct(meta, x, "standardize", controls=controls)
    for ref, rows in _references(meta, controls):
        np.testing.assert_allclose(z[ref].mean(0), 0, atol=1e-7)
        np.testing.assert_allclose(z[ref].std(0), 1, atol=1e-7)
        mean, std = x[ref].mean(0), x[ref].std(0)  # every well of the experiment by the same affine map
        np.testing.assert_allclose(z[rows], (x[rows] - mean) / std, atol=1e-7)


def _whitening_case(shape):
    seed, experiments, controls, treatments, features = shape
    return _embeddings(seed, experiments, max(controls, features + 2), treatments, features)


@FAST
@given(shape=embedding_shapes)
def test_spherize_whitens_each_experiments_controls(shape):
    """Without the regulariser, ZCA gives the controls mean 0 and identity covariance, per experiment;
    with it, their covariance is C (C + eps I)^-1 (eigenvalues shrunk towards 0, never above 1)."""
    meta, x = _whitening_case(shape)
    features = x.shape[1]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys.modules["rcic.profiles.correct"], "SPHERIZE_EPSILON", 0.0)
        z = correct(meta, x, "spherize", controls="all")
    regularised = correct(meta, x, "spherize", controls="all")
    for ref, _ in _references(meta, "all"):
        np.testing.assert_allclose(z[ref].mean(0), 0, atol=1e-7)
        np.testing.assert_allclose(np.cov(z[ref], rowvar=False).reshape(features, features), np.eye(features),
                                   atol=1e-6)
        cov = np.cov(x[ref], rowvar=False).reshape(features, features)
        epsilon = SPHERIZE_EPSILON * np.trace(cov) / features
        np.testing.assert_allclose(np.cov(regularised[ref], rowvar=False).reshape(features, features),
                                   cov @ np.linalg.inv(cov + epsilon * np.eye(features)), atol=1e-6)


@FEW
@given(shape=embedding_shapes, factor=st.sampled_from([1e-3, 1e3]), method=st.sampled_from(["standardize",
                                                                                               "spherize"]))
def test_scale_free_corrections_do_not_depend_on_the_embeddings_units(shape, factor, method):
    meta, x = _whitening_case(shape)
    np.testing.assert_allclose(correct(meta, x * factor, method), correct(meta, x, method), atol=1e-6)


def _efaar_tvn(meta: pd.DataFrame, x: np.ndarray, chosen: np.ndarray, ridge: float = 0.5) -> np.ndarray:
    """EFAAR's typical variation normalisation written out step by step (scikit-learn, scipy): standardise on
    the controls, PCA fitted on them, standardise again on them, then each experiment times
    (C_e + ridge I)^(-1/2), C_e the covariance of its controls."""
    from scipy.linalg import fractional_matrix_power
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    a = StandardScaler().fit(x[chosen]).transform(x)
    a = PCA().fit(a[chosen]).transform(a)
    a = StandardScaler().fit(a[chosen]).transform(a)
    out = np.empty_like(a)
    for experiment in meta["experiment"].unique():
        rows = (meta["experiment"] == experiment).to_numpy()
        cov = np.cov(a[rows & chosen], rowvar=False, ddof=1).reshape(a.shape[1], a.shape[1])
        out[rows] = a[rows] @ np.real(fractional_matrix_power(cov + ridge * np.eye(a.shape[1]), -0.5))
    return out


@FEW
@given(shape=embedding_shapes)
def test_tvn_is_efaars_and_whitens_each_experiments_controls_without_its_ridge(shape):
    from rcic.profiles.correct import typical_variation_normalization

    meta, x = _whitening_case(shape)
    chosen = (meta["well_type"] != "treatment").to_numpy()
    np.testing.assert_allclose(correct(meta, x, "tvn", controls="all"), _efaar_tvn(meta, x, chosen),
                               rtol=1e-6, atol=1e-6)
    z = typical_variation_normalization(meta, x, "all", ridge=0.0)
    for ref, _ in _references(meta, "all"):
        np.testing.assert_allclose(np.cov(z[ref], rowvar=False).reshape(x.shape[1], -1), np.eye(x.shape[1]),
                                   atol=1e-6)


@FAST
@given(shape=embedding_shapes)
def test_within_references_are_controls_minus_their_sirnas_mean_plus_the_experiments(shape):
    """Each control well of a siRNA with 2+ wells in its experiment, moved by (its experiment's control mean
    - its siRNA's mean there); single-well siRNAs left out; rows in table order."""
    from rcic.profiles.correct import reference_wells

    meta, x = _embeddings(*shape)
    ref, experiments = reference_wells(meta, x, "within")
    expected, expected_experiments = [], []
    for i in range(len(meta)):
        if meta.well_type[i] == "treatment":
            continue
        controls = (meta.experiment == meta.experiment[i]) & (meta.well_type != "treatment")
        same = controls & (meta.label == meta.label[i])
        if same.sum() >= 2:
            expected.append(x[i] - x[same.to_numpy()].mean(0) + x[controls.to_numpy()].mean(0))
            expected_experiments.append(meta.experiment[i])
    np.testing.assert_allclose(ref, np.array(expected).reshape(-1, x.shape[1]), atol=1e-9)
    assert experiments.tolist() == expected_experiments
    negative, _ = reference_wells(meta, x, "negative")
    np.testing.assert_array_equal(negative, x[(meta.well_type == "negative_control").to_numpy()])


# ----------------------------------------------------------------------------------------------
# Submission validation, and evaluate == submit + score
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(plate_csvs) -> Dataset:
    return read_dataset(plate_csvs)


@FEW
@given(data=st.data())
def test_a_test_submission_is_valid_only_in_sample_submission_order(tiny, data):
    order = data.draw(st.permutations(tiny.test_ids))
    labels = data.draw(st.lists(st.sampled_from(tiny.vocab.treatment_labels), min_size=len(order),
                                max_size=len(order)))
    frame = pd.DataFrame({"id_code": order, "sirna": labels})
    if list(order) == tiny.test_ids:
        validate_submission(frame, tiny)
    else:
        with pytest.raises(DataError, match="sample_submission order"):
            validate_submission(frame, tiny)


@FEW
@given(data=st.data())
def test_validation_refuses_a_repeated_well_or_a_label_that_is_not_a_treatment(tiny, data):
    wells = tiny.wells[(tiny.wells["split"] == "train") & (tiny.wells["well_type"] == "treatment")]
    ids = data.draw(st.lists(st.sampled_from(wells["id_code"].tolist()), min_size=2, max_size=10, unique=True))
    labels = data.draw(st.lists(st.sampled_from(tiny.vocab.treatment_labels), min_size=len(ids), max_size=len(ids)))
    frame = pd.DataFrame({"id_code": ids, "sirna": labels})
    validate_submission(frame, tiny)  # any treatment labels for any train wells, in any order
    i = data.draw(st.integers(0, len(ids) - 1))
    repeated = pd.concat([frame, frame.iloc[[i]]], ignore_index=True)
    with pytest.raises(DataError, match="repeats id_code"):
        validate_submission(repeated, tiny)
    foreign = frame.copy()
    control = data.draw(st.sampled_from([c for c in tiny.vocab.labels if c not in tiny.vocab.treatment_labels]
                                        + ["9999", "sirna_1"]))
    foreign.loc[i, "sirna"] = control
    with pytest.raises(DataError, match="not a treatment"):
        validate_submission(foreign, tiny)


@settings(FEW, max_examples=max(EXAMPLES // 4, 2))
@given(data=st.data(), seed=seeds)
def test_evaluate_equals_submit_then_score(tiny, data, seed):
    """The numbers of ``rcic evaluate`` are those of ``rcic submit`` + ``rcic score`` on the same logits."""
    wells = tiny.wells[(tiny.wells["split"] == "train") & (tiny.wells["well_type"] == "treatment")]
    experiments = data.draw(st.lists(st.sampled_from(sorted(wells["experiment"].unique())), min_size=1,
                                     unique=True))
    chosen = wells[wells["experiment"].isin(experiments)].sample(frac=1, random_state=seed % 2**31)
    rng = np.random.default_rng(seed)
    classes = list(tiny.vocab.labels)
    values = rng.normal(0, 2, (len(chosen), len(classes))).astype(np.float32)
    values[:, [c not in tiny.vocab.treatment_labels for c in classes]] += 50  # controls never win a treatment well
    logits = Logits(chosen["id_code"].to_numpy(), values, classes)
    evaluated = evaluate_logits(tiny, logits)
    assert evaluated["acc_leak"] is not None  # the data's plate groups are usable: the leak was applied
    answers = wells.rename(columns={"label": "sirna"})[["id_code", "sirna"]]
    for leak, key in ((True, "acc_leak"), (False, "acc")):
        submission = make_submission(tiny, logits, leak=leak).frame
        scored = score(submission, answers, tiny)
        assert evaluated[key] == pytest.approx(scored["accuracy"], abs=1e-12)
        truth = answers.set_index("id_code").loc[submission["id_code"], "sirna"].to_numpy()
        assert scored["accuracy"] == pytest.approx((submission["sirna"].to_numpy() == truth).mean(), abs=1e-12)
        for experiment, result in evaluated["experiments"].items():
            assert result[key] == pytest.approx(scored["by_experiment"][experiment], abs=1e-12)
        for cell_type, result in evaluated["per_cell_type"].items():
            assert result[key] == pytest.approx(scored["by_cell_type"][cell_type], abs=1e-12)
    assert evaluated["wells"] == len(chosen)
