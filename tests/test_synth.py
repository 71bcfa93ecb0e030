"""The synthetic generator mirrors the real structure and is byte-reproducible."""

from __future__ import annotations

import hashlib
import re

import cv2
import numpy as np
import pandas as pd

from rcic.io import load_site, read_dataset
from rcic.synth import generate, preset
from tests.conftest import need_real_images, run_cli


def _digest(folder):
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(folder).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


def test_structure_matches_real_rxrx1(tiny_data):
    ds = read_dataset(tiny_data)
    assert ds.layout == "kaggle-2019"
    s = ds.summary()
    assert s["treatment_classes"] == 8 and s["plate_groups"] == 4 and s["cell_types"] == ["HEPG2", "HUVEC"]
    wells = ds.wells
    # negative control at B02 of every plate, positive controls at fixed positions
    neg = wells[wells.well_type == "negative_control"]
    assert set(neg.well) == {"B02"} and len(neg) == wells.groupby(["experiment", "plate"]).ngroups
    pos = wells[wells.well_type == "positive_control"]
    assert set(pos.well) <= {f"{r}{c:02d}" for r in "CFHJM" for c in (3, 7, 11, 15, 19, 22)}
    # treatments: each group once per plate, rotating cyclically; train rotations {0, 1}
    groups = ds.plate_groups
    assert [len(g) for g in groups.groups] == [2] * 4
    assert {groups.rotation(o) for o in groups.orders.values()} == {0, 1}
    # the test experiments use the 4th rotation, unseen in train
    answers = pd.read_csv(tiny_data / "answers.csv", dtype=str).merge(ds.wells, on="id_code")
    lookup = {label: g for g, members in enumerate(groups.groups) for label in members}
    test_orders = {e: tuple(lookup[f.sirna.iloc[0]] for _, f in grp.groupby("plate"))
                   for e, grp in answers.groupby("experiment")}
    assert {groups.rotation(o) for o in test_orders.values()} == {3}
    sample = pd.read_csv(tiny_data / "sample_submission.csv")
    assert sample.id_code.tolist() == ds.test_ids and set(answers.id_code) == set(sample.id_code)


def test_images_have_batch_effects_and_class_signal(tiny_data):
    from rcic.synth.generator import (
        NO_PLATE_EFFECT,
        _camera,
        design_plates,
        experiment_effects,
        plate_effects,
        render_site,
    )
    from rcic.synth.intensity import QUANTILES, grey_levels

    config = preset("tiny")  # what tiny_data was made with
    wells = design_plates(config)[0].set_index(["experiment", "plate", "well"])
    for id_code, site in (("HEPG2-01_1_B02", 1), ("HUVEC-02_3_B02", 2)):
        # the files hold, channel by channel, the rendering of the well's class under its experiment's and
        # its plate's effects, from the site's own seed
        experiment, plate, well = id_code.rsplit("_", 2)
        rng = np.random.default_rng([config.seed, 4, *id_code.encode(), site])
        expected = render_site(config, experiment.split("-")[0], int(wells.loc[(experiment, int(plate), well), "cls"]),
                               experiment_effects(config, experiment), rng, plate_effects(config, experiment,
                                                                                          int(plate)))
        img = load_site(tiny_data, id_code, site)
        assert img.shape == (6, 32, 32) and img.dtype == np.uint8
        np.testing.assert_array_equal(img, expected)
    # the batch effect by hand: without noise, grey level g of channel c becomes g x gain_c + offset_c x the
    # channel's background (its 5% grey level), per experiment; experiments draw different gains and offsets
    levels = grey_levels("HEPG2")
    effects = [experiment_effects(config, e) | {"noise": 0.0} for e in ("HEPG2-01", "HEPG2-02")]
    for batch in effects:
        out = _camera(np.full((6, 2, 2), 40, np.float32), levels, batch, NO_PLATE_EFFECT, np.random.default_rng(0))
        background = levels[:, list(QUANTILES).index(0.05)]
        assert out[:, 0, 0].tolist() == np.clip(np.rint(40 * batch["gain"] + batch["offset"] * background), 0,
                                                255).tolist()
    assert not np.allclose(effects[0]["gain"], effects[1]["gain"])
    assert not np.allclose(effects[0]["offset"], effects[1]["offset"])


def test_same_seed_same_bytes_any_workers(tmp_path):
    config = preset("tiny", n_classes=4, n_positive=1, cell_types=("RPE",), train_experiments=1, image_size=16)
    a = generate(tmp_path / "a", config, workers=1)
    b = generate(tmp_path / "b", config, workers=2)
    c = generate(tmp_path / "c", preset("tiny", n_classes=4, n_positive=1, cell_types=("RPE",),
                                        train_experiments=1, image_size=16, seed=1))
    assert _digest(a) == _digest(b) != _digest(c)


def test_synth_cli_2023_labels_negative_controls_and_refuses_nonempty(tmp_path):
    run_cli("synth", tmp_path / "d", "--preset", "tiny", "--image-size", "16", "--label-style", "kaggle-2023",
            "--cell-types", "U2OS", "--negative-controls", "3")
    ds = read_dataset(tmp_path / "d")
    assert ds.layout == "kaggle-2023" and ds.vocab.labels[-1] == "UNTREATED"
    assert all(label.startswith("sirna_") for label in ds.vocab.labels[:-1])
    for split in ("train", "test"):  # exactly 3 negative controls per plate, B02 among them, real spelling
        controls = pd.read_csv(tmp_path / "d" / f"{split}_controls.csv")
        negative = controls[controls.well_type == "negative_control"]
        assert set(negative.sirna) == {"UNTREATED"}
        per_plate = negative.groupby(["experiment", "plate"]).well.agg(list)
        assert len(per_plate) == 4 * ds.wells.query(f"split == '{split}'").experiment.nunique()
        assert (per_plate.str.len() == 3).all() and all("B02" in w for w in per_plate)
        treatments = pd.read_csv(tmp_path / "d" / f"{split}.csv")
        assert not set(negative.id_code) & set(treatments.id_code)  # an extra control takes a well of its own
    proc = run_cli("synth", tmp_path / "d", "--preset", "tiny", check=False)
    assert proc.returncode == 2 and "not empty" in proc.stderr
    proc = run_cli("synth", tmp_path / "e", "--n-classes", "6", check=False)
    assert proc.returncode == 2 and "multiple of 4" in proc.stderr and not (tmp_path / "e").exists()
    proc = run_cli("synth", tmp_path / "e", "--negative-controls", "0", check=False)
    assert proc.returncode == 2 and "negative_controls" in proc.stderr and not (tmp_path / "e").exists()


def test_plate_effect_scales_each_channel_by_the_plates_gain():
    from rcic.synth.generator import NO_PLATE_EFFECT, experiment_effects, plate_effects, render_site

    config = preset("tiny", plate_effect=1.0)
    assert plate_effects(preset("tiny"), "RPE-01", 1) is NO_PLATE_EFFECT  # strength 0: no plate effect at all
    effects = [plate_effects(config, "RPE-01", p) for p in range(1, 5)]
    assert len({tuple(np.round(e["gain"], 6)) for e in effects}) == 4  # every plate its own gains
    # the same cells (same random stream, no camera noise, no offsets) on plate 2, and on it with a gain of 1
    batch = {**experiment_effects(config, "RPE-01"), "noise": 0.0, "offset": np.zeros(6)}
    plate = {**effects[1], "offset": np.zeros(6)}

    def channel_means(gain):
        site = render_site(config, "RPE", 3, batch, np.random.default_rng(7), {**plate, "gain": gain})
        return site.reshape(6, -1).mean(axis=1)

    with_gain, unit = channel_means(plate["gain"]), channel_means(np.ones(6))
    np.testing.assert_allclose(with_gain, plate["gain"] * unit, atol=0.3)  # up to rounding to grey levels
    assert np.abs(with_gain - unit).max() > 1  # the gains are large enough to see


def test_realsize_preset_has_the_real_plate_layout(tmp_path):
    from rcic.synth.generator import _write_csvs, design_plates

    config = preset("realsize")
    wells, labels = design_plates(config)
    _write_csvs(wells, labels, tmp_path)  # the CSVs alone: rcic reads the design without images
    ds = read_dataset(tmp_path)
    assert [len(g) for g in ds.plate_groups.groups] == [277] * 4
    per_plate = ds.wells.drop_duplicates("id_code").groupby(["experiment", "plate", "well_type"]).size().unstack()
    assert (per_plate["treatment"] == 277).all() and (per_plate["positive_control"] == 30).all()
    assert (per_plate["negative_control"] == 1).all()
    # the real 2019 ids: treatments 0-1107, positive controls 1108-1137, the negative control 1138
    controls = pd.read_csv(tmp_path / "train_controls.csv")
    assert set(controls.loc[controls.well_type == "negative_control", "sirna"]) == {1138}
    assert set(controls.loc[controls.well_type == "positive_control", "sirna"]) == set(range(1108, 1138))


def test_channel_intensities_match_the_real_pngs_of_each_cell_type(tmp_path):
    from rcic.synth.intensity import STATISTICS, channel_statistics, real_channel_planes

    real: dict[str, dict[int, list]] = {}  # cell type -> channel -> statistics of every real PNG
    for cell_type, _, _, channel, plane in real_channel_planes(need_real_images()):
        real.setdefault(cell_type, {}).setdefault(channel, []).append(channel_statistics(plane[None])[0])
    # the real PNGs are negative controls (B02): compare like with like, without batch effects (they come on top)
    config = preset("tiny", n_classes=4, n_positive=1, cell_types=tuple(sorted(real)), train_experiments=1,
                    image_size=48, negative_controls=3, batch_effect=0.0)
    data = generate(tmp_path / "d", config)
    sites = read_dataset(data).sites.query("well_type == 'negative_control'")
    for cell_type, by_channel in real.items():
        synthetic = np.median([channel_statistics(load_site(data, row.id_code, row.site))
                               for row in sites[sites.cell_type == cell_type].itertuples()], axis=0)
        for channel, stats in by_channel.items():
            stats = np.array(stats)
            # the spread between the real sites, widened for quantisation and for the few cells of a 48 px site
            slack = np.maximum(np.median(stats, axis=0) * 0.15, [1.5, 1.5, 1.5, 1.5, 0.005])
            low, high = stats.min(axis=0) - slack, stats.max(axis=0) + slack
            inside = (low <= synthetic[channel - 1]) & (synthetic[channel - 1] <= high)
            assert inside.all(), (f"{cell_type} w{channel}: synthetic {dict(zip(STATISTICS, synthetic[channel - 1]))}"
                                  f" outside real {dict(zip(STATISTICS, zip(low, high)))}")


def test_eda_shows_the_dataset_next_to_real_sites(tiny_data, tmp_path):
    from rcic.reports.eda import read_real_sites, synthetic_vs_real_section
    from rcic.store import open_source

    images = need_real_images()
    # the section alone (the rest of `rcic eda` is tested elsewhere); the CLI's --real is checked below
    page = synthetic_vs_real_section(open_source(tiny_data), tmp_path, read_real_sites(images), images)
    assert "This dataset next to real sites" in page and (tmp_path / "synthetic_vs_real.png").is_file()
    # the real column holds the real PNGs' own numbers: HUVEC w1, median over its complete sites of the mean
    planes = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted(images.glob("*/HUVEC-*/Plate*/*_s1_w1.png"))]
    table = page[page.index("This dataset next to real sites"):]
    header = [re.sub("<.*?>", "", c).strip() for c in re.findall(r"<th>.*?</th>", table, re.S)]
    row = next(r for r in re.findall(r"<tr>(.*?)</tr>", table, re.S) if "<td>HUVEC</td>" in r and "<td>w1</td>" in r)
    cells = [re.sub("<.*?>", "", c).strip() for c in re.findall(r"<td>.*?</td>", row, re.S)]
    assert float(cells[header.index("mean (real)")]) == round(float(np.median([p.mean() for p in planes])), 1)
    proc = run_cli("eda", tiny_data, "--out", tmp_path / "eda2", "--real", tmp_path, check=False)
    assert proc.returncode == 2 and "holds no real site" in proc.stderr and not (tmp_path / "eda2").exists()


def test_morphology_knob_scales_how_far_the_cell_types_grey_levels_are():
    from rcic.synth.intensity import REAL_QUANTILES, grey_levels

    np.testing.assert_allclose(grey_levels("HEPG2", 0.0), grey_levels("HUVEC", 0.0))  # 0: the cell types alike
    assert grey_levels("HUVEC", 1.0) is REAL_QUANTILES["HUVEC"]  # 1: the real levels
    # 2: twice as far from the average (geometric, as the shapes): log distances double where nothing clips
    mean = np.exp(np.mean([np.log(q + 1) for q in REAL_QUANTILES.values()], axis=0))
    twice, once = np.log(grey_levels("RPE", 2.0) + 1) - np.log(mean), np.log(REAL_QUANTILES["RPE"] + 1) - np.log(mean)
    unclipped = (grey_levels("RPE", 2.0) > 0) & (grey_levels("RPE", 2.0) < 255)
    np.testing.assert_allclose(twice[unclipped], 2 * once[unclipped], atol=1e-9)
