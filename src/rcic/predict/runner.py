"""Prediction through Lightning: ``Trainer.predict`` over wells (both sites x D4 TTA in the predict
step), any accelerator and precision Lightning supports, ``devices`` for DDP, run ensembles.

``predict`` returns well logits (and pooled features) averaged over the runs; under DDP it returns
them on rank 0 and None on the other ranks, which write nothing.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
from scipy.special import log_softmax

from rcic import interrupts
from rcic.data.augment import TTA_SETS
from rcic.data.dataset import DOMAINS, PREDICT_SPLITS, RxRxDataModule
from rcic.errors import DataError, RcicError
from rcic.predict.logits import Logits
from rcic.store.source import ImageSource
from rcic.training.callbacks import InterruptCallback, WellPredictionWriter
from rcic.training.fit import distribution, resolve_channels_last, resolve_precision
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
        raise RcicError("run folder not found" if not run_dir.exists() else "is not a run folder", run_dir)
    path = run_dir / "checkpoints" / f"{checkpoint}.ckpt"
    if not path.is_file():
        raise RcicError(f"no {checkpoint} checkpoint in this run folder (checkpoints/{checkpoint}.ckpt)", run_dir)
    return path


def load_task(path: Path) -> RcicTask:
    """An rcic checkpoint as a task; anything else (another file, a truncated one, a pickle that would run
    code: read with ``weights_only=True``, nothing in it runs) is a one-line error.

    The backbone is built without its pretrained weights (the checkpoint's weights replace them), so a
    run trained with ``model.pretrained: true`` loads where those weights are absent."""
    import pickle
    import zipfile

    from rcic.training.fit import read_checkpoint

    checkpoint = read_checkpoint(path, mmap=True)
    try:
        recipe = dict(checkpoint["hyper_parameters"]["recipe"])
        recipe["model"] = {**recipe["model"], "pretrained": False, "pretrained_file": None}
        return RcicTask.load_from_checkpoint(path, map_location="cpu", weights_only=True, recipe=recipe)
    except (RuntimeError, KeyError, EOFError, OSError, TypeError, AttributeError, ValueError,
            pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise RcicError(f"not a readable rcic checkpoint ({type(err).__name__})", path) from None


def run_val_experiments(run_dir: Path) -> list[str]:
    """The experiments a run held out (``run.json``); a ``data.fold: all`` run has none."""
    try:
        info = json.loads((Path(run_dir) / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise RcicError("no readable run.json: --split val needs the run folder's record of its held-out "
                        "experiments", run_dir) from None
    if info.get("fold") == "all" or not info.get("val_experiments"):
        raise RcicError("trained with data.fold: all (every labelled experiment), so it has no held-out "
                        "experiments for --split val", run_dir)
    return list(info["val_experiments"])


ADABN_CHOICES = ("recipe", "none", *DOMAINS)
# the priors ``auto`` tries: from plain AdaBN (0) to the trained statistics alone (1)
ADABN_PRIOR_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
# how sharply ``auto`` weighs its candidates by their agreement with the plate assignment: a candidate
# whose arg-max fits the layout on 2% fewer wells weighs 1/e of the best (chosen before measuring; the
# only value tried, BENCHMARKS.md)
AGREEMENT_SHARPNESS = 50.0


def _check_split(split: str, tta: int, adabn: str = "recipe", adabn_prior: float | str | None = None) -> None:
    if split not in PREDICT_SPLITS:
        raise RcicError(f"--split must be one of {', '.join(PREDICT_SPLITS)}, got {split!r}")
    if tta not in TTA_SETS:
        raise RcicError(f"--tta must be one of {', '.join(map(str, TTA_SETS))}, got {tta}")
    if adabn not in ADABN_CHOICES:
        raise RcicError(f"--adabn must be one of {', '.join(ADABN_CHOICES)}, got {adabn!r}")
    if adabn_prior is not None and adabn_prior != "auto" and not 0.0 <= adabn_prior <= 1.0:  # NaN fails both
        raise RcicError(f"--adabn-prior must be between 0 and 1, or auto, got {adabn_prior}")


def _set_adabn(task: RcicTask, adabn: str, adabn_prior: float | str | None = None) -> float | str:
    """The run's own AdaBN (``recipe``) or the one asked for; it must agree with the run's centring domain.

    Returns the prior in force: a number (also set on the task) or ``auto`` (``predict`` tries each)."""
    task.adabn = task.recipe.model.adabn if adabn == "recipe" else adabn
    prior = task.recipe.model.adabn_prior if adabn_prior is None else adabn_prior
    if adabn_prior and task.adabn == "none":
        what = "chooses how much to mix into" if adabn_prior == "auto" else "mixes statistics into"
        raise RcicError(f"--adabn-prior {adabn_prior} {what} AdaBN's, and this prediction has "
                        "none (the run's model.adabn: none, or --adabn none): add --adabn plate")
    center = task.recipe.model.center_embeddings
    if "none" not in (task.adabn, center) and task.adabn != center:
        raise RcicError(f"--adabn {task.adabn}: the run centres its embeddings per {center} "
                        f"(model.center_embeddings), so AdaBN must use that domain too ({center} or none)")
    if prior == "auto" and task.adabn == "none":
        prior = 0.0  # the recipe's auto, with AdaBN switched off: no statistics to mix
    if prior != "auto":
        task.adabn_prior = float(prior)
    return prior


def predict_run(task: RcicTask, source: ImageSource, split: str, val_experiments: list[str] | None = None,
                tta: int = 8, batch_size: int = 32, num_workers: int = 0, devices: int | str = 1,
                precision: str = "auto", accelerator: str = "auto", controls: bool = False,
                progress: Callable[[int, int], None] | None = None, site_outputs: bool = False,
                adabn: str = "recipe", any_classes: bool = False, adabn_prior: float | str | None = None):
    """Well logits and features of one run: (wells frame, logits, features) on rank 0, None elsewhere.

    ``adabn``: ``recipe`` (the run's ``model.adabn``), ``none``, ``plate`` or ``experiment``; with
    AdaBN or embedding centring the wells are predicted domain by domain. ``adabn_prior``: the weight
    of the trained BatchNorm statistics mixed into each domain's (None: the run's ``model.adabn_prior``),
    or ``auto``: one prediction per prior of ``ADABN_PRIOR_GRID``, blended by how well each one's arg-max
    agrees with the plate assignment (``_predict_choosing_prior``; the record in ``task.adabn_prior_choice``).
    ``any_classes`` lets a run embed data whose treatments it never saw (an RxRx1 model on RxRx3-core):
    its logits then mean nothing.
    """
    _check_split(split, tta, adabn, adabn_prior)
    task.adabn_prior_choice = None
    if _set_adabn(task, adabn, adabn_prior) == "auto":
        skipped = ("the run embeds treatments it never saw (any_classes)" if any_classes
                   else None if source.dataset.plate_groups.usable else "the data has no 4 usable plate groups")
        if skipped is None:
            return _predict_choosing_prior(task, source, split, val_experiments, tta, batch_size, num_workers,
                                           devices, precision, accelerator, controls, progress, site_outputs, adabn)
        log.info("AdaBN prior auto: plain AdaBN (prior 0), since %s to choose by", skipped)
        task.adabn_prior, task.adabn_prior_choice = 0.0, {"chosen": 0.0, "skipped": skipped}
    recipe = task.recipe
    dm = RxRxDataModule(source, recipe.data, recipe.augment, recipe.seed)
    if list(dm.classes) != task.classes and not any_classes:
        raise DataError("the run's classes differ from this data's (another dataset or label spelling?)",
                        source.dataset.root)
    if source.dataset.channels != task.in_channels:
        raise DataError(f"the run was trained on {task.in_channels}-channel images; this data has "
                        f"{source.dataset.channels}", source.dataset.root)
    if dm.input_size != task.input_size and task.recipe.data.image_size is None:
        log.info("sites are %d px, the run was trained at %d px: resizing", dm.input_size, task.input_size)
    dm.setup("predict")
    rows = dm.rows_for(split, val_experiments, controls=controls)
    if rows.empty:
        raise DataError(f"no wells to predict for --split {split}", source.dataset.root)
    unknown = sorted(set(rows["cell_type"]) - set(task.cell_types))
    if unknown and task.net.embed is not None:
        raise DataError(f"cell type {unknown[0]} is not one the run was trained on "
                        f"({', '.join(task.cell_types)}); its cell-type embedding has no entry for it",
                        source.dataset.root)
    index = {c: i for i, c in enumerate(task.cell_types)} | {c: 0 for c in unknown}  # unused without embedding
    dataset = dm.well_dataset(rows, index)
    loader = dm.predict_dataloader_for(dataset, batch_size, num_workers, task.eval_domain(), task.eval_phases())
    task.tta = TTA_SETS[tta]
    task.site_outputs = site_outputs
    task.channels_last = resolve_channels_last(recipe)
    writer = WellPredictionWriter(progress)
    trainer = L.Trainer(accelerator=accelerator, precision=resolve_precision(precision), logger=False,
                        callbacks=[writer, InterruptCallback()], enable_progress_bar=False, enable_model_summary=False,
                        **distribution(devices))
    try:
        with warnings.catch_warnings():
            # DomainEvalSampler: Lightning cannot see that a custom batch sampler returns every well; it does
            # (each domain's prediction phase covers all its wells, tested), so its warning says nothing here
            warnings.filterwarnings("ignore", message=r"You are using a custom batch sampler")
            trainer.predict(task, dataloaders=loader, return_predictions=False)
    except SystemExit:
        if trainer.interrupted or interrupts.pending():
            raise KeyboardInterrupt from None
        raise
    out = writer.collect(trainer)
    if out is None:
        return None
    if len(out["index"]) != len(dataset):
        raise RcicError(f"prediction covered {len(out['index'])} of {len(dataset)} wells")
    wells = dataset.wells.assign(real_sites=dataset.real_sites)
    return wells, out["logits"], out["features"], out.get("site_logits")


def _predict_choosing_prior(task: RcicTask, source: ImageSource, split: str, val_experiments, tta: int,
                            batch_size: int, num_workers: int, devices, precision: str, accelerator: str,
                            controls: bool, progress, site_outputs: bool, adabn: str):
    """``adabn_prior: auto``: one prediction per prior of ``ADABN_PRIOR_GRID``, blended by how well each
    agrees with the plate assignment.

    Each candidate weighs ``exp(AGREEMENT_SHARPNESS * (agreement - best agreement))``: the best one 1,
    one whose arg-max fits the plate layout on 2% fewer wells 1/e. The blend is the weighted mean of
    the candidates' log-softmax (and of their features): an ensemble over BatchNorm statistics that
    leans on the ones that fit the layout, instead of a hard pick among predictions that often differ
    by less than their noise (BENCHMARKS.md: on 6 learning sets it was never below the single
    candidate it would have kept, by up to 1.6 points arg-max and 2.3 with the leak). ``chosen`` is
    the candidate of the highest agreement (ties: the smaller prior); the record in
    ``task.adabn_prior_choice`` also holds every agreement and weight (None on non-zero DDP ranks,
    which take part in every candidate and return None). The running sums (float64) are rescaled
    whenever a better candidate arrives, so no more than two candidates' predictions are held at once."""
    sums, total_weight, best_agreement, agreements = None, 0.0, -1.0, {}
    wells, choice = None, {"chosen": 0.0, "agreement": {}}
    for j, prior in enumerate(ADABN_PRIOR_GRID):
        sub = None if progress is None else (
            lambda d, n, j=j: progress(j * n + d, len(ADABN_PRIOR_GRID) * n))
        result = predict_run(task, source, split, val_experiments, tta, batch_size, num_workers, devices,
                             precision, accelerator, controls, sub, site_outputs, adabn, False, prior)
        if result is None:
            continue
        agreement = _agreement(source, result[0], result[1], task.classes)
        if agreement is None:  # no treatment wells (controls only): nothing to assign, plain AdaBN. No early
            # exit: under DDP the other ranks run every candidate, and rank 0 must take part in each
            if wells is None:
                wells, sums, choice = result[0], list(result[1:]), {"chosen": prior,
                                                                     "skipped": "no treatment wells to assign"}
            continue
        log.info("AdaBN prior %g: arg-max agrees with the plate assignment on %.4f of the wells", prior, agreement)
        agreements[f"{prior:g}"] = agreement
        parts = [log_softmax(result[1].astype(np.float64), axis=-1), result[2].astype(np.float64),
                 None if result[3] is None else log_softmax(result[3].astype(np.float64), axis=-1)]
        if agreement > best_agreement:  # strictly: a tie keeps the smaller prior as the chosen one
            rescale = 0.0 if sums is None else float(np.exp(AGREEMENT_SHARPNESS * (best_agreement - agreement)))
            sums = parts if sums is None else [None if s is None else s * rescale + p for s, p in zip(sums, parts)]
            total_weight = total_weight * rescale + 1.0
            wells, best_agreement, choice["chosen"] = result[0], agreement, prior
        else:
            weight = float(np.exp(AGREEMENT_SHARPNESS * (agreement - best_agreement)))
            sums = [None if s is None else s + weight * p for s, p in zip(sums, parts)]
            total_weight += weight
    task.adabn_prior = choice["chosen"]
    task.adabn_prior_choice = choice if wells is not None else None
    if wells is None:
        return None
    if "skipped" in choice:
        return (wells, *sums)
    # the record: each candidate's agreement and the weight it had in the blend (from the unrounded agreement)
    choice["agreement"] = {p: round(a, 6) for p, a in agreements.items()}
    choice["weights"] = {p: round(float(np.exp(AGREEMENT_SHARPNESS * (a - best_agreement))), 6)
                         for p, a in agreements.items()}
    return (wells, *[None if s is None else (s / total_weight).astype(np.float32) for s in sums])


def _agreement(source: ImageSource, wells, logits: np.ndarray, classes: list[str]) -> float | None:
    """How well one candidate's predictions fit the plate layout (``rcic.assign.assignment_agreement``),
    on its treatment wells and treatment classes: the label-free score that weighs ``auto``'s candidates (None
    where there is no treatment well or class to assign)."""
    from rcic.assign import assignment_agreement, treatment_log_probs

    treatment = (wells["well_type"] == "treatment").to_numpy()
    log_probs, treatment_classes = treatment_log_probs(
        logits[treatment], classes, set(source.dataset.vocab.treatment_labels))
    if not treatment.any() or not treatment_classes:
        return None
    return assignment_agreement(wells[treatment], log_probs, treatment_classes, source.dataset.plate_groups)


def predict(run_dirs: list[str | Path], source: ImageSource, split: str = "test", tta: int = 8,
            checkpoint: str = "best", batch_size: int = 32, num_workers: int = 0, embeddings: bool = False,
            progress: Callable[[int, int], None] | None = None, devices: int | str = 1, precision: str = "auto",
            accelerator: str = "auto", controls: bool = False, combine: str = "mean",
            site_outputs: bool = False, adabn: str = "recipe", any_classes: bool = False,
            experiments: list[str] | None = None, adabn_prior: float | str | None = None) -> Logits | None:
    """Well logits averaged over both sites, the TTA transforms and all given runs.

    ``split``: ``val`` (the held-out experiments recorded in the runs' ``run.json``, which must
    agree), ``test``, ``train`` or ``all``; ``controls`` adds the control wells (embeddings).
    ``combine``: features of an ensemble averaged (``mean``) or side by side (``concat``).
    ``site_outputs`` keeps each site's logits too (``Logits.site_logits``, not stored in files).
    ``adabn`` overrides the runs' ``model.adabn`` (``recipe`` keeps each run's own), ``adabn_prior``
    their ``model.adabn_prior`` (None keeps each run's own). A prior of ``auto`` predicts each run once
    per prior of ``ADABN_PRIOR_GRID`` and blends the predictions (log-softmax and features), each weighted
    by how well its arg-max agrees with the plate assignment (``rcic.assign.assignment_agreement``: no
    labels; ``_predict_choosing_prior``); the best candidate (ties: the smaller prior), every
    candidate's agreement and weight are recorded in ``extra["runs"]``. It costs one prediction
    per candidate. Where there is nothing to assign (no 4 usable plate groups, ``any_classes`` as
    ``rcic embed`` predicts, no treatment wells) ``auto`` is plain AdaBN (prior 0), recorded as skipped.
    ``any_classes``: the runs may have been trained on other treatments (embeddings only; see predict_run).
    ``experiments``: with ``split="val"``, predict these experiments instead of the runs' held-out ones.
    """
    _check_split(split, tta, adabn, adabn_prior)
    run_dirs = [Path(r) for r in run_dirs]
    val_experiments = None
    if experiments is not None and split != "val":
        raise ValueError(f"experiments are chosen with split='val', not {split!r}")
    if split == "val" and experiments is not None:
        val_experiments = list(experiments)
    elif split == "val":
        held_out = {str(r): run_val_experiments(r) for r in run_dirs}
        val_experiments = held_out[str(run_dirs[0])]
        for run, held in held_out.items():
            if held != val_experiments:
                raise RcicError("runs hold out different experiments; --split val needs runs of the same fold "
                                "(data.split_seed and data.fold)", run)
    tasks = [(r, load_task(find_checkpoint(r, checkpoint))) for r in run_dirs]
    log.info("predicting %s with %d run(s), TTA x%d, %s checkpoint", split, len(tasks), tta, checkpoint)
    wells, total, features, classes, site_total = None, None, [], None, None
    for i, (run_dir, task) in enumerate(tasks):
        sub = None if progress is None else (lambda d, n, i=i: progress(i * n + d, len(tasks) * n))
        result = predict_run(task, source, split, val_experiments, tta, batch_size, num_workers, devices,
                             precision, accelerator, controls, sub, site_outputs, adabn, any_classes,
                             adabn_prior)
        if result is None:
            continue  # a non-zero DDP rank: rank 0 assembles
        run_wells, logits, feats, site_logits = result
        if site_logits is not None:
            site_total = site_logits.astype(np.float64) + (0 if site_total is None else site_total)
        if wells is None:
            wells, classes, total = run_wells, task.classes, logits.astype(np.float64)
        else:
            if task.classes != classes:
                raise RcicError("runs predict different classes; ensemble runs trained on the same data", run_dir)
            if not np.array_equal(run_wells["id_code"].to_numpy(), wells["id_code"].to_numpy()):
                raise RcicError("runs cover different wells", run_dir)
            total += logits
        features.append(feats)
    if wells is None:
        return None
    extra: dict[str, np.ndarray] = {}
    if split != "test" or (wells["label"] != "").all():
        extra["labels"] = wells["label"].to_numpy().astype(str)
    if embeddings:
        extra["embeddings"] = (np.mean(features, axis=0) if combine == "mean"
                               else np.concatenate(features, axis=1)).astype(np.float32)
    extra["runs"] = np.asarray([json.dumps({"run": str(r), "tta": tta, "checkpoint": checkpoint, "adabn": t.adabn,
                                           "adabn_prior": t.adabn_prior}
                                          | ({"adabn_prior_auto": t.adabn_prior_choice} if t.adabn_prior_choice
                                             else {}))
                                for r, t in tasks])
    logits = Logits(wells["id_code"].to_numpy(), (total / len(tasks)).astype(np.float32), list(classes), extra,
                    wells=wells)
    if site_total is not None:
        logits.site_logits = (site_total / len(tasks)).astype(np.float32)
    return logits
