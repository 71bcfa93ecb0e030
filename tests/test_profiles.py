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
