"""What each technique buys on the synthetic small preset (2 CPU cores, a few minutes per run).

    python bench/learning.py [--out bench/out/learning] [--epochs 12]

1. Normalisation: ``cpu-demo`` trained with per-image, per-experiment (controls) and no
   normalisation; held-out-experiment accuracy of each (arg-max, one view).
2. Prediction steps on the best of those runs: arg-max, + D4 TTA (x8), + plate leak, and then
   + pseudo-labels (retrain with the most confident half of the test wells after assignment),
   on the held-out validation experiments and on the unseen test experiments.
Writes ``table.md`` in the output folder and prints it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from rcic.config import load_recipe
from rcic.predict import predict
from rcic.store import open_source, pack
from rcic.submit import leak_pseudo_labels, make_submission, score
from rcic.synth import generate, preset
from rcic.training import fit


def markdown(frame: pd.DataFrame) -> str:
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])


def accuracy(source, logits, answers, leak) -> float:
    sub = make_submission(source.dataset, logits, leak=leak)
    return score(sub.frame, answers)["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/out/learning"))
    ap.add_argument("--epochs", type=int, default=12)
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "data" / "answers.csv").is_file():
        generate(out / "data", preset("small"), workers=2)
    pack(out / "data", out / "store.zarr", workers=2)
    source = open_source(out / "store.zarr")
    train_answers = pd.read_csv(out / "data" / "train.csv", dtype=str)
    test_answers = pd.read_csv(out / "data" / "answers.csv", dtype=str)
    chance = 1 / source.dataset.vocab.n_treatments

    def train(name, overrides, extra=None):
        run = out / name
        recipe = load_recipe("cpu-demo", [f"trainer.epochs={args.epochs}", *overrides])
        if not (run / "checkpoints" / "best.ckpt").is_file():
            fit(source, recipe, run, progress=False, extra_train=extra)
        # wall time of the run, also for a run reused from an earlier invocation
        seconds = (run / "checkpoints" / "last.ckpt").stat().st_mtime - (run / "recipe.yaml").stat().st_mtime
        return run, seconds

    rows = []
    runs = {}
    for name, mode in (("image", "image"), ("experiment", "experiment_controls"), ("none", "none")):
        run, seconds = train(f"norm-{name}", [f"data.normalization={mode}"])
        runs[name] = run
        val = predict([run], source, split="val", tta=1)
        rows.append({"normalisation": mode, "val accuracy (arg-max)": accuracy(source, val, train_answers, False),
                     "train seconds": round(seconds)})
    norm = pd.DataFrame(rows)
    best = norm.loc[norm["val accuracy (arg-max)"].idxmax(), "normalisation"]
    run = runs[{"image": "image", "experiment_controls": "experiment", "none": "none"}[best]]
    steps = []
    for split, answers in (("val", train_answers), ("test", test_answers)):
        one, eight = (predict([run], source, split=split, tta=t) for t in (1, 8))
        steps.append({"split": split, "arg-max": accuracy(source, one, answers, False),
                      "+ TTA x8": accuracy(source, eight, answers, False),
                      "+ plate leak": accuracy(source, eight, answers, True)})
    test_logits = predict([run], source, split="test", tta=8)
    pseudo = leak_pseudo_labels(source.dataset, test_logits, 0.5)
    pl_run, _ = train(f"pseudo-{best}", [f"data.normalization={best}"], extra=pseudo)
    for row, (split, answers) in zip(steps, (("val", train_answers), ("test", test_answers))):
        retrained = predict([pl_run], source, split=split, tta=8)
        row["pseudo-labels: TTA x8"] = accuracy(source, retrained, answers, False)
        row["pseudo-labels: + leak"] = accuracy(source, retrained, answers, True)
    steps = pd.DataFrame(steps)
    text = (f"Synthetic small preset, cpu-demo recipe, {args.epochs} epochs, 2 CPU cores; chance = {chance:.3f}.\n\n"
            "Normalisation (held-out experiments, arg-max of one view):\n\n" + markdown(norm)
            + f"\n\nPrediction steps (the {best} run; pseudo-labels: retrained with the most confident half of the "
            "test wells after plate assignment):\n\n" + markdown(steps) + "\n")
    (out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
