"""One evaluation path: validation in Lightning, rcic evaluate and submit + score agree; exact under DDP;
splits that do not move; data.fold: all; exact mid-epoch resume; the WILDS layout and split."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch

from rcic.config import load_recipe
from rcic.data import RxRxDataModule, experiment_folds
from rcic.io import read_dataset
from rcic.predict import load_logits
from rcic.store import open_source
from rcic.training import fit
from tests.conftest import run_cli

# model.adabn_prior=0: cpu-demo's auto would predict 5 times (tests/test_plate_aware.py covers it)
TINY = ["--set", "model.adabn_prior=0",
        "--set", "data.num_workers=0", "--set", "data.batch_size=16", "--set", "data.folds=2",
        "--set", "trainer.accelerator=cpu"]


def _best_row(run) -> pd.Series:
    """The validation that chose best.ckpt (the first maximum of the run's monitor)."""
    history = pd.read_csv(run / "history.csv")
    monitor = json.loads((run / "run.json").read_text())["monitor"]
    return history.loc[history[monitor].idxmax()]


def test_validation_evaluate_and_submit_score_agree(tiny_run, tiny_store, tiny_data, tmp_path):
    best = _best_row(tiny_run)
    # validation adapts with plain AdaBN (prior 0); cpu-demo's auto may choose another prior at prediction,
    # so the two agree at the prior validation used
    plain = ["--adabn-prior", "0"]
    result = json.loads(run_cli("evaluate", tiny_run, "--data", tiny_store, "--tta", "1", "--json", *plain).stdout)
    assert set(result) >= {"acc", "acc_leak", "wells", "per_cell_type", "experiments"}
    assert result["acc"] == pytest.approx(best["val/acc"], abs=1e-6)
    assert result["acc_leak"] == pytest.approx(best["val/acc_leak"], abs=1e-6)
    for cell_type, scores in result["per_cell_type"].items():
        assert scores["acc"] == pytest.approx(best[f"val/acc_{cell_type}"], abs=1e-6)
        assert scores["acc_leak"] == pytest.approx(best[f"val/acc_leak_{cell_type}"], abs=1e-6)
    held_out = json.loads((tiny_run / "run.json").read_text())["val_experiments"]
    assert sorted(result["experiments"]) == held_out
    assert result["wells"] == sum(e["wells"] for e in result["experiments"].values())
    # the same logits through the submission path: submit (leak / arg-max) + score against train.csv
    logits = tmp_path / "val.npz"
    run_cli("predict", tiny_run, "--data", tiny_store, "--split", "val", "--tta", "1", "--out", logits, *plain)
    for flag, key in (([], "acc_leak"), (["--no-leak"], "acc")):
        run_cli("submit", "--data", tiny_store, "--logits", logits, *flag, "--out", tmp_path / "s.csv")
        scored = json.loads(run_cli("score", "--submission", tmp_path / "s.csv", "--answers",
                                    tiny_data / "train.csv", "--json").stdout)
        assert scored["accuracy"] == pytest.approx(result[key], abs=1e-9)
        assert scored["wells"] == result["wells"]


@pytest.mark.slow
def test_ddp_validation_and_prediction_equal_one_process(tiny_data, tmp_path):
    """Two gloo processes validate and predict exactly what one process does, with an odd number of sites."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    wells = read_dataset(data).wells
    folds = experiment_folds(wells, 2, split_seed=0)
    held_out = sorted(e for e, f in folds.items() if f == 0)[0]
    (data / "train" / held_out / "Plate1").glob("*_s2_w3.png").__next__().unlink()  # one site unreadable
    store = tmp_path / "s.zarr"
    run_cli("pack", data, "--out", store, "--skip-missing")
    assert len(open_source(store).dataset.sites) % 2 == 1
    run = tmp_path / "ddp"
    run_cli("train", "--data", store, "--recipe", "cpu-demo", "--out", run, *TINY, "--set", "trainer.epochs=1",
            "--devices", "2", process=True)
    best = _best_row(run)
    one = json.loads(run_cli("evaluate", run, "--data", store, "--tta", "1", "--json").stdout)
    two = json.loads(run_cli("evaluate", run, "--data", store, "--tta", "1", "--devices", "2", "--json",
                             process=True).stdout)
    assert one["acc"] == pytest.approx(best["val/acc"], abs=1e-6) and one == two
    assert one["acc_leak"] == pytest.approx(best["val/acc_leak"], abs=1e-6)
    run_cli("predict", run, "--data", store, "--tta", "2", "--out", tmp_path / "one.npz")
    run_cli("predict", run, "--data", store, "--tta", "2", "--devices", "2", "--out", tmp_path / "two.npz",
            process=True)
    a, b = load_logits(tmp_path / "one.npz"), load_logits(tmp_path / "two.npz")
    assert (a.id_code == b.id_code).all()
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-5)


def test_splits_do_not_move_with_the_seed(tiny_store):
    source = open_source(tiny_store)

    def held_out(*overrides):
        recipe = load_recipe("cpu-demo", ["data.folds=2", *overrides])
        dm = RxRxDataModule(source, recipe.data, recipe.augment, recipe.seed)
        dm.setup("fit")
        return dm.val_experiments

    assert held_out() == held_out("seed=7") == held_out("seed=123")
    assert any(held_out(f"data.split_seed={s}") != held_out() for s in range(1, 8))
    assert held_out("data.fold=1") != held_out() and set(held_out("data.fold=1")).isdisjoint(held_out())


def test_fold_all_trains_on_everything_without_validation(tiny_store, tmp_path):
    run = tmp_path / "all"
    run_cli("train", "--data", tiny_store, "--recipe", "cpu-demo", "--out", run, *TINY, "--set", "trainer.epochs=1",
            "--set", "data.fold=all")
    info = json.loads((run / "run.json").read_text())
    assert info["fold"] == "all" and info["val_experiments"] == [] and info["complete"]
    train = open_source(tiny_store).dataset.sites.query("split == 'train'")
    assert (train.label != "").all() and info["train_sites"] == len(train)  # every site: controls are classes too
    assert (run / "checkpoints" / "best.ckpt").is_file()
    assert not any(c.startswith("val/") for c in pd.read_csv(run / "history.csv").columns)
    for command in ("predict", "evaluate"):
        out = [] if command == "evaluate" else ["--out", tmp_path / "x.npz"]
        proc = run_cli(command, run, "--data", tiny_store, "--split", "val", *out, check=False)
        assert proc.returncode == 2 and "data.fold: all" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.npz").exists()
    test = tmp_path / "test.npz"
    run_cli("predict", run, "--data", tiny_store, "--tta", "1", "--out", test)
    assert len(load_logits(test).id_code) == len(open_source(tiny_store).dataset.test_ids)


class _Crash(L.Callback):
    """Dies right after a given optimizer step, as a killed process would (checkpoints stay on disk)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("killed")


def _weights(path):
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if v.dtype.is_floating_point}


@pytest.mark.slow
def test_resume_from_a_mid_epoch_checkpoint_is_exact(tiny_store, tmp_path):
    source = open_source(tiny_store)
    recipe = load_recipe("cpu-demo", ["data.num_workers=0", "data.batch_size=16", "data.folds=2",
                                      "trainer.epochs=2", "trainer.checkpoint_every_n_steps=2",
                                      "augment.cutmix=0.5", "augment.intensity_jitter=0.2",
                                      "augment.random_resized_crop={scale: [0.5, 1.0]}"])
    fit(source, recipe, tmp_path / "full", progress=False)
    with pytest.raises(RuntimeError, match="killed"):
        fit(source, recipe, tmp_path / "killed", progress=False, extra_callbacks=[_Crash(3)])
    last = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 2 and last["epoch"] == 0  # a resume point in the middle of epoch 0
    fit(source, recipe, tmp_path / "killed", resume=True, progress=False)
    a, b = (_weights(tmp_path / r / "checkpoints" / "last.ckpt") for r in ("full", "killed"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    # the resumed run's logs are the uninterrupted run's logs
    full_log, resumed_log = (pd.read_csv(tmp_path / r / "logs" / "metrics.csv") for r in ("full", "killed"))
    assert list(full_log.columns) == list(resumed_log.columns) and len(full_log) == len(resumed_log)
    pd.testing.assert_frame_equal(full_log, resumed_log, rtol=1e-4)


def test_resume_refuses_a_changed_schedule(tiny_run, tiny_store):
    before = (tiny_run / "recipe.yaml").read_text()
    proc = run_cli("train", "--data", tiny_store, "--recipe", "cpu-demo", "--out", tiny_run, *TINY,
                   "--set", "trainer.epochs=3", "--set", "optim.lr=0.01", "--resume", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "trainer.epochs" in proc.stderr and "optim.lr" in proc.stderr
    assert (tiny_run / "recipe.yaml").read_text() == before
    proc = run_cli("train", "--data", tiny_store, "--recipe", "cpu-demo", "--out", tiny_run, *TINY,
                   "--set", "trainer.epochs=2", "--resume")
    assert "complete" in proc.stdout


def test_weight_decay_groups_and_head_only_warmup(tiny_store, tmp_path):
    seen = {}

    class Watch(L.Callback):
        def on_train_start(self, trainer, module):
            names = {id(p): n for n, p in module.net.named_parameters()}
            for group in trainer.optimizers[0].param_groups:
                for p in group["params"]:
                    seen[names[id(p)]] = group["weight_decay"]
            self.start = {n: p.detach().clone() for n, p in module.net.named_parameters()}

        def on_train_epoch_end(self, trainer, module):
            changed = {n: not torch.equal(p, self.start[n]) for n, p in module.net.named_parameters()}
            seen[f"epoch{trainer.current_epoch}"] = changed

    recipe = load_recipe("cpu-demo", ["data.num_workers=0", "data.batch_size=16", "data.folds=2",
                                      "trainer.epochs=2", "optim.freeze_backbone_epochs=1", "optim.weight_decay=0.1"])
    fit(open_source(tiny_store), recipe, tmp_path / "run", progress=False, extra_callbacks=[Watch()])
    assert seen["embed.weight"] == 0 and seen["backbone.bn1.weight"] == 0 and seen["neck.1.weight"] == 0
    assert seen["backbone.conv1.0.weight"] == 0.1 and seen["head.weight"] == 0.1
    assert all(v == 0 for k, v in seen.items() if k.endswith(".bias"))
    first, second = seen["epoch0"], seen["epoch1"]
    assert not first["backbone.conv1.0.weight"] and first["head.weight"]  # head-only warm-up epoch
    assert second["backbone.conv1.0.weight"]


def test_unknown_cell_type_at_prediction_is_an_error(tiny_run, tmp_path):
    run_cli("synth", tmp_path / "d", "--preset", "tiny", "--image-size", "16", "--cell-types", "HEPG2,U2OS")
    proc = run_cli("predict", tiny_run, "--data", tmp_path / "d", "--out", tmp_path / "x.npz", check=False)
    assert proc.returncode == 2 and "cell type U2OS" in proc.stderr and not (tmp_path / "x.npz").exists()


def test_bad_recipes_are_reported_before_torch_is_imported(tmp_path):
    code = ("import sys\nfrom rcic.cli import main\n"
            f"sys.argv = ['rcic', 'train', '--data', '{tmp_path}', '--recipe', 'cpu-demo', '--out', "
            f"'{tmp_path / 'run'}', '--set', 'trainer.monitor=val/nope']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.split() == ["2", "False"], proc.stderr
    assert "--set trainer.monitor=val/nope" in proc.stderr and "recipe key trainer.monitor" in proc.stderr


@pytest.mark.parametrize("overrides,message", [
    (["trainer.monitor=val/f1"], "recipe key trainer.monitor"),
    (["data.fold=7"], "recipe key data.fold: 7 is out of range"),
    (["data.fold=all", "data.split=wilds"], "recipe key data.fold"),
])
def test_bad_evaluation_keys(tiny_store, tmp_path, overrides, message):
    args = [x for o in overrides for x in ("--set", o)]
    proc = run_cli("train", "--data", tiny_store, "--recipe", "cpu-demo", "--out", tmp_path / "r", *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr and not (tmp_path / "r").exists()


def test_evaluate_needs_labels(tiny_run, tiny_store):
    proc = run_cli("evaluate", tiny_run, "--data", tiny_store, "--split", "test", check=False)
    assert proc.returncode == 2 and "no label" in proc.stderr


@pytest.fixture(scope="module")
def wilds_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("wilds") / "rxrx1_v1.0"
    run_cli("synth", out, "--preset", "tiny", "--layout", "wilds", "--image-size", "24", "--test-experiments", "2")
    return out


def test_wilds_layout_is_read_as_released(wilds_data):
    meta = pd.read_csv(wilds_data / "metadata.csv")
    assert list(meta.columns) == ["site_id", "well_id", "cell_type", "dataset", "experiment", "plate", "well", "site",
                                  "well_type", "sirna", "sirna_id"]
    assert set(meta.dataset) == {"train", "val", "test"} and meta.sirna_id.max() == 10
    ds = read_dataset(wilds_data)
    assert ds.layout == "wilds" and ds.channels == 3 and set(ds.sites.split) == {"train", "val", "test"}
    assert (ds.wells.label != "").all() and ds.vocab.n_treatments == 8
    from rcic.io import load_site

    image = load_site(wilds_data, ds.sites.id_code.iloc[0], 1)
    assert image.shape == (3, 24, 24) and image.dtype == np.uint8


@pytest.mark.slow
def test_wilds_split_training_and_its_evaluation(wilds_data, tiny_store, tmp_path):
    run = tmp_path / "wilds"
    args = ["--data", wilds_data, "--recipe", "cpu-demo", *TINY, "--set", "trainer.epochs=1",
            "--set", "data.split=wilds", "--set", "data.normalization=image"]
    proc = run_cli("train", *args, "--out", run, check=False)
    assert proc.returncode == 2 and "model.input" in proc.stderr and not run.exists()
    run_cli("train", *args, "--set", "model.input=rgb", "--out", run)
    ds = read_dataset(wilds_data)
    info = json.loads((run / "run.json").read_text())
    assert info["val_experiments"] == sorted(ds.wells.query("split == 'val'").experiment.unique())
    train_sites = ds.sites.query("split == 'train'")
    assert info["train_sites"] == int((train_sites.site == 1).sum())  # WILDS trains on site 1 only
    result = json.loads(run_cli("evaluate", run, "--data", wilds_data, "--split", "test", "--tta", "1",
                                "--json").stdout)
    wilds = result["wilds"]
    test_sites = ds.sites.query("split == 'test'")
    assert wilds["images"] == len(test_sites) and set(wilds["per_cell_type"]) == set(test_sites.cell_type)
    assert wilds["acc_wg"] == min(wilds["per_cell_type"].values())
    images = test_sites.cell_type.value_counts()  # acc_avg is over images: each cell type weighs by its images
    assert wilds["acc_avg"] == pytest.approx(sum(wilds["per_cell_type"][c] * n for c, n in images.items()) / len(
        test_sites))
    proc = run_cli("train", "--data", tiny_store, "--recipe", "cpu-demo", "--out", tmp_path / "k",
                   "--set", "data.split=wilds", "--set", "model.input=rgb", check=False)
    assert proc.returncode == 2 and "data.split" in proc.stderr and not (tmp_path / "k").exists()
