"""The LightningModule: step maths only (batch preparation, loss, mixing, schedule, metrics).

The Trainer owns the loop. The checkpoint holds the recipe and the class/cell-type/experiment
lists, so a run can be rebuilt from its checkpoint alone (``RcicTask.load_from_checkpoint``).

Validation measures what the leaderboard measures: each held-out well's two sites are averaged
(mean log-softmax over the treatment classes) and scored with ``rcic.assign.score_wells``,
arg-max and plate leak, on the whole held-out set gathered from every rank (the sampler's
padding dropped by index, so no well counts twice under DDP).

Plate-aware keys: with ``model.adabn`` and/or ``model.center_embeddings`` validation and
prediction go domain by domain (``rcic.data.DomainEvalSampler``): a domain's BatchNorm statistics
(phase ADAPT) and mean embedding (phase MEAN) are computed from its own sites before its sites are
predicted (phase PREDICT), mixed with the trained ones first where ``model.adabn_prior`` > 0 (``auto``:
0 in validation; ``rcic.predict`` chooses it); the trained BatchNorm statistics are restored afterwards.
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
from rcic.data.dataset import PHASE_ADAPT, PHASE_MEAN, PHASE_PREDICT
from rcic.errors import RecipeError
from rcic.models.adabn import adapting, mix_bn_state, restore_bn_state, save_bn_state, start_domain
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
        self.adabn: str = self.recipe.model.adabn  # prediction may override it (rcic predict --adabn)
        # and this (--adabn-prior). ``auto`` is resolved by rcic.predict, which runs and blends each candidate;
        # validation during training has no such choice and uses plain AdaBN
        prior = self.recipe.model.adabn_prior
        self.adabn_prior: float = 0.0 if prior == "auto" else prior
        self.adabn_prior_choice: dict | None = None  # auto's candidates at prediction: agreements, weights, best
        self._bn_saved: list[dict] | None = None
        self._last_phase: int | None = None
        self._mean_sum: torch.Tensor | None = None
        self._mean_count = 0

    def forward(self, image: torch.Tensor, cell_type: torch.Tensor | None = None, center: torch.Tensor | None = None,
                domain: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        net = self.__dict__["_compiled"] or self.net
        return net(image, cell_type, center, domain)

    # -- domain-wise evaluation (AdaBN, embedding centring) ---------------------------------------

    def eval_domain(self) -> str | None:
        """The domain evaluation goes by (``plate`` / ``experiment``), or None for plain batches."""
        adabn, center = self.adabn, self.recipe.model.center_embeddings
        if adabn != "none" and center != "none" and adabn != center:
            raise RecipeError(f"AdaBN per {adabn} with embeddings centred per {center} (model.center_embeddings): "
                              "both must use one domain")
        return None if adabn == center == "none" else (center if adabn == "none" else adabn)

    def eval_phases(self) -> tuple[int, ...]:
        return ((PHASE_ADAPT,) if self.adabn != "none" else ()) + (
            (PHASE_MEAN,) if self.recipe.model.center_embeddings != "none" else ()) + (PHASE_PREDICT,)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "set_domain_evaluation"):
            datamodule.set_domain_evaluation(self.eval_domain(), self.eval_phases())

    def _start_domain_evaluation(self) -> None:
        self._last_phase, self._mean_sum, self._mean_count = None, None, 0
        if self.eval_domain() is not None and self.adabn != "none":
            self._bn_saved = save_bn_state(self.net)

    def _end_domain_evaluation(self) -> None:
        if self._bn_saved is not None:
            restore_bn_state(self.net, self._bn_saved)
            self._bn_saved = None

    def _domain_phase(self, batch: dict, views, cell_type: torch.Tensor) -> torch.Tensor | None:
        """Run an adaptation batch (None: nothing to record), or return the centre for a prediction batch.

        ``views()`` yields the batch's normalised image views (sites x TTA). A domain's batches come
        phase by phase, so a new domain starts where the plan's first phase follows another phase.
        """
        if self.eval_domain() is None or "phase" not in batch:
            return None
        phase, first = int(batch["phase"][0]), self.eval_phases()[0]
        if phase == first and self._last_phase != first:  # a new domain
            if self.adabn != "none":
                start_domain(self.net)
            self._mean_sum, self._mean_count = None, 0
        if self._last_phase == PHASE_ADAPT and phase != PHASE_ADAPT and self.adabn_prior > 0:
            mix_bn_state(self.net, self._bn_saved, self.adabn_prior)  # the domain's statistics are complete
        self._last_phase = phase
        if phase == PHASE_ADAPT:
            with adapting(self.net):
                for x in views(adapt=True):
                    self(x, cell_type)
            return None
        if phase == PHASE_MEAN:
            for x in views(adapt=False):
                features = self(x, cell_type)["features"].double().sum(0)
                self._mean_sum = features if self._mean_sum is None else self._mean_sum + features
                self._mean_count += len(x)
            return None
        if self.recipe.model.center_embeddings == "none":
            return None
        return (self._mean_sum / max(self._mean_count, 1)).float()

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
        out = self(images, batch["cell_type"], domain=self._train_domains(batch))
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

    def _train_domains(self, batch: dict) -> torch.Tensor | None:
        """Per-site domain ids for centring at training, by the means of the batch's own domains.

        Batch-domain means rather than running per-domain means: with domain batches
        (``data.sampler``, required by the recipe check) a batch's mean is its domain's mean
        estimated on the current weights, as at prediction (the domain's mean over its wells, same
        weights), with nothing stale, no state to checkpoint and nothing to sync between DDP ranks.
        """
        center = self.recipe.model.center_embeddings
        if center == "none":
            return None
        return batch["experiment"] * 1000 + batch["plate"] if center == "plate" else batch["experiment"]

    def on_validation_epoch_start(self) -> None:
        self._start_domain_evaluation()

    def validation_step(self, batch, batch_idx: int) -> None:
        images = self._images(batch, batch_idx, train=False)
        center = self._domain_phase(batch, lambda adapt: [images], batch["cell_type"])
        if self.eval_domain() is not None and int(batch["phase"][0]) != PHASE_PREDICT:
            return
        out = self(images, batch["cell_type"], center)
        loss = loss_per_sample(out, batch["label"], self.recipe.loss)
        log_probs = F.log_softmax(out["logits"][:, : self.n_treatments].float(), dim=1)
        self._val.append({"index": batch["index"], "log_probs": log_probs, "loss": loss.float()})

    def _gather_rows(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rows of every rank (ranks may hold different numbers: domain-wise evaluation); padding dropped."""
        size = torch.tensor([len(local["index"])], device=self.device)
        longest = int(self.all_gather(size).max())
        padded = {k: torch.cat([v, v.new_full((longest - len(v), *v.shape[1:]), -1)]) for k, v in local.items()}
        gathered = {k: v.reshape(-1, *v.shape[2:]) for k, v in self.all_gather(padded).items()}
        keep = gathered["index"] >= 0
        return {k: v[keep] for k, v in gathered.items()}

    def on_validation_epoch_end(self) -> None:
        self._end_domain_evaluation()
        if not self._val:
            return
        local = {k: torch.cat([v[k] for v in self._val]) for k in self._val[0]}
        self._val.clear()
        if self.trainer.world_size > 1:
            local = self._gather_rows(local)
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

    def on_predict_epoch_start(self) -> None:
        self._start_domain_evaluation()

    def on_predict_epoch_end(self) -> None:
        self._end_domain_evaluation()

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        """A batch of wells: both sites x the TTA transforms, averaged (logits and pooled features).

        In domain-wise prediction the adaptation batches return no rows: BatchNorm statistics from
        the sites as they are (D4 moves pixels, not the channel statistics BatchNorm keeps), the
        mean embedding over the same TTA views as the prediction it centres.
        """
        images = batch["image"]  # (B, S, C, H, W)
        b, s = images.shape[:2]
        x = prepare(images.flatten(0, 1), self.recipe.data.normalization, batch["stats"].flatten(0, 1),
                    self.input_size)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        cell = batch["cell_type"].repeat_interleave(s)
        # a domain's statistics count each real site once, as validation (one item per site) does
        real = batch["real"].flatten() if "real" in batch else slice(None)
        center = self._domain_phase(batch, lambda adapt: [x[real]] if adapt else (d4_transform(x[real], k)
                                                                                  for k in self.tta), cell[real])
        if self.eval_domain() is not None and int(batch["phase"][0]) != PHASE_PREDICT:
            n = len(self.classes)
            empty = {"index": batch["index"][:0], "logits": x.new_zeros(0, n),
                     "features": x.new_zeros(0, self.net.feature_dim)}
            return empty | ({"site_logits": x.new_zeros(0, s, n)} if self.site_outputs else {})
        logits = features = 0
        for k in self.tta:
            out = self(d4_transform(x, k), cell, center)
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

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # a resume skips on_train_epoch_start (restarted mid-epoch or at an epoch's end, Lightning counts the
        # epoch only later): set the backbone's state at every batch too, from the epoch the batch trains in
        self.on_train_epoch_start()

    # The persistent training metrics hold each rank's own running sums. A checkpoint (written by rank
    # 0) holds their sums over all ranks; on resume rank 0 takes them and the other ranks start at zero,
    # so the epoch's synced means stay exact under DDP. A checkpoint written once the epoch's batches are
    # all done resumes in the next epoch: it holds the sums that epoch starts with, zero.
    def _train_metrics(self) -> dict:
        return {"train_acc": self.train_acc, "train_loss": self.train_loss}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._trainer is None:
            return
        state = checkpoint["state_dict"]
        trainer = self.trainer
        if trainer.fit_loop.epoch_loop.batch_progress.current.processed >= trainer.num_training_batches:
            for name, metric in self._train_metrics().items():
                for key, default in metric._defaults.items():
                    if f"{name}.{key}" in state and isinstance(default, torch.Tensor):
                        state[f"{name}.{key}"] = default.detach().clone()
            return
        if trainer.world_size < 2:
            return
        for name, metric in self._train_metrics().items():
            with metric.sync_context(should_sync=True):  # a collective: every rank saves a checkpoint together
                for key in metric._defaults:
                    state[f"{name}.{key}"] = getattr(metric, key).detach().clone()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self._trainer is None or self.trainer.global_rank == 0:
            return
        state = checkpoint["state_dict"]
        for name, metric in self._train_metrics().items():
            for key, default in metric._defaults.items():
                if f"{name}.{key}" in state and isinstance(default, torch.Tensor):
                    state[f"{name}.{key}"] = default.detach().clone()

    def parameter_checksum(self) -> float:
        return float(sum(p.detach().double().sum().item() for p in self.parameters()))
