"""The run report (``report.html``): EDA, curves, the accuracy table, rotations, confusion, commands."""

from __future__ import annotations

import html
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from rcic.reports.html import figure, note, page, save_figure, section, table, write_page  # noqa: E402

REPRODUCE = """# real data: the Kaggle download (train.csv, test.csv, *_controls.csv, train/, test/)
rcic info  KAGGLE_DIR
rcic pack  KAGGLE_DIR --out rxrx1.zarr --size 256 --workers 8 --skip-missing
rcic eda   rxrx1.zarr --out eda/
rcic train --data rxrx1.zarr --recipe winning --out runs/fold0 --set data.fold=0
rcic predict runs/fold0 --data rxrx1.zarr --split val  --tta 8 --out val.npz
rcic predict runs/fold0 --data rxrx1.zarr --split test --tta 8 --out test.npz
rcic submit --data rxrx1.zarr --logits val.npz --out val_submission.csv
rcic score  --submission val_submission.csv --answers KAGGLE_DIR/train.csv
rcic submit --data rxrx1.zarr --logits test.npz --out submission.csv
# pseudo-labels: retrain with the most confident test wells
rcic train --data rxrx1.zarr --recipe winning --out runs/fold0-pl --pseudo test.npz --pseudo-fraction 0.5
# embeddings and a batch-corrected phenomic map (bring a siRNA->gene table and known gene pairs)
rcic embed runs/fold0 --data rxrx1.zarr --out embeddings.parquet
rcic map embeddings.parquet --out map/ --correct none --correct tvn --genes genes.csv --relationships pairs.csv"""


def per_experiment_plot(scores: dict[str, dict], path: Path) -> None:
    frame = pd.DataFrame({name: s["by_experiment"] for name, s in scores.items()})
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(frame) + 2), 3.6))
    frame.plot.bar(ax=ax, width=0.8)
    ax.set(ylim=(0, 1), ylabel="accuracy", title="Accuracy per held-out experiment")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def confusion_plot(labels: np.ndarray, preds: np.ndarray, classes: list[str], path: Path) -> None:
    index = {c: i for i, c in enumerate(classes)}
    m = np.zeros((len(classes), len(classes)))
    for t, p in zip(labels, preds):
        if t in index and p in index:
            m[index[t], index[p]] += 1
    m = m / np.maximum(m.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    im = ax.imshow(m, cmap="viridis", vmin=0, vmax=1)
    ax.set(title="Confusion (rows: true siRNA, columns: predicted)", xlabel="predicted", ylabel="true")
    fig.colorbar(im, ax=ax, fraction=0.046)
    save_figure(fig, path)


def write_run_report(out: Path, *, eda_dir: Path | None, run_dir: Path, accuracy: pd.DataFrame,
                     scores: dict[str, dict], rotations: pd.DataFrame, confusion: tuple | None,
                     title: str = "rcic run report", commands: str = REPRODUCE, map_scores: dict | None = None,
                     map_report: Path | None = None) -> Path:
    """Write ``out/report.html``; images are copied or drawn into ``out/report_files``."""
    files = out / "report_files"
    files.mkdir(parents=True, exist_ok=True)
    sections = []
    if eda_dir is not None and (eda_dir / "index.html").is_file():
        parts = [f'<p>The full data report: <a href="{html.escape(str((eda_dir / "index.html").relative_to(out)))}">'
                 "EDA</a>.</p>"]
        for name, caption in (("plate_map.png", "Plate map"), ("plate_groups.png", "Plate groups per experiment"),
                              ("intensity_by_experiment.png", "Channel intensity by experiment (batch effect)"),
                              ("montage_experiments.png", "Colour composites across experiments")):
            if (eda_dir / name).is_file():
                shutil.copyfile(eda_dir / name, files / name)
                parts.append(figure(f"report_files/{name}", caption))
        sections.append(section("Data", *parts))
    if (run_dir / "curves.png").is_file():
        shutil.copyfile(run_dir / "curves.png", files / "curves.png")
        sections.append(section("Training", figure("report_files/curves.png",
                                                   "Loss and held-out accuracy per epoch")))
    sections.append(section("Accuracy", "<p>Held-out experiments (validation fold) and the synthetic test set: "
                                        "arg-max of one view, + D4 test-time augmentation, + the plate leak "
                                        "(rotation choice and per-plate linear assignment).</p>",
                            table(accuracy)))
    if scores:
        per_experiment_plot(scores, files / "per_experiment.png")
        sections.append(section("Per experiment", figure("report_files/per_experiment.png",
                                                         "Accuracy per held-out experiment")))
    if not rotations.empty:
        sections.append(section("Plate rotations", "<p>The group order chosen for each experiment, and its "
                                                   "confidence (margin in mean log-probability to the runner-up)."
                                                   "</p>", table(rotations)))
    if confusion is not None:
        confusion_plot(*confusion, files / "confusion.png")
        sections.append(section("Confusion overview", figure("report_files/confusion.png",
                                                             "Row-normalised confusion on held-out wells "
                                                             "(arg-max with TTA, before the plate leak)")))
    else:
        sections.append(section("Confusion overview", note("No validation predictions.")))
    if map_scores:
        from rcic.reports.map_report import scores_table

        link = ""
        if map_report is not None and map_report.is_file():
            link = (f' The full phenomic-map report: <a href="{html.escape(str(map_report.relative_to(out)))}">'
                    "map</a>.")
        sections.append(section("Phenomic map", "<p>Every well embedded with the trained model (pooled features), "
                                                "corrected with the control wells or not, and benchmarked: "
                                                f"replicate retrieval, batch leakage, known gene relationships.{link}"
                                                "</p>", table(scores_table(map_scores))))
    sections.append(section("Reproduce on real data", f"<pre>{html.escape(commands)}</pre>"))
    path = out / "report.html"
    write_page(path, page(title, f"run {run_dir}", sections))
    return path
