"""``fit``: build data, model and Trainer from a recipe and train into a run folder.

A run folder holds ``recipe.yaml`` (resolved), ``run.json`` (data, split, held-out experiments,
classes), ``checkpoints/`` (``best.ckpt``, ``last.ckpt``, one per epoch), ``logs/metrics.csv``,
``tb/`` (TensorBoard), ``history.csv`` and ``curves.png``. Nothing in an existing run folder is
overwritten unless ``resume`` continues that same run; a folder whose run died before its first
checkpoint starts afresh. When training ends, checkpoints keep only the weights (no optimiser
state): they are for prediction, and a finished run has nothing left to resume.
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
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

from rcic.atomic import atomic_path, atomic_write_text
from rcic.config import Recipe, dump_recipe, load_recipe
from rcic.data.dataset import RxRxDataModule
from rcic.errors import RcicError, RecipeError
from rcic.store.source import ImageSource
from rcic.training.callbacks import AtomicCheckpointIO, CurvesCallback, DdpAgreementCallback, RunCSVLogger
from rcic.training.module import RcicTask

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    run_dir: Path
    best_checkpoint: Path | None
    best_score: float | None
    monitor: str | None
    epochs: int
    already_complete: bool = False


def is_child_rank() -> bool:
    """True in the extra processes of a multi-process (DDP / torchrun) launch."""
    return int(os.environ.get("LOCAL_RANK", 0)) > 0 or int(os.environ.get("RANK", 0)) > 0


def has_gpu() -> bool:
    return torch.cuda.is_available()


def resolve_precision(precision: str) -> str:
    # bf16 on CPU is 8-20x slower than fp32 here: fp32 on CPU, bf16-mixed on a GPU
    if precision != "auto":
        return precision
    return "bf16-mixed" if has_gpu() else "32-true"


def resolve_augment_on(recipe: Recipe) -> str:
    on = recipe.augment.on
    return ("device" if has_gpu() else "workers") if on == "auto" else on


def resolve_channels_last(recipe: Recipe) -> bool:
    value = recipe.trainer.channels_last
    return has_gpu() if value == "auto" else bool(value)


def distribution(devices: int | str, nodes: int = 1, find_unused: bool = False) -> dict:
    """Devices and strategy; torchrun's environment wins where present."""
    if "LOCAL_WORLD_SIZE" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ:  # launched by torchrun
        devices = int(os.environ["LOCAL_WORLD_SIZE"])
        nodes = int(os.environ.get("WORLD_SIZE", devices)) // devices
    multi = (devices not in (1, "1")) or nodes > 1
    strategy = ("ddp_find_unused_parameters_true" if find_unused else "ddp") if multi else "auto"
    return {"devices": devices, "num_nodes": nodes, "strategy": strategy}


def _checkpoints(run_dir: Path) -> list[Path]:
    folder = run_dir / "checkpoints"
    return sorted(folder.glob("*.ckpt")) if folder.is_dir() else []


def _read_run_info(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _check_run_dir(run_dir: Path, recipe: Recipe, resume: bool) -> Path | None:
    """Refuse to overwrite a run; on resume, check the recipe and return the checkpoint to continue."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RcicError("exists and is not a folder; choose another --out", run_dir)
    saved = run_dir / "recipe.yaml"
    if not resume:
        if _checkpoints(run_dir):
            raise RcicError("holds a run already: add --resume to continue it, or choose another --out", run_dir)
        if run_dir.is_dir() and any(run_dir.iterdir()) and not saved.is_file():
            raise RcicError("exists and is not an rcic run folder; choose another --out", run_dir)
        return None  # new, or a run that died before its first checkpoint: start afresh
    if saved.is_file():
        previous = load_recipe(saved)
        if previous.digest() != recipe.digest():
            diff = ", ".join(previous.differences(recipe)[:6])
            raise RecipeError(f"--resume with another recipe than the run's (differs in: {diff}); a changed "
                              "schedule cannot continue a run: start a new one", run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    return last if last.is_file() else None  # no checkpoint yet: the run starts afresh


def build_task(dm: RxRxDataModule, recipe: Recipe, augment_on: str, channels_last: bool) -> RcicTask:
    if not timm.is_model(recipe.model.backbone):
        raise RecipeError(f"recipe key model.backbone: unknown timm model {recipe.model.backbone!r}")
    return RcicTask(recipe.to_dict(), list(dm.classes), dm.vocab.n_treatments, dm.cell_types, dm.experiments,
                    dm.input_size, in_channels=dm.source.dataset.channels, augment_on=augment_on,
                    channels_last=channels_last)


def _check_monitor(recipe: Recipe, dm: RxRxDataModule) -> str | None:
    if not recipe.validates:
        return None
    monitor = recipe.trainer.monitor
    if monitor == "val/acc_leak" and not dm.plate_groups.usable:
        raise RecipeError(f"recipe key trainer.monitor: val/acc_leak needs the plate leak (4 plate groups in the "
                          f"training labels; this data has {len(dm.plate_groups.groups)}); use val/acc")
    return monitor


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
    if resume and not child and _read_run_info(run_dir).get("complete"):
        info = _read_run_info(run_dir)
        best = run_dir / "checkpoints" / "best.ckpt"
        return FitResult(run_dir, best if best.is_file() else None, info.get("best_score"), info.get("monitor"),
                         recipe.trainer.epochs, already_complete=True)
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    t = recipe.trainer
    augment_on, channels_last = resolve_augment_on(recipe), resolve_channels_last(recipe)
    max_size = max((t.image_size_schedule or {0: 0}).values())
    dm = RxRxDataModule(source, recipe.data, recipe.augment, recipe.seed, augment_on, max_size, extra_train)
    monitor = _check_monitor(recipe, dm)
    task = build_task(dm, recipe, augment_on, channels_last)
    dm.setup("fit")
    if not child and last is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
        info = {"data": str(Path(source.dataset.root).resolve()) if "://" not in str(source.dataset.root)
                else str(source.dataset.root), "layout": source.dataset.layout,
                "split": recipe.data.split, "split_seed": recipe.data.split_seed, "fold": recipe.data.fold,
                "val_experiments": dm.val_experiments, "train_sites": int(len(dm.train_rows())),
                "val_sites": int(len(dm.val_rows())), "pseudo_sites": int(dm.sites["pseudo"].sum()),
                "classes": list(dm.classes), "recipe_digest": recipe.digest(), "augment_on": augment_on,
                "monitor": monitor, "complete": False}
        atomic_write_text(run_dir / "run.json", json.dumps(info, indent=2))
    if child and resume:
        path = run_dir / "checkpoints" / "last.ckpt"
        last = path if path.is_file() else None

    folder = run_dir / "checkpoints"
    # best.ckpt: by the recipe's monitor at every validation (also mid-epoch); with data.fold: all
    # (no validation) the last epoch. One file per epoch, and last.ckpt: a resume point at any time.
    if monitor is None:
        best = ModelCheckpoint(dirpath=folder, filename="best", save_top_k=1, every_n_epochs=1,
                               enable_version_counter=False)
    else:
        best = ModelCheckpoint(dirpath=folder, filename="best", monitor=monitor,
                               mode="min" if monitor == "val/loss" else "max", save_top_k=1,
                               auto_insert_metric_name=False, enable_version_counter=False)
    keep = t.keep_epoch_checkpoints  # None: every epoch's file stays; N: the N latest (monitor the step)
    per_epoch = ModelCheckpoint(dirpath=folder, filename="epoch{epoch:03d}", every_n_epochs=1, save_last=True,
                                save_top_k=-1 if keep is None else keep, monitor=None if keep is None else "step",
                                mode="max", auto_insert_metric_name=False, enable_version_counter=False)
    checkpoints = [best, per_epoch]
    every = t.checkpoint_every_n_steps or t.val_every_n_steps
    if every:
        checkpoints.append(ModelCheckpoint(dirpath=folder, filename="latest-step", save_top_k=1, save_last=True,
                                           every_n_train_steps=every, enable_version_counter=False))
    progress = progress and os.isatty(2)  # a live bar on a terminal only; logs get the callers' epoch lines
    bars = [RichProgressBar(leave=False)] if progress else []
    dist = distribution(t.devices if devices is None else devices, t.num_nodes,
                        find_unused=recipe.optim.freeze_backbone_epochs > 0)
    cpu = t.accelerator == "cpu" or (t.accelerator == "auto" and not has_gpu())
    trainer = L.Trainer(
        default_root_dir=run_dir,
        max_epochs=t.epochs,
        accelerator=t.accelerator,
        precision=resolve_precision(t.precision),
        accumulate_grad_batches=recipe.optim.accumulate,
        gradient_clip_val=recipe.optim.grad_clip,
        val_check_interval=t.val_every_n_steps or 1.0,
        check_val_every_n_epoch=None if t.val_every_n_steps else 1,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=None if recipe.validates else 0,
        num_sanity_val_steps=0,
        logger=[RunCSVLogger(run_dir, resume=last is not None),
                TensorBoardLogger(run_dir, name="tb", version="")],
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
    log.info("training %s on %s: %s, %d train / %d val sites, %s", recipe.name, source.dataset.root,
             f"fold {recipe.data.fold}" if recipe.data.split == "folds" else "WILDS split",
             len(dm.train_rows()), len(dm.val_rows()), "resuming" if last else "new run")
    try:
        trainer.fit(task, datamodule=dm, ckpt_path=str(last) if last else None)
    except SystemExit:
        if trainer.interrupted:  # Lightning turns Ctrl-C into exit(1): keep it an interruption (exit 130)
            raise KeyboardInterrupt from None
        raise
    best_path = Path(best.best_model_path) if best.best_model_path else None
    score = float(best.best_model_score) if best.best_model_score is not None else None
    if trainer.is_global_zero:
        _finish(run_dir, score, monitor)
    return FitResult(run_dir, best_path, score, monitor, trainer.current_epoch)


def _finish(run_dir: Path, score: float | None, monitor: str | None) -> None:
    """The run is complete: checkpoints keep only what prediction needs (weights, recipe, classes), and
    files holding the same weights (best.ckpt, last.ckpt, the last epoch's) become one file, hard-linked."""
    kept: list[tuple[Path, dict]] = []
    for path in _checkpoints(run_dir):
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        for key in ("optimizer_states", "lr_schedulers", "loops", "callbacks"):
            checkpoint.pop(key, None)
        twin = next((p for p, state in kept if _same_weights(state, checkpoint["state_dict"])), None)
        with atomic_path(path) as tmp:
            if twin is not None:
                os.link(twin, tmp)
            else:
                torch.save(checkpoint, tmp)
        if twin is None:
            kept.append((path, checkpoint["state_dict"]))
    info = _read_run_info(run_dir)
    info.update(complete=True, best_score=score, monitor=monitor)
    atomic_write_text(run_dir / "run.json", json.dumps(info, indent=2))


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
