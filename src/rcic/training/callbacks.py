"""Side effects of training, kept out of the step maths: atomic checkpoints, curves, DDP check."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from lightning.fabric.plugins import TorchCheckpointIO

from rcic.atomic import atomic_path, atomic_write_text


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint beside its target and rename it: a crash never leaves a broken file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


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
