"""RxRx3-core: the download's formats, the EFAAR benchmark against its own package, known answers."""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rcic.rxrx3.benchmark import (
    Map,
    aggregate,
    average_precision,
    compound_gene_benchmark,
    correct_wells,
    known_relationship_recall,
    roc_auc,
)
from rcic.rxrx3.formats import METADATA_COLUMNS, read_embeddings, read_metadata
from rcic.rxrx3.relationships import SOURCES, annotations_dir, filter_relationships
from rcic.synth.rxrx3_core import EMBEDDINGS_FILE, METADATA_FILE, generate_rxrx3_core, rxrx3_preset
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def synth3(tmp_path_factory) -> Path:
    """The tiny synthetic RxRx3-core without images (the formats test writes its own shards)."""
    return _make(tmp_path_factory, "core")


def _make(factory, name: str, **overrides) -> Path:
    out = factory.mktemp("rxrx3") / name
    generate_rxrx3_core(out, rxrx3_preset("tiny", images=False, **overrides))
    return out


def _map(folder: Path, method: str = "pca-centerscale") -> Map:
    meta = read_metadata(folder / METADATA_FILE)
    embedded = read_embeddings(folder / EMBEDDINGS_FILE, meta)
    return aggregate(embedded.metadata, correct_wells(embedded.metadata, embedded.x, method))


@functools.lru_cache(maxsize=1)
def _sources() -> dict[str, pd.DataFrame]:
    folder = annotations_dir()
    return {s: filter_relationships(pd.read_csv(folder / f"{s}.txt")) for s in SOURCES}


# ----------------------------------------------------------------------------------------------
# The oracle: efaar_benchmarking's own known_relationship_benchmark (imported here only)
# ----------------------------------------------------------------------------------------------


def test_recall_equals_efaar_known_relationship_benchmark(synth3, tmp_path):
    benchmarking = pytest.importorskip("efaar_benchmarking.benchmarking")  # needs geomloss, torch, scipy, sklearn
    from sklearn.utils import Bunch

    map_ = _map(synth3)
    genes = set(map_.metadata["perturbation"][map_.metadata["perturbation_type"] == "CRISPR"])
    for source in SOURCES:  # the real files, less the rows a gene of this map is not in: the same pairs, and
        # efaar's row-by-row filter takes seconds, not minutes
        rows = pd.read_csv(annotations_dir() / f"{source}.txt")
        rows[rows["entity1"].isin(genes) & rows["entity2"].isin(genes)].to_csv(tmp_path / f"{source}.txt", index=False)
    expected = benchmarking.known_relationship_benchmark(
        Bunch(features=pd.DataFrame(map_.features), metadata=map_.metadata), "perturbation",
        benchmark_sources=list(SOURCES), recall_thr_pairs=[(0.05, 0.95), (0.1, 0.9)],
        benchmark_data_dir=str(tmp_path)).set_index("source")
    is_gene = (map_.metadata["perturbation_type"] == "CRISPR").to_numpy()
    got = known_relationship_recall(map_.metadata["perturbation"].to_numpy(), map_.features, _sources(),
                                    lookup=is_gene).table.set_index("source")
    assert list(got.index) == list(expected.index) == list(SOURCES)
    for column in ("null_distribution_size", "query_distribution_size"):
        assert (got[column] == expected[column]).all()
    for column in ("recall_0.05_0.95", "recall_0.1_0.9"):
        np.testing.assert_allclose(got[column], expected[column], rtol=0, atol=1e-9)
    # a known answer: with the planted complexes noiseless (genes of one complex share one phenotype exactly), a
    # known pair is a hit exactly when it joins two genes of one complex (complexes.csv)
    planted = tmp_path / "planted"
    generate_rxrx3_core(planted, rxrx3_preset("tiny", images=False, complex_strength=1.0, noise=0.0,
                                              batch_effect=0.0))
    with warnings.catch_warnings():  # noiseless controls are all alike: PCA's unused variance ratio divides 0 by 0
        warnings.simplefilter("ignore", RuntimeWarning)
        clean = _map(planted)
    is_gene = (clean.metadata["perturbation_type"] == "CRISPR").to_numpy()
    recall = known_relationship_recall(clean.metadata["perturbation"].to_numpy(), clean.features, _sources(),
                                       lookup=is_gene).table.set_index("source")["recall_0.05_0.95"]
    complex_of = pd.read_csv(planted / "complexes.csv").set_index("gene")["complex"]
    for source, pairs in _sources().items():
        pairs = pairs[pairs["entity1"].isin(complex_of.index) & pairs["entity2"].isin(complex_of.index)]
        within = (complex_of[pairs["entity1"]].to_numpy() == complex_of[pairs["entity2"]].to_numpy()).mean()
        assert recall[source] == pytest.approx(within), source


def test_recall_falls_to_chance_when_phenotypes_are_shuffled(synth3):
    # the map's rows dealt to random entities: a known pair is then a random pair of the map, whose
    # rank in the null is uniform, so recall at 5/95 is 0.10 (5% in each tail)
    map_ = _map(synth3)
    is_gene = (map_.metadata["perturbation_type"] == "CRISPR").to_numpy()
    sources = {s: _sources()[s] for s in ("CORUM", "HuMAP", "StringDB")}
    hits = pairs = 0
    for seed in range(5):
        shuffled = map_.features[np.random.default_rng(seed).permutation(len(map_.features))]
        table = known_relationship_recall(map_.metadata["perturbation"].to_numpy(), shuffled, sources,
                                          lookup=is_gene).table
        hits += (table["recall_0.05_0.95"] * table["query_distribution_size"]).sum()
        pairs += table["query_distribution_size"].sum()
    assert abs(hits / pairs - 0.10) < 0.03, hits / pairs


def test_efaar_filter_and_planted_pairs():
    # (A,B), (B,A), (A,A), (A,B), (A,X): one pair once X, absent from the map, is dropped
    rows = pd.DataFrame({"entity1": ["A", "B", "A", "A", "A"], "entity2": ["B", "A", "A", "B", "X"]})
    pairs = filter_relationships(rows)
    assert pairs.values.tolist() == [["A", "B"], ["A", "X"]]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 8))
    x[1] = x[0]  # A, B identical: cosine 1, the top of the null
    x[3] = -x[2]  # C, D opposite: cosine -1, the bottom
    labels = ["A", "B", "C", "D", *[f"G{i}" for i in range(6)]]
    result = known_relationship_recall(labels, x, {"S": pairs, "T": pd.DataFrame({"entity1": ["A", "C"],
                                                                                  "entity2": ["B", "D"]})})
    table = result.table.set_index("source")
    assert result.null_size == 45 and table.loc["S", "query_distribution_size"] == 1
    assert table.loc["T", "recall_0.05_0.95"] == 1.0


def test_pca_centerscale_and_aggregation(synth3):
    meta = read_metadata(synth3 / METADATA_FILE)
    embedded = read_embeddings(synth3 / EMBEDDINGS_FILE, meta)
    z = correct_wells(embedded.metadata, embedded.x, "pca-centerscale")
    controls = (embedded.metadata["treatment"] == "EMPTY_control").to_numpy()
    for _, rows in embedded.metadata.groupby("experiment_name").indices.items():
        c = z[rows][controls[rows]]
        np.testing.assert_allclose(c.mean(0), 0, atol=1e-9)
        np.testing.assert_allclose(c.std(0), 1, atol=1e-9)
    map_ = aggregate(embedded.metadata, z)
    crispr = meta[meta["perturbation_type"] == "CRISPR"]
    genes = crispr["treatment"].str.split("_").str[0].nunique()  # every gene and EMPTY_control
    compounds = meta[(meta["perturbation_type"] == "COMPOUND") & ~meta["treatment"].str.contains("_control")]
    kept = compounds[compounds["concentration"] != 0.26].groupby(["treatment", "concentration"]).ngroups
    assert len(map_.metadata) == genes + kept == 71 + 12 * 8
    assert not map_.metadata["perturbation"].str.contains("CRISPR_control").any()
    assert (map_.metadata["perturbation"] == "EMPTY_control").sum() == 1
    assert 0.26 not in set(map_.metadata["concentration"])
    # the map row of a gene is the mean of its guides' wells
    psma1 = embedded.metadata["treatment"].str.startswith("PSMA1_").to_numpy()
    row = map_.metadata.index[map_.metadata["perturbation"] == "PSMA1"][0]
    np.testing.assert_allclose(map_.features[row], z[psma1].mean(0), atol=1e-12)


def test_compound_gene_known_answer_and_sklearn_equality():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(0)
    for trial in range(50):  # ties included: scores on a coarse grid half of the time
        y = (rng.random(30) < 0.3).astype(float)
        y[0], y[1] = 1, 0
        s = rng.integers(0, 4, 30) / 3 if trial % 2 else rng.random(30)
        assert abs(average_precision(y, s) - average_precision_score(y, s)) < 1e-12
        assert abs(roc_auc(y, s) - roc_auc_score(y, s)) < 1e-12
    # compound K parallel (or antiparallel) to its active gene T0 at every concentration, the rest orthogonal
    genes = [f"T{i}" for i in range(24)]
    d = 64
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    rows = [("CRISPR", g, np.nan, basis[i]) for i, g in enumerate(genes)]
    rows += [("COMPOUND", "K", c, (-1) ** k * 2 * basis[0]) for k, c in enumerate((0.01, 1.0))]
    meta = pd.DataFrame([r[:3] for r in rows], columns=["perturbation_type", "perturbation", "concentration"])
    map_ = Map(meta, np.stack([r[3] for r in rows]))
    truth = pd.DataFrame({"gene_symbol": genes + ["T1"], "nM_value": [10.0] + [50000.0] * 23 + [5000.0],
                          "treatment": "K"})
    table, scored = compound_gene_benchmark(map_, truth, seeds=3)
    table = table.set_index("concentration")
    assert scored == 1
    for key in (0.01, 1.0, "max"):
        assert table.loc[key, "ap"] == 1.0 and table.loc[key, "auc"] == 1.0
    assert table.loc[0.1, "ap"] == 0.0 and table.loc[0.1, "auc"] == 0.5  # no case at this concentration


# ----------------------------------------------------------------------------------------------
# The command and its outputs; bad input
# ----------------------------------------------------------------------------------------------


def test_benchmark_command_writes_table_scores_and_page(synth3, tmp_path, monkeypatch):
    from rcic.rxrx3 import relationships

    monkeypatch.setattr(relationships, "_reported", set())
    out = tmp_path / "bench"
    proc = run_cli("benchmark", "rxrx3-core", "--metadata", synth3 / METADATA_FILE, "--embeddings",
                   synth3 / EMBEDDINGS_FILE, "--out", out, "--correct", "pca-centerscale", "--correct", "none",
                   "--compound-genes", synth3 / "compound_gene_interactions.csv", "--seeds", "2")
    assert "CORUM relationships (efaar-benchmarking): licence CC-BY-NC 4.0" in proc.stdout
    assert "SIGNOR relationships" in proc.stdout and "Known-relationship recall" in proc.stdout
    scores = json.loads((out / "scores.json").read_text())
    recall = pd.read_csv(out / "recall.csv")
    assert scores["dataset"]["map_entities"] == 71 + 12 * 8 and scores["dataset"]["null_pairs"] == 167 * 166 // 2
    for row in recall.itertuples():
        assert scores["corrections"][row.correction]["recall"][row.source]["recall_0.05_0.95"] == \
            row._5
    assert scores["best_correction"] in ("pca-centerscale", "none")
    page = (out / "index.html").read_text()
    assert page.index("Known-relationship recall") < page.index("Compound-gene")
    cg = pd.read_csv(out / "compound_gene.csv")
    assert list(cg["concentration"])[:9] == ["0.0025", "0.01", "0.025", "0.1", "0.25", "1.0", "2.5", "10.0", "max"]


def _fails(*args) -> str:
    proc = run_cli(*map(str, args), check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_bad_input_is_one_line_naming_the_file(synth3, tmp_path, monkeypatch):
    from rcic.rxrx3 import relationships

    monkeypatch.setattr(relationships, "_reported", set())  # no licence line before an error either
    meta, emb = synth3 / METADATA_FILE, synth3 / EMBEDDINGS_FILE
    base = ["benchmark", "rxrx3-core", "--metadata", meta, "--out", tmp_path / "o"]
    frame = pd.read_parquet(emb)
    other = frame.copy()
    other.loc[:2, "well_id"] = ["gene-999_1_A01", "gene-999_1_A02", "gene-999_1_A03"]
    other.to_parquet(tmp_path / "other.parquet")
    line = _fails(*base, "--embeddings", tmp_path / "other.parquet")
    assert "other.parquet" in line and f"3 of {len(frame)} well_ids are not in the metadata" in line
    nan = frame.copy()
    nan.loc[5, "feature_3"] = np.nan
    nan.to_parquet(tmp_path / "nan.parquet")
    line = _fails(*base, "--embeddings", tmp_path / "nan.parquet")
    assert "nan.parquet" in line and "1 wells have NaN" in line
    line = _fails(*base, "--embeddings", emb, "--source", "corum", "--source", "biogrid")
    assert "unknown relationship source 'biogrid'" in line and "corum" in line
    truth = pd.read_csv(synth3 / "compound_gene_interactions.csv")
    truth.loc[0, "gene_symbol"] = "NOTAGENE"
    truth.to_csv(tmp_path / "truth.csv", index=False)
    line = _fails(*base, "--embeddings", emb, "--compound-genes", tmp_path / "truth.csv")
    assert "truth.csv" in line and "'NOTAGENE'" in line and "not in the map" in line
    assert not (tmp_path / "o" / "scores.json").exists()
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "efaar_benchmarking" else real(name, *a))
    line = _fails(*base, "--embeddings", emb)
    assert "pip install --no-deps efaar-benchmarking==1.0" in line


def test_synthetic_download_format_and_shards(tmp_path):
    import imagecodecs
    import pyarrow.parquet as pq

    out = tmp_path / "core"
    generate_rxrx3_core(out, rxrx3_preset("tiny", gene_experiments=1, compound_experiments=1, compounds=3,
                                          controls=4, crispr_controls=2, image_size=16))
    with open(out / METADATA_FILE) as f:
        assert f.readline().strip().split(",") == METADATA_COLUMNS
        assert any('"' in line and "|c:" in line for line in f)  # a SMILES with commas is quoted
    meta = read_metadata(out / METADATA_FILE)
    assert meta["address"].str.fullmatch(r"([A-Z]|A[A-F])\d{2}").all()
    assert pd.isna(meta.loc[meta["perturbation_type"] == "CRISPR", "concentration"]).all()
    shard = pq.read_table(sorted((out / "data").glob("*.parquet"))[0])
    assert shard.column_names == ["__key__", "jp2"]
    key, image = shard.column("__key__")[0].as_py(), shard.column("jp2")[0].as_py()
    assert key.endswith("_s1_1") and "/Plate" in key
    plane = imagecodecs.jpeg2k_decode(image["bytes"])
    assert plane.shape == (16, 16) and plane.dtype == np.uint8
    from rcic.rxrx3.images import read_dataset

    dataset = read_dataset(out)
    assert len(dataset.sites) == len(meta) and set(dataset.sites["site"]) == {1}
    # rcic pack reads the shards into a store (1,536-well addresses, one site per well), site for site
    from rcic.store import open_source, pack

    store = open_source(pack(out, tmp_path / "core.zarr", shard=16).path)
    assert store.dataset.layout == "rxrx3-core" and len(store.dataset.sites) == len(meta)
    for row in store.dataset.sites.sample(5, random_state=0).to_dict("records"):
        expected = np.stack([imagecodecs.jpeg2k_decode(image_bytes(out, row["id_code"], c)) for c in range(1, 7)])
        np.testing.assert_array_equal(store.read_site(row), expected)


def image_bytes(root: Path, well_id: str, channel: int) -> bytes:
    import pyarrow.parquet as pq

    experiment, plate, address = well_id.rsplit("_", 2)
    key = f"{experiment}/Plate{plate}/{address}_s1_{channel}"
    for path in sorted((root / "data").glob("*.parquet")):
        table = pq.read_table(path).to_pandas()
        hit = table[table["__key__"] == key]
        if len(hit):
            return hit["jp2"].iloc[0]["bytes"]
    raise KeyError(key)


def test_map_reads_rxrx3_core_and_builtin_relationships(synth3, tmp_path, monkeypatch):
    from rcic.rxrx3 import relationships

    monkeypatch.setattr(relationships, "_reported", set())  # as in a fresh process: the licence not yet shown
    proc = run_cli("map", synth3 / EMBEDDINGS_FILE, "--metadata", synth3 / METADATA_FILE, "--relationships", "CORUM",
                   "--out", tmp_path / "map", "--correct", "none", "--no-probe", "--null-size", "100")
    assert "CORUM relationships (efaar-benchmarking): licence CC-BY-NC 4.0" in proc.stdout
    scores = json.loads((tmp_path / "map" / "scores.json").read_text())["none"]
    # the map's labels are the genes: its pairs are CORUM's pairs among the 70 knocked-out genes
    map_ = _map(synth3, "none")
    is_gene = (map_.metadata["perturbation_type"] == "CRISPR").to_numpy()
    expected = known_relationship_recall(map_.metadata["perturbation"].to_numpy(), map_.features,
                                         {"CORUM": _sources()["CORUM"]}, lookup=is_gene).table
    assert scores["known_pairs"] == expected["query_distribution_size"].iloc[0]


def test_rxrx1_model_embeds_rxrx3_core_as_unseen(tiny_run, tmp_path):
    """An rcic model trained on RxRx1 embeds RxRx3-core (treatments it never saw): every well is unseen,
    and the embeddings feed the benchmark."""
    out = tmp_path / "core"
    generate_rxrx3_core(out, rxrx3_preset("tiny", gene_experiments=1, compound_experiments=1, compounds=3,
                                          controls=4, crispr_controls=2, image_size=32))
    run_cli("pack", out, "--out", tmp_path / "core.zarr", "--workers", "1")
    run_cli("embed", tiny_run, "--data", tmp_path / "core.zarr", "--out", tmp_path / "e.parquet", "--tta", "1")
    frame = pd.read_parquet(tmp_path / "e.parquet")
    meta = read_metadata(out / METADATA_FILE)
    assert sorted(frame["id_code"]) == sorted(meta["well_id"])
    assert not frame["seen_in_training"].any()
    run_cli("benchmark", "rxrx3-core", "--metadata", out / METADATA_FILE, "--embeddings", tmp_path / "e.parquet",
            "--out", tmp_path / "bench", "--json")
    assert json.loads((tmp_path / "bench" / "scores.json").read_text())


def test_replicate_average_precision_of_an_rxrx3_map_equals_copairs_with_ties():
    """Replicate AP on an RxRx3-core-like map (compound doses replicated across experiments, each gene
    in one experiment, controls unlabelled or positive) equals copairs' on the labelled wells, with
    exact ties everywhere: 16-d vectors with four entries of +-1 (unit entries +-0.5), so every
    cosine is a multiple of 1/4 in float32 and float64 alike. Both code paths (the rows-and-columns
    restricted one and the one sharing blocks with the nearest neighbours), the comparison passes,
    the sorted rows (a dose with 15 positives) and the narrow broadcast are all exercised."""
    from copairs.map import average_precision as copairs_ap

    from rcic.profiles.metrics import replicate_average_precision, similarity_scores

    rng = np.random.default_rng(3)
    rows = [(f"cpd{c}@1uM", f"compound-{(c + k) % 4 + 1:03d}", "treatment") for c in range(300) for k in range(4)]
    rows += [("cpd7@1uM", "compound-002", "treatment")] * 2  # same dose twice in one experiment: not candidates
    rows += [("busy@10uM", f"compound-{k % 4 + 1:03d}", "treatment") for k in range(20)]
    rows += [(f"GENE{g}", f"gene-{g % 3 + 1:03d}", "treatment") for g in range(50) for _ in range(4)]
    rows += [("", f"gene-{k % 3 + 1:03d}", "negative_control") for k in range(40)]
    rows += [("CRISPR_control", f"compound-{k % 4 + 1:03d}", "positive_control") for k in range(20)]
    labels, experiments, well_types = (list(column) for column in zip(*rows))
    n = len(rows)
    meta = pd.DataFrame({"id_code": [f"{e}_1_{i}" for i, e in enumerate(experiments)], "experiment": experiments,
                         "plate": 1, "well": [str(i) for i in range(n)], "cell_type": "HUVEC",
                         "well_type": well_types, "label": labels})
    prototypes = np.zeros((12, 16))
    for p in prototypes:
        p[rng.choice(16, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
    own = {label: rng.integers(12) for label in set(labels)}
    x = prototypes[[own[label] if rng.random() < 0.5 else rng.integers(12) for label in labels]]
    chosen = (meta["well_type"] == "treatment").to_numpy()
    theirs = copairs_ap(meta[chosen].reset_index(drop=True), x[chosen], pos_sameby=["label", "cell_type"],
                        pos_diffby=["experiment"], neg_sameby=["cell_type"], neg_diffby=["label"], progress_bar=False)
    theirs = theirs.dropna(subset=["average_precision"])
    theirs.index = np.flatnonzero(chosen)[theirs.index]
    assert theirs["n_pos_pairs"].max() == 15 and len(theirs) == 1222  # the genes have no replicate elsewhere
    for ours in (replicate_average_precision(meta, x), similarity_scores(meta, x).average_precision):
        ours = ours.set_index("row")
        assert list(ours.index) == list(theirs.index)
        np.testing.assert_allclose(ours["average_precision"], theirs["average_precision"], rtol=0, atol=1e-12)
        assert (ours["n_pos_pairs"] == theirs["n_pos_pairs"]).all()
        assert (ours["n_total_pairs"] == theirs["n_total_pairs"]).all()
