"""Shared fixtures: tiny synthetic datasets made at test time, and the real RxRx1 files when present."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("RCIC_REALDATA", ROOT.parent / "shared" / "realdata" / "rxrx1"))
REAL_CSV = REAL / "kaggle_v2019"
REAL_IMAGES = REAL / "images"
# a wide terminal for every rcic run, in this process or not: tables and paths are never wrapped
os.environ["COLUMNS"] = "200"


def need_real_csvs() -> Path:
    if not (REAL_CSV / "train.csv").is_file():
        pytest.skip(f"real RxRx1 CSVs not found at {REAL_CSV} (set RCIC_REALDATA)")
    return REAL_CSV


def need_real_images() -> Path:
    if not (REAL_IMAGES / "train").is_dir():
        pytest.skip(f"real RxRx1 PNGs not found at {REAL_IMAGES} (set RCIC_REALDATA)")
    return REAL_IMAGES


def run_cli(*args: str, cwd: Path | None = None, check: bool = True,
            process: bool = False) -> subprocess.CompletedProcess:
    """Run the `rcic` command line as a user would and return its exit code, stdout and stderr.

    In this process by default (the CLI's own ``main``, with its error handling), so a test does not
    pay for importing torch again; ``process=True`` runs the real entry point in a subprocess, for
    what only a process shows (everything printed by any library on stderr, signals, DDP).
    """
    argv = [str(a) for a in args]
    if process:
        proc = subprocess.run([sys.executable, "-m", "rcic.cli", *argv], capture_output=True, text=True,
                              cwd=cwd, env={**os.environ, "COLUMNS": "200"})
    else:
        proc = _run_in_process(argv, cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"rcic {' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def _run_in_process(argv: list[str], cwd: Path | None) -> subprocess.CompletedProcess:
    from rcic.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_argv, old_cwd, old_columns = sys.argv, Path.cwd(), os.environ.get("COLUMNS")
    sys.argv, os.environ["COLUMNS"] = ["rcic", *argv], "200"
    code: int | str | None = 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exit_:
        code = exit_.code
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
        if old_columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old_columns
    returncode = code if isinstance(code, int) else (0 if code is None else 1)
    return subprocess.CompletedProcess(["rcic", *argv], returncode, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The `tiny` synthetic preset (32 px, 8 classes, 2 cell types) in the Kaggle 2019 layout."""
    from rcic.synth import generate, preset

    return generate(tmp_path_factory.mktemp("synth") / "tiny", preset("tiny"))


@pytest.fixture(scope="session")
def tiny_store(tiny_data, tmp_path_factory) -> Path:
    from rcic.store import pack

    return pack(tiny_data, tmp_path_factory.mktemp("store") / "tiny.zarr").path


@pytest.fixture()
def real_b02(tmp_path) -> Path:
    """A Kaggle-layout folder holding the 12 real B02 wells: real CSV rows + the real PNG tree."""
    csv, images = need_real_csvs(), need_real_images()
    controls = pd.read_csv(csv / "train_controls.csv")
    plates = {(p.parent.name, int(p.name.removeprefix("Plate"))) for p in (images / "train").glob("*/Plate*")}
    on_disk = np.array([(e, p) in plates for e, p in zip(controls.experiment, controls.plate)])
    keep = controls[on_disk & (controls.well == "B02").to_numpy()]
    keep.to_csv(tmp_path / "train_controls.csv", index=False)
    for name in ("train.csv", "test.csv", "test_controls.csv"):
        pd.read_csv(csv / name, nrows=0).to_csv(tmp_path / name, index=False)
    (tmp_path / "train").symlink_to(images / "train")
    return tmp_path


@pytest.fixture(scope="session")
def tiny_run(tiny_store, tmp_path_factory) -> Path:
    """A 2-epoch cpu-demo run on the tiny store (shared by the prediction and submission tests)."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    run_cli("train", "--data", tiny_store, "--recipe", "cpu-demo", "--out", out, "--set", "data.num_workers=0",
            "--set", "data.batch_size=16", "--set", "trainer.epochs=2", "--set", "data.folds=2",
            "--set", "trainer.accelerator=cpu", "--set", "model.adabn_prior=0")  # auto: 5 predictions each
    return out


@pytest.fixture(scope="session")
def plate_csvs(tmp_path_factory) -> Path:
    """A synthetic download's CSVs in the Kaggle 2019 layout and no images (for what reads metadata only):
    3 cell types x (2 train + 1 test) experiments, 32 siRNAs in 4 plate groups of 8; answers.csv holds
    the test wells' labels."""
    from rcic.synth.generator import design_plates, preset

    wells, labels = design_plates(preset("small", train_experiments=2, test_experiments=1))
    frame = wells.assign(sirna=[labels[c] for c in wells["cls"]])
    out = tmp_path_factory.mktemp("plate_csvs")
    keys = ["id_code", "experiment", "plate", "well"]
    for split in ("train", "test"):
        part = frame[frame["split"] == split]
        treatment = part[part["well_type"] == "treatment"]
        treatment[keys + ["sirna"] if split == "train" else keys].to_csv(out / f"{split}.csv", index=False)
        part[part["well_type"] != "treatment"][keys + ["sirna", "well_type"]].to_csv(out / f"{split}_controls.csv",
                                                                                     index=False)
        if split == "test":
            treatment[["id_code", "sirna"]].to_csv(out / "answers.csv", index=False)
    return out
