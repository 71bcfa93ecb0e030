"""The ``rcic`` command line: one subcommand per stage, each a few lines over the library.

User errors (``RcicError``) are caught once, in ``main``: one line on stderr, exit code 2.
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


@contextmanager
def progress_bar(description: str):
    """A rich progress bar; yields a ``progress(done, total)`` callback for library code."""
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=False) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


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
    data: Annotated[Path, typer.Argument(help="RxRx1 folder (Kaggle 2019, Kaggle 2023 or RxRx1 release) or store")],
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
    data: Annotated[Path, typer.Argument(help="RxRx1 folder with PNG images")],
    id_code: Annotated[str, typer.Option("--id", help="Well id_code, e.g. HEPG2-01_1_B03")],
    out: Annotated[Path, typer.Option(help="Output PNG file")],
    site: Annotated[int, typer.Option(help="Site 1 or 2")] = 1,
    split: Annotated[str, typer.Option(help="train or test")] = "train",
) -> None:
    """Write the colour composite of one site (Recursion's reference channel colours)."""
    import cv2

    from rcic.atomic import atomic_path
    from rcic.io import load_site, to_rgb

    image = to_rgb(load_site(data, id_code, site, split).transpose(1, 2, 0))
    with atomic_path(out) as tmp:
        if not cv2.imwrite(str(tmp), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
            raise RcicError("cannot write the image (use a .png file name)", out)
    console.print(f"wrote {out}")


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Output folder (must not exist or be empty)")],
    preset: Annotated[str, typer.Option(help="tiny (tests), small (CPU demo), medium")] = "small",
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same bytes")] = 0,
    n_classes: Annotated[int | None, typer.Option(help="Treatment classes (multiple of 4)")] = None,
    n_positive: Annotated[int | None, typer.Option(help="Positive control classes")] = None,
    image_size: Annotated[int | None, typer.Option(help="Site size in pixels (16-512)")] = None,
    train_experiments: Annotated[int | None, typer.Option(help="Train experiments per cell type")] = None,
    test_experiments: Annotated[int | None, typer.Option(help="Test experiments per cell type")] = None,
    cell_types: Annotated[str | None, typer.Option(help="Comma-separated, e.g. HEPG2,HUVEC")] = None,
    label_style: Annotated[str | None, typer.Option(help="kaggle-2019 (integers) or kaggle-2023 (sirna_<k>)")] = None,
    workers: Annotated[int, typer.Option(help="Worker processes")] = 1,
) -> None:
    """Generate a synthetic RxRx1 dataset in the Kaggle 2019 layout, with answers.csv for scoring."""
    from rcic.synth import generate
    from rcic.synth import preset as make_preset

    config = make_preset(
        preset, seed=seed, n_classes=n_classes, n_positive=n_positive, image_size=image_size,
        train_experiments=train_experiments, test_experiments=test_experiments, label_style=label_style,
        cell_types=tuple(c.strip() for c in cell_types.split(",")) if cell_types else None)
    with progress_bar("synth sites") as update:
        generate(out, config, workers=workers, progress=update)
    console.print(f"wrote {out} ({config.n_classes} classes, {config.image_size}px)")


@app.command()
def pack(
    data: Annotated[Path, typer.Argument(help="RxRx1 folder with PNG images")],
    out: Annotated[Path, typer.Option(help="Store folder to create (or resume)")],
    size: Annotated[int | None, typer.Option(help="Resize sites to SIZE x SIZE (default: keep)")] = None,
    compression: Annotated[str, typer.Option(help="none, lz4 or zstd")] = "lz4",
    workers: Annotated[int, typer.Option(help="Worker processes")] = 1,
    skip_missing: Annotated[bool, typer.Option(help="Leave out sites with missing/corrupt files (report)")] = False,
) -> None:
    """Pack every site into a zarr store that reads many times faster than PNG (resumable)."""
    from rcic.store import pack as pack_store

    with progress_bar("pack sites") as update:
        result = pack_store(data, out, size=size, compression=compression, workers=workers,
                            skip_missing=skip_missing, progress=update)
    console.print(f"packed {result.packed}/{result.sites} sites into {result.path}"
                  + (f" (resumed after {result.resumed_blocks} blocks)" if result.resumed_blocks else ""))
    if result.missing:
        console.print(f"[yellow]{result.missing} sites left out: see {result.path / 'missing.csv'}[/]")


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        app(standalone_mode=False)
    except RcicError as err:
        err_console.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err_console.print("interrupted: run the same command again to resume")
        sys.exit(130)
    except Exception as err:  # click usage errors carry their own exit code
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(err.exit_code)
        raise


if __name__ == "__main__":
    main()
