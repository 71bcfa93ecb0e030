"""The LightningModule: step maths only (batch preparation, loss, mixing, schedule, metrics).

The Trainer owns the loop. The checkpoint holds the recipe and the class/cell-type/experiment
lists, so a run can be rebuilt from its checkpoint alone (``RcicTask.load_from_checkpoint``).

Validation measures what the leaderboard measures: each held-out well's two sites are averaged
(mean log-softmax over the treatment classes) and scored with ``rcic.assign.score_wells``,
arg-max and plate leak, on the whole held-out set gathered from every rank (the sampler's
padding dropped by index, so no well counts twice under DDP).
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from rcic.assign.scoring import mean_by_well, score_wells
from rcic.config import Recipe, recipe_from_dict
from rcic.data.augment import TTA_SETS, d4_transform, generator, mix_batch, prepare, step_seed
from rcic.models.net import RcicNet, loss_per_sample


class RcicTask(L.LightningModule):
    def __init__(self, recipe: dict, classes: list[str], n_treatments: int, cell_types: list[str],
                 experiments: list[str], input_size: int, in_channels: int = 6, augment_on: str = "workers",
                 channels_last: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.recipe: Recipe = recipe_from_dict(recipe)
        self.classes, self.n_treatments = list(classes), n_treatments
        self.cell_types, self.experiments = list(cell_types), list(experiments)
        self.input_size, self.in_channels = input_size, in_channels
        self.augment_on, self.channels_last = augment_on, channels_last
        self.net = RcicNet(self.recipe.model, len(classes), len(cell_types), scale=self.recipe.loss.scale,
                           in_channels=in_channels)
        # epoch accuracy of the un-mixed training batches, reduced across DDP ranks by torchmetrics
        self.train_acc = MulticlassAccuracy(num_classes=len(classes), average="micro")
        self.train_loss = MeanMetric()
        for metric in (self.train_acc, self.train_loss):
            metric.persistent(True)  # running sums travel in mid-epoch checkpoints: a resumed epoch's means are exact
        self.tta: tuple[int, ...] = TTA_SETS[1]
        self.site_outputs = False  # predict_step also returns each site's logits (WILDS scores images)
        self._val: list[dict[str, torch.Tensor]] = []
        self.__dict__["_compiled"] = None  # not a submodule: the state dict keeps the plain net's keys

    def forward(self, image: torch.Tensor, cell_type: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        net = self.__dict__["_compiled"] or self.net
        return net(image, cell_type)

    def configure_model(self) -> None:
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.recipe.trainer.compile and self.__dict__["_compiled"] is None:
            self.__dict__["_compiled"] = torch.compile(self.net)

    # -- batch preparation: normalisation and (device) augmentation, after the transfer ---------

    def _images(self, batch: dict, batch_idx: int, train: bool) -> torch.Tensor:
        images = batch["image"]
        if images.dtype == torch.uint8:  # not prepared in the workers: normalise (and augment) here
            augment = self.recipe.augment if train and self.augment_on == "device" else None
            gen = generator(self.recipe.seed, self.current_epoch, batch_idx, self.global_rank, 1) if augment else None
            images = prepare(images, self.recipe.data.normalization, batch["stats"], self.input_size, augment, gen)
        if train:
            size = self.scheduled_size(self.current_epoch)
            if size and size != images.shape[-1]:
                images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                                       antialias=size < images.shape[-1])
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def scheduled_size(self, epoch: int) -> int | None:
        schedule = self.recipe.trainer.image_size_schedule
        if not schedule:
            return None
        return schedule[max(e for e in schedule if e <= epoch)]

    # -- steps ----------------------------------------------------------------------------------

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        # every random draw of a step (dropout, mixing, device augmentation) is a function of
        # (seed, epoch, batch, rank): a run resumed from any checkpoint replays the same steps
        seed = step_seed(self.recipe.seed, self.current_epoch, batch_idx, self.global_rank)
        torch.manual_seed(seed)
        images = self._images(batch, batch_idx, train=True)
        rng = np.random.default_rng(seed)
        images, target_a, target_b, lam = mix_batch(images, batch["label"], self.recipe.augment, rng)
        out = self(images, batch["cell_type"])
        loss_cfg = self.recipe.loss
        loss = loss_per_sample(out, target_a, loss_cfg)
        if lam < 1.0:
            loss = lam * loss + (1 - lam) * loss_per_sample(out, target_b, loss_cfg)
        loss = loss.mean()
        self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(images))
        self.train_loss.update(loss.detach(), len(images))
        self.log("train/loss_epoch", self.train_loss, on_step=False, on_epoch=True, batch_size=len(images))
        if lam == 1.0:
            self.train_acc.update(out["logits"].detach(), target_a)
        # logged at every step (updated on un-mixed batches only), so its epoch value is always computed
        # and reset, also in an epoch that a resumed run finishes after its last un-mixed batch
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=len(images))
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        out = self(self._images(batch, batch_idx, train=False), batch["cell_type"])
        loss = loss_per_sample(out, batch["label"], self.recipe.loss)
        log_probs = F.log_softmax(out["logits"][:, : self.n_treatments].float(), dim=1)
        self._val.append({"index": batch["index"], "log_probs": log_probs, "loss": loss.float()})

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        local = {k: torch.cat([v[k] for v in self._val]) for k in self._val[0]}
        self._val.clear()
        if self.trainer.world_size > 1:
            local = {k: v.reshape(-1, *v.shape[2:]) for k, v in self.all_gather(local).items()}
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or getattr(datamodule, "val_set", None) is None:
            return
        index = local["index"].cpu().numpy()
        index, first = np.unique(index, return_index=True)  # drops DistributedSampler's padding
        rows = datamodule.val_set.rows.iloc[index]
        codes, log_probs = mean_by_well(rows["id_code"].to_numpy(), local["log_probs"][first].cpu().numpy())
        wells = rows.drop_duplicates("id_code").set_index("id_code").loc[codes].reset_index()
        scores = score_wells(wells, log_probs, self.classes[: self.n_treatments], datamodule.plate_groups)
        # every rank computed the same numbers from the same gathered set: no further sync needed
        values = {"val/loss": float(local["loss"][first].mean()), "val/acc": scores["acc"],
                  "val/acc_leak": scores["acc_leak"]}
        for cell_type, s in scores["per_cell_type"].items():
            values[f"val/acc_{cell_type}"], values[f"val/acc_leak_{cell_type}"] = s["acc"], s["acc_leak"]
        for experiment, s in scores["experiments"].items():
            values[f"val_experiment/{experiment}"] = s["acc"]
        for name, value in values.items():
            if value is not None:
                self.log(name, value, prog_bar=name in ("val/acc", "val/acc_leak"), rank_zero_only=False)

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        """A batch of wells: both sites x the TTA transforms, averaged (logits and pooled features)."""
        images = batch["image"]  # (B, S, C, H, W)
        b, s = images.shape[:2]
        x = prepare(images.flatten(0, 1), self.recipe.data.normalization, batch["stats"].flatten(0, 1),
                    self.input_size)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        cell = batch["cell_type"].repeat_interleave(s)
        logits = features = 0
        for k in self.tta:
            out = self(d4_transform(x, k), cell)
            logits = logits + out["logits"].float()
            features = features + out["features"].float()
        n = len(self.tta)
        per_site = (logits / n).view(b, s, -1)
        out = {"index": batch["index"], "logits": per_site.mean(1), "features": (features / n).view(b, s, -1).mean(1)}
        if self.site_outputs:
            out["site_logits"] = per_site
        return out

    # -- optimiser and schedule ---------------------------------------------------------------

    def configure_optimizers(self):
        from timm.optim import param_groups_weight_decay
        from timm.scheduler import CosineLRScheduler

        o = self.recipe.optim
        # no weight decay on norms, biases and the cell-type embedding (timm's param groups)
        groups = param_groups_weight_decay(self.net, o.weight_decay, no_weight_decay_list=self.net.no_weight_decay())
        match o.optimizer:
            case "adam":
                opt = torch.optim.Adam(groups, lr=o.lr)
            case "adamw":
                opt = torch.optim.AdamW(groups, lr=o.lr)
            case "sgd":
                opt = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=True)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        per_epoch = total / max(self.trainer.max_epochs, 1)
        warmup = int(round(o.warmup_epochs * per_epoch))
        match o.schedule:
            case "constant":
                return opt
            case "onecycle":
                schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=o.lr, total_steps=total + 1,
                                                               pct_start=0.3, div_factor=25.0)
            case "cosine":
                schedule = CosineLRScheduler(opt, t_initial=total, lr_min=o.lr * 0.01, warmup_t=warmup,
                                             warmup_lr_init=o.lr / max(warmup, 1), warmup_prefix=True,
                                             t_in_epochs=False)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def lr_scheduler_step(self, scheduler, metric=None) -> None:
        if hasattr(scheduler, "step_update"):  # timm schedulers: the lr is a function of the update count
            scheduler.step_update(num_updates=self.global_step)
        else:
            scheduler.step()

    def on_train_epoch_start(self) -> None:
        # head-only warm-up: the backbone takes no gradient (and no optimiser update) at first
        frozen = self.current_epoch < self.recipe.optim.freeze_backbone_epochs
        for p in self.net.backbone.parameters():
            p.requires_grad_(not frozen)

    def parameter_checksum(self) -> float:
        return float(sum(p.detach().double().sum().item() for p in self.parameters()))
