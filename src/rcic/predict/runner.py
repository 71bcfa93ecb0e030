"""Prediction: D4 test-time augmentation, site averaging and run ensembles, into a logits file."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from rcic.data.dataset import RxRxDataModule
from rcic.data.transforms import TTA_SETS, d4_transform
from rcic.errors import DataError, RcicError
from rcic.predict.logits import Logits
from rcic.store.source import ImageSource
from rcic.training.module import RcicTask

log = logging.getLogger(__name__)


def find_checkpoint(run_dir: str | Path, checkpoint: str = "best") -> Path:
    """``best``, ``last`` or a path; a run folder without that checkpoint is a clear error."""
    run_dir = Path(run_dir)
    if checkpoint not in ("best", "last"):
        path = Path(checkpoint)
        if not path.is_file():
            raise RcicError("checkpoint not found", path)
        return path
    if not run_dir.is_dir():
        raise RcicError("run folder not found", run_dir)
    path = run_dir / "checkpoints" / f"{checkpoint}.ckpt"
    if not path.is_file():
        raise RcicError(f"no {checkpoint} checkpoint in this run folder (checkpoints/{checkpoint}.ckpt)", run_dir)
    return path


def load_task(path: Path) -> RcicTask:
    try:
        return RcicTask.load_from_checkpoint(path, map_location="cpu", weights_only=False)
    except (RuntimeError, KeyError, EOFError, OSError) as err:
        raise RcicError(f"not a readable rcic checkpoint ({type(err).__name__})", path) from err


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def predict_run(task: RcicTask, source: ImageSource, split: str, tta: int = 8, batch_size: int = 64,
                num_workers: int = 0, embeddings: bool = False,
                progress: Callable[[int, int], None] | None = None
                ) -> tuple[pd.DataFrame, np.ndarray, np.ndarray | None]:
    """Per-site logits of one run, averaged over the TTA transforms: (rows, logits, features)."""
    if tta not in TTA_SETS:
        raise RcicError(f"--tta must be one of {', '.join(map(str, TTA_SETS))}, got {tta}")
    dm = RxRxDataModule(source, task.recipe)
    if list(dm.classes) != task.classes:
        raise DataError("the run's classes differ from this data's (another dataset or label spelling?)",
                        source.dataset.root)
    rows = dm.rows_for(split)
    dataset = dm.make_dataset(rows, train=False)
    # the model saw the run's own cell-type order; map this data's cell types onto it
    lookup = {c: i for i, c in enumerate(task.cell_types)}
    cell_index = torch.tensor([lookup.get(c, 0) for c in dm.cell_types])
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    device = _device()
    net = task.net.to(device).eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    logits, feats, done = [], [], 0
    for batch in loader:
        images = batch["image"].to(device)
        cell = cell_index[batch["cell_type"]].to(device)
        total, ftotal = 0, 0
        with autocast:
            for k in TTA_SETS[tta]:
                out = net(d4_transform(images, k), cell)
                total = total + out["logits"].float()
                ftotal = ftotal + out["features"].float()
        logits.append((total / len(TTA_SETS[tta])).cpu().numpy())
        feats.append((ftotal / len(TTA_SETS[tta])).cpu().numpy())
        done += len(images)
        if progress:
            progress(done, len(dataset))
    features = np.concatenate(feats) if embeddings else None
    return dataset.rows, np.concatenate(logits), features


def _per_well(rows: pd.DataFrame, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average over the sites of each well (both sites; one where the other is missing)."""
    codes, inverse = np.unique(rows["id_code"].to_numpy(), return_inverse=True)
    sums = np.zeros((len(codes), values.shape[1]), np.float64)
    np.add.at(sums, inverse, values)
    counts = np.bincount(inverse, minlength=len(codes))[:, None]
    return codes, (sums / counts).astype(np.float32)


def predict(run_dirs: list[str | Path], source: ImageSource, split: str = "test", tta: int = 8,
            checkpoint: str = "best", batch_size: int = 64, num_workers: int = 0, embeddings: bool = False,
            progress: Callable[[int, int], None] | None = None) -> Logits:
    """Well logits averaged over both sites, the TTA transforms and all given runs."""
    if split not in ("test", "val"):
        raise RcicError(f"--split must be test or val, got {split!r}")
    runs = [(Path(r), load_task(find_checkpoint(r, checkpoint))) for r in run_dirs]
    log.info("predicting %s with %d run(s), TTA x%d, %s checkpoint", split, len(runs), tta, checkpoint)
    ids, total, ftotal, classes, labels = None, None, None, None, None
    for i, (run_dir, task) in enumerate(runs):
        sub = None if progress is None else (lambda d, n, i=i: progress(i * n + d, len(runs) * n))
        rows, logits, feats = predict_run(task, source, split, tta, batch_size, num_workers, embeddings, sub)
        codes, well_logits = _per_well(rows, logits)
        if ids is None:
            ids, classes, total = codes, task.classes, well_logits.astype(np.float64)
            ftotal = None if feats is None else _per_well(rows, feats)[1].astype(np.float64)
            truth = rows.drop_duplicates("id_code").set_index("id_code")["label"]
            labels = truth.loc[codes].to_numpy().astype(str)
        else:
            if task.classes != classes:
                raise RcicError("runs predict different classes; ensemble runs trained on the same data", run_dir)
            if not np.array_equal(codes, ids):
                raise RcicError("runs cover different wells (for --split val, give runs of the same fold)", run_dir)
            total += well_logits
            if ftotal is not None:
                ftotal += _per_well(rows, feats)[1]
    extra = {"labels": labels} if split == "val" else {}
    if ftotal is not None:
        extra["embeddings"] = (ftotal / len(runs)).astype(np.float32)
    extra["runs"] = np.asarray([json.dumps({"run": str(r), "tta": tta, "checkpoint": checkpoint}) for r, _ in runs])
    return Logits(ids, (total / len(runs)).astype(np.float32), list(classes), extra)
