"""``fit``: build data, model and Trainer from a recipe and train into a run folder.

A run folder holds ``recipe.yaml`` (resolved), ``run.json`` (data, split, held-out experiments,
classes), ``checkpoints/`` (``best.ckpt``, ``last.ckpt``, one per epoch), ``logs/metrics.csv``,
``tb/`` (TensorBoard), ``history.csv`` and ``curves.png``. Nothing in an existing run folder is
overwritten unless ``resume`` continues that same run; a folder whose run died before its first
checkpoint starts afresh.

A run survives being killed at any moment: ``run.lock`` (an ``fcntl`` lock held for the run's life)
keeps a second ``rcic train`` out of the folder; every file is written atomically; ``--resume``
continues from the newest intact checkpoint (a cut ``last.ckpt`` falls back to an older resume
point, which replays the same steps), and refuses what would change the computation (the recipe,
the number of devices or nodes, the pseudo-labels, the data). When training ends the run is first
marked complete (``run.json``), then its checkpoints keep only the weights (no optimiser state):
they are for prediction, and a finished run has nothing left to resume. A finish that is itself
interrupted is completed by the next ``--resume``. Checkpoints are read with
``torch.load(weights_only=True)``: a file's code is never run.
"""

from __future__ import annotations

import fcntl
import gc
import hashlib
import json
import logging
import os
import pickle
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import timm
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

from rcic import interrupts
from rcic.atomic import atomic_path, atomic_write_text
from rcic.config import Recipe, dump_recipe, load_recipe
from rcic.data.dataset import RxRxDataModule
from rcic.errors import RcicError, RecipeError
from rcic.store.source import ImageSource
from rcic.training.callbacks import (
    AtomicCheckpointIO,
    CurvesCallback,
    DdpAgreementCallback,
    InterruptCallback,
    RunCSVLogger,
    StepCheckpoint,
)
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


LOCK_NAME = "run.lock"
# what a finished run's checkpoints no longer hold: they are for prediction
TRAINING_STATE = ("optimizer_states", "lr_schedulers", "loops", "callbacks")
RESUME_POINTS = ("last.ckpt", "latest-step.ckpt", "epoch*.ckpt")


def _checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints; never the hidden temporary files of a write that was cut short."""
    folder = run_dir / "checkpoints"
    return sorted(p for p in folder.glob("*.ckpt") if not p.name.startswith(".")) if folder.is_dir() else []


@contextmanager
def lock_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold ``run.lock`` in ``run_dir`` for the run's life: a second ``rcic train`` there is refused.

    An ``fcntl`` lock is released by the kernel when its process dies, even by kill -9, so a killed
    run never leaves a stale lock. A folder this call created and nothing else wrote to is removed
    again: a refused run writes nothing.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise RcicError("exists and is not a folder; choose another --out", run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RcicError(f"is in use by another rcic train (pid {holder}; {LOCK_NAME}): wait for it to end, "
                        "or choose another --out", run_dir) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        _remove_partial_writes(run_dir)  # ours alone now: a temporary file is a write cut short by a kill
        yield
    finally:
        if created and [p.name for p in run_dir.iterdir()] == [LOCK_NAME]:
            path.unlink()
            run_dir.rmdir()
        os.close(fd)


def _remove_partial_writes(run_dir: Path) -> None:
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "logs"):
        for tmp in folder.glob(".*.tmp-*") if folder.is_dir() else ():
            tmp.unlink(missing_ok=True)


def read_checkpoint(path: Path, mmap: bool = False) -> dict:
    """A checkpoint's content, read with ``weights_only=True`` (tensors and plain values: no code runs);
    anything else (another file, a cut one, a pickle that would run code) is a one-line error."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise RcicError("not a readable rcic checkpoint (it holds objects other than tensors and plain values, "
                        "which rcic never loads: a file's code is never run)", path) from None
    except (RuntimeError, KeyError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise RcicError(f"not a readable rcic checkpoint (cut or damaged: {type(err).__name__})", path) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise RcicError("not a readable rcic checkpoint (no state_dict)", path)
    return checkpoint


def resume_point(run_dir: Path) -> Path | None:
    """The newest intact checkpoint to resume from: ``last.ckpt``, or where it is cut or damaged, the
    newest intact older resume point (the steps after it are replayed exactly). None: no checkpoint yet."""
    folder = run_dir / "checkpoints"
    candidates = [p for pattern in RESUME_POINTS for p in sorted(folder.glob(pattern)) if not p.name.startswith(".")]
    if not candidates:
        return None
    problems = []
    found: list[tuple[int, Path]] = []
    for path in candidates:
        try:
            checkpoint = read_checkpoint(path, mmap=True)
        except RcicError as err:
            problems.append(str(err))
            continue
        if "loops" in checkpoint:  # a resume point (a finished run's files hold weights only)
            found.append((int(checkpoint.get("global_step", 0)), path))
    if not found:
        why = f" ({problems[0]})" if problems else ""
        raise RcicError(f"no intact checkpoint to resume from{why}: start over with another --out "
                        "(or delete this folder)", run_dir)
    step, path = max(found, key=lambda item: (item[0], item[1].name == "last.ckpt"))
    if problems:
        log.warning("%s; resuming from %s (step %d)", problems[0], path.name, step)
    return path


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
        others = [p for p in run_dir.iterdir() if p.name != LOCK_NAME] if run_dir.is_dir() else []
        if others and not saved.is_file():
            raise RcicError("exists and is not an rcic run folder; choose another --out", run_dir)
        return None  # new, or a run that died before its first checkpoint: start afresh
    if saved.is_file():
        previous = load_recipe(saved)
        if previous.digest() != recipe.digest():
            diff = ", ".join(previous.differences(recipe)[:6])
            raise RecipeError(f"--resume with another recipe than the run's (differs in: {diff}); a changed "
                              "schedule cannot continue a run: start a new one", run_dir)
    if _read_run_info(run_dir).get("complete"):
        return None
    return resume_point(run_dir)  # None: no checkpoint yet, the run starts afresh


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


def _digest(frame: pd.DataFrame, *extra) -> str:
    hashes = pd.util.hash_pandas_object(frame.reset_index(drop=True), index=False).to_numpy()
    return hashlib.sha256(hashes.tobytes() + json.dumps(extra).encode()).hexdigest()[:16]


def data_fingerprint(source: ImageSource) -> str:
    """What identifies the data a run trains on: its site table, layout, channels and size, and (for a
    packed store, where they cost nothing) the sites' pixel statistics. The same data moved or
    packed again keeps its fingerprint."""
    sites = source.dataset.sites
    columns = [c for c in ("id_code", "site", "experiment", "plate", "well", "cell_type", "split", "well_type",
                           "label") if c in sites]
    frame = sites[columns].astype(str)
    if hasattr(source, "store"):
        stats = np.asarray(source.channel_stats(), dtype=np.float32).reshape(len(sites), -1)
        frame = frame.assign(**{f"stat{i}": stats[:, i] for i in range(stats.shape[1])})
    return _digest(frame, source.dataset.layout, source.dataset.channels, getattr(source, "image_size", None))


def pseudo_fingerprint(extra_train: pd.DataFrame | None) -> str | None:
    """The pseudo-labelled wells and their labels (``--pseudo`` file and fraction), None without."""
    if extra_train is None or not len(extra_train):
        return None
    return _digest(extra_train[["id_code", "label"]].astype(str).sort_values("id_code"))


def _run_identity(source: ImageSource, trainer: L.Trainer, extra_train: pd.DataFrame | None) -> dict:
    return {"devices": int(trainer.num_devices), "num_nodes": int(trainer.num_nodes),
            "data_fingerprint": data_fingerprint(source), "pseudo_fingerprint": pseudo_fingerprint(extra_train)}


def _check_same_run(run_dir: Path, identity: dict) -> None:
    """A resume must compute what the run computed: refuse other devices, pseudo-labels or data (runs from
    before these were recorded are not checked)."""
    info = _read_run_info(run_dir)
    start_over = "or start over with another --out"
    if "devices" in info and (info["devices"], info["num_nodes"]) != (identity["devices"], identity["num_nodes"]):
        raise RcicError(f"--resume on {identity['devices']} device(s) x {identity['num_nodes']} node(s), but the run "
                        f"trained on {info['devices']} x {info['num_nodes']} (the per-device batch, the sampler's "
                        f"shards and the schedule would change): resume with --devices {info['devices']} and "
                        f"trainer.num_nodes={info['num_nodes']}, {start_over}", run_dir)
    if "pseudo_fingerprint" in info and info["pseudo_fingerprint"] != identity["pseudo_fingerprint"]:
        had = "with pseudo-labels" if info["pseudo_fingerprint"] else "without pseudo-labels"
        raise RcicError(f"--resume with other pseudo-labels than the run's (it trained {had}; --pseudo file or "
                        f"--pseudo-fraction differ): resume with the same ones, {start_over}", run_dir)
    if "data_fingerprint" in info and info["data_fingerprint"] != identity["data_fingerprint"]:
        raise RcicError(f"--resume on other data than the run's (it trained on {info.get('data')}; the sites, "
                        f"labels or pixels differ): resume on the same data, {start_over}", run_dir)


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
    """Train ``recipe`` on ``source`` into ``run_dir``; ``extra_train`` adds pseudo-labelled wells.

    The run folder is locked for the run's life (rank 0; the other ranks are its own processes)."""
    run_dir = Path(run_dir)
    child = is_child_rank()
    with nullcontext() if child else lock_run_dir(run_dir):
        return _fit(source, recipe, run_dir, resume, devices, extra_train, progress, extra_callbacks, child)


def _checkpoint_callbacks(recipe: Recipe, folder: Path, monitor: str | None) -> tuple[ModelCheckpoint, list]:
    t = recipe.trainer
    # best.ckpt: by the recipe's monitor at every validation (also mid-epoch); with data.fold: all
    # (no validation) the end of the last epoch. One file per epoch, and last.ckpt: a resume point at
    # any time. The per-epoch files are written at the end of each training epoch, whenever validation
    # runs (trainer.val_every_n_steps): the steps after an epoch's last validation are kept too.
    if monitor is None:
        best = ModelCheckpoint(dirpath=folder, filename="best", save_top_k=1, every_n_epochs=1,
                               save_on_train_epoch_end=True, enable_version_counter=False)
    else:
        best = ModelCheckpoint(dirpath=folder, filename="best", monitor=monitor,
                               mode="min" if monitor == "val/loss" else "max", save_top_k=1,
                               auto_insert_metric_name=False, enable_version_counter=False)
    keep = t.keep_epoch_checkpoints  # None: every epoch's file stays; N: the N latest (monitor the step)
    per_epoch = ModelCheckpoint(dirpath=folder, filename="epoch{epoch:03d}", every_n_epochs=1, save_last=True,
                                save_top_k=-1 if keep is None else keep, monitor=None if keep is None else "step",
                                mode="max", auto_insert_metric_name=False, enable_version_counter=False,
                                save_on_train_epoch_end=True)
    checkpoints = [best, per_epoch]
    every = t.checkpoint_every_n_steps or t.val_every_n_steps
    if every:
        checkpoints.append(StepCheckpoint(dirpath=folder, filename="latest-step", save_top_k=1, save_last=True,
                                          every_n_train_steps=every, enable_version_counter=False))
    return best, checkpoints


def _fit(source: ImageSource, recipe: Recipe, run_dir: Path, resume: bool, devices: int | str | None,
         extra_train: pd.DataFrame | None, progress: bool, extra_callbacks: list[L.Callback] | None,
         child: bool) -> FitResult:
    last = _check_run_dir(run_dir, recipe, resume) if not child else None
    if resume and not child and _read_run_info(run_dir).get("complete"):
        _compact(run_dir)  # a finish that was interrupted ends now
        info = _read_run_info(run_dir)
        best = run_dir / "checkpoints" / "best.ckpt"
        return FitResult(run_dir, best if best.is_file() else None, info.get("best_score"), info.get("monitor"),
                         recipe.trainer.epochs, already_complete=True)
    if child and resume:  # the same choice as rank 0's, from the same files
        last = resume_point(run_dir)
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    t = recipe.trainer
    augment_on, channels_last = resolve_augment_on(recipe), resolve_channels_last(recipe)
    max_size = max((t.image_size_schedule or {0: 0}).values())
    dm = RxRxDataModule(source, recipe.data, recipe.augment, recipe.seed, augment_on, max_size, extra_train)
    monitor = _check_monitor(recipe, dm)
    task = build_task(dm, recipe, augment_on, channels_last)
    dm.setup("fit")

    best, checkpoints = _checkpoint_callbacks(recipe, run_dir / "checkpoints", monitor)
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
                   *(extra_callbacks or []), InterruptCallback()],
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # EpochSampler splits by rank itself (same order after a resume)
        deterministic=cpu,
        enable_progress_bar=progress,
        enable_model_summary=False,
        log_every_n_steps=5,
        **dist,
    )
    if not child:
        identity = _run_identity(source, trainer, extra_train)
        if last is not None:
            _check_same_run(run_dir, identity)
        else:
            _start_run(run_dir, recipe, source, dm, augment_on, monitor, identity)
    log.info("training %s on %s: %s, %d train / %d val sites, %s", recipe.name, source.dataset.root,
             f"fold {recipe.data.fold}" if recipe.data.split == "folds" else "WILDS split",
             len(dm.train_rows()), len(dm.val_rows()), f"resuming from {last.name}" if last else "new run")
    # The DataLoader workers fork from this process: objects frozen out of the garbage collector's reach
    # (the site tables, everything built so far) stay shared pages in every worker instead of being
    # copied into each by the collector's writes (bench/scale.py --worker-memory, BENCHMARKS.md)
    gc.freeze()
    try:
        trainer.fit(task, datamodule=dm, ckpt_path=str(last) if last else None)
    except SystemExit:
        if trainer.interrupted or interrupts.pending():  # Lightning turns Ctrl-C into exit(1): keep it exit 130
            raise KeyboardInterrupt from None
        raise
    finally:
        gc.unfreeze()
    best_path = Path(best.best_model_path) if best.best_model_path else None
    score = float(best.best_model_score) if best.best_model_score is not None else None
    if trainer.is_global_zero:
        _finish(run_dir, score, monitor)
    return FitResult(run_dir, best_path, score, monitor, trainer.current_epoch)


def _start_run(run_dir: Path, recipe: Recipe, source: ImageSource, dm: RxRxDataModule, augment_on: str,
               monitor: str | None, identity: dict) -> None:
    root = str(source.dataset.root)
    atomic_write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
    info = {"data": str(Path(root).resolve()) if "://" not in root else root, "layout": source.dataset.layout,
            "split": recipe.data.split, "split_seed": recipe.data.split_seed, "fold": recipe.data.fold,
            "val_experiments": dm.val_experiments, "train_sites": int(len(dm.train_rows())),
            "val_sites": int(len(dm.val_rows())), "pseudo_sites": int(dm.sites["pseudo"].sum()),
            "classes": list(dm.classes), "recipe_digest": recipe.digest(), "augment_on": augment_on,
            "monitor": monitor, **identity, "complete": False}
    atomic_write_text(run_dir / "run.json", json.dumps(info, indent=2))


def _finish(run_dir: Path, score: float | None, monitor: str | None) -> None:
    """The run is complete: marked so first (a kill after this mark leaves a complete run), then compacted."""
    info = _read_run_info(run_dir)
    info.update(complete=True, best_score=score, monitor=monitor, compacted=False)
    atomic_write_text(run_dir / "run.json", json.dumps(info, indent=2))
    _compact(run_dir)


def _compact(run_dir: Path) -> None:
    """Checkpoints keep only what prediction needs (weights, recipe, classes), and files holding the same
    weights (best.ckpt, last.ckpt, the last epoch's) become one file, hard-linked. Each file is replaced
    atomically and a file already compacted is left as it is, so an interrupted compaction just runs again."""
    kept: list[tuple[Path, dict]] = []
    for path in _checkpoints(run_dir):
        checkpoint = read_checkpoint(path)
        stripped = not any(key in checkpoint for key in TRAINING_STATE)
        for key in TRAINING_STATE:
            checkpoint.pop(key, None)
        twin = next((p for p, state in kept if _same_weights(state, checkpoint["state_dict"])), None)
        if twin is not None and not os.path.samefile(twin, path):
            with atomic_path(path) as tmp:
                os.link(twin, tmp)
        elif twin is None and not stripped:
            with atomic_path(path) as tmp:
                torch.save(checkpoint, tmp)
        if twin is None:
            kept.append((path, checkpoint["state_dict"]))
    info = _read_run_info(run_dir)
    if not info.get("compacted", True):
        info["compacted"] = True
        atomic_write_text(run_dir / "run.json", json.dumps(info, indent=2))


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
