"""predict -> submit -> score from the CLI, TTA kernels, ensembles, pseudo-labels and bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from rcic.assign import center_log_probs
from rcic.errors import DataError
from rcic.io import read_dataset
from rcic.predict import Logits, average_logits, load_logits, save_logits
from rcic.submit import (
    evaluate_logits,
    leak_pseudo_labels,
    make_submission,
    read_submission_csv,
    score,
    wilds_scores,
    write_submission,
)
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def predictions(tiny_run, tiny_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("pred")
    run_cli("predict", tiny_run, "--data", tiny_store, "--split", "val", "--tta", "8", "--out", out / "val.npz")
    run_cli("predict", tiny_run, "--data", tiny_store, "--split", "test", "--tta", "2", "--embeddings",
            "--out", out / "test.npz")
    run_cli("predict", tiny_run, tiny_run, "--data", tiny_store, "--split", "test", "--tta", "1",
            "--checkpoint", "last", "--out", out / "test_last.npz")
    return out


def test_logits_files(predictions, tiny_run, tiny_data):
    ds = read_dataset(tiny_data)
    val, test = load_logits(predictions / "val.npz"), load_logits(predictions / "test.npz")
    classes = json.loads((tiny_run / "run.json").read_text())["classes"]
    assert val.classes == classes == test.classes and val.logits.dtype == np.float32
    assert sorted(test.id_code) == sorted(ds.test_ids)  # one row per well (sites averaged)
    assert test.extra["embeddings"].shape[0] == len(test.id_code)
    val_experiments = json.loads((tiny_run / "run.json").read_text())["val_experiments"]
    assert {i.rsplit("_", 2)[0] for i in val.id_code} == set(val_experiments)
    truth = ds.wells.set_index("id_code").loc[val.id_code, "label"]
    assert (val.extra["labels"] == truth.to_numpy()).all()


def test_submit_and_score(predictions, tiny_data, tmp_path):
    sub = tmp_path / "sub.csv"
    proc = run_cli("submit", "--data", tiny_data, "--logits", predictions / "test.npz", "--out", sub)
    assert "rotation" in proc.stdout
    frame = pd.read_csv(sub, dtype=str)
    sample = pd.read_csv(tiny_data / "sample_submission.csv", dtype=str)
    assert frame.id_code.tolist() == sample.id_code.tolist()
    ds = read_dataset(tiny_data)
    assert set(frame.sirna) <= set(ds.vocab.treatment_labels)
    merged = frame.merge(ds.wells, on="id_code")
    assert not merged.duplicated(["experiment", "plate", "sirna"]).any()
    result = json.loads(run_cli("score", "--data", tiny_data, "--submission", sub, "--answers",
                                tiny_data / "answers.csv", "--json").stdout)
    answers = pd.read_csv(tiny_data / "answers.csv", dtype=str).set_index("id_code")["sirna"]
    hit = pd.Series(frame.sirna.to_numpy() == answers.loc[frame.id_code].to_numpy(), index=frame.id_code)
    cell_type, experiment = hit.index.str.split("-").str[0], hit.index.str.rsplit("_", n=2).str[0]
    assert result["accuracy"] == pytest.approx(hit.mean()) and result["wells"] == len(frame)
    assert result["by_cell_type"] == pytest.approx(hit.groupby(cell_type).mean().to_dict())
    assert result["by_experiment"] == pytest.approx(hit.groupby(experiment).mean().to_dict())
    assert set(result["by_cell_type"]) == {"HEPG2", "HUVEC"} and len(result["by_experiment"]) == 2
    # ensemble of two logits files, arg-max: each well gets the treatment class of its mean logits
    run_cli("submit", "--data", tiny_data, "--logits", predictions / "test.npz", "--logits",
            predictions / "test_last.npz", "--no-leak", "--center", "none", "--out", tmp_path / "ens.csv")
    ensemble = pd.read_csv(tmp_path / "ens.csv", dtype=str)
    a, b = load_logits(predictions / "test.npz"), load_logits(predictions / "test_last.npz")
    mean = (pd.DataFrame(a.logits, index=a.id_code) + pd.DataFrame(b.logits, index=b.id_code)) / 2
    treatments = [i for i, c in enumerate(a.classes) if c in set(ds.vocab.treatment_labels)]
    expected = [a.classes[treatments[k]] for k in mean.loc[sample.id_code].to_numpy()[:, treatments].argmax(1)]
    assert ensemble.id_code.tolist() == sample.id_code.tolist() and ensemble.sirna.tolist() == expected
    # a validation submission (plate leak) scored against train.csv: every val well, scored by hand
    run_cli("submit", "--data", tiny_data, "--logits", predictions / "val.npz", "--out", tmp_path / "val.csv")
    val = json.loads(run_cli("score", "--submission", tmp_path / "val.csv", "--answers", tiny_data / "train.csv",
                             "--json").stdout)
    val_sub = pd.read_csv(tmp_path / "val.csv", dtype=str)
    train = pd.read_csv(tiny_data / "train.csv", dtype=str).set_index("id_code")["sirna"]
    assert sorted(val_sub.id_code) == sorted(load_logits(predictions / "val.npz").id_code)
    assert val["wells"] == len(val_sub)
    assert val["accuracy"] == pytest.approx((val_sub.sirna.to_numpy() == train.loc[val_sub.id_code].to_numpy()).mean())


def test_average_logits_aligns_rows_by_id(tmp_path):
    """Ensemble members list their wells in different orders: each well's mean is over its own rows."""
    classes = ["a", "b", "c"]
    first = Logits(np.array(["w1", "w2", "w3"]), np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], np.float32), classes)
    second = Logits(np.array(["w3", "w1", "w2"]), np.array([[0, 0, 3], [5, 0, 1], [0, 1, 0]], np.float32), classes)
    third = Logits(np.array(["w2", "w3", "w1"]), np.array([[2, 2, 2], [2, 4, 0], [0, 4, 8]], np.float32), classes)
    for name, member in (("1", first), ("2", second), ("3", third)):
        save_logits(tmp_path / f"{name}.npz", member)
    mean = average_logits([tmp_path / "1.npz", tmp_path / "2.npz", tmp_path / "3.npz"])
    assert mean.id_code.tolist() == ["w1", "w2", "w3"] and mean.classes == classes
    # by hand: w1 = ([1,2,3] + [5,0,1] + [0,4,8]) / 3, w2 = ([4,5,6] + [0,1,0] + [2,2,2]) / 3, w3 = ...
    np.testing.assert_allclose(mean.logits, np.array([[6, 6, 12], [6, 8, 8], [9, 12, 12]]) / 3, rtol=1e-6)
    save_logits(tmp_path / "other_wells.npz", Logits(np.array(["w1", "w2", "w4"]), first.logits, classes))
    save_logits(tmp_path / "other_classes.npz", Logits(first.id_code, first.logits, ["a", "c", "b"]))
    for bad, message in (("other_wells", "wells differ"), ("other_classes", "classes differ")):
        with pytest.raises(DataError, match=message):
            average_logits([tmp_path / "1.npz", tmp_path / f"{bad}.npz"])


def test_bad_input(predictions, tiny_data, tiny_run, tmp_path):
    good = load_logits(predictions / "test.npz")
    nan = good.logits.copy()
    nan[3, 2] = np.nan
    np.savez(tmp_path / "nan.npz", id_code=good.id_code, logits=nan, classes=np.array(good.classes))
    np.savez(tmp_path / "ids.npz", id_code=np.array(["HEPG2-99_1_B03"] + list(good.id_code[1:])),
             logits=good.logits, classes=np.array(good.classes))
    cases = [(["--logits", tmp_path / "nan.npz"], "NaN or infinite logits"),
             (["--logits", tmp_path / "ids.npz"], "not wells of this data"),
             (["--logits", tmp_path / "missing.npz"], "logits file not found")]
    for args, message in cases:
        out = tmp_path / "sub.csv"
        proc = run_cli("submit", "--data", tiny_data, *args, "--out", out, check=False)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert not out.exists() and not list(tmp_path.glob(".sub*"))
    (tmp_path / "empty_run").mkdir()
    proc = run_cli("predict", tmp_path / "empty_run", "--data", tiny_data, "--out", tmp_path / "x.npz", check=False)
    assert proc.returncode == 2 and "no best checkpoint" in proc.stderr and not (tmp_path / "x.npz").exists()


def test_pseudo_labels_join_training(predictions, tiny_store, tmp_path):
    out = tmp_path / "pseudo"
    run_cli("train", "--data", tiny_store, "--recipe", "cpu-demo", "--out", out, "--set", "data.num_workers=0",
            "--set", "data.batch_size=16", "--set", "trainer.epochs=1", "--set", "data.folds=2",
            "--pseudo", predictions / "test.npz", "--pseudo-fraction", "0.5")
    info = json.loads((out / "run.json").read_text())
    n_test_wells = len(load_logits(predictions / "test.npz").id_code)
    assert info["pseudo_sites"] == 2 * round(0.5 * n_test_wells)


def test_submission_keeps_2023_label_spelling(tmp_path):
    """A kaggle-2023 dataset gets sirna_<k> labels back, in sample_submission order."""
    run_cli("synth", tmp_path / "d", "--preset", "tiny", "--image-size", "16", "--label-style", "kaggle-2023")
    ds = read_dataset(tmp_path / "d")
    ids = np.array(ds.test_ids)
    rng = np.random.default_rng(0)
    save_logits(tmp_path / "l.npz", Logits(ids, rng.normal(size=(len(ids), len(ds.vocab))).astype(np.float32),
                                           list(ds.vocab.labels)))
    run_cli("submit", "--data", tmp_path / "d", "--logits", tmp_path / "l.npz", "--out", tmp_path / "s.csv")
    sub = pd.read_csv(tmp_path / "s.csv", dtype=str)
    assert sub.id_code.tolist() == ds.test_ids and sub.sirna.str.fullmatch(r"sirna_\d+").all()
    assert set(sub.sirna) <= set(ds.vocab.treatment_labels)


# ----------------------------------------------------------------------------------------------
# The submission library on metadata only (seconds; what bench/mutation.py runs for rcic.submit)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plates(plate_csvs):
    return read_dataset(plate_csvs)


def _train_answers(ds) -> pd.DataFrame:
    wells = ds.wells[(ds.wells.split == "train") & (ds.wells.well_type == "treatment")]
    return wells.rename(columns={"label": "sirna"})[["id_code", "sirna"]].reset_index(drop=True)


def _random_logits(ds, ids, seed=0, signal=0.0) -> Logits:
    rng = np.random.default_rng(seed)
    classes = list(ds.vocab.labels)
    values = rng.normal(0, 1, (len(ids), len(classes))).astype(np.float32)
    labels = ds.wells.set_index("id_code").loc[list(ids), "label"]
    known = [classes.index(label) if label else -1 for label in labels]
    for row, column in enumerate(known):
        if column >= 0:
            values[row, column] += signal
    return Logits(np.asarray(ids), values, classes)


def test_score_by_hand_and_what_it_refuses(plates):
    answers = _train_answers(plates)
    experiment = answers.id_code.str.rsplit("_", n=2).str[0]
    chosen = sorted(experiment.unique())[:2]
    sub = answers[experiment.isin(chosen)].reset_index(drop=True)
    treatments = list(plates.vocab.treatment_labels)
    wrong = sub.index[::3]
    sub.loc[wrong, "sirna"] = [treatments[(treatments.index(s) + 1) % len(treatments)] for s in sub.sirna[wrong]]
    result = score(sub, answers, plates)
    hit = pd.Series(sub.sirna.to_numpy() == answers.set_index("id_code").loc[sub.id_code, "sirna"].to_numpy())
    sub_experiment = sub.id_code.str.rsplit("_", n=2).str[0]
    assert result["accuracy"] == pytest.approx(hit.mean()) and 0 < hit.mean() < 1
    assert result["wells"] == len(sub) and result["experiments"] == chosen
    assert result["by_experiment"] == pytest.approx(hit.groupby(sub_experiment).mean().to_dict())
    assert result["by_cell_type"] == pytest.approx(hit.groupby(sub_experiment.str.split("-").str[0]).mean().to_dict())
    first = sub_experiment[0]
    cases = [(sub.iloc[1:], None, f"covers {int((sub_experiment == first).sum()) - 1} of the "
                                  f"{int((sub_experiment == first).sum())} wells of experiment {first}"),
             (pd.concat([sub, pd.DataFrame({"id_code": ["HEPG2-99_1_B02"], "sirna": ["1"]})]), None,
              "1 submitted wells have no answer (first 'HEPG2-99_1_B02')"),
             (sub.assign(sirna=sub.sirna.where(sub.index != 0, "sirna_1")), None,
              "label 'sirna_1' is not spelt as the answers' labels (integers)"),
             (sub.assign(sirna=sub.sirna.where(sub.index != 0, plates.vocab.labels[-1])), plates,
              "is not a treatment label")]
    for frame, dataset, message in cases:
        with pytest.raises(DataError, match=re.escape(message)):
            score(frame.reset_index(drop=True), answers, dataset)
    stranger = pd.DataFrame({"id_code": ["HEPG2-99_1_B02"], "sirna": ["1"]})
    with pytest.raises(DataError, match="not wells of"):
        score(stranger, pd.concat([answers, stranger]), plates)


def test_read_submission_csv_refuses_empty_or_repeated_files(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("id_code,sirna\n")
    (tmp_path / "twice.csv").write_text("id_code,sirna\nA-01_1_B02,3\nA-01_1_B02,4\n")
    (tmp_path / "good.csv").write_text("id_code,sirna\nA-01_1_B02,3\nA-01_1_B03,sirna_4\n")
    for name, message in (("empty", "empty submission file"), ("header", "header but no rows"),
                          ("twice", "duplicate id_code 'A-01_1_B02'")):
        with pytest.raises(DataError, match=message):
            read_submission_csv(tmp_path / f"{name}.csv")
    good = read_submission_csv(tmp_path / "good.csv")
    assert good.to_dict("list") == {"id_code": ["A-01_1_B02", "A-01_1_B03"], "sirna": ["3", "sirna_4"]}


def test_make_submission_labels_by_hand_and_its_refusals(plates, tmp_path):
    ids = plates.test_ids
    logits = _random_logits(plates, ids[::-1], seed=3)  # rows in another order than the submission's
    plain = make_submission(plates, logits, leak=False)  # the model's own log-probabilities by default
    treatments = [i for i, c in enumerate(logits.classes) if c in set(plates.vocab.treatment_labels)]
    row = {k: i for i, k in enumerate(logits.id_code)}
    best = logits.logits[[row[i] for i in ids]][:, treatments].argmax(1)
    assert plain.frame.id_code.tolist() == ids
    assert plain.frame.sirna.tolist() == [logits.classes[treatments[k]] for k in best]
    # --center plate: each plate's lean is removed first (rcic.assign.center_log_probs, tested on its own)
    x = logits.logits[[row[i] for i in ids]][:, treatments].astype(np.float64)
    x -= x.max(1, keepdims=True)
    centered = center_log_probs(plates.wells.set_index("id_code").loc[ids].reset_index(),
                                x - np.log(np.exp(x).sum(1, keepdims=True)))
    assert make_submission(plates, logits, leak=False, center="plate").frame.sirna.tolist() == \
        [logits.classes[treatments[k]] for k in centered.argmax(1)]
    leak = make_submission(plates, logits, leak=True)
    merged = leak.frame.merge(plates.wells, on="id_code")
    assert leak.frame.id_code.tolist() == ids and not merged.duplicated(["experiment", "plate", "sirna"]).any()
    groups = plates.plate_groups
    for (experiment, plate), rows in merged.groupby(["experiment", "plate"]):
        order = leak.experiments.set_index("experiment").loc[experiment, "order"]
        assert set(rows.sirna) <= groups.groups[int(order[plate - 1])]  # the plate's group only
    write_submission(tmp_path / "s.csv", leak)
    assert pd.read_csv(tmp_path / "s.csv", dtype=str).equals(leak.frame.reset_index(drop=True).astype(str))
    control = plates.wells[plates.wells.well_type != "treatment"].id_code.iloc[0]
    train = _train_answers(plates).id_code.tolist()[:5]
    refusals = [(_random_logits(plates, ids[:-1]), "logits cover"),
                (_random_logits(plates, train + [control]), "control well"),
                (Logits(logits.id_code, logits.logits[:, :3], ["x", "y", "z"]), "not labels of this data"),
                (Logits(logits.id_code, logits.logits[:, 1:], logits.classes[1:]), "the logits lack 1 of"),
                (Logits(np.array(["HEPG2-99_1_B02"]), logits.logits[:1], logits.classes), "not wells of this data")]
    for bad, message in refusals:
        with pytest.raises(DataError, match=message) as error:
            make_submission(plates, bad)
        assert str(error.value).startswith(f"{plates.root}: ")  # names the data it checked against


def test_evaluate_names_the_data_of_wells_without_labels(plates):
    with pytest.raises(DataError, match="have no label in the data") as error:
        evaluate_logits(plates, _random_logits(plates, plates.test_ids))
    assert str(error.value).startswith(f"{plates.root}: ")


def test_wilds_scores_by_hand():
    """Accuracy per image over all classes; a well's repeated missing site is no image."""
    wells = pd.DataFrame({"label": ["a", "b", "a", "c"], "cell_type": ["X", "X", "Y", "Y"],
                          "real_sites": [2, 1, 2, 2]})
    site_logits = np.zeros((4, 2, 3), np.float32)  # classes a, b, c; arg-max per site:
    for well, sites in enumerate([("a", "b"), ("b", "a"), ("a", "a"), ("b", "c")]):
        for site, label in enumerate(sites):
            site_logits[well, site, "abc".index(label)] = 1.0
    logits = Logits(np.array(["w1", "w2", "w3", "w4"]), site_logits.mean(1), ["a", "b", "c"],
                    site_logits=site_logits)
    result = wilds_scores(wells, logits)
    # images: X: w1 (a ok, b wrong), w2 (site 1 only: b ok) -> 2/3; Y: w3 (ok, ok), w4 (wrong, ok) -> 3/4
    assert result["images"] == 7 and result["per_cell_type"] == pytest.approx({"X": 2 / 3, "Y": 3 / 4})
    assert result["acc_avg"] == pytest.approx(5 / 7) and result["acc_wg"] == pytest.approx(2 / 3)


def test_leak_pseudo_labels_are_the_most_confident_plate_assigned_test_wells(plates):
    ids = plates.test_ids
    logits = _random_logits(plates, ids, seed=4)
    chosen = leak_pseudo_labels(plates, logits, 0.25)
    labels = make_submission(plates, logits, leak=True).frame.set_index("id_code").sirna
    assert len(chosen) == round(0.25 * len(ids)) and chosen.confidence.is_monotonic_decreasing
    assert (chosen.label.to_numpy() == labels.loc[chosen.id_code].to_numpy()).all()
    for fraction in (0.0, 1.5):
        with pytest.raises(DataError, match="--pseudo-fraction must be in"):
            leak_pseudo_labels(plates, logits, fraction)
    with pytest.raises(DataError, match="from test-set logits"):
        leak_pseudo_labels(plates, _random_logits(plates, _train_answers(plates).id_code), 0.5)
