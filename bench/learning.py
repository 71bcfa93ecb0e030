"""Does the shipped recipe hold up on data it was not tuned on? cpu-demo across differently-made sets.

    python bench/learning.py [--sets A,B,C,D] [--epochs N] [--set KEY=VALUE ...] [--out bench/out/learning]

Four synthetic sets, each with its own seed and its own knobs (batch-effect strength, size and
spread of the siRNA effects, cell-type-specific effects, morphology, image size, missing wells).
On each, with the ``cpu-demo`` recipe:

- fold 0 of 3: its best validation ``val/acc`` and ``val/acc_leak`` (well level, as logged);
- the test split (scored against answers.csv) of: the fold-0 model alone, the 3-fold ensemble,
  and a ``data.fold: all`` model, each arg-max and with the plate leak (D4 TTA x8);
- a plain small CNN (``bench/baseline_cnn.py``) trained on all experiments for the same wall time
  as the ``data.fold: all`` run, arg-max and with the leak;
- the wall time of each training.

Goals (issue #8): on every set the 3-fold ensemble with the leak beats the single fold by >= 3
points, and cpu-demo (``data.fold: all``) beats the baseline by >= 10 points with the leak.
Writes ``table.md`` and ``results.json`` in the output folder; finished runs are reused.

    python bench/learning.py --compare model.backbone=resnet18 [--compare KEY=VALUE ...]

How cpu-demo's defaults were picked: fold 0 of every set with each alternative (one override at a
time) beside the shipped recipe: well-level ``val/acc`` and ``val/acc_leak``, the test split with
the leak, and the wall time. Writes ``choices.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from rcic.config import load_recipe
from rcic.predict import load_logits, predict, save_logits
from rcic.store import open_source, pack
from rcic.submit import make_submission, score
from rcic.synth import generate, preset
from rcic.training import fit

ROOT = Path(__file__).resolve().parent
SETS = {
    "A": dict(seed=21, n_classes=128, effect_size=0.22),
    "B": dict(seed=22, n_classes=128, effect_size=0.25, batch_effect=1.8, cell_type_effect=0.3),
    "C": dict(seed=23, n_classes=128, effect_size=0.20, effect_spread=0.9, morphology=2.0, missing_wells=0.05),
    "D": dict(seed=24, n_classes=96, effect_size=0.22, batch_effect=0.6, cell_type_effect=0.5, morphology=0.5,
              image_size=48),
}


def markdown(frame: pd.DataFrame) -> str:
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])


def test_accuracy(source, logits, answers) -> tuple[float, float]:
    plain = score(make_submission(source.dataset, logits, leak=False).frame, answers)["accuracy"]
    leak = score(make_submission(source.dataset, logits, leak=True).frame, answers)["accuracy"]
    return plain, leak


def train(source, out: Path, overrides: list[str]) -> tuple[Path, float, dict]:
    """A cpu-demo run (reused when finished): its folder, wall seconds and best validation row."""
    recipe = load_recipe("cpu-demo", overrides)
    timing = out / "seconds.txt"
    if not (out / "run.json").is_file() or not json.loads((out / "run.json").read_text()).get("complete"):
        if out.exists():
            import shutil

            shutil.rmtree(out)
        start = time.perf_counter()
        fit(source, recipe, out, progress=False)
        timing.write_text(f"{time.perf_counter() - start:.1f}")
    history = pd.read_csv(out / "history.csv")
    best = {}
    if "val/acc_leak" in history:
        best = history.loc[history["val/acc_leak"].idxmax()].to_dict()
    return out, float(timing.read_text()), best


def run_set(name: str, knobs: dict, out: Path, overrides: list[str], baseline: bool) -> dict:
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "data" / "answers.csv").is_file():
        generate(folder / "data", preset("small", **knobs), workers=2)
    pack(folder / "data", folder / "store.zarr", workers=2)
    source = open_source(folder / "store.zarr")
    answers = pd.read_csv(folder / "data" / "answers.csv", dtype=str)
    common = ["data.folds=3", *overrides]
    folds = [train(source, folder / f"fold{k}", [*common, f"data.fold={k}"]) for k in range(3)]
    every, seconds_all, _ = train(source, folder / "all", [*common, "data.fold=all"])

    def logits(runs, path):
        if not path.is_file():
            save_logits(path, predict(runs, source, split="test", tta=8, batch_size=64))
        return load_logits(path)

    single = test_accuracy(source, logits([folds[0][0]], folder / "test_fold0.npz"), answers)
    ensemble = test_accuracy(source, logits([f[0] for f in folds], folder / "test_ensemble.npz"), answers)
    everything = test_accuracy(source, logits([every], folder / "test_all.npz"), answers)
    row = {"set": name, "knobs": knobs, "fold0 val/acc": folds[0][2].get("val/acc"),
           "fold0 val/acc_leak": folds[0][2].get("val/acc_leak"),
           "fold0 test": single[0], "fold0 test+leak": single[1],
           "3-fold test": ensemble[0], "3-fold test+leak": ensemble[1],
           "fold=all test": everything[0], "fold=all test+leak": everything[1],
           "fold seconds": round(sum(f[1] for f in folds) / 3), "fold=all seconds": round(seconds_all)}
    if baseline:
        path = folder / "baseline_test.npz"
        if not path.is_file():
            subprocess.run([sys.executable, str(ROOT / "baseline_cnn.py"), "--data", str(folder / "store.zarr"),
                            "--seconds", str(seconds_all), "--out", str(path)], check=True)
        row["baseline test"], row["baseline test+leak"] = test_accuracy(source, load_logits(path), answers)
    row["chance"] = 1 / source.dataset.vocab.n_treatments
    return row


def compare_choices(out: Path, sets: list[str], alternatives: list[str]) -> str:
    """Fold 0 of each set with the shipped recipe and with each single override, side by side."""
    rows = []
    for name in sets:
        folder = out / name
        if not (folder / "store.zarr").exists():
            raise SystemExit(f"{folder}: run the learning benchmark on set {name} first")
        source = open_source(folder / "store.zarr")
        answers = pd.read_csv(folder / "data" / "answers.csv", dtype=str)
        for choice in ["cpu-demo", *alternatives]:
            run_dir = folder / ("fold0" if choice == "cpu-demo" else "fold0-" + choice.replace("=", "-"))
            overrides = ["data.folds=3", "data.fold=0"] + ([] if choice == "cpu-demo" else [choice])
            run, seconds, best = train(source, run_dir, overrides)
            path = run_dir.parent / f"{run_dir.name}.test.npz"
            if not path.is_file():
                save_logits(path, predict([run], source, split="test", tta=8, batch_size=64))
            _, leak = test_accuracy(source, load_logits(path), answers)
            rows.append({"set": name, "recipe": choice, "fold0 val/acc": best.get("val/acc"),
                         "fold0 val/acc_leak": best.get("val/acc_leak"), "fold0 test+leak": leak,
                         "seconds": round(seconds)})
    text = "cpu-demo against single changes, fold 0 of each set:\n\n" + markdown(pd.DataFrame(rows)) + "\n"
    (out / "choices.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "learning")
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override KEY=VALUE")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--compare", action="append", default=[], metavar="KEY=VALUE",
                    help="compare cpu-demo with this single change on fold 0 of every set")
    args = ap.parse_args()
    if args.compare:
        print(compare_choices(args.out, args.sets.split(","), args.compare))
        return
    rows = [run_set(name, SETS[name], args.out, args.overrides, not args.no_baseline)
            for name in args.sets.split(",")]
    frame = pd.DataFrame(rows)
    frame["ensemble gain"] = frame["3-fold test+leak"] - frame["fold0 test+leak"]
    if "baseline test+leak" in frame:
        frame["margin over baseline"] = frame["fold=all test+leak"] - frame["baseline test+leak"]
    goals = (f"\nGoals: ensemble gain >= 0.03 on every set: {bool((frame['ensemble gain'] >= 0.03).all())}"
             + (f"; margin over baseline >= 0.10 on every set: {bool((frame['margin over baseline'] >= 0.10).all())}"
                if "margin over baseline" in frame else ""))
    shown = frame.drop(columns=["knobs"])
    knobs = "\n".join(f"- {r['set']}: " + ", ".join(f"{k}={v}" for k, v in r["knobs"].items()) for r in rows)
    text = (f"cpu-demo recipe{' with ' + ', '.join(args.overrides) if args.overrides else ''}; synthetic sets "
            f"(4 cell types, 3 train + 1 test experiments each, 64 px unless set):\n{knobs}\n\n"
            + markdown(shown) + "\n" + goals + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2, default=float))
    print(text)


if __name__ == "__main__":
    main()
