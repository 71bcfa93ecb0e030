"""The end-to-end demo on built-in synthetic data, stage by stage, each resumable.

synth -> info -> pack -> eda -> train (cpu-demo, held-out experiments) -> predict (val, test; TTA)
-> submit (with and without the plate leak) -> score -> embed + map (batch correction, phenomic
benchmarks on the experiments the model never trained on) -> report.html
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pandas as pd

from rcic.atomic import atomic_write_text
from rcic.config import load_recipe
from rcic.predict import Logits, load_logits, predict, save_logits
from rcic.profiles import DEFAULT_CONTROLS, phenomic_map, read_embeddings, read_gene_tables, write_embeddings
from rcic.reports.eda import write_eda
from rcic.reports.map_report import write_map_report
from rcic.reports.run_report import write_run_report
from rcic.store import open_source, pack
from rcic.submit import make_submission, read_submission_csv, score, write_submission
from rcic.synth import generate, preset
from rcic.training import fit

# none, the simplest correction, EFAAR's TVN, and Harmony (which uses all wells, not only the controls):
# which one helps depends on how many controls there are and on what the embeddings still carry
DEMO_CORRECTIONS = ("none", "center", "tvn", "harmony")
STAGES = ("synth", "info", "pack", "eda", "train", "predict", "submit", "score", "map", "report")


@dataclass
class DemoResult:
    out: Path
    summary: dict
    accuracy: pd.DataFrame
    report: Path
    rotations: pd.DataFrame
    map_scores: dict


class _TrainProgress(L.Callback):
    def __init__(self, progress: Callable[[int, int], None]):
        self.progress = progress

    def on_train_batch_end(self, trainer, *args) -> None:
        total = trainer.num_training_batches * trainer.max_epochs
        self.progress(trainer.current_epoch * trainer.num_training_batches + args[-1] + 1, total)


def run_demo(out: str | Path = "demo-out", preset_name: str = "small", seed: int = 0, epochs: int | None = None,
             workers: int = 2, stage: Callable[[str], None] | None = None,
             progress: Callable[[int, int], None] | None = None) -> DemoResult:
    """Run every stage into ``out``; a stage whose output is complete is not redone."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stage = stage or (lambda name: None)
    progress = progress or (lambda done, total: None)

    stage("synth")
    data = out / "data"
    if not (data / "answers.csv").is_file():
        generate(data, preset(preset_name, seed=seed), workers=workers, progress=progress)

    stage("info")
    summary = open_source(data).dataset.summary()

    stage("pack")
    store_path = out / "store.zarr"
    pack(data, store_path, compression="lz4", workers=workers, progress=progress)
    source = open_source(store_path)

    stage("eda")
    write_eda(source, out / "eda", progress=progress)

    stage("train")
    overrides = [f"seed={seed}", f"data.num_workers={min(workers, 2)}"]
    if epochs is not None:
        overrides.append(f"trainer.epochs={epochs}")
    recipe = load_recipe("cpu-demo", overrides)
    run_dir = out / "run"
    done = run_dir / "history.csv"
    finished = done.is_file() and len(pd.read_csv(done)) >= recipe.trainer.epochs
    if not finished:
        resume = (run_dir / "checkpoints" / "last.ckpt").is_file()
        if not resume and run_dir.exists():
            shutil.rmtree(run_dir)  # an interrupted first epoch: nothing to keep
        fit(source, recipe, run_dir, resume=resume, progress=False, extra_callbacks=[_TrainProgress(progress)])

    stage("predict")
    logits: dict[str, Logits] = {}
    for name, split, tta in (("val_tta1", "val", 1), ("val_tta8", "val", 8), ("test_tta1", "test", 1),
                             ("test_tta8", "test", 8)):
        path = out / f"{name}.npz"
        if not path.is_file():
            save_logits(path, predict([run_dir], source, split=split, tta=tta, progress=progress))
        logits[name] = load_logits(path)

    stage("submit")
    dataset = source.dataset
    variants = {"arg-max": ("tta1", False), "+ TTA (x8)": ("tta8", False), "+ plate leak": ("tta8", True)}
    submissions, rotations = {}, pd.DataFrame()
    for split in ("val", "test"):
        for label, (tta, leak) in variants.items():
            result = make_submission(dataset, logits[f"{split}_{tta}"], leak=leak)
            path = out / f"submission_{split}_{tta}{'_leak' if leak else ''}.csv"
            write_submission(path, result)
            submissions[(split, label)] = path
            if split == "test" and leak:
                rotations = result.experiments
    (out / "submission.csv").write_bytes(submissions[("test", "+ plate leak")].read_bytes())

    stage("score")
    answers = {"val": read_submission_csv(data / "train.csv", "answers"),
               "test": read_submission_csv(data / "answers.csv", "answers")}
    rows, scores = [], {}
    for (split, label), path in submissions.items():
        s = score(read_submission_csv(path), answers[split])
        rows.append({"split": "held-out (val)" if split == "val" else "test", "step": label,
                     "accuracy": s["accuracy"], **s["by_cell_type"]})
        scores[f"{split} {label}"] = s
    chance = 1 / summary["treatment_classes"]
    accuracy = pd.DataFrame(rows)
    accuracy.attrs["chance"] = chance
    (out / "accuracy.json").write_text(json.dumps({"chance": chance, "rows": rows}, indent=2))

    stage("map")
    map_scores = _phenomic_map(out, run_dir, source, data, progress)

    stage("report")
    val = logits["val_tta8"]
    # the arg-max (with TTA) confusion shows what the model mixes up; after the leak it is near-diagonal
    val_sub = read_submission_csv(submissions[("val", "+ TTA (x8)")]).set_index("id_code")
    confusion = (val.extra["labels"], val_sub.loc[val.id_code, "sirna"].to_numpy(),
                 list(dataset.vocab.treatment_labels))
    report = write_run_report(out, eda_dir=out / "eda", run_dir=run_dir, accuracy=accuracy,
                              scores={k: v for k, v in scores.items() if k.startswith("val")},
                              rotations=rotations, confusion=confusion, title="rcic demo report",
                              map_scores=map_scores, map_report=out / "map" / "map.html")
    return DemoResult(out, summary, accuracy, report, rotations, map_scores)


def _phenomic_map(out: Path, run_dir: Path, source, data: Path, progress) -> dict:
    """An out-of-fold map: the trained model embeds every well, and the map scores only the wells of
    experiments it never trained on.

    The demo trains one fold (cpu-demo: fold 0 of 3), which holds out one experiment per cell type;
    replicate retrieval needs two experiments of a cell type. So the map also scores the test
    experiments, equally unseen, whose synthetic truth (``answers.csv``) gives their treatment
    wells a label. With every fold trained, ``rcic embed runs/fold* --split val`` gives every
    labelled experiment its out-of-fold embedding instead (README).
    """
    from rcic.profiles import embed_wells, scored_wells

    scores_path = out / "map" / "scores.json"
    if scores_path.is_file():
        return json.loads(scores_path.read_text())
    embeddings = out / "embeddings.parquet"
    if not embeddings.is_file():
        frame, runs = embed_wells([run_dir], source, "all", progress, tta=2)
        truth = pd.read_csv(data / "answers.csv", dtype=str).set_index("id_code")["sirna"]
        test = frame["label"].eq("") & frame["id_code"].isin(truth.index)
        frame.loc[test, "label"] = truth.loc[frame.loc[test, "id_code"]].to_numpy()
        write_embeddings(embeddings, frame, runs)
    meta, x = read_embeddings(embeddings)
    keep, _ = scored_wells(meta)
    meta, x = meta[keep].reset_index(drop=True), x[keep]
    genes, pairs = read_gene_tables(data / "genes.csv", data / "relationships.csv", meta)
    result = phenomic_map(meta, x, list(DEMO_CORRECTIONS), genes, pairs, null_size=2000, progress=progress)
    write_map_report(out / "map", meta, result.scores, result.corrected, str(embeddings), controls=DEFAULT_CONTROLS)
    atomic_write_text(scores_path, json.dumps(result.scores, indent=2))
    return result.scores
