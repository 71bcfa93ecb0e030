"""Embeddings, batch correction and phenomic-map benchmarks: checked against copairs, against hand
computations, and on synthetic data whose biology is known."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from rcic.errors import DataError
from rcic.profiles import (
    DEFAULT_CONTROLS,
    META_COLUMNS,
    correct,
    embedding_frame,
    phenomic_map,
    read_embeddings,
    write_embeddings,
)
from rcic.profiles.metrics import batch_leakage, known_recall, replicate_average_precision
from tests.conftest import run_cli


def _meta(labels, experiments, cell_types=None, well_types=None):
    n = len(labels)
    return pd.DataFrame({"id_code": [f"{e}_1_B{i + 2:02d}" for i, e in enumerate(experiments)],
                         "experiment": experiments, "plate": 1, "well": [f"B{i + 2:02d}" for i in range(n)],
                         "cell_type": cell_types or [e.split("-")[0] for e in experiments],
                         "well_type": well_types or ["treatment"] * n, "label": labels})


def test_average_precision_equals_copairs():
    from copairs.map import average_precision

    rng = np.random.default_rng(0)
    rows = [(f"s{k}", f"{ct}-{e:02d}", ct) for ct in ("HEPG2", "HUVEC") for e in range(1, 5) for k in range(12)]
    meta = _meta([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    signal = {label: rng.normal(size=16) for label in meta["label"].unique()}
    x = np.stack([signal[label] for label in meta["label"]]) + rng.normal(scale=1.5, size=(len(meta), 16))
    ours = replicate_average_precision(meta, x).set_index("row").sort_index()
    theirs = average_precision(meta.reset_index(drop=True), x, pos_sameby=["label", "cell_type"],
                               pos_diffby=["experiment"], neg_sameby=["cell_type"], neg_diffby=["label"],
                               progress_bar=False)
    theirs = theirs.dropna(subset=["average_precision"])
    assert list(ours.index) == list(theirs.index)
    np.testing.assert_allclose(ours["average_precision"], theirs["average_precision"], atol=1e-6)
    assert (ours["n_pos_pairs"].to_numpy() == theirs["n_pos_pairs"].to_numpy()).all()
    assert (ours["n_total_pairs"].to_numpy() == theirs["n_total_pairs"].to_numpy()).all()
    from copairs.map.normalization import normalize_ap

    from rcic.profiles.metrics import normalized_average_precision

    m, n = ours["n_pos_pairs"].to_numpy(), ours["n_total_pairs"].to_numpy() - ours["n_pos_pairs"].to_numpy()
    np.testing.assert_allclose(normalized_average_precision(ours["average_precision"].to_numpy(), m, n),
                               normalize_ap(ours["average_precision"].to_numpy(), m, n), atol=1e-12)


def test_average_precision_by_hand():
    # query a (exp 1); candidates: a' (exp 2, positive) and b, b' (negatives); cosine on 2-D points
    meta = _meta(["a", "a", "b", "b"], ["X-01", "X-02", "X-01", "X-02"])
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.2], [1.0, -0.5]])
    ap = replicate_average_precision(meta, x).set_index("row")
    # for well 0: b (0.98) and b' (0.89) rank above a' (0.0): one positive at rank 3 -> AP = 1/3
    assert ap.loc[0, "average_precision"] == pytest.approx(1 / 3)
    assert ap.loc[0, "n_pos_pairs"] == 1 and ap.loc[0, "n_total_pairs"] == 3


def test_batch_leakage_and_known_recall_by_hand():
    experiments = ["X-01"] * 12 + ["X-02"] * 12
    meta = _meta([f"s{i % 6}" for i in range(24)], experiments)
    x = np.array([[1.0, 0.01 * i] if e == "X-01" else [-1.0, 0.01 * i] for i, e in enumerate(experiments)])
    observed, expected = batch_leakage(meta, x, k=10)
    assert observed == 1.0 and expected == pytest.approx(11 / 23)
    # recall: 4 genes; g0 and g1 identical, g2 and g3 opposite: both pairs in a tail of the 6 pair similarities
    meta = _meta(["s0", "s1", "s2", "s3"], ["X-01"] * 4)
    genes = pd.DataFrame({"label": ["s0", "s1", "s2", "s3"], "gene": ["g0", "g1", "g2", "g3"]})
    x = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.2], [0.0, -1.0, 0.1]])
    pairs = pd.DataFrame({"gene_a": ["g0", "g2"], "gene_b": ["g1", "g3"]})
    recall, interval, n = known_recall(meta, x, genes, pairs, tail=0.2)
    assert n == 2 and recall == 1.0 and interval == (1.0, 1.0)


@pytest.fixture(scope="module")
def intensity_embeddings(tmp_path_factory):
    """Model-free embeddings of synthetic data (channel intensity statistics, as a profiler would give)."""
    from rcic.store import open_source, pack
    from rcic.synth import generate, preset

    folder = tmp_path_factory.mktemp("profiles")
    data = generate(folder / "data", preset("small", image_size=32, test_experiments=2), workers=2)
    source = open_source(pack(data, folder / "s.zarr", workers=2).path)
    sites = source.dataset.sites

    def features(image):
        x = image.reshape(image.shape[0], -1).astype(np.float32)
        return np.concatenate([x.mean(1), x.std(1), *np.percentile(x, [10, 50, 90, 99], axis=1),
                               (x > x.mean(1, keepdims=True)).mean(1)])

    per_site = np.stack([features(source.read_site(r)) for r in sites.to_dict("records")])
    codes, inverse = np.unique(sites["id_code"], return_inverse=True)
    wells = np.zeros((len(codes), per_site.shape[1]))
    np.add.at(wells, inverse, per_site)
    wells /= np.bincount(inverse)[:, None]
    meta = sites.drop_duplicates("id_code").set_index("id_code").loc[codes].reset_index()
    answers = pd.read_csv(data / "answers.csv", dtype=str).set_index("id_code")["sirna"]
    meta["label"] = [answers.get(i, label) or label for i, label in zip(meta["id_code"], meta["label"])]
    path = folder / "emb.parquet"
    write_embeddings(path, embedding_frame(meta, wells))
    return path, data


def test_map_numbers_are_the_metrics_of_the_corrected_embeddings(intensity_embeddings):
    """phenomic_map reports, for each correction, the metrics of exactly that correction's output."""
    from rcic.profiles.metrics import probe_accuracy, replicate_map

    path, data = intensity_embeddings
    meta, x = read_embeddings(path)
    genes, pairs = pd.read_csv(data / "genes.csv", dtype=str), pd.read_csv(data / "relationships.csv", dtype=str)
    result = phenomic_map(meta, x, ["none", "tvn"], genes, pairs, null_size=200)
    for method in ("none", "tvn"):
        z = correct(meta, x, method, controls=DEFAULT_CONTROLS)
        np.testing.assert_allclose(result.corrected[method], z)
        s = result.scores[method]
        assert s["replicate_map"] == pytest.approx(replicate_map(meta, z, null_size=200)[0])
        assert (s["batch_leakage"], s["batch_leakage_expected"]) == pytest.approx(batch_leakage(meta, z))
        assert s["known_recall"] == pytest.approx(known_recall(meta, z, genes, pairs)[0])
        assert s["probe_acc"] == pytest.approx(probe_accuracy(meta, z))
    # the raw features carry the batch: a well's neighbours come from its own experiment more than by chance
    assert result.scores["none"]["batch_leakage"] > result.scores["none"]["batch_leakage_expected"]


def test_probe_holds_out_whole_experiments():
    """Labels a linear model reads off perfectly: every held-out well is right. Labels that exist
    only in the held-out experiments cannot be learnt, and are not counted."""
    from rcic.data.dataset import experiment_folds
    from rcic.profiles.metrics import probe_accuracy

    rng = np.random.default_rng(0)
    experiments = [f"X-{e:02d}" for e in range(1, 7) for _ in range(40)]
    labels = [f"s{i % 8}" for i in range(len(experiments))]
    meta = _meta(labels, experiments)
    x = np.eye(8)[[int(label[1:]) for label in labels]] * 5 + rng.normal(scale=0.1, size=(len(labels), 8))
    assert probe_accuracy(meta, x) == 1.0
    folds = experiment_folds(meta.assign(split="train"), 3, 0)
    held_out = [e for e, f in folds.items() if f == 0]
    # a siRNA present only in the held-out experiments: relabelled wells there, unseen in training
    relabel = meta["experiment"].isin(held_out).to_numpy() & (meta["label"] == "s0").to_numpy()
    assert probe_accuracy(meta.assign(label=np.where(relabel, "new", meta["label"])), x) == 1.0
    # noise only: near chance (1/8), far below the perfect probe
    assert probe_accuracy(meta, rng.normal(size=x.shape)) < 0.4


def test_map_cli_json_report_and_every_correction(intensity_embeddings, tmp_path):
    from rcic.profiles.metrics import replicate_map

    path, data = intensity_embeddings
    args = ["map", path, "--out", tmp_path / "map", "--genes", data / "genes.csv", "--relationships",
            data / "relationships.csv", "--null-size", "200", "--json"]
    for method in ("none", "center", "standardize", "tvn", "spherize", "harmony"):
        args += ["--correct", method]
    proc = run_cli(*args)
    result = json.loads(proc.stdout)
    assert list(result) == ["none", "center", "standardize", "tvn", "spherize", "harmony"]
    written = json.loads((tmp_path / "map" / "scores.json").read_text())
    for method, scores in result.items():
        assert set(scores) == {"replicate_map", "replicate_fraction", "batch_leakage", "known_recall",
                               "known_recall_ci", "probe_acc"}
        assert all(written[method][k] == v for k, v in scores.items())  # what is printed is what is written
    meta, x = read_embeddings(path)
    assert result["none"]["replicate_map"] == pytest.approx(replicate_map(meta, x, null_size=200)[0])
    assert result["center"]["replicate_map"] == pytest.approx(
        replicate_map(meta, correct(meta, x, "center", controls=DEFAULT_CONTROLS), null_size=200)[0])
    assert "no seen_in_training column" in proc.stderr  # rcic embed's column is absent from this table
    assert (tmp_path / "map" / "map.html").is_file() and (tmp_path / "map" / "embeddings.png").is_file()


def _broken(tmp_path, path, change) -> str:
    frame = pd.read_parquet(path)
    out = tmp_path / "bad.parquet"
    change(frame).to_parquet(out)
    return out


@pytest.mark.parametrize("change,message", [
    (lambda f: f.drop(columns=["experiment"]), "missing metadata column(s) experiment"),
    (lambda f: f[[c for c in f.columns if not c.startswith("emb_")]], "no emb_* columns"),
    (lambda f: f.assign(emb_3=np.where(np.arange(len(f)) == 5, np.nan, f["emb_3"])), "NaN"),
    (lambda f: f.assign(well_type="treatment"), "well(s); correction tvn needs at least 2"),
])
def test_map_bad_input_is_one_line_and_writes_nothing(intensity_embeddings, tmp_path, change, message):
    path, _ = intensity_embeddings
    bad = _broken(tmp_path, path, change)
    proc = run_cli("map", bad, "--out", tmp_path / "out", "--correct", "tvn", check=False)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_gene_tables_that_match_nothing(intensity_embeddings, tmp_path):
    path, data = intensity_embeddings
    pd.DataFrame({"label": ["x1", "x2"], "gene": ["A", "B"]}).to_csv(tmp_path / "g.csv", index=False)
    proc = run_cli("map", path, "--out", tmp_path / "out", "--genes", tmp_path / "g.csv", "--relationships",
                   data / "relationships.csv", check=False)
    assert proc.returncode == 2 and "no label of the gene table" in proc.stderr and not (tmp_path / "out").exists()


def test_embed_writes_one_row_per_well(tiny_run, tiny_store, tmp_path):
    out = tmp_path / "e.parquet"
    run_cli("embed", tiny_run, "--data", tiny_store, "--tta", "1", "--out", out)
    frame = pd.read_parquet(out)
    assert list(frame.columns[: len(META_COLUMNS)]) == META_COLUMNS
    features = [c for c in frame.columns if c.startswith("emb_")]
    assert features == [f"emb_{i}" for i in range(len(features))] and len(features) > 8
    from rcic.store import open_source

    ds = open_source(tiny_store).dataset
    assert len(frame) == len(ds.wells) and set(frame.well_type) == set(ds.wells.well_type)
    test = frame[frame.id_code.isin(set(ds.wells[ds.wells.split == "test"].id_code))]
    assert (test[test.well_type == "treatment"].label == "").all()  # unlabelled test treatment wells
    assert (frame[frame.well_type != "treatment"].label != "").all()  # controls keep their labels
    meta, x = read_embeddings(out)
    z = correct(meta, x, "center")
    assert z.shape == x.shape and np.isfinite(z).all()
    run_cli("embed", tiny_run, "--data", tiny_store, "--split", "test", "--tta", "1", "--out", tmp_path / "t.parquet")
    assert set(pd.read_parquet(tmp_path / "t.parquet").id_code) == set(ds.wells[ds.wells.split == "test"].id_code)
    with pytest.raises(DataError):
        correct(meta, x, "zca")


# ----------------------------------------------------------------------------------------------
# Fast checks on hand-made tables (what bench/mutation.py runs for rcic.profiles)
# ----------------------------------------------------------------------------------------------


def _controls_meta(negatives_per_experiment: dict[str, int]) -> pd.DataFrame:
    """Per experiment: that many negative controls, two positive controls of one siRNA, two treatments."""
    rows = []
    for exp, n in negatives_per_experiment.items():
        rows += [("negative_control", "EMPTY")] * n + [("positive_control", "p1")] * 2 + [("treatment", "s1")] * 2
        rows[-(n + 4):] = [(t, label, exp) for t, label in rows[-(n + 4):]]
    return _meta([r[1] for r in rows], [r[2] for r in rows], well_types=[r[0] for r in rows])


def test_corrections_refuse_too_few_controls_unknown_methods_and_control_sets():
    meta = _controls_meta({"X-01": 2, "X-02": 1, "X-03": 0})
    x = np.random.default_rng(0).normal(size=(len(meta), 3))
    with pytest.raises(DataError) as err:
        correct(meta, x, "standardize", controls="negative")
    assert str(err.value) == ("--controls negative: experiment X-02 has 1 negative-control well(s); correction "
                              "standardize needs at least 2 per experiment (2 experiment(s) short; try --controls all "
                              "or within)")
    with pytest.raises(DataError) as err:
        correct(meta, x, "center", controls="negative", source="emb.parquet")
    assert str(err.value) == ("emb.parquet: --controls negative: experiment X-03 has 0 negative-control well(s); "
                              "correction center needs at least 1 per experiment (1 experiment(s) short; try "
                              "--controls all or within)")
    # within: controls of a siRNA with one well in its experiment give no reference row
    single = _meta(["EMPTY", "p1", "p2", "s1"], ["X-01"] * 4,
                   well_types=["negative_control", "positive_control", "positive_control", "treatment"])
    with pytest.raises(DataError) as err:
        correct(single, x[:4], "tvn", controls="within")
    assert str(err.value) == ("--controls within: experiment X-01 has 0 control (in a siRNA with 2+ wells) well(s); "
                              "correction tvn needs at least 2 per experiment (1 experiment(s) short; try --controls "
                              "all or within)")
    assert correct(single, x[:4], "tvn", controls="all").shape == (4, 3)
    np.testing.assert_array_equal(correct(meta, x, "none"), x)  # needs no controls
    for bad, message in [(dict(method="zca"), "unknown correction 'zca'; choose from none, pca, center, standardize, "
                                              "spherize, tvn, harmony, combat, scanorama"),
                         (dict(method="center", controls="some"), "--controls must be one of negative, all, within, "
                                                                  "got 'some'")]:
        with pytest.raises(DataError) as err:
            correct(meta, x, **bad)
        assert str(err.value) == message


def test_controls_all_and_within_pick_every_control_and_center_uses_their_mean():
    meta = _controls_meta({"X-01": 1, "X-02": 2})
    x = np.arange(len(meta) * 2, dtype=float).reshape(-1, 2) ** 1.5
    for controls in ("all", "within"):
        z = correct(meta, x, "center", controls=controls)
        for exp in ("X-01", "X-02"):
            rows = (meta.experiment == exp).to_numpy()
            ref = rows & (meta.well_type != "treatment").to_numpy()
            np.testing.assert_allclose(z[rows], x[rows] - x[ref].mean(0))
    z = correct(meta, x, "center", controls="negative")
    rows = (meta.experiment == "X-01").to_numpy()
    np.testing.assert_allclose(z[rows], x[rows] - x[rows & (meta.well_type == "negative_control").to_numpy()].mean(0))


def test_principal_components_are_the_centred_datas_projections():
    from rcic.profiles.correct import principal_components

    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 4)) @ np.diag([5.0, 3.0, 1.0, 0.5]) + 10
    pcs = principal_components(x)
    assert pcs.shape == (6, 4)  # k = min(50, features, wells - 1)
    centred = x - x.mean(0)
    values, vectors = np.linalg.eigh(np.cov(centred, rowvar=False))
    expected = centred @ vectors[:, ::-1]  # largest variance first
    np.testing.assert_allclose(np.abs(pcs), np.abs(expected), atol=1e-9)
    assert principal_components(x, k=2).shape == (6, 2) and principal_components(x[:3]).shape == (3, 2)
    meta = _meta(["a"] * 6, ["X-01"] * 6)
    np.testing.assert_allclose(correct(meta, x, "pca"), pcs)


def test_scored_wells_leave_out_the_seen_ones_and_say_so():
    from rcic.profiles import scored_wells

    meta = _meta(["a", "b", "c"], ["X-01"] * 3)
    mask, note = scored_wells(meta)
    assert mask.tolist() == [True] * 3
    assert note == ("no seen_in_training column: all 3 wells are treated as unseen by the model that made them "
                    "(rcic embed records it)")
    seen = meta.assign(seen_in_training=[True, False, False])
    mask, note = scored_wells(seen)
    assert mask.tolist() == [False, True, True]
    assert note == "scoring 2 wells unseen in training (1 seen wells left out; --include-seen keeps them)"
    mask, note = scored_wells(seen, include_seen=True)
    assert mask.tolist() == [True] * 3 and note == "scoring all 3 wells, 1 of them seen in training (--include-seen)"
    with pytest.raises(DataError) as err:
        scored_wells(meta.assign(seen_in_training=True))
    assert str(err.value) == ("all 3 wells were seen in training by the model that embedded them: embed held-out "
                              "experiments (rcic embed RUN... --split val) or pass --include-seen")


def test_gene_tables_must_share_labels_and_genes(tmp_path):
    from rcic.profiles import read_gene_tables

    meta = _meta(["s1", "s2", ""], ["X-01"] * 3)
    (tmp_path / "genes.csv").write_text("label,gene\ns1,G1\ns2,G2\n")
    (tmp_path / "rel.csv").write_text("gene_a,gene_b\nG1,G2\n")
    genes, pairs = read_gene_tables(tmp_path / "genes.csv", tmp_path / "rel.csv", meta)
    assert genes.values.tolist() == [["s1", "G1"], ["s2", "G2"]] and pairs.values.tolist() == [["G1", "G2"]]
    (tmp_path / "other.csv").write_text("label,gene\nx1,G1\n")
    with pytest.raises(DataError) as err:
        read_gene_tables(tmp_path / "other.csv", tmp_path / "rel.csv", meta.iloc[:1])
    assert str(err.value) == (f"{tmp_path / 'other.csv'}: no label of the gene table is a label of the embeddings "
                              "(e.g. 'x1' vs 's1'): another dataset or label spelling?")
    (tmp_path / "rel.csv").write_text("gene_a,gene_b\nG1,G9\n")
    with pytest.raises(DataError) as err:
        read_gene_tables(tmp_path / "genes.csv", tmp_path / "rel.csv", meta)
    assert str(err.value) == f"{tmp_path / 'rel.csv'}: no relationship joins two genes of the gene table"
    with pytest.raises(DataError) as err:
        phenomic_map(meta, np.ones((3, 2)), ["none", "zca"])
    assert str(err.value) == ("unknown correction 'zca'; choose from none, pca, center, standardize, spherize, tvn, "
                              "harmony, combat, scanorama")


def test_embeddings_files_round_trip_and_their_defects_are_named(tmp_path):
    meta = _meta(["s1", "", "EMPTY"], ["X-01"] * 3, well_types=["treatment", "treatment", "negative_control"])
    x = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.5]])
    path = tmp_path / "e.parquet"
    write_embeddings(path, embedding_frame(meta, x, seen=np.array([True, False, False])))
    back, features = read_embeddings(path)
    assert back[META_COLUMNS].values.tolist() == meta[META_COLUMNS].values.tolist()
    assert back["seen_in_training"].tolist() == [True, False, False]
    np.testing.assert_array_equal(features, x)
    frame = pd.read_parquet(path)

    def refused(changed, name="bad.parquet") -> str:
        changed.to_parquet(tmp_path / name)
        with pytest.raises(DataError) as err:
            read_embeddings(tmp_path / name)
        return str(err.value).removeprefix(f"{tmp_path / name}: ")

    assert refused(frame.drop(columns=["label", "plate"])) == (
        "missing metadata column(s) plate, label (an embeddings table has id_code, experiment, plate, well, "
        "cell_type, well_type, label and emb_0, emb_1, ...)")
    assert refused(frame.drop(columns=["emb_0", "emb_1"])) == ("no emb_* columns: the features must be columns "
                                                               "emb_0, emb_1, ...")
    assert refused(frame.assign(emb_1=[1.0, np.inf, np.nan])) == ("2 wells have NaN or infinite embeddings (first "
                                                                  "'X-01_1_B03')")
    assert refused(frame.assign(emb_1=["a", "b", "c"])) == "the emb_* columns are not all numbers"
    assert refused(frame.assign(seen_in_training=[1, 0, 0])) == "column seen_in_training must be true/false"
    assert refused(frame.assign(well_type="control")) == ("unknown well_type 'control' (expected treatment, "
                                                          "positive_control, negative_control)")
    assert refused(frame.assign(id_code="X")) == "duplicate id_code 'X'"
    assert refused(frame.iloc[:1]) == "fewer than two wells"
    # emb_10 after emb_9: features in numeric order, not as strings
    wide = embedding_frame(meta, np.arange(33.0).reshape(3, 11))
    wide.to_parquet(tmp_path / "wide.parquet")
    np.testing.assert_array_equal(read_embeddings(tmp_path / "wide.parquet")[1], np.arange(33.0).reshape(3, 11))
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError) as err:
        read_embeddings(tmp_path / "junk.parquet")
    assert str(err.value) == f"{tmp_path / 'junk.parquet'}: not a readable parquet file (ArrowInvalid)"
    with pytest.raises(DataError) as err:
        read_embeddings(tmp_path / "none.parquet")
    assert str(err.value) == f"{tmp_path / 'none.parquet'}: embeddings file not found"
    with pytest.raises(DataError) as err:
        write_embeddings(tmp_path / "e.csv", frame)
    assert str(err.value) == f"{tmp_path / 'e.csv'}: embeddings are written as parquet: give a file name ending in " \
                             ".parquet"


def test_map_scores_are_the_metrics_of_each_corrections_output_on_a_small_table():
    """phenomic_map on a hand-made table (3 experiments x 6 siRNAs x 2 wells + controls): each number equals its
    metric on that correction's output, and progress counts every step."""
    from rcic.profiles.metrics import batch_leakage, probe_accuracy, replicate_map

    rng = np.random.default_rng(3)
    rows = [(f"s{k}", f"HEPG2-0{e}", "treatment") for e in (1, 2, 3) for k in range(6) for _ in range(2)]
    rows += [("EMPTY", f"HEPG2-0{e}", "negative_control") for e in (1, 2, 3) for _ in range(3)]
    meta = _meta([r[0] for r in rows], [r[1] for r in rows], well_types=[r[2] for r in rows])
    signal = {f"s{k}": rng.normal(size=5) * 2 for k in range(6)} | {"EMPTY": np.zeros(5)}
    offset = {e: rng.normal(size=5) * 3 for e in meta.experiment.unique()}
    x = np.stack([signal[r[0]] + offset[r[1]] for r in rows]) + rng.normal(scale=0.5, size=(len(rows), 5))
    genes = pd.DataFrame({"label": [f"s{k}" for k in range(6)], "gene": ["G0", "G0", "G1", "G2", "G3", "G4"]})
    pairs = pd.DataFrame({"gene_a": ["G1", "G2", "G1", "G9"], "gene_b": ["G3", "G4", "G1", "G1"]})  # G9: no siRNA
    steps = []
    result = phenomic_map(meta, x, ["none", "center", "none"], genes, pairs, null_size=50, controls="negative",
                          progress=lambda done, total: steps.append((done, total)))
    assert list(result.scores) == ["none", "center"] and steps == [(i, 15) for i in range(1, 11)]
    for method in ("none", "center"):
        z = correct(meta, x, method, controls="negative")
        np.testing.assert_allclose(result.corrected[method], z)
        s = result.scores[method]
        mean_ap, fraction, per_sirna = replicate_map(meta, z, null_size=50)
        assert (s["replicate_map"], s["replicate_fraction"]) == pytest.approx((mean_ap, fraction))
        assert len(result.per_sirna[method]) == 6
        assert (s["batch_leakage"], s["batch_leakage_expected"]) == pytest.approx(batch_leakage(meta, z))
        recall, interval, n = known_recall(meta, z, genes, pairs)
        assert (s["known_recall"], s["known_recall_ci"], s["known_pairs"]) == (recall, list(interval), n) and n == 2
        assert s["probe_acc"] == pytest.approx(probe_accuracy(meta, z))
    # the raw table carries each experiment's offset: 5 same-experiment wells of 13 expected by chance... and more
    assert result.scores["none"]["batch_leakage_expected"] == pytest.approx(14 / 44)
    assert result.scores["none"]["batch_leakage"] > result.scores["center"]["batch_leakage"]
    bare = phenomic_map(meta, x, ["none"], probe=False)
    assert bare.scores["none"]["known_recall"] is None and bare.scores["none"]["known_pairs"] == 0
    assert bare.scores["none"]["probe_acc"] is None and bare.scores["none"]["known_recall_ci"] is None


def test_average_precision_with_many_positives_equals_a_brute_force_ranking():
    """21 wells per siRNA over 3 experiments: 14 positives a query, past the code's counting shortcuts
    (one comparison pass per positive up to 12, sorted rows beyond): each AP against the ranking itself."""
    rng = np.random.default_rng(7)
    rows = [(f"s{k}", f"X-0{e}") for k in range(20) for e in (1, 2, 3) for _ in range(7)]
    meta = _meta([r[0] for r in rows], [r[1] for r in rows])
    x = rng.normal(size=(len(rows), 6)) + np.repeat(rng.normal(size=(20, 6)), 21, axis=0)
    ours = replicate_average_precision(meta, x).set_index("row").sort_index()
    unit = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    sims = unit @ unit.T
    labels, experiments = meta["label"].to_numpy(), meta["experiment"].to_numpy()
    for i in range(0, len(rows), 17):
        candidate = ~((labels == labels[i]) & (experiments == experiments[i]))
        order = np.flatnonzero(candidate)[np.argsort(-sims[i, candidate], kind="stable")]
        hits = labels[order] == labels[i]
        expected = np.mean(np.cumsum(hits)[hits] / (np.flatnonzero(hits) + 1))
        assert ours.loc[i, "n_pos_pairs"] == 14 and ours.loc[i, "n_total_pairs"] == len(order) == 413
        assert ours.loc[i, "average_precision"] == pytest.approx(expected, abs=1e-6)
