"""Phenomic maps that measure the truth: out-of-fold embeddings, the controls a correction learns from,
each correction on data with a known answer, and the panel's metrics against scib-metrics and copairs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from rcic.profiles import correct, embedding_frame, read_embeddings, write_embeddings
from rcic.profiles.correct import reference_wells
from tests.conftest import run_cli


def _plates(n_experiments=3, treatments=6, positives=2, negatives=8, dims=4, seed=0, batch=2.0):
    """Experiments of one cell type: each siRNA a direction, each experiment a shift and a scaling."""
    rng = np.random.default_rng(seed)
    rows = []
    for e in range(n_experiments):
        rows += [(f"HEPG2-{e + 1:02d}", "treatment", f"s{k}") for k in range(treatments) for _ in range(2)]
        rows += [(f"HEPG2-{e + 1:02d}", "positive_control", f"p{k}") for k in range(positives) for _ in range(4)]
        rows += [(f"HEPG2-{e + 1:02d}", "negative_control", "neg") for _ in range(negatives)]
    meta = pd.DataFrame(rows, columns=["experiment", "well_type", "label"])
    meta.insert(0, "id_code", [f"{e}_1_{i}" for i, e in enumerate(meta["experiment"])])
    meta["plate"], meta["well"], meta["cell_type"] = 1, "B02", "HEPG2"
    signal = {label: rng.normal(size=dims) * (0 if label == "neg" else 3) for label in meta["label"].unique()}
    shift = {e: rng.normal(size=dims) * batch for e in meta["experiment"].unique()}
    scale = {e: rng.uniform(0.5, 2.0, dims) for e in meta["experiment"].unique()}
    x = np.stack([(signal[label] + rng.normal(size=dims)) * scale[e] + shift[e]
                  for label, e in zip(meta["label"], meta["experiment"])])
    return meta, x


# ----------------------------------------------------------------------------------------------
# The controls a correction learns from
# ----------------------------------------------------------------------------------------------


def test_within_controls_by_hand():
    # experiment A: siRNA p with wells 1, 3 and siRNA q with wells 10, 14; one negative control (alone: left out)
    meta = pd.DataFrame({"experiment": ["A"] * 5 + ["B"] * 2, "label": ["p", "p", "q", "q", "n", "p", "p"],
                         "well_type": ["positive_control"] * 4 + ["negative_control"] + ["positive_control"] * 2})
    x = np.array([[1.0], [3.0], [10.0], [14.0], [7.0], [0.0], [4.0]])
    ref, experiments = reference_wells(meta, x, "within")
    mean_a = (1 + 3 + 10 + 14 + 7) / 5  # the experiment's control mean stays the location
    expected_a = [1 - 2 + mean_a, 3 - 2 + mean_a, 10 - 12 + mean_a, 14 - 12 + mean_a]
    expected_b = [0 - 2 + 2, 4 - 2 + 2]
    np.testing.assert_allclose(ref[:, 0], expected_a + expected_b)
    assert list(experiments) == ["A"] * 4 + ["B"] * 2
    neg, _ = reference_wells(meta, x, "negative")
    np.testing.assert_allclose(neg[:, 0], [7.0])
    # within removes the siRNAs' phenotypes: the spread standardize learns is the replicates' (var 2.5 in A)
    z = correct(meta, x, "standardize", controls="within")
    sd_a = np.std(expected_a)
    np.testing.assert_allclose(z[:5, 0], (x[:5, 0] - mean_a) / sd_a)


def test_negative_controls_too_few_is_one_line(tmp_path):
    meta, x = _plates(negatives=3)
    drop = meta.index[(meta["experiment"] == "HEPG2-02") & (meta["well_type"] == "negative_control")][1:]
    meta, x = meta.drop(drop).reset_index(drop=True), np.delete(x, drop, axis=0)
    path = tmp_path / "e.parquet"
    write_embeddings(path, embedding_frame(meta, x))
    proc = run_cli("map", path, "--out", tmp_path / "out", "--correct", "tvn", "--controls", "negative", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "experiment HEPG2-02 has 1 negative-control well(s); correction tvn needs at least 2" in proc.stderr
    assert not (tmp_path / "out").exists()
    assert run_cli("map", path, "--out", tmp_path / "ok", "--correct", "tvn", "--controls", "all",
                   "--no-probe").returncode == 0


# ----------------------------------------------------------------------------------------------
# Each correction on data with a known answer
# ----------------------------------------------------------------------------------------------


def _controls_of(meta, experiment, controls="negative"):
    wt = meta["well_type"]
    chosen = (wt == "negative_control") if controls == "negative" else (wt != "treatment")
    return (chosen & (meta["experiment"] == experiment)).to_numpy()


def test_center_standardize_spherize_known_answers(monkeypatch):
    meta, x = _plates(negatives=40)
    center = correct(meta, x, "center")
    standard = correct(meta, x, "standardize")
    import sys

    monkeypatch.setattr(sys.modules["rcic.profiles.correct"], "SPHERIZE_EPSILON", 0.0)
    sphere = correct(meta, x, "spherize")
    for experiment in meta["experiment"].unique():
        c = _controls_of(meta, experiment)
        np.testing.assert_allclose(center[c].mean(0), 0, atol=1e-10)
        np.testing.assert_allclose(standard[c].mean(0), 0, atol=1e-10)
        np.testing.assert_allclose(standard[c].std(0), 1, atol=1e-10)
        np.testing.assert_allclose(np.cov(sphere[c], rowvar=False), np.eye(x.shape[1]), atol=1e-8)
        # centring keeps every other well's offset from the controls: a shift, nothing else
        rows = (meta["experiment"] == experiment).to_numpy()
        np.testing.assert_allclose(center[rows], x[rows] - x[c].mean(0))
    # unregularised ZCA is pycytominer's Spherize (full-rank controls)
    from pycytominer.operations.transform import Spherize

    c = _controls_of(meta, "HEPG2-01")
    rows = (meta["experiment"] == "HEPG2-01").to_numpy()
    theirs = Spherize(epsilon=0, center=True, method="ZCA", return_numpy=True).fit(pd.DataFrame(x[c]))
    np.testing.assert_allclose(sphere[rows], theirs.transform(pd.DataFrame(x[rows])), atol=1e-8)


def test_spherize_regularisation_shrinks_each_control_direction_as_stated():
    from rcic.profiles.correct import SPHERIZE_EPSILON

    meta, x = _plates(negatives=40, seed=3)
    z = correct(meta, x, "spherize")
    c = _controls_of(meta, "HEPG2-02")
    cov = np.cov(x[c], rowvar=False)
    eps = SPHERIZE_EPSILON * np.trace(cov) / len(cov)
    values = np.linalg.eigvalsh(cov)
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(np.cov(z[c], rowvar=False))),
                               np.sort(values / (values + eps)), atol=1e-8)


@pytest.mark.parametrize("controls", ["negative", "all"])
def test_tvn_is_efaars_definition(controls):
    """EFAAR's tvn_on_controls (efaar_benchmarking/efaar.py), transcribed step by step with the
    libraries it calls: sklearn's StandardScaler and PCA, scipy's fractional_matrix_power."""
    from scipy import linalg
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    meta, x = _plates(negatives=5, dims=6, seed=1)
    ctrl = (meta["well_type"] == "negative_control").to_numpy() if controls == "negative" else \
        (meta["well_type"] != "treatment").to_numpy()
    e = StandardScaler().fit(x[ctrl]).transform(x)
    e = PCA().fit(e[ctrl]).transform(e)
    e = StandardScaler().fit(e[ctrl]).transform(e)
    for batch in meta["experiment"].unique():
        b = (meta["experiment"] == batch).to_numpy()
        cov = np.cov(e[b & ctrl], rowvar=False, ddof=1) + 0.5 * np.eye(e.shape[1])
        e[b] = e[b] @ linalg.fractional_matrix_power(cov, -0.5)
    np.testing.assert_allclose(correct(meta, x, "tvn", controls=controls), np.real(e), atol=1e-8)


def test_pca_is_the_first_components():
    from sklearn.decomposition import PCA

    meta, x = _plates(dims=8)
    ours = correct(meta, x, "pca")
    theirs = PCA(n_components=8).fit_transform(x)
    np.testing.assert_allclose(np.abs(ours), np.abs(theirs), atol=1e-8)  # up to each component's sign


def _shifted(treatments: int, shift_scale: float):
    """Experiments that differ by a shift only (same siRNAs, little noise)."""
    rng = np.random.default_rng(0)
    meta, _ = _plates(n_experiments=3, treatments=treatments, dims=10)
    signal = {label: rng.normal(size=10) * 3 for label in meta["label"].unique()}
    shift = {e: rng.normal(size=10) * shift_scale for e in meta["experiment"].unique()}
    x = np.stack([signal[label] + shift[e] for label, e in zip(meta["label"], meta["experiment"])])
    return meta, x + rng.normal(size=x.shape) * 0.3


def _spread(meta, y, by):
    """Mean distance of the groups' centroids from the overall centroid, relative to the wells' own."""
    centroids = pd.DataFrame(y).groupby(meta[by].to_numpy()).mean().to_numpy()
    return np.linalg.norm(centroids - centroids.mean(0), axis=1).mean() / np.linalg.norm(y - y.mean(0), axis=1).mean()


@pytest.mark.parametrize("method", ["combat", "scanorama"])
def test_batch_only_shift_is_removed(method):
    """A pure shift between experiments: the experiments' centroids come together (to a tenth of
    their spread), the siRNAs' stay apart."""
    meta, x = _shifted(8, 6.0)
    z = correct(meta, x, method)
    assert _spread(meta, z, "experiment") < 0.1 * _spread(meta, x, "experiment")
    assert _spread(meta, z, "label") > 0.9 * _spread(meta, x, "label")


def test_harmony_is_harmonypy_on_the_principal_components():
    import harmonypy

    from rcic.profiles.correct import principal_components

    meta, x = _shifted(60, 3.0)
    z = correct(meta, x, "harmony")
    pcs = principal_components(x)
    theirs = harmonypy.run_harmony(pcs, meta[["experiment"]], ["experiment"], verbose=False, random_state=0)
    np.testing.assert_allclose(z, np.asarray(theirs.Z_corr).reshape(z.shape), atol=1e-8)
    # Harmony corrects partially at this size (its clusters follow the batches): it still moves the
    # experiments together and keeps the siRNAs apart
    assert _spread(meta, z, "experiment") < 0.85 * _spread(meta, x, "experiment")
    assert _spread(meta, z, "label") > _spread(meta, x, "label")


# ----------------------------------------------------------------------------------------------
# Seen and unseen wells
# ----------------------------------------------------------------------------------------------


def test_map_scores_unseen_wells_and_says_how_many(tmp_path):
    meta, x = _plates(n_experiments=4)
    seen = meta["experiment"].isin(["HEPG2-01"]).to_numpy()
    path = tmp_path / "e.parquet"
    write_embeddings(path, embedding_frame(meta, x, seen), runs=[{"run": "r"}])
    proc = run_cli("map", path, "--out", tmp_path / "a", "--correct", "none", "--no-probe", "--json")
    n_unseen, n_seen = int((~seen).sum()), int(seen.sum())
    assert f"scoring {n_unseen:,} wells unseen in training ({n_seen:,} seen wells left out" in proc.stderr
    only_unseen = json.loads(proc.stdout)["none"]["replicate_map"]
    from rcic.profiles.metrics import replicate_map

    assert only_unseen == pytest.approx(replicate_map(meta[~seen].reset_index(drop=True), x[~seen])[0])
    proc = run_cli("map", path, "--out", tmp_path / "b", "--correct", "none", "--no-probe", "--json",
                   "--include-seen")
    assert json.loads(proc.stdout)["none"]["replicate_map"] == pytest.approx(replicate_map(meta, x)[0])
    plain = tmp_path / "plain.parquet"
    embedding_frame(meta, x).to_parquet(plain)
    proc = run_cli("map", plain, "--out", tmp_path / "c", "--correct", "none", "--no-probe")
    assert f"no seen_in_training column: all {len(meta):,} wells are treated as unseen" in proc.stdout


def _fold_runs(tiny_run, tiny_store, tmp_path, folds=3):
    """The K fold runs of a K-fold cross-validation on the tiny store: the real folds
    (``experiment_folds``, as training deals them) in each run.json, and each fold's network made
    distinct (weights scaled by 1 + 0.05 k) from one trained checkpoint, so that which model embedded
    an experiment shows in the numbers. (Training three folds would cost the suite a minute.)"""
    import torch

    from rcic.data.dataset import experiment_folds
    from rcic.store import open_source

    wells = open_source(tiny_store).dataset.wells
    fold_of = experiment_folds(wells, folds, 0)
    info = json.loads((tiny_run / "run.json").read_text())
    runs = []
    for k in range(folds):
        run = tmp_path / f"fold{k}"
        (run / "checkpoints").mkdir(parents=True)
        state = torch.load(tiny_run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
        state["state_dict"] = {n: (v * (1 + 0.05 * k) if v.is_floating_point() and "net" in n else v)
                               for n, v in state["state_dict"].items()}
        torch.save(state, run / "checkpoints" / "best.ckpt")
        held_out = sorted(e for e, f in fold_of.items() if f == k)
        (run / "run.json").write_text(json.dumps({**info, "fold": k, "folds": folds, "val_experiments": held_out}))
        shutil.copy(tiny_run / "recipe.yaml", run / "recipe.yaml")
        runs.append(run)
    return runs, fold_of


def test_out_of_fold_embeddings(tiny_run, tiny_store, tmp_path):
    runs, fold_of = _fold_runs(tiny_run, tiny_store, tmp_path)
    out = tmp_path / "oof.parquet"
    run_cli("embed", *runs, "--data", tiny_store, "--split", "val", "--tta", "1", "--out", out)
    frame = pd.read_parquet(out)
    assert set(frame["experiment"]) == set(fold_of)  # every labelled experiment, once
    assert not frame["seen_in_training"].any() and frame["id_code"].is_unique
    from rcic.profiles import embedding_runs

    records = embedding_runs(out)
    assert [r["embedded_experiments"] for r in records] == [r["val_experiments"] for r in records]
    assert sorted(e for r in records for e in r["embedded_experiments"]) == sorted(fold_of)
    # fold 1's experiments carry fold 1's features (not another fold's), carried onto fold 0's space by the
    # Procrustes map that a hand computation fits on the test wells both folds embed
    from rcic.predict import predict
    from rcic.profiles import apply_map, procrustes_maps
    from rcic.store import open_source

    source = open_source(tiny_store)
    wells = source.dataset.wells
    test_experiments = wells.loc[wells["split"] == "test"].groupby("cell_type")["experiment"].min()
    for record in records:  # one test experiment per cell type, no fold trained on it
        assert record["alignment"]["anchor_split"] == "test"
        assert record["alignment"]["anchor_experiments"] == sorted(test_experiments)
    emb = [c for c in frame.columns if c.startswith("emb_")]
    anchors = []
    for run in runs[:2]:
        test = predict([run], source, split="val", experiments=sorted(test_experiments), tta=1, embeddings=True,
                       controls=True)
        anchors.append(test.extra["embeddings"][np.argsort(test.id_code, kind="stable")])
    maps = procrustes_maps(anchors)
    for k in (0, 1):
        own = predict([runs[k]], source, split="val", tta=1, embeddings=True, controls=True)
        mine = frame.set_index("id_code").loc[own.id_code, emb].to_numpy()
        np.testing.assert_allclose(mine, apply_map(own.extra["embeddings"], maps[k]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mine[1:] - mine[0], (own.extra["embeddings"][1:] - own.extra["embeddings"][0])
                               @ maps[1][1], rtol=1e-4, atol=1e-5)  # a rotation: distances kept
    # --align none: each fold's own features, as the model gives them
    run_cli("embed", *runs, "--data", tiny_store, "--split", "val", "--tta", "1", "--align", "none",
            "--out", tmp_path / "raw.parquet")
    raw = pd.read_parquet(tmp_path / "raw.parquet").set_index("id_code").loc[own.id_code, emb]
    np.testing.assert_allclose(raw.to_numpy(), own.extra["embeddings"], rtol=1e-5, atol=1e-6)
    # one fold over every well: seen are the labelled experiments it trained on (not its own fold, not test)
    run_cli("embed", runs[0], "--data", tiny_store, "--split", "all", "--tta", "1", "--out", tmp_path / "all.parquet")
    every = pd.read_parquet(tmp_path / "all.parquet")
    trained = {e for e, f in fold_of.items() if f != 0}
    assert (every["seen_in_training"] == every["experiment"].isin(trained)).all()
    assert every["experiment"].nunique() > len(fold_of)  # the test experiments are in it, unseen
    meta, _ = read_embeddings(out)
    assert not meta["seen_in_training"].any()


def test_procrustes_maps_undo_a_rotation_and_shift():
    """Anchors embedded in a rotated, shifted copy of a space: the map carries every well back exactly."""
    from rcic.profiles import apply_map, procrustes_maps

    rng = np.random.default_rng(0)
    reference = rng.normal(size=(60, 8))
    rotation, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    other = reference @ rotation + 3.0
    wells = rng.normal(size=(5, 8))
    maps = procrustes_maps([reference, other])
    np.testing.assert_allclose(apply_map(wells, maps[0]), wells, atol=1e-12)  # the first space stays
    np.testing.assert_allclose(apply_map(wells @ rotation + 3.0, maps[1]), wells, atol=1e-9)
    with pytest.raises(Exception, match="differ in shape"):
        procrustes_maps([reference, other[:, :4]])


def test_split_val_on_a_fold_all_run_is_one_line(tiny_run, tmp_path, tiny_store):
    run = tmp_path / "all"
    shutil.copytree(tiny_run, run)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "fold": "all", "val_experiments": []}))
    proc = run_cli("embed", run, "--data", tiny_store, "--split", "val", "--out", tmp_path / "e.parquet", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "data.fold: all" in proc.stderr and not (tmp_path / "e.parquet").exists()
    proc = run_cli("embed", tiny_run, "--data", tiny_store, "--split", "val", "--align", "rotate",
                   "--out", tmp_path / "e.parquet", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "--align must be procrustes or none" in proc.stderr and not (tmp_path / "e.parquet").exists()


# ----------------------------------------------------------------------------------------------
# The panel: each metric as scib-metrics and copairs compute it, the aggregate as Arevalo et al.
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_panel_metrics_equal_scib_metrics_on_the_same_input():
    """Our exact neighbours are scikit-learn's; every score of a cell type is scib-metrics' own
    function on that input (the silhouettes' subsample being every well, Leiden searching our
    resolutions), and the per-siRNA pieces the bootstrap resamples average back to it."""
    import scib_metrics
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    from rcic.profiles.panel import LEIDEN_RESOLUTIONS, _scores, neighbours, scib_parts, stratified_subsample

    meta, x = _plates(n_experiments=3, treatments=10, negatives=6, dims=6, batch=1.0)
    labels, batches = meta["label"].to_numpy(), meta["experiment"].to_numpy()
    ours = neighbours(x)
    distances, indices = NearestNeighbors(n_neighbors=ours.n_neighbors).fit(x).kneighbors(x)
    np.testing.assert_allclose(ours.distances, distances, atol=1e-4)
    assert (np.sort(ours.indices, 1) == np.sort(indices, 1)).all()
    blocks = neighbours(x, block=16)  # seven row blocks: each pair of blocks multiplied once
    np.testing.assert_allclose(blocks.distances, distances, atol=1e-4)
    assert (np.sort(blocks.indices, 1) == np.sort(indices, 1)).all()
    assert (blocks.indices[:, 0] == np.arange(len(x))).all()  # self first
    # scib-metrics on our neighbours (the same input: float32 distances move Leiden's graph otherwise)
    nn = NeighborsResults(indices=ours.indices, distances=ours.distances)
    parts = scib_parts(x, labels, batches, max_wells=len(x))
    values = _scores([parts], [pd.Series(dtype=float)])
    leiden = max((scib_metrics.nmi_ari_cluster_labels_leiden(nn, labels, optimize_resolution=False, resolution=r)
                  for r in LEIDEN_RESOLUTIONS), key=lambda scores: scores["nmi"])
    expected = {"graph connectivity": scib_metrics.graph_connectivity(nn, labels),
                "Leiden NMI": leiden["nmi"], "Leiden ARI": leiden["ari"],
                "isolated labels": scib_metrics.isolated_labels(x, labels, batches),
                "kBET": scib_metrics.kbet_per_label(nn, batches, labels),
                "silhouette label": scib_metrics.silhouette_label(x, labels),
                "silhouette batch": scib_metrics.silhouette_batch(x, labels, batches),
                "iLISI": scib_metrics.ilisi_knn(nn, batches), "cLISI": scib_metrics.clisi_knn(nn, labels)}
    for metric, value in expected.items():
        assert values[metric] == pytest.approx(float(value), abs=1e-5), metric
    # a bootstrap draw of every siRNA once is the data itself
    once = pd.Series(1, index=np.unique(labels))
    again = _scores([parts], [pd.Series(dtype=float)], counts=once)
    for metric in expected:
        assert again[metric] == pytest.approx(values[metric], abs=1e-6), metric  # float32 sums
    # below the cap: silhouette label is scib-metrics' on the subsample, the other metrics unchanged
    rows = stratified_subsample(labels, batches, 40)
    sampled = _scores([scib_parts(x, labels, batches, max_wells=40)], [pd.Series(dtype=float)])
    assert sampled["silhouette label"] == pytest.approx(float(scib_metrics.silhouette_label(x[rows], labels[rows])),
                                                        abs=1e-5)
    for metric in ("kBET", "iLISI", "cLISI", "graph connectivity", "Leiden NMI", "silhouette batch"):
        assert sampled[metric] == pytest.approx(values[metric], abs=1e-6), metric
    # kBET on two of the siRNAs scib-metrics scores (p0, p1, neg: 10 wells or more): its own values for them
    from rcic.profiles.panel import kbet_labels, kbet_per_label

    _, codes = np.unique(labels, return_inverse=True)
    _, batch_codes = np.unique(batches, return_inverse=True)
    _, full = scib_metrics.kbet_per_label(nn, batch_codes, codes, return_df=True)
    chosen, scoreable = kbet_labels(codes, batch_codes, max_labels=2)
    assert len(chosen) == 2 and scoreable == full["kBET"].notna().sum() == 3
    assert kbet_per_label(nn, batch_codes, codes, chosen).to_dict() == pytest.approx(
        full.set_index("cluster")["kBET"].loc[chosen].to_dict())


def test_graph_connectivity_is_scib_metrics():
    """One connected-components pass over the within-label edges gives scib-metrics' per-label slices'
    value, on a graph sparse enough that labels split into several components."""
    import scib_metrics

    from rcic.profiles.panel import graph_connectivity, neighbours

    rng = np.random.default_rng(1)
    codes = rng.integers(0, 60, 900)
    nn = neighbours(rng.normal(size=(900, 6)) + (codes % 7)[:, None], k=8)
    expected = scib_metrics.graph_connectivity(nn, codes)
    assert expected < 1  # some labels split into several components
    assert graph_connectivity(nn, codes) == pytest.approx(float(expected), abs=1e-12)


def test_silhouette_subsample_keeps_every_sirna_across_experiments():
    """Each siRNA keeps its share of the wells (two at least), one per experiment before any
    experiment gives a second; the same seed draws the same wells; under the cap, every well."""
    from rcic.profiles.panel import stratified_subsample

    # siRNA a: 12 wells, 4 in each of 3 experiments; b: 3 wells in 3 experiments; c: 1 well
    labels = np.array(["a"] * 12 + ["b"] * 3 + ["c"])
    batches = np.array(["E1", "E2", "E3"] * 4 + ["E1", "E2", "E3"] + ["E1"])
    rows = stratified_subsample(labels, batches, max_wells=8, seed=3)  # half the 16 wells
    picked = pd.DataFrame({"label": labels[rows], "batch": batches[rows]})
    assert picked["label"].value_counts().to_dict() == {"a": 6, "b": 2, "c": 1}  # round(12/2), max(2, 1.5), all
    assert picked[picked.label == "a"]["batch"].value_counts().to_dict() == {"E1": 2, "E2": 2, "E3": 2}
    assert picked[picked.label == "b"]["batch"].nunique() == 2
    assert (stratified_subsample(labels, batches, 8, seed=3) == rows).all() and (np.diff(rows) > 0).all()
    assert not (stratified_subsample(labels, batches, 8, seed=4) == rows).all()
    assert (stratified_subsample(labels, batches, 16) == np.arange(16)).all()


def test_replicate_map_against_negative_controls_by_hand():
    from rcic.profiles.panel import replicate_map_negcon

    # siRNA s in experiments A and B; two negative controls; cosine similarity on 2-D points
    meta = pd.DataFrame({"experiment": ["A", "B", "A", "B"], "label": ["s", "s", "neg", "neg"],
                         "well_type": ["treatment", "treatment", "negative_control", "negative_control"]})
    x = np.array([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0]])
    # s@A (1, 0): its replicate (cosine 0.6) ranks below one negative (0.8), above the other (0.0): AP 1/2
    # s@B (0.6, 0.8): both negatives (0.96, 0.8) rank above its replicate (0.6): AP 1/3
    result = replicate_map_negcon(meta, x, null_size=100)
    assert result["s"] == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_bootstrap_draws_are_the_siRNA_resamples():
    """The bootstrap's positional draws are rng.choice(siRNAs) counted per label, controls kept once:
    the ranks equal those from pandas' counts of the drawn names."""
    from rcic.profiles.panel import _bootstrap_ranks, _Parts, _scores, aggregate

    rng = np.random.default_rng(5)
    sirnas = np.array([f"s{i}" for i in range(12)], dtype=object)
    wells = np.concatenate([np.repeat(sirnas, 3), ["neg"] * 4])

    def parts(shift):
        def per_label():
            return pd.Series(rng.random(12) + shift, index=sirnas)

        return [_Parts(len(wells), {"graph connectivity": 0.5}, {"kBET": per_label(), "silhouette batch": per_label(),
                                                               "silhouette label": pd.Series(rng.random(len(wells)),
                                                                                             index=wells)},
                       {"iLISI": (pd.Series(1 + rng.random(len(wells)), index=wells), 3),
                        "cLISI": (pd.Series(1 + rng.random(len(wells)), index=wells), 13)})], [per_label()]

    by_method = {"a": parts(0.0), "b": parts(0.05), "c": parts(0.1)}
    low, high = _bootstrap_ranks(by_method, sirnas, 30, seed=3)
    draw, ranks = np.random.default_rng(3), []
    for _ in range(30):
        counts = pd.concat([pd.Series(draw.choice(sirnas, len(sirnas))).value_counts(), pd.Series(1, index=["neg"])])
        overall = [aggregate(_scores(*by_method[m], counts=counts))[2] for m in by_method]
        ranks.append(pd.Series(overall).rank(ascending=False, method="min").to_numpy())
    assert low == np.quantile(ranks, 0.025, axis=0).round().astype(int).tolist()
    assert high == np.quantile(ranks, 0.975, axis=0).round().astype(int).tolist()
    assert low != high  # the resamples do move the ranks


def test_aggregate_is_arevalos():
    from rcic.profiles.panel import BATCH_METRICS, BIO_METRICS, aggregate

    values = dict.fromkeys(BATCH_METRICS, 0.5) | dict.fromkeys(BIO_METRICS, 0.8)
    values["iLISI"], values["consistency mAP"] = 0.1, float("nan")  # no gene table: left out of bio
    batch, bio, overall = aggregate(values)
    assert batch == pytest.approx((0.5 * 3 + 0.1) / 4) and bio == pytest.approx(0.8)
    assert overall == pytest.approx(0.4 * batch + 0.6 * bio)


def test_map_html_shows_the_panel_as_a_heat_table(tmp_path):
    from rcic.reports.map_report import PANEL_SCORE_COLUMNS, panel_heat_table

    panel = pd.DataFrame({"correction": ["none", "harmony"], **{c: [0.1, 0.9] for c in PANEL_SCORE_COLUMNS},
                          "rank": [2, 1], "rank 95% low": [2, 1], "rank 95% high": [2, 2]})
    html = panel_heat_table(panel)
    rows = html.split("<tr>")[2:]
    assert "harmony" in rows[0] and "none" in rows[1]  # best overall first
    assert "rgb(49,130,189)" not in rows[1] and "1 (1-2)" in rows[0] and "2 (2-2)" in rows[1]
    assert rows[0].count("<td") == len(PANEL_SCORE_COLUMNS) + 2  # name, every metric, rank



def test_panel_scores_the_phenomic_map_in_its_jobs(tmp_path):
    """rcic map --panel scores each correction's phenomic map in the job that corrects it: the same
    scores as rcic map without --panel; the panel's rows in the order asked for."""
    from rcic.profiles.panel import panel_jobs

    # pca and harmony share one job (one SVD), the longest first
    assert panel_jobs(["none", "center", "pca", "harmony"]) == [("pca", "harmony"), ("center",), ("none",)]
    meta, x = _plates(n_experiments=2, treatments=6, negatives=4, dims=6, batch=1.0)  # no siRNA with 10 wells:
    path = tmp_path / "e.parquet"                                                    # no kBET, no numba compile
    write_embeddings(path, embedding_frame(meta, x))
    pd.DataFrame({"label": [f"s{k}" for k in range(6)], "gene": ["G0", "G0", "G1", "G1", "G2", "G2"]}).to_csv(
        tmp_path / "genes.csv", index=False)
    pd.DataFrame({"gene_a": ["G0"], "gene_b": ["G1"]}).to_csv(tmp_path / "pairs.csv", index=False)
    common = ["--genes", tmp_path / "genes.csv", "--relationships", tmp_path / "pairs.csv", "--correct", "none",
              "--correct", "center", "--correct", "pca", "--correct", "harmony", "--null-size", "100"]
    run_cli("map", path, "--out", tmp_path / "panel", "--panel", "--workers", "1", "--bootstrap", "20", *common)
    run_cli("map", path, "--out", tmp_path / "map", *common)
    panel, alone = (json.loads((tmp_path / name / "scores.json").read_text()) for name in ("panel", "map"))
    assert panel == alone and list(panel) == ["none", "center", "pca", "harmony"]
    assert list(pd.read_csv(tmp_path / "panel" / "panel.csv")["correction"]) == ["none", "center", "pca", "harmony"]


def _worker_report(job):
    """A panel job that reports where it ran: (job, process, torch threads, wells the worker holds). Each
    job waits (up to 60 s) until both workers have one, so that a worker that starts first cannot take all."""
    import os
    import time
    from pathlib import Path

    import torch

    from rcic.profiles.panel import _WORKER

    meeting = Path(os.environ["RCIC_TEST_MEETING"])
    (meeting / str(os.getpid())).touch()
    deadline = time.monotonic() + 60
    while len(list(meeting.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    return [(job, os.getpid(), torch.get_num_threads(), len(_WORKER["x"]))]


def test_panel_workers_share_the_jobs_one_thread_each(tmp_path, monkeypatch):
    """--workers 2: two spawned processes hold the wells, share the jobs, and keep to their
    share of the cores (no four threads on two cores)."""
    import os

    from rcic.profiles.panel import _run_jobs, _Settings, panel_jobs

    monkeypatch.setenv("RCIC_TEST_MEETING", str(tmp_path))  # the spawned workers inherit it
    meta, x = _plates(n_experiments=2, dims=3)
    jobs = panel_jobs(["none", "tvn", "pca", "harmony", "combat"])
    ticks = []
    settings = _Settings("within", None, 100, 0, None, 100, (1.0,), 10, None)
    results = [r for rs in _run_jobs(meta, x, jobs, settings, 2, ticks.append, job_fn=_worker_report) for r in rs]
    assert sorted(job for job, *_ in results) == sorted(jobs)
    assert len({pid for _, pid, _, _ in results}) == 2 and os.getpid() not in {pid for _, pid, _, _ in results}
    assert {threads for _, _, threads, _ in results} == {max(1, os.cpu_count() // 2)}
    assert {wells for *_, wells in results} == {len(x)}
    assert sum(ticks) == len(jobs) * 2  # each method's correction and its one cell type
