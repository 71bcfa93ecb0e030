"""Training from the CLI: recipes, run folder, resume, refusal to overwrite, DDP on 2 CPU processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from rcic.config import RECIPE_DIR, load_recipe
from rcic.errors import RecipeError
from tests.conftest import run_cli

# a resnet18-sized model on 32 px sites, a few steps: seconds on 2 cores
# model.adabn_prior=0: cpu-demo's auto would predict 5 times (tests/test_plate_aware.py covers it)
TINY = ["--set", "model.adabn_prior=0",
        "--set", "data.num_workers=0", "--set", "data.batch_size=16", "--set", "trainer.epochs=2",
        "--set", "data.folds=2", "--set", "trainer.accelerator=cpu"]


def test_shipped_recipes_validate():
    names = {p.stem for p in RECIPE_DIR.glob("*.yaml")}
    assert {"cpu-demo", "winning", "seed-densenet121"} <= names
    winning = load_recipe("winning")
    assert winning.model.head == "cosine" and (winning.loss.ce, winning.loss.arcface) == (0.8, 0.2)
    assert winning.data.classes == "treatments+controls" and winning.augment.cutmix > 0
    seed = load_recipe("seed-densenet121")
    assert seed.model.backbone == "densenet121" and seed.model.input == "rgb"
    assert seed.data.batch_size * seed.optim.accumulate == 30


@pytest.mark.parametrize("override,message", [
    ("model.backbon=resnet18", "recipe key model.backbon: unknown key"),
    ("optim.lr=-1", "recipe key optim.lr"),
    ("data.normalization=zscore", "recipe key data.normalization"),
    ("loss.arcface=0.5", "margin losses need model.head: cosine"),
])
def test_bad_recipe_keys_name_the_key(override, message):
    with pytest.raises(RecipeError, match=message.replace(".", r"\.")):
        load_recipe("seed-densenet121", [override])


def test_set_overrides_are_typed():
    r = load_recipe("cpu-demo", ["optim.lr=3e-4", "trainer.image_size_schedule={0: 32, 2: 48}", "data.fold=1"])
    assert r.optim.lr == 3e-4 and r.trainer.image_size_schedule == {0: 32, 2: 48} and r.data.fold == 1


def _weights(path):
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if v.dtype.is_floating_point}


def test_train_writes_a_complete_run_and_refuses_to_overwrite(tiny_run, tiny_store, tiny_data, tmp_path):
    from rcic.data.dataset import experiment_folds
    from rcic.io import read_dataset

    files = {p.relative_to(tiny_run).as_posix() for p in tiny_run.rglob("*") if p.is_file()}
    for expected in ("recipe.yaml", "run.json", "checkpoints/best.ckpt", "checkpoints/last.ckpt",
                     "checkpoints/epoch000.ckpt", "checkpoints/epoch001.ckpt", "logs/metrics.csv", "curves.png",
                     "history.csv"):
        assert expected in files, expected
    assert any(f.startswith("tb/events") for f in files)
    history = pd.read_csv(tiny_run / "history.csv")
    assert len(history) == 2 and {"val/acc", "val/acc_HEPG2", "val/acc_HUVEC", "val/loss"} <= set(history.columns)
    info = json.loads((tiny_run / "run.json").read_text())
    # tiny_run: cpu-demo (fold 0 held out, controls are classes too) with data.folds=2: the held-out experiments
    # are fold 0 of experiment_folds, and every site of the others is a training site
    ds = read_dataset(tiny_data)
    sites = ds.sites
    held_out = sorted(e for e, f in experiment_folds(ds.wells, 2, 0).items() if f == 0)
    assert info["val_experiments"] == held_out and len(held_out) == 2
    assert info["train_sites"] == int(((sites.split == "train") & ~sites.experiment.isin(held_out)).sum())
    before = (tiny_run / "recipe.yaml").read_text()
    proc = run_cli("train", "--data", tiny_store, "--recipe", "cpu-demo", "--out", tiny_run, *TINY, check=False)
    assert proc.returncode == 2 and "holds a run already" in proc.stderr
    proc = run_cli("train", "--data", tiny_store, "--recipe", "cpu-demo", "--out", tiny_run, *TINY,
                   "--set", "model.backbone=resnet34", "--resume", check=False)
    assert proc.returncode == 2 and "another recipe" in proc.stderr and "model.backbone" in proc.stderr
    assert (tiny_run / "recipe.yaml").read_text() == before


@pytest.mark.parametrize("args,message", [
    (["--set", "model.backbone=resnet_not_a_model"], "unknown timm model 'resnet_not_a_model'"),
    (["--set", "data.image_size=64"], "64 px asked, but the data's sites are 32 px"),
    (["--set", "model.pretrained=maybe"], "recipe key model.pretrained"),
    (["--set", "model.backbone_args={stem_stride: 1}"], "recipe key model.backbone_args: test_resnet rejects them"),
])
def test_bad_training_input_writes_nothing(tiny_store, tmp_path, args, message):
    out = tmp_path / "run"
    proc = run_cli("train", "--data", tiny_store, "--recipe", "cpu-demo", "--out", out, *TINY, *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()
    proc = run_cli("train", "--data", tmp_path / "missing", "--recipe", "cpu-demo", "--out", out, check=False)
    assert proc.returncode == 2 and "data folder not found" in proc.stderr


def test_variants_train_a_step(tiny_data, tmp_path):
    """RGB-composite input + linear head, focal + CutMix, plate normalisation, progressive resizing, PNG input."""
    run_cli("train", "--data", tiny_data, "--recipe", "seed-densenet121", "--out", tmp_path / "a", *TINY,
            "--set", "model.backbone=resnet18", "--set", "model.pretrained=false", "--set", "data.image_size=32",
            "--set", "trainer.epochs=1", "--set", "trainer.val_every_n_steps=3", "--set", "optim.accumulate=2",
            "--set", "augment.cutmix=1.0", "--set", "loss.focal=0.5", "--set", "data.normalization=plate",
            "--set", "trainer.image_size_schedule={0: 24}", "--set", "data.batch_size=8")
    names = {p.name for p in (tmp_path / "a" / "checkpoints").iterdir()}
    assert {"best.ckpt", "last.ckpt", "epoch000.ckpt"} <= names
    log = pd.read_csv(tmp_path / "a" / "logs" / "metrics.csv")
    assert log.loc[log["val/acc"].notna(), "step"].tolist() == [1]  # validated mid-epoch, after batch 3 (1 update)
    # the epoch's 4th batch came after the last validation: the epoch's checkpoint holds it (2 updates)
    epoch = torch.load(tmp_path / "a" / "checkpoints" / "epoch000.ckpt", map_location="cpu", weights_only=True)
    assert epoch["global_step"] == 2


@pytest.mark.parametrize("launcher", ["devices", "torchrun"])
def test_ddp_two_cpu_processes(tiny_store, tmp_path, launcher):
    out = tmp_path / "ddp"
    args = ["train", "--data", tiny_store, "--recipe", "cpu-demo", "--out", out, *TINY, "--set", "trainer.epochs=1",
            "--set", "trainer.checkpoint_every_n_steps=1"]
    if launcher == "devices":
        run_cli(*args, "--devices", "2", process=True)
    else:
        torchrun = Path(sys.executable).with_name("torchrun")
        proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "rcic.cli", *map(str, args)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
    check = json.loads((out / "ddp_check.json").read_text())
    assert check["world_size"] == 2 and check["agree"] and len(check["checksums"]) == 2
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["best.ckpt", "epoch000.ckpt", "last.ckpt", "latest-step.ckpt"]
    # the persistent training metrics of a mid-epoch checkpoint are sums over both ranks (1 batch of 16 each)
    step = torch.load(out / "checkpoints" / "latest-step.ckpt", map_location="cpu", weights_only=True)
    assert step["global_step"] == 1
    state = step["state_dict"]
    assert float(state["train_loss.weight"]) == 32 and int(state["train_acc.tp"] + state["train_acc.fp"]) == 32


def test_pretrained_weights_from_a_local_file_adapt_to_six_channels(tmp_path):
    """ImageNet-style weights from a file: timm tiles the RGB first conv over 6 channels (x 3/6)."""
    import timm

    from rcic.models.net import create_backbone

    reference = timm.create_model("resnet18", pretrained=False)
    torch.save(reference.state_dict(), tmp_path / "weights.pth")
    recipe = load_recipe("cpu-demo", ["model.backbone=resnet18", f"model.pretrained_file={tmp_path / 'weights.pth'}"])
    conv = create_backbone(recipe.model, 6).conv1.weight.detach()
    assert conv.shape[1] == 6
    torch.testing.assert_close(conv[:, :3], reference.conv1.weight.detach() * 0.5)
    torch.testing.assert_close(conv[:, 3:], reference.conv1.weight.detach() * 0.5)
    with pytest.raises(RecipeError, match="not available offline"):
        create_backbone(load_recipe("cpu-demo", ["model.backbone=resnet18", "model.pretrained=true"]).model, 6)


def test_backbone_args_reach_timm():
    """``model.backbone_args`` are timm's own: output_stride 8 keeps a 48 px site at 6x6, not 2x2."""
    from rcic.models.net import create_backbone

    site = torch.zeros(1, 6, 48, 48)
    plain = create_backbone(load_recipe("cpu-demo").model, 6)
    dilated = create_backbone(load_recipe("cpu-demo", ["model.backbone_args={output_stride: 8}"]).model, 6)
    assert plain.forward_features(site).shape[-2:] == (2, 2)
    assert dilated.forward_features(site).shape[-2:] == (6, 6)
    with pytest.raises(RecipeError, match="'in_chans' is set by rcic"):
        create_backbone(load_recipe("cpu-demo", ["model.backbone_args={in_chans: 3}"]).model, 6)


def test_same_seed_same_weights_on_cpu(tiny_store, tmp_path):
    args = ["--data", tiny_store, "--recipe", "cpu-demo", *TINY, "--set", "trainer.epochs=1",
            "--set", "augment.cutmix=0.5"]
    run_cli("train", *args, "--out", tmp_path / "a")
    run_cli("train", *args, "--out", tmp_path / "b")
    run_cli("train", *args, "--set", "seed=1", "--out", tmp_path / "c")
    a, b, c = (_weights(tmp_path / r / "checkpoints" / "last.ckpt") for r in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
