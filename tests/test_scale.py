"""The full-scale benchmark in a reduced size: the real CSV structure, a partial download (1% of the
images), and every step of bench/scale.py giving complete, correct results."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from rcic.config import load_recipe
from rcic.data import RxRxDataModule
from rcic.io import read_dataset
from rcic.store import PackedStore, open_source, pack

ROOT = Path(__file__).resolve().parents[1]


def _scale_module():
    spec = importlib.util.spec_from_file_location("rcic_bench_scale", ROOT / "bench" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_partial_download_at_reduced_scale(tmp_path):
    scale = _scale_module()
    folder = scale.structure(tmp_path / "data", fraction=0.06, images=0.02)
    ds = read_dataset(folder)
    assert ds.plate_groups.usable and len(ds.sites) > 5000
    present = {(p.parent.parent.name, p.parent.name, p.name.rsplit("_w", 1)[0]) for p in folder.rglob("*_w1.png")}
    result = pack(folder, tmp_path / "s.zarr", skip_missing=True, workers=2)
    assert result.packed == len(present) and result.missing == len(ds.sites) - len(present)
    report = pd.read_csv(tmp_path / "s.zarr" / "missing.csv")
    assert len(report) == result.missing and report["index"].is_monotonic_increasing
    store = PackedStore(tmp_path / "s.zarr")
    assert len(store.dataset.sites) == len(present)
    assert store.read(int(store.dataset.sites.store_index[0])).shape[1] == 8
    scale.dataloader_epoch(tmp_path / "s.zarr")  # the bench's step runs on a partial store; what it reads:
    recipe = load_recipe("cpu-demo", ["data.num_workers=0", "data.fold=all", "data.batch_size=256"])
    dm = RxRxDataModule(open_source(tmp_path / "s.zarr"), recipe.data, recipe.augment, recipe.seed)
    dm.setup("fit")
    seen = torch.cat([batch["index"] for batch in dm.train_dataloader()])
    sites = store.dataset.sites
    assert len(dm.train_set) == ((sites.split == "train") & sites.label.isin(dm.classes)).sum()  # every packed one
    assert sorted(seen.tolist()) == list(range(len(dm.train_set)))  # each once in an epoch
    scale.submit_random(folder, tmp_path)
    submission = pd.read_csv(tmp_path / "submission.csv", dtype=str)
    assert submission.id_code.tolist() == ds.test_ids  # every test well, in sample_submission order
    assert submission.sirna.isin(set(ds.vocab.treatment_labels)).all()
    # the plate leak: each plate's labels come from one group, each once; a plate may repeat a label only
    # where this partial download's labels leave its group short of the plate's wells
    for _, plate in submission.merge(ds.wells, on="id_code").groupby(["experiment", "plate"]):
        group = next(g for g in ds.plate_groups.groups if set(plate.sirna) <= g)
        assert plate.sirna.nunique() == min(len(plate), len(group))
