"""Side effects of training, kept out of the step maths: atomic checkpoints, logs that survive a resume,
curves, the DDP check, and the prediction writer."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from rcic import interrupts
from rcic.atomic import atomic_path, atomic_write_text

FULL_DISK_BYTES = 256 << 20  # a failed checkpoint write with less free than this is a full disk


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint beside its target and rename it: a crash never leaves a broken file.
    Read it with ``weights_only=True``: tensors and plain values only, a file's code is never run."""

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=None) -> dict:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_path(path) as tmp:
                torch.save(checkpoint, tmp)
        except (OSError, RuntimeError) as err:
            # torch's zip writer reports a full disk as a RuntimeError: name it for what it is
            if isinstance(err, OSError) and err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            if isinstance(err, OSError) or shutil.disk_usage(path.parent).free < FULL_DISK_BYTES:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
            raise


class StepCheckpoint(ModelCheckpoint):
    """``latest-step.ckpt`` every N optimiser steps, except on an epoch's last batch: the epoch's own
    checkpoint follows at its end, and a resume from a last batch would skip the epoch's end (its
    checkpoint files, history and logs), which Lightning counts as done."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def _read_log(path: Path) -> tuple[list[str], list[dict]]:
    """Header and rows of a ``metrics.csv``; a last line cut by a kill (no newline yet) is dropped."""
    if not path.is_file():
        return [], []
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(text))
    rows = [row for row in reader if None not in row]  # None: a row with more fields than the header
    return list(reader.fieldnames or []), rows


class _ResumedWriter(ExperimentWriter):
    """``metrics.csv`` that survives a kill and a resume. Lightning's writer deletes an existing file,
    rewrites its header in place (a kill there loses the log) and fails when the resumed run logs a
    column the kept file lacks. This one keeps the rows of the run being resumed up to the first step
    the resumed run logs (it logs the later ones again identically), takes the union of their columns
    and the new ones, and replaces the file atomically whenever its header changes; rows are appended."""

    def _check_log_dir_exists(self) -> None:
        self._merged = False  # the kept rows are merged at the first save that has rows

    def save(self) -> None:
        if not self.metrics:
            return
        if self._merged:
            super().save()
            return
        path = Path(self.metrics_file_path)
        header, rows = _read_log(path)
        first = min(int(m["step"]) for m in self.metrics)
        kept = [row for row in rows if row.get("step") not in (None, "") and int(float(row["step"])) < first]
        self.metrics_keys = sorted(set(header) | set().union(*self.metrics))
        self._write_all(kept + self.metrics)
        self.metrics = []
        self._merged = True

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        _, rows = _read_log(Path(self.metrics_file_path))
        self._write_all(rows, fieldnames)

    def _write_all(self, rows: list[dict], fieldnames: list[str] | None = None) -> None:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=fieldnames or self.metrics_keys)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.metrics_file_path, out.getvalue())


class RunCSVLogger(CSVLogger):
    """``logs/metrics.csv`` of a run; with ``resume`` it continues the file instead of replacing it."""

    def __init__(self, run_dir: Path, resume: bool):
        super().__init__(run_dir, name="logs", version="", flush_logs_every_n_steps=1)
        self._resume = resume

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            if not self._resume:
                path = Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE
                path.unlink(missing_ok=True)
            self._experiment = _ResumedWriter(log_dir=self.log_dir)
        return self._experiment


class InterruptCallback(L.Callback):
    """Once a batch: stop on a Ctrl-C that a finalizer swallowed (``rcic.interrupts``)."""

    def on_train_batch_end(self, *args) -> None:
        interrupts.check()

    def on_validation_batch_end(self, *args) -> None:
        interrupts.check()

    def on_predict_batch_end(self, *args) -> None:
        interrupts.check()

    def on_train_epoch_end(self, *args) -> None:
        interrupts.check()


class CurvesCallback(L.Callback):
    """After each epoch: ``history.csv`` and ``curves.png`` (loss and accuracy) in the run folder."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.history: list[dict] = []

    def on_train_start(self, trainer, pl_module) -> None:
        path = self.run_dir / "history.csv"
        if path.is_file():  # a resumed run continues its history
            self.history = pd.read_csv(path).to_dict("records")
            self.history = [h for h in self.history if h["epoch"] < trainer.current_epoch]

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith(("train/", "val/")) and not k.endswith("_step") and v.numel() == 1}
        self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **metrics})
        frame = pd.DataFrame(self.history)
        atomic_write_text(self.run_dir / "history.csv", frame.to_csv(index=False))
        plot_curves(frame, self.run_dir / "curves.png")


def plot_curves(history: pd.DataFrame, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    epochs = history["epoch"] + 1
    train_key = "train/loss_epoch" if "train/loss_epoch" in history else "train/loss"
    for key, label in ((train_key, "train"), ("val/loss", "validation")):
        if key in history and history[key].notna().any():
            ax_loss.plot(epochs, history[key], marker="o", label=label)
    ax_loss.set(title="Loss", xlabel="epoch")
    ax_loss.legend()
    for key in sorted(k for k in history if k.startswith("val/acc")):
        style = {"linewidth": 2.5} if key == "val/acc" else {"linestyle": "--", "alpha": 0.7}
        ax_acc.plot(epochs, history[key], marker="o", label=key.removeprefix("val/"), **style)
    if "train/acc" in history:
        ax_acc.plot(epochs, history["train/acc"], color="grey", alpha=0.6, label="train")
    ax_acc.set(title="Accuracy on held-out experiments", xlabel="epoch", ylim=(0, 1))
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


class DdpAgreementCallback(L.Callback):
    """At the end of training, check that every rank holds the same weights (``ddp_check.json``)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.world_size < 2:
            return
        local = torch.tensor([pl_module.parameter_checksum()], dtype=torch.float64, device=pl_module.device)
        sums = pl_module.all_gather(local).reshape(-1).tolist()
        if trainer.is_global_zero:
            report = {"world_size": trainer.world_size, "checksums": sums,
                      "agree": max(sums) - min(sums) <= 1e-6 * max(1.0, abs(sums[0])), "pid": os.getpid()}
            atomic_write_text(self.run_dir / "ddp_check.json", json.dumps(report, indent=2))


class WellPredictionWriter(BasePredictionWriter):
    """Collects ``predict_step`` outputs batch by batch; ``collect`` gathers them on rank 0, by index.

    Under DDP each rank predicts its share of the wells; the gathered rows are de-duplicated by
    well index, so any padding of a sampler never counts a well twice.
    """

    def __init__(self, progress=None):
        super().__init__(write_interval="batch")
        self.parts: list[dict[str, np.ndarray]] = []
        self.progress = progress
        self.done = 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        self.parts.append({k: v.detach().float().cpu().numpy() if k != "index" else v.cpu().numpy()
                           for k, v in prediction.items()})
        if self.progress is not None:
            self.done += len(prediction["index"]) * trainer.world_size
            total = len(trainer.predict_dataloaders.dataset)
            self.progress(min(self.done, total), total)

    def collect(self, trainer) -> dict[str, np.ndarray] | None:
        """All ranks' predictions ordered by well index on rank 0; None on the other ranks."""
        local = {k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]} if self.parts else {}
        self.parts = []
        if trainer.world_size > 1:
            import torch.distributed as dist

            everything = [None] * trainer.world_size if trainer.is_global_zero else None
            dist.gather_object(local, everything, dst=0)
            if not trainer.is_global_zero:
                return None
            everything = [part for part in everything if part]
            local = {k: np.concatenate([p[k] for p in everything]) for k in everything[0]}
        index, first = np.unique(local["index"], return_index=True)
        return {k: v[first] for k, v in local.items()} | {"index": index}
