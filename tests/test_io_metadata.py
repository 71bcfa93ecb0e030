"""Readers of the three layouts, the site table, the class vocabulary and the plate groups."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from rcic.errors import DataError
from rcic.io import derive_plate_groups, detect_layout, read_dataset
from tests.conftest import need_real_csvs, run_cli

REAL_2019 = {
    "layout": "kaggle-2019", "train_wells": 36515, "test_wells": 19897, "train_control_wells": 4097,
    "test_control_wells": 2246, "train_experiments": 33, "test_experiments": 18,
    "cell_types": ["HEPG2", "HUVEC", "RPE", "U2OS"], "treatment_classes": 1108, "plate_groups": 4,
}


def test_info_json_on_real_2019_csvs():
    out = run_cli("info", need_real_csvs(), "--json").stdout
    summary = json.loads(out)
    assert {k: summary[k] for k in REAL_2019} == REAL_2019


def test_site_table_and_plate_groups_on_real_csvs():
    ds = read_dataset(need_real_csvs())
    assert len(ds.sites) == 125_510 and set(ds.sites["site"]) == {1, 2}
    assert list(ds.sites.columns) == ["id_code", "experiment", "plate", "well", "site", "cell_type", "split",
                                      "well_type", "label"]
    assert (ds.sites.loc[(ds.sites.split == "test") & (ds.sites.well_type == "treatment"), "label"] == "").all()
    groups = ds.plate_groups
    assert [len(g) for g in groups.groups] == [277] * 4
    assert set().union(*groups.groups) == set(ds.vocab.treatment_labels)
    # train uses three cyclic rotations of one order; the fourth is left for test
    assert {groups.rotation(o) for o in groups.orders.values()} == {0, 1, 2}
    # every labelled plate carries exactly one group
    treated = ds.wells[(ds.wells.split == "train") & (ds.wells.well_type == "treatment")]
    for (exp, plate), labels in treated.groupby(["experiment", "plate"])["label"]:
        g = groups.orders[exp][plate - 1]
        assert set(labels) <= groups.groups[g]
    assert ds.vocab.labels[:2] == ("0", "1") and ds.vocab.labels[-1] == "1138"
    assert ds.vocab.n_treatments == 1108 and ds.vocab.n_positive == 30
    assert ds.test_ids[:2] == ["HEPG2-08_1_B03", "HEPG2-08_1_B04"]


def _as_2023(src, dst):
    """The real CSVs respelt as the current Kaggle download: sirna_<k> (shuffled numbering), UNTREATED."""
    rng = np.random.default_rng(0)
    numbering = rng.permutation(1138)
    spell = {k: f"sirna_{numbering[k]}" for k in range(1138)} | {1138: "UNTREATED"}
    for name in ("train.csv", "test.csv", "train_controls.csv", "test_controls.csv", "sample_submission.csv"):
        frame = pd.read_csv(src / name)
        if "sirna" in frame and name != "sample_submission.csv":
            frame["sirna"] = frame["sirna"].map(spell)
        if name == "sample_submission.csv":
            frame["sirna"] = "sirna_826"
        frame.to_csv(dst / name, index=False)
    return spell


def test_kaggle_2023_layout_keeps_string_labels(tmp_path):
    spell = _as_2023(need_real_csvs(), tmp_path)
    assert detect_layout(tmp_path) == "kaggle-2023"
    ds = read_dataset(tmp_path)
    summary = ds.summary()
    assert {k: summary[k] for k in REAL_2019 if k != "layout"} == {k: v for k, v in REAL_2019.items() if k != "layout"}
    assert ds.vocab.labels[-1] == "UNTREATED"
    assert set(ds.vocab.treatment_labels) == {spell[k] for k in range(1108)}
    assert ds.wells.loc[ds.wells.id_code == "HEPG2-01_1_B02", "label"].item() == "UNTREATED"


def test_rxrx1_release_layout(tmp_path):
    src = need_real_csvs()
    frames = []
    for name, split in (("train.csv", "train"), ("test.csv", "test"), ("train_controls.csv", "train"),
                        ("test_controls.csv", "test")):
        f = pd.read_csv(src / name)
        if "well_type" not in f:
            f["well_type"] = "treatment"
        if "sirna" not in f:  # the full release labels test wells too
            f["sirna"] = 0
        f["dataset"] = split
        frames.append(f)
    wells = pd.concat(frames, ignore_index=True)
    sites = wells.loc[wells.index.repeat(2)].reset_index(drop=True)
    sites["site"] = [1, 2] * len(wells)
    meta = pd.DataFrame({
        "site_id": sites.id_code + "_" + sites.site.astype(str), "well_id": sites.id_code,
        "cell_type": sites.experiment.str.split("-").str[0], "dataset": sites.dataset,
        "experiment": sites.experiment, "plate": sites.plate, "well": sites.well, "site": sites.site,
        "well_type": sites.well_type, "sirna": "s" + (sites.sirna + 100).astype(str), "sirna_id": sites.sirna})
    meta.to_csv(tmp_path / "metadata.csv", index=False)
    summary = json.loads(run_cli("info", tmp_path, "--json").stdout)
    assert summary["layout"] == "rxrx1"
    assert (summary["train_wells"], summary["test_wells"], summary["treatment_classes"]) == (36515, 19897, 1108)
    assert summary["plate_groups"] == 4 and summary["train_experiments"] == 33


@pytest.fixture()
def small_kaggle(tmp_path):
    """A minimal, valid Kaggle 2019 folder written by hand (one plate, controls, a test well)."""
    (tmp_path / "train.csv").write_text("id_code,experiment,plate,well,sirna\nHEPG2-01_1_B03,HEPG2-01,1,B03,5\n"
                                        "HEPG2-01_1_B04,HEPG2-01,1,B04,7\n")
    (tmp_path / "test.csv").write_text("id_code,experiment,plate,well\nHEPG2-02_1_B03,HEPG2-02,1,B03\n")
    head = "id_code,experiment,plate,well,sirna,well_type\n"
    (tmp_path / "train_controls.csv").write_text(head + "HEPG2-01_1_B02,HEPG2-01,1,B02,1138,negative_control\n")
    (tmp_path / "test_controls.csv").write_text(head + "HEPG2-02_1_B02,HEPG2-02,1,B02,1138,negative_control\n")
    return tmp_path


BAD_INPUT = [
    ("missing file", lambda d: (d / "test.csv").unlink(), "test.csv: file not found"),
    ("misspelt column", lambda d: _edit(d / "train.csv", "sirna", "sirnaa", 1), "missing column(s) sirna"),
    ("duplicate id_code", lambda d: _edit(d / "train.csv", "HEPG2-01_1_B04,HEPG2-01,1,B04",
                                          "HEPG2-01_1_B03,HEPG2-01,1,B03"), "duplicate id_code 'HEPG2-01_1_B03'"),
    ("id_code disagrees", lambda d: _edit(d / "train.csv", "HEPG2-01,1,B04", "HEPG2-01,2,B04"),
     "disagrees with its columns"),
    ("unknown well", lambda d: _edit(d / "train.csv", "B04,HEPG2-01,1,B04", "Z99,HEPG2-01,1,Z99"),
     "unknown well name 'Z99'"),
    ("plate outside 1-4", lambda d: _edit(d / "train.csv", "HEPG2-01_1_B04,HEPG2-01,1", "HEPG2-01_5_B04,HEPG2-01,5"),
     "plate '5' outside 1-4"),
    ("duplicate across files", lambda d: _edit(d / "train_controls.csv", "HEPG2-01_1_B02,HEPG2-01,1,B02",
                                               "HEPG2-01_1_B03,HEPG2-01,1,B03"), "duplicate id_code"),
]


def _edit(path, old, new, count=-1):
    path.write_text(path.read_text().replace(old, new, count))


@pytest.mark.parametrize("case,break_it,message", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_line_exit_2(small_kaggle, case, break_it, message):
    assert json.loads(run_cli("info", small_kaggle, "--json").stdout)["train_wells"] == 2
    break_it(small_kaggle)
    proc = run_cli("info", small_kaggle, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr
    assert str(small_kaggle) in lines[0]  # names the file or folder


def test_missing_folder_and_unknown_layout(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_dataset(tmp_path / "nope")
    with pytest.raises(DataError, match="no train.csv"):
        read_dataset(tmp_path)


def test_plate_groups_from_labels_not_literals():
    # 8 treatments in 4 groups of 2; experiment B rotated by one plate
    rows = []
    groups = [("a", "b"), ("c", "d"), ("e", "f"), ("g", "h")]
    for exp, rot in (("X-01", 0), ("X-02", 1)):
        for p in range(1, 5):
            for label in groups[(p - 1 + rot) % 4]:
                rows.append({"experiment": exp, "plate": p, "well_type": "treatment", "label": label})
    found = derive_plate_groups(pd.DataFrame(rows))
    assert [set(g) for g in found.groups] == [set(g) for g in groups]
    assert found.orders == {"X-01": (0, 1, 2, 3), "X-02": (1, 2, 3, 0)}
    assert found.usable and found.rotation((3, 0, 1, 2)) == 3


def test_plate_groups_survive_a_stray_well():
    """A well whose label belongs to another group (as in the 2023 files' extra wells) merges nothing."""
    rows = []
    groups = [("a", "b", "c"), ("d", "e", "f"), ("g", "h", "i"), ("j", "k", "l")]
    for exp, rot in (("X-01", 0), ("X-02", 1), ("X-03", 2)):
        for p in range(1, 5):
            for label in groups[(p - 1 + rot) % 4]:
                rows.append({"experiment": exp, "plate": p, "well_type": "treatment", "label": label})
    rows.append({"experiment": "X-03", "plate": 1, "well_type": "treatment", "label": "a"})  # stray
    found = derive_plate_groups(pd.DataFrame(rows))
    assert [set(g) for g in found.groups] == [set(g) for g in groups]
    assert found.orders["X-03"] == (2, 3, 0, 1)


# ----------------------------------------------------------------------------------------------
# Hand-made folders: exact results and exact error lines (fast; what bench/mutation.py runs)
# ----------------------------------------------------------------------------------------------


def _error(folder) -> str:
    with pytest.raises(DataError) as err:
        read_dataset(folder)
    return str(err.value)


def test_small_kaggle_2019_summary_vocab_and_test_ids(small_kaggle):
    ds = read_dataset(small_kaggle)
    assert ds.summary() == {
        "layout": "kaggle-2019", "root": str(small_kaggle), "train_wells": 2, "test_wells": 1,
        "train_control_wells": 1, "test_control_wells": 1, "train_experiments": 1, "test_experiments": 1,
        "cell_types": ["HEPG2"], "treatment_classes": 2, "positive_control_classes": 0,
        "negative_control_classes": 1, "plate_groups": 1, "sites": 10}
    assert ds.vocab.labels == ("5", "7", "1138") and ds.channels == 6
    assert ds.test_ids == ["HEPG2-02_1_B03"]
    assert ds.sites[["id_code", "site", "split", "label"]].values.tolist() == [
        ["HEPG2-02_1_B02", 1, "test", "1138"], ["HEPG2-02_1_B02", 2, "test", "1138"],
        ["HEPG2-02_1_B03", 1, "test", ""], ["HEPG2-02_1_B03", 2, "test", ""],
        ["HEPG2-01_1_B02", 1, "train", "1138"], ["HEPG2-01_1_B02", 2, "train", "1138"],
        ["HEPG2-01_1_B03", 1, "train", "5"], ["HEPG2-01_1_B03", 2, "train", "5"],
        ["HEPG2-01_1_B04", 1, "train", "7"], ["HEPG2-01_1_B04", 2, "train", "7"]]


def test_a_test_csv_with_labels_keeps_its_wells_unlabelled(small_kaggle):
    (small_kaggle / "test.csv").write_text("id_code,experiment,plate,well,sirna\nHEPG2-02_1_B03,HEPG2-02,1,B03,5\n")
    ds = read_dataset(small_kaggle)
    assert ds.wells.loc[ds.wells.id_code == "HEPG2-02_1_B03", "label"].item() == ""
    assert ds.summary()["test_wells"] == 1 and ds.test_ids == ["HEPG2-02_1_B03"]


def test_sample_submission_sets_the_test_order_and_must_match_test_csv(small_kaggle):
    (small_kaggle / "test.csv").write_text("id_code,experiment,plate,well\nHEPG2-02_1_B03,HEPG2-02,1,B03\n"
                                           "HEPG2-02_1_B04,HEPG2-02,1,B04\n")
    (small_kaggle / "sample_submission.csv").write_text("id_code,sirna\nHEPG2-02_1_B04,1\nHEPG2-02_1_B03,1\n")
    assert read_dataset(small_kaggle).test_ids == ["HEPG2-02_1_B04", "HEPG2-02_1_B03"]
    for body in ("HEPG2-02_1_B04,1\nHEPG2-02_1_B05,1\n", "HEPG2-02_1_B04,1\nHEPG2-02_1_B04,1\nHEPG2-02_1_B03,1\n"):
        (small_kaggle / "sample_submission.csv").write_text("id_code,sirna\n" + body)
        assert _error(small_kaggle) == f"{small_kaggle}/sample_submission.csv: id_code values do not match test.csv"


@pytest.fixture()
def small_2023(small_kaggle):
    """small_kaggle spelt as the current Kaggle download; sirna_9 / sirna_10 check the natural order."""
    _edit(small_kaggle / "train.csv", "B03,5", "B03,sirna_10")
    _edit(small_kaggle / "train.csv", "B04,7", "B04,sirna_9")
    for name in ("train_controls.csv", "test_controls.csv"):
        _edit(small_kaggle / name, ",1138,", ",UNTREATED,")
    return small_kaggle


def test_kaggle_2023_spelling_detected_and_labels_in_natural_order(small_2023):
    assert detect_layout(small_2023) == "kaggle-2023"
    ds = read_dataset(small_2023)
    assert ds.layout == "kaggle-2023" and ds.vocab.labels == ("sirna_9", "sirna_10", "UNTREATED")
    assert ds.vocab.encode(["sirna_10", "UNTREATED", "", "sirna_11"]).tolist() == [1, 2, -1, -1]


def test_plate_groups_numbered_by_natural_order_without_a_full_experiment():
    """No experiment has all 4 plates labelled: groups are numbered by their first label, 3 before 5."""
    rows = [{"experiment": "X-01", "plate": p, "well_type": "treatment", "label": label}
            for p, labels in ((1, ("5", "6")), (2, ("3", "10"))) for label in labels]
    found = derive_plate_groups(pd.DataFrame(rows))
    assert found.groups == (frozenset({"3", "10"}), frozenset({"5", "6"})) and found.orders == {}
    assert not found.usable


# (file, old, new) edits of small_kaggle and the exact error line; {d} is the folder
KAGGLE_ERRORS = [
    ("empty train.csv", [("train.csv", None, "")], "{d}/train.csv: empty file (no header)"),
    ("extra field, first row", [("train.csv", "B03,5", "B03,5,9")],
     "{d}/train.csv: rows have more fields than the header"),
    ("extra field, later row", [("train.csv", "B04,7", "B04,7,9")],
     "{d}/train.csv: not a readable CSV (Error tokenizing data. C error: Expected 5 fields in line 3, saw 6)"),
    ("repeated column", [("train.csv", "well,sirna\n", "well,sirna,sirna\n")],
     "{d}/train.csv: column 'sirna' appears 2 times in the header"),
    ("not utf-8", [("test.csv", "HEPG2-02,1", "HEPG2-\xe9,1")], "{d}/test.csv: not a text CSV (not UTF-8)"),
    ("missing column", [("test_controls.csv", ",well_type\n", "\n"), ("test_controls.csv", ",negative_control", "")],
     "{d}/test_controls.csv: missing column(s) well_type; found id_code, experiment, plate, well, sirna"),
    ("two missing columns", [("test_controls.csv", ",sirna,well_type\n", "\n"),
                             ("test_controls.csv", ",1138,negative_control", "")],
     "{d}/test_controls.csv: missing column(s) sirna, well_type; found id_code, experiment, plate, well"),
    ("plate 5", [("train.csv", "HEPG2-01_1_B04,HEPG2-01,1", "HEPG2-01_5_B04,HEPG2-01,5")],
     "{d}/train.csv: plate '5' outside 1-4 (row 3)"),
    ("plate 0", [("train.csv", "HEPG2-01_1_B04,HEPG2-01,1", "HEPG2-01_0_B04,HEPG2-01,0")],
     "{d}/train.csv: plate '0' outside 1-4 (row 3)"),
    ("plate x", [("train.csv", "HEPG2-01_1_B04,HEPG2-01,1", "HEPG2-01_x_B04,HEPG2-01,x")],
     "{d}/train.csv: plate 'x' outside 1-4 (row 3)"),
    ("well Z99", [("train.csv", "B04,HEPG2-01,1,B04", "Z99,HEPG2-01,1,Z99")],
     "{d}/train.csv: unknown well name 'Z99' (row 3)"),
    ("well B25", [("train.csv", "B04,HEPG2-01,1,B04", "B25,HEPG2-01,1,B25")],
     "{d}/train.csv: unknown well name 'B25' (row 3)"),
    ("empty experiment", [("train.csv", "B04,HEPG2-01,", "B04,,")], "{d}/train.csv: empty experiment (row 3)"),
    ("experiment with a slash", [("train.csv", "HEPG2-01_1_B04,HEPG2-01", "HEPG2/01_1_B04,HEPG2/01")],
     "{d}/train.csv: experiment 'HEPG2/01' is not a plain name (letters, digits, - _ . only; row 3)"),
    ("id_code disagrees", [("train.csv", "HEPG2-01,1,B04", "HEPG2-01,2,B04")],
     "{d}/train.csv: id_code 'HEPG2-01_1_B04' disagrees with its columns (expected 'HEPG2-01_2_B04', row 3)"),
    ("duplicate id_code", [("train.csv", "HEPG2-01_1_B04,HEPG2-01,1,B04", "HEPG2-01_1_B03,HEPG2-01,1,B03")],
     "{d}/train.csv: duplicate id_code 'HEPG2-01_1_B03' (row 3)"),
    ("unknown well_type", [("train_controls.csv", "negative_control", "negative")],
     "{d}/train_controls.csv: unknown well_type 'negative' (row 2)"),
    ("empty sirna", [("train.csv", "B04,7", "B04,")], "{d}/train.csv: empty sirna label (row 3)"),
    ("empty control sirna", [("test_controls.csv", "1138", "")], "{d}/test_controls.csv: empty sirna label (row 2)"),
    ("2023 label in 2019 data", [("train.csv", "B04,7", "B04,sirna_7")],
     "{d}/train.csv: label 'sirna_7' (row 3) is not an integer label (0, 1, ...) as in the rest of this "
     "kaggle-2019 data (mixed label spellings?)"),
    ("leading zero", [("train_controls.csv", "1138", "01138")],
     "{d}/train_controls.csv: label '01138' (row 2) is not an integer label (0, 1, ...) as in the rest of this "
     "kaggle-2019 data (mixed label spellings?)"),
    ("duplicate across files",
     [("train_controls.csv", "HEPG2-01_1_B02,HEPG2-01,1,B02", "HEPG2-01_1_B03,HEPG2-01,1,B03")],
     "{d}: duplicate id_code 'HEPG2-01_1_B03' (in train.csv, train_controls.csv)"),
    ("label of two kinds", [("test_controls.csv", "1138", "5")],
     "{d}: label '5' names different kinds of well (treatment in train.csv, negative_control in test_controls.csv)"),
    ("treatment label among the controls", [("train.csv", "B04,7", "B04,99999")],
     "{d}/train.csv: treatment label '99999' of well HEPG2-01_1_B04 is outside the treatment range of this data "
     "(controls start at 1138)"),
]


def _break(folder, edits):
    for name, old, new in edits:
        path = folder / name
        if old is None:
            path.write_text(new)
        else:
            text = path.read_text()
            assert old in text, (name, old)
            path.write_bytes(text.replace(old, new).encode("latin-1"))


@pytest.mark.parametrize("case,edits,message", KAGGLE_ERRORS, ids=[c[0] for c in KAGGLE_ERRORS])
def test_kaggle_error_names_the_file_row_and_problem(small_kaggle, case, edits, message):
    _break(small_kaggle, edits)
    assert _error(small_kaggle) == message.format(d=small_kaggle)


KAGGLE_2023_ERRORS = [
    ("integer label in 2023 data", [("train_controls.csv", "UNTREATED", "1138")],
     "{d}/train_controls.csv: label '1138' (row 2) is not a label spelt sirna_<k> or UNTREATED as in the rest of "
     "this kaggle-2023 data (mixed label spellings?)"),
    ("treatment called UNTREATED", [("train.csv", "B04,sirna_9", "B04,UNTREATED"),
                                    ("train_controls.csv", "UNTREATED,negative_control", "sirna_1108,positive_control"),
                                    ("test_controls.csv", "UNTREATED,negative_control", "sirna_1108,positive_control")],
     "{d}/train.csv: treatment well HEPG2-01_1_B04 has the negative-control label UNTREATED"),
]


@pytest.mark.parametrize("case,edits,message", KAGGLE_2023_ERRORS, ids=[c[0] for c in KAGGLE_2023_ERRORS])
def test_kaggle_2023_error_names_the_file_row_and_problem(small_2023, case, edits, message):
    _break(small_2023, edits)
    assert _error(small_2023) == message.format(d=small_2023)


def test_test_csv_that_is_a_folder_a_fifo_or_missing(small_kaggle):
    import os

    path = small_kaggle / "test.csv"
    path.unlink()
    assert _error(small_kaggle) == f"{path}: file not found"
    path.mkdir()
    assert _error(small_kaggle) == f"{path}: is a folder, not a CSV file"
    path.rmdir()
    os.mkfifo(path)
    assert _error(small_kaggle) == f"{path}: is not a regular file (a FIFO, socket or device): not a CSV file"


def test_data_folder_that_is_missing_a_file_or_empty(tmp_path):
    assert _error(tmp_path / "nope") == f"{tmp_path}/nope: data folder not found"
    (tmp_path / "file").write_text("x")
    assert _error(tmp_path / "file") == f"{tmp_path}/file: is not a folder"
    assert _error(tmp_path) == (f"{tmp_path}: no train.csv (Kaggle layout) or metadata.csv (RxRx1 / WILDS release) "
                                "in this folder")


def test_check_trainable_refuses_controls_only(small_kaggle):
    read_dataset(small_kaggle).check_trainable()  # two labelled treatment wells: fine
    (small_kaggle / "train.csv").write_text("id_code,experiment,plate,well,sirna\n")
    with pytest.raises(DataError) as err:
        read_dataset(small_kaggle).check_trainable()
    assert str(err.value) == (f"{small_kaggle}/train.csv: no labelled treatment wells to train on (a train.csv with "
                              "a header but no rows?)")


# The full release / WILDS release: one metadata.csv row per site
RELEASE_WELLS = [  # experiment, plate, well, well_type, sirna, sirna_id, dataset (WILDS: U2OS-01 is val)
    ("HEPG2-01", 1, "B02", "negative_control", "EMPTY", "1138", "train"),
    ("HEPG2-01", 1, "B03", "treatment", "s100", "5", "train"),
    ("HEPG2-01", 2, "B03", "treatment", "s200", "7", "train"),
    ("U2OS-01", 1, "B02", "negative_control", "EMPTY", "1138", "test"),
    ("U2OS-01", 1, "B03", "treatment", "s100", "5", "test"),
]


def _release(folder, wilds=False, edits=(), drop=()):
    """metadata.csv of RELEASE_WELLS, two sites per well; ``edits``: (line, column, value), header = line 1."""
    rows = []
    for exp, plate, well, kind, sirna, sirna_id, split in RELEASE_WELLS:
        split = "val" if wilds and exp == "U2OS-01" else split
        for site in (1, 2):
            rows.append({"site_id": f"{exp}_{plate}_{well}_{site}", "well_id": f"{exp}_{plate}_{well}",
                         "cell_type": exp.split("-")[0], "dataset": split, "experiment": exp, "plate": str(plate),
                         "well": well, "site": str(site), "well_type": kind, "sirna": sirna, "sirna_id": sirna_id})
    frame = pd.DataFrame(rows).drop(columns=list(drop))
    for line, column, value in edits:
        frame.loc[line - 2, column] = value
    frame.to_csv(folder / "metadata.csv", index=False)
    return folder


def test_release_reads_sites_with_the_sirna_column_and_wilds_with_sirna_id(tmp_path):
    ds = read_dataset(_release(tmp_path))
    assert ds.layout == "rxrx1" and detect_layout(tmp_path) == "rxrx1"
    assert ds.sites[["id_code", "plate", "site", "split", "label"]].values.tolist() == [
        ["U2OS-01_1_B02", 1, 1, "test", "EMPTY"], ["U2OS-01_1_B02", 1, 2, "test", "EMPTY"],
        ["U2OS-01_1_B03", 1, 1, "test", "s100"], ["U2OS-01_1_B03", 1, 2, "test", "s100"],
        ["HEPG2-01_1_B02", 1, 1, "train", "EMPTY"], ["HEPG2-01_1_B02", 1, 2, "train", "EMPTY"],
        ["HEPG2-01_1_B03", 1, 1, "train", "s100"], ["HEPG2-01_1_B03", 1, 2, "train", "s100"],
        ["HEPG2-01_2_B03", 2, 1, "train", "s200"], ["HEPG2-01_2_B03", 2, 2, "train", "s200"]]
    assert ds.test_ids == ["U2OS-01_1_B03"] and ds.vocab.labels == ("s100", "s200", "EMPTY")
    assert read_dataset(_release(tmp_path, drop=["sirna"])).vocab.labels == ("5", "7", "1138")

    wilds = read_dataset(_release(tmp_path, wilds=True))
    assert wilds.layout == "wilds" and wilds.channels == 3
    assert wilds.vocab.labels == ("5", "7", "1138")
    assert wilds.summary() == {
        "layout": "wilds", "root": str(tmp_path), "train_wells": 2, "test_wells": 0, "train_control_wells": 1,
        "test_control_wells": 0, "train_experiments": 1, "test_experiments": 0, "cell_types": ["HEPG2", "U2OS"],
        "treatment_classes": 2, "positive_control_classes": 0, "negative_control_classes": 1, "plate_groups": 2,
        "sites": 10, "val_wells": 1, "val_control_wells": 1, "val_experiments": 1}


# (wilds?, edits, dropped columns, the exact error line with {m} the metadata.csv)
RELEASE_ERRORS = [
    ("no label column", False, [], ["sirna", "sirna_id"], "{m}: missing column sirna_id (the labels of the rxrx1 "
                                                           "layout)"),
    ("wilds without sirna_id", True, [], ["sirna_id"], "{m}: missing column sirna_id (the labels of the wilds layout)"),
    ("no dataset column", False, [], ["dataset"], "{m}: missing column(s) dataset; found site_id, well_id, cell_type, "
                                                  "experiment, plate, well, site, well_type, sirna, sirna_id"),
    ("plate 5", False, [(3, "plate", "5")], [], "{m}: plate '5' outside 1-4 (row 3)"),
    ("well Z99", False, [(3, "well", "Z99")], [], "{m}: unknown well name 'Z99' (row 3)"),
    ("site 3", False, [(3, "site", "3")], [], "{m}: site '3' outside 1-2 (row 3)"),
    ("site 0", False, [(3, "site", "0")], [], "{m}: site '0' outside 1-2 (row 3)"),
    ("dataset misspelt", False, [(2, "dataset", "trian"), (3, "dataset", "trian")], [],
     "{m}: unknown dataset 'trian' (row 2; expected train / test)"),
    ("wilds dataset misspelt", True, [(2, "dataset", "trian"), (3, "dataset", "trian")], [],
     "{m}: unknown dataset 'trian' (row 2; expected train / val / test)"),
    ("well_type misspelt", False, [(4, "well_type", "treat"), (5, "well_type", "treat")], [],
     "{m}: unknown well_type 'treat' (row 4)"),
    ("one row in another split", False, [(3, "dataset", "test")], [],
     "{m}: experiment HEPG2-01 has dataset 'test' on 1 row(s) (first: row 3) and 'train' on 5: an experiment is in "
     "one split"),
    ("wilds: one row in val", True, [(7, "dataset", "val")], [],
     "{m}: experiment HEPG2-01 has dataset 'val' on 1 row(s) (first: row 7) and 'train' on 5: an experiment is in "
     "one split"),
    ("empty train label", False, [(5, "sirna", "")], [], "{m}: empty sirna label (row 5)"),
    ("wilds: empty val label", True, [(10, "sirna_id", "")], [], "{m}: empty sirna_id label (row 10)"),
    ("duplicate site", False, [(5, "site", "1")], [], "{m}: duplicate site HEPG2-01_1_B03_s1 (row 5)"),
    ("sites disagree", False, [(5, "sirna", "s999")], [],
     "{m}: the sites of well 'HEPG2-01_1_B03' disagree on its split, well type or label"),
    ("wilds: label spelling", True, [(4, "sirna_id", "s5"), (5, "sirna_id", "s5")], [],
     "{m}: label 's5' (row 4) is not an integer label (0, 1, ...) as in the rest of this wilds data (mixed label "
     "spellings?)"),
    ("wilds: treatment among the controls", True, [(6, "sirna_id", "99999"), (7, "sirna_id", "99999")], [],
     "{m}: treatment label '99999' of well HEPG2-01_2_B03 is outside the treatment range of this data (controls "
     "start at 1138)"),
    ("wilds: a label of two kinds", True, [(6, "sirna_id", "1138"), (7, "sirna_id", "1138")], [],
     "{m}: label '1138' names different kinds of well (negative_control in metadata.csv, treatment in metadata.csv)"),
]


@pytest.mark.parametrize("case,wilds,edits,drop,message", RELEASE_ERRORS, ids=[c[0] for c in RELEASE_ERRORS])
def test_release_error_names_the_file_row_and_problem(tmp_path, case, wilds, edits, drop, message):
    _release(tmp_path, wilds=wilds, edits=edits, drop=drop)
    assert _error(tmp_path) == message.format(m=tmp_path / "metadata.csv")


def test_release_test_wells_need_no_label_but_wilds_ones_do(tmp_path):
    ds = read_dataset(_release(tmp_path, edits=[(10, "sirna", ""), (11, "sirna", "")]))
    assert ds.wells.loc[ds.wells.id_code == "U2OS-01_1_B03", "label"].item() == ""


def test_check_site_table_accepts_what_read_dataset_made_and_refuses_defects(small_kaggle):
    from rcic.io.metadata import SITE_COLUMNS, check_site_table

    sites = read_dataset(small_kaggle).sites
    stored = sites.astype(str)
    back = check_site_table(stored, "kaggle-2019", "store/sites.csv")
    assert back.values.tolist() == sites.values.tolist() and list(back.columns) == SITE_COLUMNS  # plate, site: int

    def refused(frame, layout="kaggle-2019"):
        with pytest.raises(DataError) as err:
            check_site_table(frame, layout, "store/sites.csv")
        return str(err.value)

    assert refused(stored, "kaggle") == ("store/sites.csv: unknown layout 'kaggle' (expected one of kaggle-2019, "
                                         "kaggle-2023, rxrx1, wilds)")
    assert refused(stored[SITE_COLUMNS[::-1]]) == (
        "store/sites.csv: columns label, well_type, split, cell_type, site, well, plate, experiment, id_code are not "
        "the site table's (id_code, experiment, plate, well, site, cell_type, split, well_type, label)")
    assert refused(stored.assign(cell_type=["HEPG2"] * 9 + ["U2OS"])) == (
        "store/sites.csv: cell_type 'U2OS' disagrees with its experiment (row 11)")
    assert refused(stored.assign(split=stored["split"].replace("test", "val"))) == (
        "store/sites.csv: unknown split 'val' (row 2; expected train / test)")
    assert refused(stored.assign(label=stored["label"].replace("5", ""))) == "store/sites.csv: empty label (row 8)"
    assert refused(stored.assign(label=stored["label"].replace("1138", ""))) == "store/sites.csv: empty label (row 2)"
    assert refused(stored.assign(well_type=stored["well_type"].replace("negative_control", "neg"))) == (
        "store/sites.csv: unknown well_type 'neg' (row 2)")
