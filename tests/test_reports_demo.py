"""The demo end to end (tiny preset) and both HTML reports rendered in real headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from rcic.io import read_dataset
from tests.conftest import REAL_CSV, run_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = run_cli("demo", "--out", out, "--preset", "tiny", "--epochs", "2", "--workers", "2", process=True)
    assert "Accuracy" in proc.stdout and "report.html" in proc.stdout
    # a newcomer's first run ends on the table and the paths: no progress line left, nothing on stderr
    assert proc.stdout.rstrip().splitlines()[-1].startswith("report") and proc.stderr.strip() == "", proc.stderr
    return out


def test_demo_output_is_small(demo_dir):
    """Once training ends, checkpoints keep the weights only (no optimiser state)."""
    import torch

    for ckpt in (demo_dir / "run" / "checkpoints").glob("*.ckpt"):
        assert "optimizer_states" not in torch.load(ckpt, map_location="cpu", weights_only=False), ckpt.name


@pytest.mark.slow
def test_demo_passes_through_every_stage(demo_dir):
    for path in ("data/answers.csv", "store.zarr/zarr.json", "eda/index.html", "run/checkpoints/best.ckpt",
                 "val_tta8.npz", "test_tta8.npz", "submission.csv", "accuracy.json", "report.html",
                 "embeddings.parquet", "map/scores.json", "map/map.html"):
        assert (demo_dir / path).exists(), path
    rows = json.loads((demo_dir / "accuracy.json").read_text())["rows"]
    assert {r["step"] for r in rows} == {"arg-max", "+ TTA (x8)", "+ plate leak"}
    # the submission is a whole, valid test submission, and the table's last test row is its score
    submission = pd.read_csv(demo_dir / "submission.csv", dtype=str)
    sample = pd.read_csv(demo_dir / "data" / "sample_submission.csv", dtype=str)
    answers = pd.read_csv(demo_dir / "data" / "answers.csv", dtype=str).set_index("id_code")["sirna"]
    ds = read_dataset(demo_dir / "data")
    assert submission.id_code.tolist() == sample.id_code.tolist()
    assert submission.sirna.isin(set(ds.vocab.treatment_labels)).all()
    assert not submission.merge(ds.wells, on="id_code").duplicated(["experiment", "plate", "sirna"]).any()
    leak = next(r for r in rows if r["split"] == "test" and r["step"] == "+ plate leak")
    assert leak["accuracy"] == pytest.approx((submission.sirna.to_numpy() == answers.loc[submission.id_code]).mean())
    # a second run reuses every finished stage: the data, the checkpoint and the predictions are not rewritten
    kept = ["data/answers.csv", "run/checkpoints/best.ckpt", "val_tta8.npz", "test_tta8.npz", "embeddings.parquet"]
    before = {p: (demo_dir / p).stat().st_mtime_ns for p in kept}
    proc = run_cli("demo", "--out", demo_dir, "--preset", "tiny", "--epochs", "2")
    assert "Accuracy" in proc.stdout
    assert {p: (demo_dir / p).stat().st_mtime_ns for p in kept} == before


def render(page_path: Path, screenshot: Path) -> tuple[list[str], list[bool], str]:
    """Open a page in headless Chromium: console errors, whether each image loaded, the page text."""
    playwright = pytest.importorskip("playwright.sync_api")
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (the CI set-up installs it)")
    errors: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(page_path.resolve().as_uri(), wait_until="load")
        loaded = page.eval_on_selector_all("img", "els => els.map(e => e.complete && e.naturalWidth > 0)")
        text = page.inner_text("body")
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return errors, loaded, text


@pytest.mark.browser
def test_reports_render_in_chromium(demo_dir, tmp_path):
    shots = Path(os.environ.get("RCIC_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    for page, must in ((demo_dir / "report.html", ["Accuracy", "Plate rotations", "Confusion overview",
                                                   "Reproduce on real data"]),
                       (demo_dir / "eda" / "index.html", ["Plate map", "Montages", "batch effect"]),
                       (demo_dir / "map" / "map.html", ["Benchmarks", "replicate mAP", "tvn", "Known relationships"])):
        errors, loaded, text = render(page, shots / f"{page.parent.name}-{page.stem}.png")
        assert errors == [], errors
        assert loaded and all(loaded), loaded
        assert all(m in text for m in must)
        assert (shots / f"{page.parent.name}-{page.stem}.png").stat().st_size > 10_000


@pytest.mark.browser
def test_eda_on_real_csvs_without_images(tmp_path):
    if not (REAL_CSV / "train.csv").is_file():
        pytest.skip("real CSVs not present")
    run_cli("eda", REAL_CSV, "--out", tmp_path / "eda")
    errors, loaded, text = render(tmp_path / "eda" / "index.html", tmp_path / "real.png")
    assert errors == [] and all(loaded)
    assert "No images could be read" in text and "HUVEC-01" in text
