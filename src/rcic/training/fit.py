"""``fit``: build data, model and Trainer from a recipe and train into a run folder.

A run folder holds ``recipe.yaml`` (resolved), ``run.json`` (data, fold, classes),
``checkpoints/`` (``best.ckpt``, ``last.ckpt``, one per epoch), ``logs/metrics.csv``, ``tb/``
(TensorBoard), ``history.csv`` and ``curves.png``. Nothing in an existing run folder is
overwritten unless ``resume`` continues that same run.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pandas as pd
import timm
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from rcic.atomic import atomic_write_text
from rcic.config import Recipe, dump_recipe, load_recipe
from rcic.data.dataset import RxRxDataModule
from rcic.errors import RcicError, RecipeError
from rcic.store.source import ImageSource
from rcic.training.callbacks import AtomicCheckpointIO, CurvesCallback, DdpAgreementCallback
from rcic.training.module import RcicTask

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    run_dir: Path
    best_checkpoint: Path | None
    best_val_acc: float | None
    epochs: int


def is_child_rank() -> bool:
    """True in the extra processes of a multi-process (DDP / torchrun) launch."""
    return int(os.environ.get("LOCAL_RANK", 0)) > 0 or int(os.environ.get("RANK", 0)) > 0


def resolve_precision(recipe: Recipe) -> str:
    if recipe.trainer.precision != "auto":
        return recipe.trainer.precision
    # bf16 on CPU is 8-20x slower than fp32 here: fp32 on CPU, bf16-mixed on a GPU
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def _distribution(recipe: Recipe, devices: int | str | None) -> dict:
    """Devices and strategy; torchrun's environment wins where present."""
    t = recipe.trainer
    devices = t.devices if devices is None else devices
    nodes = t.num_nodes
    if "LOCAL_WORLD_SIZE" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ:  # launched by torchrun
        devices = int(os.environ["LOCAL_WORLD_SIZE"])
        nodes = int(os.environ.get("WORLD_SIZE", devices)) // devices
    multi = (devices not in (1, "1")) or nodes > 1
    return {"devices": devices, "num_nodes": nodes, "strategy": "ddp" if multi else "auto"}


def _check_run_dir(run_dir: Path, recipe: Recipe, resume: bool) -> Path | None:
    """Refuse to overwrite a run; on resume, check the recipe and return the last checkpoint."""
    saved = run_dir / "recipe.yaml"
    if not resume:
        if saved.exists() or (run_dir / "checkpoints").exists():
            raise RcicError("holds a run already: add --resume to continue it, or choose another --out", run_dir)
        return None
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise RcicError("nothing to resume: no checkpoints/last.ckpt", run_dir)
    previous = load_recipe(saved)
    if previous.digest() != recipe.digest():
        diff = ", ".join(previous.differences(recipe)[:5])
        raise RecipeError(f"--resume with another recipe than the checkpoint's (differs in: {diff})", run_dir)
    return last


def build_datamodule(source: ImageSource, recipe: Recipe, extra_train: pd.DataFrame | None = None
                     ) -> RxRxDataModule:
    if not timm.is_model(recipe.model.backbone):
        raise RecipeError(f"recipe key model.backbone: unknown timm model {recipe.model.backbone!r}")
    return RxRxDataModule(source, recipe, extra_train)


def fit(
    source: ImageSource,
    recipe: Recipe,
    run_dir: str | Path,
    resume: bool = False,
    devices: int | str | None = None,
    extra_train: pd.DataFrame | None = None,
    progress: bool = True,
    extra_callbacks: list[L.Callback] | None = None,
) -> FitResult:
    """Train ``recipe`` on ``source`` into ``run_dir``; ``extra_train`` adds pseudo-labelled wells."""
    run_dir = Path(run_dir)
    child = is_child_rank()
    last = _check_run_dir(run_dir, recipe, resume) if not child else None
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    dm = build_datamodule(source, recipe, extra_train)
    task = RcicTask(recipe.to_dict(), list(dm.classes), dm.vocab.n_treatments, dm.cell_types, dm.experiments,
                    dm.input_size)
    if not child and not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
        info = {"data": str(Path(source.dataset.root).resolve()), "layout": source.dataset.layout,
                "fold": recipe.data.fold, "val_experiments": sorted(dm.val_rows()["experiment"].unique()),
                "train_sites": int(len(dm.train_rows())), "val_sites": int(len(dm.val_rows())),
                "pseudo_sites": int(dm.sites["pseudo"].sum()), "classes": list(dm.classes),
                "recipe_digest": recipe.digest()}
        atomic_write_text(run_dir / "run.json", json.dumps(info, indent=2))
    if child and resume:
        last = run_dir / "checkpoints" / "last.ckpt"

    t = recipe.trainer
    folder = run_dir / "checkpoints"
    # best by validation accuracy (checked at every validation, also mid-epoch); one per epoch; and
    # last.ckpt refreshed by every save of the periodic callbacks (a resume point at any time)
    best = ModelCheckpoint(dirpath=folder, filename="best", monitor="val/acc", mode="max", save_top_k=1,
                           auto_insert_metric_name=False, enable_version_counter=False)
    keep = t.keep_epoch_checkpoints  # None: every epoch's file stays; N: the N latest (monitor the step)
    per_epoch = ModelCheckpoint(dirpath=folder, filename="epoch{epoch:03d}", every_n_epochs=1, save_last=True,
                                save_top_k=-1 if keep is None else keep, monitor=None if keep is None else "step",
                                mode="max", auto_insert_metric_name=False, enable_version_counter=False)
    checkpoints = [best, per_epoch]
    if t.val_every_n_steps:
        checkpoints.append(ModelCheckpoint(dirpath=folder, filename="latest-step", save_top_k=1, save_last=True,
                                           every_n_train_steps=t.val_every_n_steps, enable_version_counter=False))
    bars = [] if not progress else [RichProgressBar(leave=True) if os.isatty(2) else TQDMProgressBar(refresh_rate=20)]
    dist = _distribution(recipe, devices)
    cpu = t.accelerator == "cpu" or (t.accelerator == "auto" and not torch.cuda.is_available())
    trainer = L.Trainer(
        default_root_dir=run_dir,
        max_epochs=t.epochs,
        accelerator=t.accelerator,
        precision=resolve_precision(recipe),
        accumulate_grad_batches=recipe.optim.accumulate,
        gradient_clip_val=recipe.optim.grad_clip,
        val_check_interval=t.val_every_n_steps or 1.0,
        check_val_every_n_epoch=None if t.val_every_n_steps else 1,
        limit_train_batches=t.limit_train_batches,
        num_sanity_val_steps=0,
        logger=[CSVLogger(run_dir, name="logs", version=""), TensorBoardLogger(run_dir, name="tb", version="")],
        callbacks=[*checkpoints, CurvesCallback(run_dir), DdpAgreementCallback(run_dir), *bars,
                   *(extra_callbacks or [])],
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # EpochSampler splits by rank itself (same order after a resume)
        deterministic=cpu,
        enable_progress_bar=progress,
        enable_model_summary=False,
        log_every_n_steps=5,
        **dist,
    )
    log.info("training %s on %s: fold %d, %d train / %d val sites, %s", recipe.name, source.dataset.root,
             recipe.data.fold, len(dm.train_rows()), len(dm.val_rows()), "resuming" if last else "new run")
    trainer.fit(task, datamodule=dm, ckpt_path=str(last) if last else None)
    best_path = Path(best.best_model_path) if best.best_model_path else None
    score = float(best.best_model_score) if best.best_model_score is not None else None
    return FitResult(run_dir, best_path, score, trainer.current_epoch)
