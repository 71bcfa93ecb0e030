"""The LightningModule: step maths only (loss, mixing, schedule, metrics); the Trainer owns the loop.

The checkpoint holds the recipe and the class/cell-type/experiment lists, so a run can be
rebuilt from its checkpoint alone (``RcicTask.load_from_checkpoint``).
"""

from __future__ import annotations

import math
import random

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from rcic.config import Recipe, recipe_from_dict
from rcic.data.transforms import mix_batch
from rcic.models.net import RcicNet, loss_per_sample


class RcicTask(L.LightningModule):
    def __init__(self, recipe: dict, classes: list[str], n_treatments: int, cell_types: list[str],
                 experiments: list[str], input_size: int):
        super().__init__()
        self.save_hyperparameters()
        self.recipe: Recipe = recipe_from_dict(recipe)
        self.classes, self.n_treatments = list(classes), n_treatments
        self.cell_types, self.experiments = list(cell_types), list(experiments)
        self.input_size = input_size
        self.net = RcicNet(self.recipe.model, len(classes), len(cell_types), scale=self.recipe.loss.scale)
        self._val: list[dict[str, torch.Tensor]] = []

    def forward(self, image: torch.Tensor, cell_type: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self.net(image, cell_type)

    # -- progressive resizing (on the device, after transfer) ----------------------------------

    def scheduled_size(self, epoch: int) -> int | None:
        schedule = self.recipe.trainer.image_size_schedule
        if not schedule:
            return None
        return schedule[max(e for e in schedule if e <= epoch)]

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer is not None and self.trainer.training:
            size = self.scheduled_size(self.current_epoch)
            if size and size != batch["image"].shape[-1]:
                batch["image"] = F.interpolate(batch["image"], size=(size, size), mode="bilinear",
                                               align_corners=False, antialias=size < batch["image"].shape[-1])
        return batch

    # -- steps ----------------------------------------------------------------------------------

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, target_a, target_b, lam = mix_batch(batch["image"], batch["label"], self.recipe.augment)
        out = self(images, batch["cell_type"])
        loss_cfg = self.recipe.loss
        loss = loss_per_sample(out, target_a, loss_cfg)
        if lam < 1.0:
            loss = lam * loss + (1 - lam) * loss_per_sample(out, target_b, loss_cfg)
        loss = loss.mean()
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=len(images))
        if lam == 1.0:
            acc = (out["logits"].argmax(1) == target_a).float().mean()
            self.log("train/acc", acc, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(images))
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        out = self(batch["image"], batch["cell_type"])
        loss = loss_per_sample(out, batch["label"], self.recipe.loss).mean()
        self.log("val/loss", loss, on_epoch=True, prog_bar=False, sync_dist=True, batch_size=len(batch["label"]))
        # treatment wells are scored among treatment classes, as in a submission
        pred = out["logits"][:, : self.n_treatments].argmax(1)
        self._val.append({"pred": pred, "label": batch["label"], "cell_type": batch["cell_type"],
                          "experiment": batch["experiment"]})

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        local = {k: torch.cat([v[k] for v in self._val]) for k in self._val[0]}
        self._val.clear()
        gathered = {k: self.all_gather(v).reshape(-1) for k, v in local.items()}
        correct = (gathered["pred"] == gathered["label"]).float()
        self.log("val/acc", correct.mean(), prog_bar=True, rank_zero_only=False)
        for i, name in enumerate(self.cell_types):
            mask = gathered["cell_type"] == i
            if mask.any():
                self.log(f"val/acc_{name}", correct[mask].mean())
        for i, name in enumerate(self.experiments):
            mask = gathered["experiment"] == i
            if mask.any():
                self.log(f"val_experiment/{name}", correct[mask].mean())

    # -- optimiser and schedule ---------------------------------------------------------------

    def configure_optimizers(self):
        o = self.recipe.optim
        groups = [{"params": list(self.net.backbone_parameters())}, {"params": self.net.head_parameters()}]
        match o.optimizer:
            case "adam":
                opt = torch.optim.Adam(groups, lr=o.lr, weight_decay=o.weight_decay)
            case "adamw":
                opt = torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
            case "sgd":
                opt = torch.optim.SGD(groups, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum, nesterov=True)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        per_epoch = total / max(self.trainer.max_epochs, 1)
        warmup = o.warmup_epochs * per_epoch
        freeze = o.freeze_backbone_epochs * per_epoch

        def factor(step: int) -> float:
            if o.schedule == "onecycle":  # cosine up over 30%, cosine down to ~0
                peak = 0.3 * total
                if step < peak:
                    return 0.04 + 0.96 * (1 - math.cos(math.pi * step / peak)) / 2
                return 1e-4 + (1 - 1e-4) * (1 + math.cos(math.pi * (step - peak) / max(total - peak, 1))) / 2
            if step < warmup:
                return (step + 1) / warmup
            if o.schedule == "constant":
                return 1.0
            progress = (step - warmup) / max(total - warmup, 1)
            return 0.01 + 0.99 * (1 + math.cos(math.pi * min(progress, 1.0))) / 2

        def backbone_factor(step: int) -> float:
            return 0.0 if step < freeze else factor(step)  # head-only warm-up epochs

        schedule = torch.optim.lr_scheduler.LambdaLR(opt, [backbone_factor, factor])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- randomness is reseeded per epoch, so a resumed run replays the same dropout and mixing ----

    def on_train_epoch_start(self) -> None:
        seed = (self.recipe.seed * 100_003 + self.current_epoch * 101 + self.global_rank) % 2**32
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)

    def parameter_checksum(self) -> float:
        return float(sum(p.detach().double().sum().item() for p in self.parameters()))

