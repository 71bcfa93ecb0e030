"""The ``rcic`` command line: one subcommand per stage, each a few lines over the library.

User errors (``RcicError``), usage errors and errors of the environment (disk full, permissions)
are caught once, in ``main``: one line on stderr, exit code 2; Ctrl-C exits 130. Outputs are
checked before any work starts (not an input, not a folder where a file goes), and written
atomically by the library.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from rcic.errors import RcicError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="RxRx1 cell-painting toolkit: from 6-channel PNGs to a leaderboard-ready submission.")
console = Console()
err_console = Console(stderr=True)


# options shared by the commands that run models (predict, evaluate, embed)
Runs = Annotated[list[Path], typer.Argument(help="One or more run folders (averaged: an ensemble)")]
DataSource = Annotated[str, typer.Option("--data", help="RxRx1 folder (PNG) or packed store (folder or URL: s3://...)")]
Tta = Annotated[int, typer.Option("--tta", help="D4 transforms averaged: 1, 2, 4 or 8")]
Checkpoint = Annotated[str, typer.Option("--checkpoint", help="best, last, or a checkpoint path")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Wells per batch (2 sites each)", min=1)]
Workers = Annotated[int, typer.Option("--workers", help="DataLoader workers", min=0)]
AdaBN = Annotated[str, typer.Option("--adabn", help="Domain BatchNorm: recipe (the run's model.adabn), none, plate "
                                                    "or experiment (statistics of each domain's own wells)")]
AdaBNPrior = Annotated[str | None, typer.Option(
    "--adabn-prior", help="With AdaBN, the weight (0-1) of the trained BatchNorm statistics mixed into each "
                          "domain's own, or auto (each of 0, 0.25, ..., 1 tried, blended by how well their arg-max "
                          "agrees with the plate assignment); default: the run's model.adabn_prior")]
Balance = Annotated[str, typer.Option("--balance", help="Balance each plate's probabilities before the plate "
                                                        "assignment: none or sinkhorn")]
Center = Annotated[str, typer.Option("--center", help="none (default): the model's own log-probabilities; plate: "
                                                      "each plate's mean per class removed first (its plate "
                                                      "effect's lean towards some classes; for models without "
                                                      "AdaBN per plate)")]
Devices = Annotated[str, typer.Option("--devices", help="Devices (GPUs, or CPU processes) for DDP")]
Precision = Annotated[str, typer.Option("--precision", help="auto (bf16-mixed on GPU, fp32 on CPU) or a Lightning "
                                                            "precision")]


def _version(value: bool) -> None:
    if value:
        from rcic import __version__

        print(f"rcic {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit")] = False) -> None:
    """RxRx1 cell-painting toolkit: from 6-channel PNGs to a leaderboard-ready submission."""


@contextmanager
def progress_bar(description: str):
    """A rich progress bar on a terminal (cleared when done, so an error stays one line); yields a
    ``progress(done, total)`` callback for library code. Not on a pipe or a file: there rich's
    bar would leave an empty line before an error."""
    if not err_console.is_terminal:
        yield lambda done, total: None
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _same_path(a: Path | str, b: Path | str) -> bool:
    if "://" in str(a) or "://" in str(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def check_output(out: Path | str, inputs: list[Path | str | None], folder: bool = False) -> None:
    """Refuse an output that is one of the command's inputs, or a file where a folder goes (and back)."""
    for given in inputs:
        if given is not None and _same_path(out, given):
            raise RcicError("is also an input of this command; writing it would destroy that input: choose "
                            "another output path", out)
    if "://" in str(out):
        return
    out = Path(out)
    if folder and out.exists() and not out.is_dir():
        raise RcicError("exists and is not a folder; choose another output path", out)
    if not folder and out.is_dir():
        raise RcicError("is a folder; give a file name", out)
    if not folder and out.exists() and not out.is_file():  # replacing a FIFO or /dev/null is never meant
        raise RcicError("exists and is not a regular file (a FIFO or device); choose another output path", out)


def _table(title: str, frame, console_=console) -> None:
    table = Table(title=title)
    for col in frame.columns:
        table.add_column(str(col), justify="right" if frame[col].dtype.kind in "if" else "left")
    for row in frame.itertuples(index=False):
        table.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row])
    console_.print(table)


# ----------------------------------------------------------------------------------------------
# Data foundation
# ----------------------------------------------------------------------------------------------


@app.command()
def info(
    data: Annotated[str, typer.Argument(help="RxRx1 folder (Kaggle 2019 / 2023, RxRx1 or WILDS release) or store "
                                                  "(folder or URL)")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Detect the layout of DATA and summarise it (wells, controls, experiments, plate groups)."""
    from rcic.store import open_source

    dataset = open_source(data).dataset
    summary = dataset.summary()
    if as_json:
        print(json.dumps(summary))
        return
    console.print(f"[bold]{data}[/]: layout [cyan]{summary['layout']}[/], {summary['sites']} sites")
    wells = dataset.wells
    by_type = wells.groupby(["cell_type", "split", "well_type"]).size().unstack(["split", "well_type"], fill_value=0)
    by_type.columns = [f"{s} {t.replace('_control', '').replace('treatment', 'treat')}" for s, t in by_type.columns]
    _table("Wells by cell type", by_type.reset_index())
    exps = wells.groupby(["cell_type", "split"])["experiment"].nunique().unstack(fill_value=0).reset_index()
    _table("Experiments", exps)
    groups = dataset.plate_groups
    console.print(
        f"classes: {summary['treatment_classes']} treatments, {summary['positive_control_classes']} positive "
        f"controls, {summary['negative_control_classes']} negative; plate groups: {len(groups.groups)} "
        f"({', '.join(str(len(g)) for g in groups.groups)} treatments)"
        + ("" if groups.usable else " [yellow](the plate leak needs 4 groups)[/]"))


@app.command()
def rgb(
    data: Annotated[str, typer.Argument(help="RxRx1 folder (any layout) or packed store (folder or URL)")],
    id_code: Annotated[str, typer.Option("--id", help="Well id_code, e.g. HEPG2-01_1_B03")],
    out: Annotated[Path, typer.Option(help="Output PNG file")],
    site: Annotated[int, typer.Option(help="Site 1 or 2", min=1, max=2)] = 1,
) -> None:
    """Write the colour composite of one site (Recursion's reference channel colours).

    The well is looked up in the data's metadata and read from wherever its layout keeps it."""
    import cv2

    from rcic.atomic import atomic_path
    from rcic.io import to_rgb
    from rcic.io.images import parse_id_code
    from rcic.store import open_source

    check_output(out, [data])
    if out.suffix.lower() != ".png":
        raise RcicError("the composite is written as PNG: give a file name ending in .png", out)
    parse_id_code(id_code)  # a plain EXPERIMENT_PLATE_WELL, nothing that could leave the data folder
    source = open_source(data)
    sites = source.dataset.sites
    row = sites[(sites["id_code"] == id_code) & (sites["site"] == site)]
    if row.empty:
        known = (sites["id_code"] == id_code).any()
        raise RcicError(f"site {site} of well {id_code} is not in this data (left out when it was packed?)" if known
                        else f"well {id_code} is in none of this data's metadata files", data)
    image = source.read_site(row.iloc[0])
    composite = image.transpose(1, 2, 0) if image.shape[0] == 3 else to_rgb(image.transpose(1, 2, 0))
    with atomic_path(out) as tmp:
        if not cv2.imwrite(str(tmp), cv2.cvtColor(composite, cv2.COLOR_RGB2BGR)):
            raise RcicError("cannot write the image", out)
    console.print(f"wrote {out} ({id_code} site {site}, {row.iloc[0]['split']})")


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Output folder (must not exist or be empty)")],
    preset: Annotated[str, typer.Option(help="tiny (tests), small (CPU demo), medium, realsize (1,108 "
                                             "treatments, 277 per plate, 32 px)")] = "small",
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same bytes")] = 0,
    n_classes: Annotated[int | None, typer.Option(help="Treatment classes (multiple of 4)")] = None,
    n_positive: Annotated[int | None, typer.Option(help="Positive control classes")] = None,
    image_size: Annotated[int | None, typer.Option(help="Site size in pixels (16-512)")] = None,
    train_experiments: Annotated[int | None, typer.Option(help="Train experiments per cell type")] = None,
    test_experiments: Annotated[int | None, typer.Option(help="Test experiments per cell type")] = None,
    cell_types: Annotated[str | None, typer.Option(help="Comma-separated, e.g. HEPG2,HUVEC")] = None,
    label_style: Annotated[str | None, typer.Option(help="kaggle-2019 (integers) or kaggle-2023 (sirna_<k>)")] = None,
    layout: Annotated[str | None, typer.Option(help="kaggle (default) or wilds (the WILDS release: metadata.csv, "
                                                    "RGB composites, train/val/test), or rxrx3-core (RxRx3-core's "
                                                    "metadata, embeddings and JPEG 2000 shards)")] = None,
    batch_effect: Annotated[float | None, typer.Option(help="Strength of experiment batch effects (1 = default)")
                            ] = None,
    effect_size: Annotated[float | None, typer.Option(help="Median strength of siRNA effects (0.425)")] = None,
    effect_spread: Annotated[float | None, typer.Option(help="Spread of siRNA strengths, 0-1 (0.65)")] = None,
    cell_type_effect: Annotated[float | None, typer.Option(help="Share of an effect specific to the cell type, "
                                                                "0-1 (0)")] = None,
    morphology: Annotated[float | None, typer.Option(help="How different the cell types look, 0-3 (1)")] = None,
    missing_wells: Annotated[float | None, typer.Option(help="Fraction of treatment wells missing per plate "
                                                             "(0)")] = None,
    plate_effect: Annotated[float | None, typer.Option(help="Strength of per-plate morphology shift, channel "
                                                            "gain/offset and blur, 0-5 (0; realsize 1)")] = None,
    negative_controls: Annotated[int | None, typer.Option(help="Negative-control wells per plate (1, as on "
                                                               "most real plates)")] = None,
    workers: Annotated[int, typer.Option(help="Worker processes", min=1)] = 1,
) -> None:
    """Generate a synthetic RxRx1 dataset (Kaggle or WILDS layout) with answers.csv and gene tables."""
    check_output(out, [], folder=True)
    if layout == "rxrx3-core":  # another download altogether: its own generator
        from rcic.synth.rxrx3_core import generate_rxrx3_core, rxrx3_preset

        counts = generate_rxrx3_core(out, rxrx3_preset(preset, seed=seed, image_size=image_size))
        console.print(f"wrote {out} (RxRx3-core layout: {counts['wells']} wells, {counts['genes']} genes, "
                      f"{counts['compounds']} compounds, {counts['dims']} features)")
        return
    from rcic.synth import generate
    from rcic.synth import preset as make_preset

    config = make_preset(
        preset, seed=seed, n_classes=n_classes, n_positive=n_positive, image_size=image_size,
        train_experiments=train_experiments, test_experiments=test_experiments, label_style=label_style,
        cell_types=tuple(c.strip() for c in cell_types.split(",")) if cell_types else None, layout=layout,
        batch_effect=batch_effect, effect_size=effect_size, effect_spread=effect_spread,
        cell_type_effect=cell_type_effect, morphology=morphology, missing_wells=missing_wells,
        plate_effect=plate_effect, negative_controls=negative_controls)
    with progress_bar("synth sites") as update:
        generate(out, config, workers=workers, progress=update)
    console.print(f"wrote {out} ({config.n_classes} classes, {config.image_size}px)")


@app.command()
def pack(
    data: Annotated[Path, typer.Argument(help="RxRx1 folder with PNG images")],
    out: Annotated[str, typer.Option(help="Store to create or resume: a folder, or a URL (s3://bucket/x.zarr)")],
    size: Annotated[int | None, typer.Option(help="Resize sites to SIZE x SIZE (default: keep)")] = None,
    compression: Annotated[str, typer.Option(help="none, lz4 or zstd")] = "lz4",
    shard: Annotated[int, typer.Option(help="Sites per stored object (zarr shard); 1: one object per site")] = 256,
    workers: Annotated[int, typer.Option(help="Worker processes", min=1)] = 1,
    skip_missing: Annotated[bool, typer.Option(help="Leave out sites with missing/corrupt files (report)")] = False,
) -> None:
    """Pack every site into a checksummed zarr store that reads many times faster than PNG (resumable)."""
    check_output(out, [data], folder=True)
    from rcic.store import pack as pack_store

    with progress_bar("pack sites") as update:
        result = pack_store(data, out, size=size, compression=compression, workers=workers,
                            skip_missing=skip_missing, progress=update, shard=shard)
    console.print(f"packed {result.packed}/{result.sites} sites into {result.path}"
                  + (f" (resumed after {result.resumed_blocks} blocks)" if result.resumed_blocks else ""))
    if result.missing:
        console.print(f"[yellow]{result.missing} sites left out: see {result.path}/missing.csv[/]")


# ----------------------------------------------------------------------------------------------
# Training, prediction, submission
# ----------------------------------------------------------------------------------------------


def _quiet_lightning() -> None:
    """Lightning's banners (devices, tips) and warnings stay out of the user's output."""
    import logging
    import warnings

    import lightning  # noqa: F401  (its loggers exist once it is imported)

    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("lightning", "pytorch_lightning")):
            logging.getLogger(name).setLevel(logging.WARNING)
    # only the known messages that say nothing to an rcic user: any other warning still shows
    for message in LIGHTNING_NOISE:
        warnings.filterwarnings("ignore", message=message)


# Lightning's advice that rcic's choices make moot (rcic writes into its own run folders, sizes its
# loaders and logging itself, validates on rank 0's gathered set), and its own deprecation notices
LIGHTNING_NOISE = (
    r"Checkpoint directory .* exists and is not empty",
    r"Experiment logs directory .* exists and is not empty",
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    r"The '\w+_dataloader' does not have many workers",
    r"You defined a `validation_step` but have no `val_dataloader`",
    r"Total length of `\w+` across ranks is zero",
    r"The `srun` command is available on your system but is not used",
    r"It is recommended to use `self\.log\(.*sync_dist=True\)`",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"Trying to infer the `batch_size` from an ambiguous collection",
    # a resume restores the sampler's position through the DataModule's state, and the metrics' running
    # sums through their persistent states: exact, whatever these two say
    r"You're resuming from a checkpoint that ended before the epoch ended",
    r"The ``compute`` method of metric \w+ was called before the ``update`` method",
)


def _epoch_lines():
    """Where stderr is not a terminal (logs, CI), one line per epoch on stdout instead of a live bar."""
    import os

    import lightning as L

    if os.isatty(2):
        return []

    class EpochLines(L.Callback):
        def on_train_epoch_end(self, trainer, module) -> None:
            if not trainer.is_global_zero:
                return
            keys = ("train/loss_epoch", "val/loss", "val/acc", "val/acc_leak")
            values = ", ".join(f"{k} {float(trainer.callback_metrics[k]):.4f}" for k in keys
                               if k in trainer.callback_metrics)
            console.print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: {values}", highlight=False)

    return [EpochLines()]


@app.command()
def train(
    data: Annotated[str, typer.Option(help="RxRx1 folder (PNG) or packed store (folder or URL: s3://...)")],
    recipe: Annotated[str, typer.Option(help="Recipe YAML file, or a shipped name: cpu-demo, winning, ...")],
    out: Annotated[Path, typer.Option(help="Run folder (checkpoints, logs, curves)")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key: key=value")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in OUT from its last checkpoint")] = False,
    devices: Annotated[str | None, typer.Option(help="Devices (GPUs, or CPU processes) for DDP")] = None,
    pseudo: Annotated[Path | None, typer.Option(help="Test logits (.npz) for pseudo-labels")] = None,
    pseudo_fraction: Annotated[float, typer.Option(help="Fraction of test wells to pseudo-label")] = 0.5,
) -> None:
    """Train a model on held-out experiments with a YAML recipe (Lightning: checkpoints, resume, DDP)."""
    from rcic.config import check_pretrained_file, load_recipe

    overrides = list(set_ or [])
    if devices is not None:
        _devices(devices)  # the option's own message, not one about a --set the user never typed
        overrides.append(f"trainer.devices={devices}")
    recipe_ = load_recipe(recipe, overrides)  # before torch is imported: a bad recipe is reported at once
    check_pretrained_file(recipe_)
    check_output(out, [data, pseudo, recipe], folder=True)
    _quiet_lightning()
    from rcic.store import open_source
    from rcic.training import fit
    from rcic.training.fit import is_child_rank

    source = open_source(data)
    source.dataset.check_trainable()
    extra = None
    if pseudo is not None:
        from rcic.predict import load_logits
        from rcic.submit import leak_pseudo_labels

        extra = leak_pseudo_labels(source.dataset, load_logits(pseudo), pseudo_fraction)
        if not is_child_rank():
            console.print(f"pseudo-labels: {len(extra)} test wells (mean confidence {extra.confidence.mean():.3f})")
    result = fit(source, recipe_, out, resume=resume, extra_train=extra, extra_callbacks=_epoch_lines())
    if is_child_rank():
        return
    if result.already_complete:
        console.print(f"run {out} is complete already ({recipe_.trainer.epochs} epochs): nothing to resume")
        return
    score = "n/a" if result.best_score is None else f"{result.best_score:.4f}"
    chosen = f"best {result.monitor} {score}" if result.monitor else "no validation (data.fold: all): last epoch"
    console.print(f"run {out}: {chosen} ({result.best_checkpoint}); curves in {out / 'curves.png'}")


@app.command()
def predict(
    runs: Runs,
    data: DataSource,
    out: Annotated[Path, typer.Option(help="Output logits file (.npz)")],
    split: Annotated[str, typer.Option(help="test, val (the runs' held-out experiments), train or all")] = "test",
    tta: Tta = 8,
    checkpoint: Checkpoint = "best",
    batch_size: BatchSize = 32,
    workers: Workers = 0,
    embeddings: Annotated[bool, typer.Option(help="Also store the pooled features")] = False,
    devices: Devices = "1",
    precision: Precision = "auto",
    adabn: AdaBN = "recipe",
    adabn_prior: AdaBNPrior = None,
) -> None:
    """Well logits averaged over both sites, D4 TTA and all given runs (Lightning Trainer.predict)."""
    from rcic.predict import predict as run_predict
    from rcic.predict import save_logits
    from rcic.store import open_source
    from rcic.training.fit import is_child_rank

    if out.suffix != ".npz":
        raise RcicError("logits files end in .npz", out)
    check_output(out, [data, *runs, None if checkpoint in ("best", "last") else checkpoint])
    _devices(devices)  # checked before a model is loaded
    _precision(precision)
    prior = _adabn_prior(adabn_prior)
    _quiet_lightning()
    source = open_source(data)
    with progress_bar(f"predict {split}") as update:
        logits = run_predict(runs, source, split, tta, checkpoint, batch_size, workers, embeddings, update,
                             devices=_devices(devices), precision=precision, adabn=adabn,
                             adabn_prior=prior)
    if logits is None or is_child_rank():
        return
    save_logits(out, logits)
    _print_prior_choices(logits)
    console.print(f"wrote {out}: {len(logits.id_code)} wells x {len(logits.classes)} classes "
                  f"({len(runs)} run(s), TTA x{tta})")


def _print_prior_choices(logits) -> None:
    """One line per run predicted with AdaBN prior ``auto``: every candidate's agreement and weight."""
    for record in logits.extra.get("runs", []):
        run = json.loads(str(record))
        if "skipped" in run.get("adabn_prior_auto", {}):
            console.print(f"{run['run']}: AdaBN prior auto is plain AdaBN (prior 0) here: "
                          f"{run['adabn_prior_auto']['skipped']}")
        elif "adabn_prior_auto" in run:
            record = run["adabn_prior_auto"]
            tried = ", ".join(f"{p}: {a:.3f} (weight {record.get('weights', {}).get(p, 1.0):.2f})"
                              for p, a in record["agreement"].items())
            console.print(f"{run['run']}: AdaBN priors blended by how well their arg-max agrees with the plate "
                          f"assignment, best {run['adabn_prior']:g} (by prior: {tried})")


def _adabn_prior(text: str | None) -> float | str | None:
    """--adabn-prior: the recipe key's rule (a number in [0, 1] or auto), checked before a model is loaded."""
    from rcic.config import parse_adabn_prior

    if text is None:
        return None
    try:
        return parse_adabn_prior(text)
    except ValueError:
        raise RcicError(f"--adabn-prior must be between 0 and 1, or auto, got {text!r}") from None


def _devices(text: str) -> int | str:
    """--devices: a count (>= 1), auto, or a comma-separated list of device indices (0,1)."""
    text = str(text).strip()
    if text.isdigit() and int(text) >= 1:
        return int(text)
    if text == "auto" or (text and "," in text and all(p.strip().isdigit() for p in text.split(","))):
        return text
    raise RcicError(f"--devices must be a number of devices (1, 2, ...), auto, or a list of device indices "
                    f"(0,1), got {text!r}")


def _precision(text: str) -> str:
    """--precision: one of the recipe's precisions (trainer.precision), checked before a model is loaded."""
    from typing import get_args

    from rcic.config import TrainerConfig

    choices = get_args(TrainerConfig.model_fields["precision"].annotation)
    if text not in choices:
        raise RcicError(f"--precision must be one of {', '.join(choices)}, got {text!r}")
    return text


def _pct(value) -> str:
    return "-" if value is None else f"{value:.4f}"


@app.command()
def evaluate(
    runs: Runs,
    data: DataSource,
    split: Annotated[str, typer.Option(help="val (the runs' held-out experiments) or test (labelled test "
                                            "wells: the WILDS release)")] = "val",
    tta: Tta = 8,
    checkpoint: Checkpoint = "best",
    batch_size: BatchSize = 32,
    workers: Workers = 0,
    devices: Devices = "1",
    precision: Precision = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
    adabn: AdaBN = "recipe",
    adabn_prior: AdaBNPrior = None,
    balance: Balance = "none",
    center: Center = "none",
) -> None:
    """Well-level accuracy (arg-max and plate leak), overall, per cell type and per experiment."""
    import pandas as pd

    from rcic.assign import BALANCES, CENTERINGS
    from rcic.predict import predict as run_predict
    from rcic.store import open_source
    from rcic.submit import evaluate_logits
    from rcic.training.fit import is_child_rank

    if balance not in BALANCES:
        raise RcicError(f"--balance must be one of {', '.join(BALANCES)}, got {balance!r}")
    if center not in CENTERINGS:
        raise RcicError(f"--center must be one of {', '.join(CENTERINGS)}, got {center!r}")
    _devices(devices)  # checked before a model is loaded
    _precision(precision)
    prior = _adabn_prior(adabn_prior)
    _quiet_lightning()
    source = open_source(data)
    wilds = source.dataset.layout == "wilds"
    if split == "test" and (source.dataset.wells.query("split == 'test'")["label"] == "").any():
        raise RcicError("the test wells of this data have no label (a Kaggle download): evaluate --split val, "
                        "or score a test submission with rcic score --answers", data)
    with progress_bar(f"evaluate {split}") as update:
        logits = run_predict(runs, source, split, tta, checkpoint, batch_size, workers, False, update,
                             devices=_devices(devices), precision=precision, controls=wilds, site_outputs=wilds,
                             adabn=adabn, adabn_prior=prior)
    if logits is None or is_child_rank():
        return
    result = evaluate_logits(source.dataset, logits, balance, center)
    if as_json:
        print(json.dumps(result | {"runs": [json.loads(str(r)) for r in logits.extra.get("runs", [])]}))
        return
    _print_prior_choices(logits)
    console.print(f"{split}: [bold]acc {_pct(result['acc'])}[/], acc with the plate leak "
                  f"[bold]{_pct(result['acc_leak'])}[/] over {result['wells']} treatment wells")
    _table("By cell type", pd.DataFrame([{"cell_type": c, "acc": _pct(v["acc"]), "acc_leak": _pct(v["acc_leak"])}
                                         for c, v in result["per_cell_type"].items()]))
    _table("By experiment", pd.DataFrame([{"experiment": e, "wells": v["wells"], "acc": _pct(v["acc"]),
                                           "acc_leak": _pct(v["acc_leak"])}
                                          for e, v in result["experiments"].items()]))
    if "wilds" in result:
        w = result["wilds"]
        console.print(f"WILDS (per image, all {len(logits.classes)} classes, {w['images']} images): "
                      f"acc_avg {w['acc_avg']:.4f}, worst cell type {w['acc_wg']:.4f}; "
                      + ", ".join(f"{c} {v:.4f}" for c, v in w["per_cell_type"].items()))


@app.command()
def submit(
    data: Annotated[str, typer.Option(help="RxRx1 folder or packed store (labels, plates, test wells)")],
    logits: Annotated[list[Path], typer.Option(help="Logits .npz (repeat to average an ensemble)")],
    out: Annotated[Path, typer.Option(help="Submission CSV to write")],
    no_leak: Annotated[bool, typer.Option("--no-leak", help="Plain arg-max, no plate assignment")] = False,
    balance: Balance = "none",
    center: Center = "none",
) -> None:
    """Write id_code,sirna for every well: plate-leak assignment (default) or arg-max; validated first."""

    from rcic.assign import BALANCES, CENTERINGS
    from rcic.predict import average_logits
    from rcic.store import open_source
    from rcic.submit import make_submission, write_submission

    if balance not in BALANCES:
        raise RcicError(f"--balance must be one of {', '.join(BALANCES)}, got {balance!r}")
    if center not in CENTERINGS:
        raise RcicError(f"--center must be one of {', '.join(CENTERINGS)}, got {center!r}")
    check_output(out, [data, *logits])
    dataset = open_source(data).dataset
    result = make_submission(dataset, average_logits(logits), leak=not no_leak, balance=balance, center=center)
    write_submission(out, result)
    _table("Experiments" + (" (plate leak)" if not no_leak else " (arg-max)"), result.experiments)
    for note in result.notes:
        console.print(f"[yellow]{note}[/]")
    console.print(f"wrote {out}: {len(result.frame)} wells")


@app.command()
def score(
    submission: Annotated[Path, typer.Option(help="Submission CSV (id_code,sirna)")],
    answers: Annotated[Path, typer.Option(help="Answers CSV (id_code,sirna): synth answers.csv or train.csv")],
    data: Annotated[str | None, typer.Option(help="Dataset: the submission's wells and labels must be its own")
                    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Accuracy overall, per cell type and per experiment (whole experiments only)."""
    import pandas as pd

    from rcic.submit import read_submission_csv
    from rcic.submit import score as score_submission

    frame = read_submission_csv(submission)
    dataset = None
    if data is not None:
        from rcic.store import open_source

        dataset = open_source(data).dataset
    result = score_submission(frame, read_submission_csv(answers, "answers"), dataset, submission_path=submission)
    if as_json:
        print(json.dumps(result))
        return
    console.print(f"accuracy [bold]{result['accuracy']:.4f}[/] over {result['wells']} wells of "
                  f"{len(result['experiments'])} experiment(s): {', '.join(result['experiments'])}")
    _table("By cell type", pd.DataFrame(list(result["by_cell_type"].items()), columns=["cell_type", "accuracy"]))
    _table("By experiment", pd.DataFrame(list(result["by_experiment"].items()), columns=["experiment", "accuracy"]))


# ----------------------------------------------------------------------------------------------
# Embeddings and phenomic maps
# ----------------------------------------------------------------------------------------------


@app.command()
def embed(
    runs: Runs,
    data: DataSource,
    out: Annotated[Path, typer.Option(help="Embeddings table to write (.parquet)")],
    split: Annotated[str, typer.Option(help="val (each run embeds the experiments it held out: give one run per "
                                            "fold for an out-of-fold map), all, train or test wells (treatments "
                                            "and controls alike)")] = "all",
    tta: Tta = 8,
    combine: Annotated[str, typer.Option(help="Runs' features averaged (mean) or side by side (concat)")] = "mean",
    align: Annotated[str, typer.Option(help="--split val with several folds: carry each fold model's feature space "
                                            "onto the first's (procrustes: a rotation and shift fitted on test "
                                            "wells every fold embeds), or none")] = "procrustes",
    checkpoint: Checkpoint = "best",
    batch_size: BatchSize = 32,
    workers: Workers = 0,
    devices: Devices = "1",
) -> None:
    """One row per well: metadata, seen_in_training and the network's pooled features (sites, TTA and runs averaged)."""
    if split not in ("val", "all", "train", "test"):
        raise RcicError(f"--split must be val, all, train or test, got {split!r}")
    if combine not in ("mean", "concat"):
        raise RcicError(f"--combine must be mean or concat, got {combine!r}")
    from rcic.profiles import ALIGNMENTS

    if align not in ALIGNMENTS:
        raise RcicError(f"--align must be {' or '.join(ALIGNMENTS)}, got {align!r}")
    if out.suffix != ".parquet":
        raise RcicError("embeddings are written as parquet: give a file name ending in .parquet", out)
    check_output(out, [data, *runs])
    _devices(devices)
    _quiet_lightning()
    from rcic.profiles import SEEN, embed_wells, write_embeddings
    from rcic.store import open_source
    from rcic.training.fit import is_child_rank

    source = open_source(data)
    with progress_bar(f"embed {split}") as update:
        made = embed_wells(runs, source, split, update, align=align, tta=tta, checkpoint=checkpoint,
                           batch_size=batch_size, num_workers=workers, devices=_devices(devices), combine=combine)
    if made is None or is_child_rank():
        return
    frame, records = made
    write_embeddings(out, frame, records)
    width = sum(str(c).startswith("emb_") for c in frame.columns)
    console.print(f"wrote {out}: {len(frame)} wells x {width} features "
                  f"({', '.join(f'{k} {v}' for k, v in frame['well_type'].value_counts().items())}; "
                  f"{int(frame[SEEN].sum())} in experiments a model trained on)")


@app.command("map")
def map_(
    embeddings: Annotated[Path, typer.Argument(help="Embeddings parquet (rcic embed, or your own features)")],
    out: Annotated[Path, typer.Option(help="Report folder (map.html, plots, scores.json)")],
    correct: Annotated[list[str] | None, typer.Option(help="Batch correction (repeat): none, pca, center, standardize, "
                                                           "spherize, tvn, harmony, combat, scanorama")] = None,
    controls: Annotated[str, typer.Option(help="Wells the control-based corrections learn from: negative, all "
                                               "(every control) or within (controls minus their siRNA's "
                                               "per-experiment mean)")] = "within",
    include_seen: Annotated[bool, typer.Option(help="Also score wells of experiments the model trained on")] = False,
    panel: Annotated[bool, typer.Option(help="Score every correction on the field's batch and bio metrics "
                                             "(scib-metrics, copairs; rcic[panel])")] = False,
    bootstrap: Annotated[int, typer.Option(help="siRNA resamples behind the panel's rank intervals", min=0)] = 200,
    workers: Annotated[int, typer.Option(help="Worker processes of --panel (each corrects and scores whole "
                                              "corrections; results do not depend on it)", min=1)] = 2,
    genes: Annotated[Path | None, typer.Option(help="siRNA -> gene table (CSV: label,gene); without it the "
                                                   "labels are gene symbols")] = None,
    relationships: Annotated[str | None, typer.Option(help="Known gene pairs: corum, humap, reactome, signor, "
                                                           "stringdb (efaar-benchmarking) or a CSV (gene_a,gene_b)")
                             ] = None,
    metadata: Annotated[Path | None, typer.Option(help="RxRx3-core metadata_rxrx3_core.csv, for embeddings keyed "
                                                       "by well_id")] = None,
    null_size: Annotated[int, typer.Option(help="Permutations behind each mAP p-value", min=100)] = 1000,
    probe: Annotated[bool, typer.Option(help="Fit the linear probe")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Batch-correct embeddings and benchmark them: replicate mAP, batch leakage, known relationships, probe;
    with --panel, every correction on the field's metrics."""
    import pandas as pd

    from rcic.atomic import atomic_write_text
    from rcic.profiles import CONTROLS, PANEL_METHODS, phenomic_map, read_embeddings, scored_wells
    from rcic.reports.eda import check_report_folder
    from rcic.reports.map_report import write_map_report

    if controls not in CONTROLS:
        raise RcicError(f"--controls must be one of {', '.join(CONTROLS)}, got {controls!r}")
    methods = list(dict.fromkeys(correct or (PANEL_METHODS if panel else ["none", "tvn"])))
    if genes is not None and relationships is None:
        raise RcicError("--genes needs --relationships (the known gene pairs its genes are scored on)")
    check_output(out, [embeddings, genes, relationships, metadata], folder=True)
    check_report_folder(out)
    if metadata is not None:  # RxRx3-core: embeddings keyed by well_id, the download's metadata beside them
        from rcic.rxrx3.mapping import read_rxrx3_embeddings

        meta, x = read_rxrx3_embeddings(embeddings, metadata)
    else:
        meta, x = read_embeddings(embeddings)
    keep, line = scored_wells(meta, include_seen)
    (err_console if as_json else console).print(line, markup=False, highlight=False)
    meta, x = meta[keep].reset_index(drop=True), x[keep]
    gene_table = pairs = None
    if relationships is not None:
        from rcic.rxrx3.mapping import map_relationships

        gene_table, pairs = map_relationships(relationships, genes, meta, lambda line: (
            err_console if as_json else console).print(line, highlight=False))
    panel_table = None
    with progress_bar("map") as update:
        if panel:
            from rcic.profiles.panel import correction_panel

            # the phenomic map of each correction is scored in the panel's job that corrects it
            panel_result = correction_panel(meta, x, methods, controls, gene_table, null_size=null_size,
                                            bootstrap=bootstrap, source=embeddings, progress=update,
                                            workers=workers, phenomic={"relationships": pairs, "probe": probe})
            panel_table, result = panel_result.table, panel_result.phenomic
        else:
            result = phenomic_map(meta, x, methods, gene_table, pairs, null_size=null_size, probe=probe,
                                  source=embeddings, progress=update, controls=controls)
    write_map_report(out, meta, result.scores, result.corrected, str(embeddings), panel=panel_table,
                     controls=controls)
    atomic_write_text(out / "scores.json", json.dumps(result.scores, indent=2))
    if panel_table is not None:
        atomic_write_text(out / "panel.csv", panel_table.to_csv(index=False))
    if as_json:
        if panel_table is not None:
            err_console.print(panel_result.note, markup=False, highlight=False, soft_wrap=True)
        print(json.dumps({m: {k: s[k] for k in ("replicate_map", "replicate_fraction", "batch_leakage",
                                                "known_recall", "known_recall_ci", "probe_acc")}
                          for m, s in result.scores.items()}
                         | ({"panel": panel_table.to_dict("records")} if panel_table is not None else {})))
        return
    from rcic.reports.map_report import panel_display, scores_table

    _table("Phenomic map", scores_table(result.scores).fillna(pd.NA).astype(object).where(lambda f: f.notna(), "-"))
    if panel_table is not None:
        _table("Correction panel (overall = 0.4 x batch + 0.6 x bio, Arevalo et al. 2024)",
               panel_display(panel_table))
        console.print(panel_result.note, markup=False, highlight=False, soft_wrap=True)
        console.print(f"panel: {out / 'panel.csv'}")
    console.print(f"report: [bold]{out / 'map.html'}[/]")


benchmark_app = typer.Typer(no_args_is_help=True, help="The field's published benchmarks as one command.")
app.add_typer(benchmark_app, name="benchmark")


@benchmark_app.command("rxrx3-core")
def benchmark_rxrx3_core(
    metadata: Annotated[Path, typer.Option(help="metadata_rxrx3_core.csv as downloaded")],
    embeddings: Annotated[Path, typer.Option(help="Embeddings parquet keyed by well_id (feature_* or emb_*)")],
    out: Annotated[Path, typer.Option(help="Report folder (index.html, recall.csv, scores.json)")],
    correct: Annotated[list[str] | None, typer.Option(help="Correction (repeat): pca-centerscale (published), or any "
                                                           "of rcic map: none, pca, center, standardize, spherize, "
                                                           "tvn, harmony, combat, scanorama")] = None,
    sources: Annotated[list[str] | None, typer.Option("--source", help="Relationship source (repeat): corum, humap, "
                                                                        "reactome, signor, stringdb or a CSV file "
                                                                        "(entity1,entity2); default: the five")] = None,
    compound_genes: Annotated[Path | None, typer.Option(help="Compound-gene ground truth (EFAAR's "
                                                             "compound_gene_interactions.csv)")] = None,
    seeds: Annotated[int, typer.Option(help="Seeds of the compound-gene benchmark's negative draws", min=1)] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print scores.json's object")] = False,
) -> None:
    """Recursion's RxRx3-core benchmarks (EFAAR): known-relationship recall, compound-gene AP and AUC."""
    from rcic.reports.eda import check_report_folder
    from rcic.rxrx3.benchmark import run_benchmark
    from rcic.rxrx3.relationships import SOURCES
    from rcic.rxrx3.report import recall_wide, write_report

    check_output(out, [metadata, embeddings, compound_genes], folder=True)
    check_report_folder(out)
    with progress_bar("benchmark") as update:
        result = run_benchmark(metadata, embeddings, list(dict.fromkeys(correct or ["pca-centerscale"])),
                               list(sources or SOURCES), compound_genes, seeds,
                               notify=lambda line: (err_console if as_json else console).print(line, highlight=False),
                               progress=update)
    write_report(out, result)
    if as_json:
        print(json.dumps(result.scores))
        return
    for line in result.notes:
        console.print(f"[yellow]{line}[/]")
    _table(f"Known-relationship recall ({result.scores['dataset']['map_entities']} entities, chance "
           f"{next(iter(result.scores['chance'].values())):.2f})", recall_wide(result).fillna("-").astype(object))
    for method, frame in result.compound_gene.items():
        _table(f"Compound-gene, {method} (mean over {seeds} seeds)",
               frame[["concentration", "ap", "ap_random", "auc", "auc_random"]].astype({"concentration": str}))
    console.print(f"best correction: [bold]{result.scores['best_correction']}[/]; "
                  f"report: [bold]{out / 'index.html'}[/]")


# ----------------------------------------------------------------------------------------------
# Reports and the demo
# ----------------------------------------------------------------------------------------------


@app.command()
def eda(
    data: Annotated[str, typer.Argument(help="RxRx1 folder (with or without images) or packed store")],
    out: Annotated[Path, typer.Option(help="Report folder (index.html and its images): new, empty, or an "
                                           "earlier rcic report")],
    real: Annotated[Path | None, typer.Option(help="Real RxRx1 PNGs (e.g. a download's train/) to show next to "
                                                   "this dataset's composites, with their channel statistics")] = None,
) -> None:
    """An HTML report of a dataset: tables, plate map and groups, intensities by experiment, montages."""
    from rcic.reports.eda import check_report_folder, write_eda
    from rcic.store import open_source

    check_output(out, [data], folder=True)
    check_report_folder(out)
    source = open_source(data)
    with progress_bar("eda") as update:
        index = write_eda(source, out, progress=update, real_images=real)
    console.print(f"wrote {index}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for every stage's output")] = Path("demo-out"),
    preset: Annotated[str, typer.Option(help="Synthetic preset: small (CPU demo) or tiny (seconds)")] = "small",
    seed: Annotated[int, typer.Option(help="Random seed")] = 0,
    epochs: Annotated[int | None, typer.Option(help="Override the cpu-demo recipe's epochs")] = None,
    workers: Annotated[int, typer.Option(help="Worker processes", min=1)] = 2,
) -> None:
    """End to end on synthetic data: synth, info, pack, eda, train, predict, submit, score, report."""
    import pandas as pd
    from rich.progress import Progress, SpinnerColumn

    from rcic.demo import STAGES, run_demo

    check_output(out, [], folder=True)
    _quiet_lightning()
    columns = [SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn()]
    with Progress(*columns, console=err_console, transient=True) as bar:
        overall = bar.add_task("demo", total=len(STAGES))
        current = bar.add_task("", total=None)

        def stage(name: str) -> None:
            if bar.tasks[current].description:
                bar.advance(overall)
            bar.update(overall, description=f"demo: {name} ({STAGES.index(name) + 1}/{len(STAGES)})")
            bar.reset(current, total=None, description=name)

        def update(done: int, total: int) -> None:
            bar.update(current, completed=done, total=total)

        result = run_demo(out, preset, seed, epochs, workers, stage=stage, progress=update)
        bar.update(overall, completed=len(STAGES))
    s = result.summary
    console.print(f"data: {s['train_wells']} train / {s['test_wells']} test treatment wells, "
                  f"{s['treatment_classes']} siRNAs, {s['train_experiments']} + {s['test_experiments']} experiments")
    _table(f"Accuracy (chance {result.accuracy.attrs['chance']:.3f})", pd.DataFrame(result.accuracy))
    from rcic.reports.map_report import scores_table

    maps = scores_table(result.map_scores)[["correction", "replicate mAP", "batch leakage",
                                            "leakage without batch effects", "known recall"]]
    _table("Phenomic map of the model's embeddings (experiments it never trained on)", maps)
    console.print(f"submission: {result.out / 'submission.csv'}")
    console.print(f"report: [bold]{result.report}[/]")


def _fail(message: str, code: int = 2) -> None:
    """The one way rcic reports a failure: one line on stderr, then the exit code."""
    text = " ".join(str(message).split())
    err_console.print(f"error: {text}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(code)


def main() -> None:
    """Console entry point: user errors become one line on stderr (exit 2), Ctrl-C exit 130; bugs keep a traceback."""
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError

    from rcic import interrupts
    from rcic.atomic import describe_os_error

    interrupts.install()
    try:
        code = app(standalone_mode=False)
        interrupts.check()  # a Ctrl-C that a finalizer swallowed still ends as an interruption
    except RcicError as err:
        _fail(str(err), err.exit_code)
    except NoArgsIsHelpError as err:
        _fail(f"no command given; `{err.ctx.command_path if err.ctx else 'rcic'} --help` lists them")
    except UsageError as err:
        where = err.ctx.command_path if err.ctx is not None else "rcic"
        _fail(f"{where}: {err.format_message()} (see `{where} --help`)", 2)
    except ClickException as err:
        _fail(err.format_message(), err.exit_code)
    except typer.Abort:
        _fail("interrupted", 130)
    except KeyboardInterrupt:
        _fail("interrupted: nothing half-written was left; run the same command again to resume", 130)
    except OSError as err:  # the environment (disk full, permissions, a path that vanished): not a bug
        _fail(describe_os_error(err), 2)
    else:
        if code == 130:
            _fail("interrupted: nothing half-written was left; run the same command again to resume", 130)
        sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
