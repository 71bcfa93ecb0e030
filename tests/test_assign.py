"""The plate leak: rotation choice and per-plate linear assignment, on known optima and the real CSVs."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from rcic.assign import assign_plates, choose_rotations, pseudo_labels, score_wells, treatment_log_probs
from rcic.io import read_dataset
from rcic.io.metadata import PlateGroups
from rcic.predict import Logits
from rcic.submit import make_submission, score
from tests.conftest import need_real_csvs


def _toy(n_per_group=4, rotation=3, seed=0, signal=3.0):
    """One experiment, 4 plates; plate p carries group (p - 1 + rotation) % 4; noisy logits."""
    rng = np.random.default_rng(seed)
    classes = [str(i) for i in range(4 * n_per_group)]
    groups = PlateGroups(tuple(frozenset(classes[g * n_per_group:(g + 1) * n_per_group]) for g in range(4)))
    rows, truth = [], []
    for p in range(1, 5):
        members = sorted(groups.groups[(p - 1 + rotation) % 4], key=int)
        for k, c in enumerate(rng.permutation(members)):
            rows.append({"id_code": f"X-01_{p}_B{k + 3:02d}", "experiment": "X-01", "plate": p})
            truth.append(classes.index(c))
    logp = rng.normal(0, 1, (len(rows), len(classes)))
    logp[np.arange(len(rows)), truth] += signal
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    return pd.DataFrame(rows), logp, classes, groups, np.array(truth)


def test_rotation_choice_finds_the_unseen_fourth_rotation():
    wells, logp, classes, groups, _ = _toy(rotation=3)
    choice = choose_rotations(wells, logp, classes, groups)["X-01"]
    assert choice.rotation == 3 and choice.order == (3, 0, 1, 2)
    assert choice.margin > 0 and choice.permutations_agree


def test_assignment_is_optimal_and_unique_per_plate():
    wells, logp, classes, groups, truth = _toy(n_per_group=5, signal=1.5, seed=3)
    choices = choose_rotations(wells, logp, classes, groups)
    assigned = assign_plates(wells, logp, classes, groups, choices)
    for p in range(1, 5):
        rows = np.flatnonzero(wells.plate.to_numpy() == p)
        allowed = sorted(groups.groups[choices["X-01"].order[p - 1]], key=int)
        cols = [classes.index(c) for c in allowed]
        assert len(set(assigned[rows])) == len(rows) and set(assigned[rows]) <= set(cols)
        best = max(sum(logp[r, c] for r, c in zip(rows, perm)) for perm in itertools.permutations(cols))
        assert np.isclose(sum(logp[r, assigned[r]] for r in rows), best)
    # with a weak signal the assignment beats the arg-max
    assert (assigned == truth).mean() >= (logp.argmax(1) == truth).mean()


def test_pseudo_labels_take_the_most_confident_wells():
    wells, logp, classes, groups, truth = _toy(signal=4.0)
    assigned = assign_plates(wells, logp, classes, groups, choose_rotations(wells, logp, classes, groups))
    chosen = pseudo_labels(wells, logp, assigned, classes, 0.25)
    assert len(chosen) == 4 and chosen.confidence.is_monotonic_decreasing
    rest = np.exp(logp[np.arange(len(assigned)), assigned])
    assert chosen.confidence.min() >= np.sort(rest)[-4] - 1e-12


def test_leak_on_the_real_structure():
    """Noisy logits on the 36,515 real training wells: rotations recovered, accuracy up, one siRNA per plate."""
    ds = read_dataset(need_real_csvs())
    wells = ds.wells[(ds.wells.split == "train") & (ds.wells.well_type == "treatment")]
    classes = list(ds.vocab.labels)
    rng = np.random.default_rng(0)
    truth = ds.vocab.encode(wells.label)
    logits = rng.normal(0, 1, (len(wells), len(classes))).astype(np.float32)
    logits[np.arange(len(wells)), truth] += 3.5
    sub = make_submission(ds, Logits(wells.id_code.to_numpy(), logits, classes), leak=True)
    plain = make_submission(ds, Logits(wells.id_code.to_numpy(), logits, classes), leak=False)
    answers = wells.rename(columns={"label": "sirna"})
    with_leak, without = score(sub.frame, answers)["accuracy"], score(plain.frame, answers)["accuracy"]
    assert with_leak > without + 0.15, (with_leak, without)
    exp = sub.experiments.set_index("experiment")
    assert (exp.rotation.astype(int) == pd.Series(ds.plate_groups.orders).map(ds.plate_groups.rotation)).all()
    merged = sub.frame.merge(ds.wells, on="id_code")
    assert not merged.duplicated(["experiment", "plate", "sirna"]).any()


def test_real_test_submission_shape():
    ds = read_dataset(need_real_csvs())
    ids = np.array(ds.test_ids)
    logits = np.random.default_rng(1).normal(size=(len(ids), len(ds.vocab))).astype(np.float32)
    sub = make_submission(ds, Logits(ids[::-1].copy(), logits, list(ds.vocab.labels)), leak=True)
    assert sub.frame.id_code.tolist() == ds.test_ids and len(sub.frame) == 19_897
    assert sub.frame.sirna.astype(int).between(0, 1107).all()  # never a control class
    assert len(sub.experiments) == 18


def test_pseudo_labels_by_hand():
    wells = pd.DataFrame({"id_code": ["a", "b", "c", "d"]})
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.9, 0.05, 0.05]])
    chosen = pseudo_labels(wells, np.log(probs), np.array([0, 1, 2, 0]), ["x", "y", "z"], 0.5)
    assert list(chosen.columns) == ["id_code", "label", "confidence"]
    assert chosen.id_code.tolist() == ["d", "b"] and chosen.label.tolist() == ["x", "y"]
    np.testing.assert_allclose(chosen.confidence, [0.9, 0.8])
    # equal confidences keep the table's order (a stable sort), also past numpy's small-array insertion sort
    confidence = np.random.default_rng(0).choice([0.3, 0.5, 0.9], size=64)
    many = pd.DataFrame({"id_code": [f"w{i:02d}" for i in range(64)]})
    log_probs = np.log(np.stack([confidence, 1 - confidence], axis=1))
    tied = pseudo_labels(many, log_probs, np.zeros(64, int), ["x", "y"], 0.5)
    expected = sorted(range(64), key=lambda i: -confidence[i])[:32]
    assert tied.id_code.tolist() == [f"w{i:02d}" for i in expected]


def test_treatment_log_probs_drop_control_columns_and_renormalise():
    logits = np.array([[1.0, 2.0, 50.0, 3.0], [0.0, 0.0, -5.0, 0.0]])
    log_probs, kept = treatment_log_probs(logits, ["t1", "t2", "ctrl", "t3"], {"t1", "t2", "t3"})
    assert kept == ["t1", "t2", "t3"]
    expected = np.log(np.exp([[1, 2, 3], [0, 0, 0]]) / np.exp([[1, 2, 3], [0, 0, 0]]).sum(1, keepdims=True))
    np.testing.assert_allclose(log_probs, expected, rtol=1e-12)


def test_score_wells_by_hand():
    """Arg-max and leak accuracies overall, per cell type and per experiment, on two experiments."""
    parts = [_toy(n_per_group=3, rotation=r, seed=s, signal=1.0) for r, s in ((1, 5), (2, 6))]
    wells = pd.concat([p[0].assign(experiment=e, cell_type=e[0], id_code=e + p[0].id_code.str[4:])
                       for p, e in zip(parts, ("A-01", "B-01"))], ignore_index=True)
    log_probs = np.concatenate([p[1] for p in parts])
    classes, groups = parts[0][2], parts[0][3]
    truth = np.concatenate([p[4] for p in parts])
    wells["label"] = [classes[t] for t in truth]
    result = score_wells(wells, log_probs, classes, groups, center="none")
    plain = log_probs.argmax(1) == truth
    choices = choose_rotations(wells, log_probs, classes, groups)
    leak = assign_plates(wells, log_probs, classes, groups, choices) == truth
    assert plain.mean() < leak.mean()  # the case tells the two apart
    assert result["acc"] == pytest.approx(plain.mean()) and result["acc_leak"] == pytest.approx(leak.mean())
    assert result["wells"] == len(wells)
    for key, column in (("per_cell_type", "cell_type"), ("experiments", "experiment")):
        assert sorted(result[key]) == sorted(wells[column].unique())
        for name, scores in result[key].items():
            mask = (wells[column] == name).to_numpy()
            assert scores["acc"] == pytest.approx(plain[mask].mean())
            assert scores["acc_leak"] == pytest.approx(leak[mask].mean())
    assert all(s["wells"] == 4 * 3 for s in result["experiments"].values())
    # no usable plate groups: no leak accuracy, the arg-max one unchanged
    for unusable in (None, PlateGroups(groups.groups[:3])):
        other = score_wells(wells, log_probs, classes, unusable, center="none")
        assert other["acc_leak"] is None and other["acc"] == result["acc"]
        assert all(s["acc_leak"] is None for s in other["per_cell_type"].values())


def test_assignment_agreement_counts_the_wells_the_assignment_leaves_as_they_are():
    from rcic.assign import assignment_agreement

    # one plate of group 0 (classes 0-3): wells 0 and 1 both lean to class 0, well 1 less, so the
    # assignment moves well 1 to its second choice (1); wells 2 and 3 already name 2 and 3
    wells, _, classes, groups, _ = _toy(n_per_group=4, rotation=0)
    logp = np.full((16, 16), -20.0)
    plate1 = np.flatnonzero(wells.plate.to_numpy() == 1)
    for p in range(2, 5):  # the other plates: each well sure of a distinct class of its plate's group
        rows = np.flatnonzero(wells.plate.to_numpy() == p)
        logp[rows, [4 * (p - 1) + k for k in range(4)]] = -0.1
    w0, w1, w2, w3 = plate1
    logp[w0, 0], logp[w1, 0], logp[w1, 1], logp[w2, 2], logp[w3, 3] = -0.1, -0.5, -0.6, -0.1, -0.1
    assert assignment_agreement(wells, logp, classes, groups) == pytest.approx(15 / 16)
    # well 1 sure of class 1 too: nothing left to correct
    logp[w1, 1] = -0.05
    assert assignment_agreement(wells, logp, classes, groups) == 1.0
    for unusable in (None, PlateGroups(groups.groups[:3])):  # as the leak, it needs the 4 plate groups
        with pytest.raises(ValueError, match="4 usable plate groups"):
            assignment_agreement(wells, logp, classes, unusable)
