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
