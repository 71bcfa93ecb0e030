"""AdaBN's prior at prediction: each fixed prior, ``auto``'s blend, the kept best and the plain mean.

    python bench/adabn_priors.py --sets D,G,B,C,A,E [--out bench/out/learning]

For each set of ``bench/learning.py`` (its data, store and cpu-demo ``data.fold: all`` run, trained
here where missing and reused otherwise): the test split predicted once per prior of
``rcic.predict.runner.ADABN_PRIOR_GRID`` (TTA x8), each scored arg-max and with the plate leak
(``rcic.submit.make_submission`` + ``rcic.submit.score`` against ``answers.csv``) with its agreement
with the plate assignment; then the candidate of the highest agreement (what ``auto`` kept before
2026-12-08), the plain mean of the five log-softmax, and ``auto``'s blend (weights
exp(AGREEMENT_SHARPNESS x (agreement - best))), recomputed from the five stored predictions.
Writes ``priors.json`` in the output folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from learning import ROOT, make_set, train
from scipy.special import log_softmax

from rcic.predict import Logits, load_logits, predict, save_logits
from rcic.predict.runner import ADABN_PRIOR_GRID, AGREEMENT_SHARPNESS, _agreement
from rcic.submit import make_submission
from rcic.submit.submission import score


def accuracy(source, answers: pd.DataFrame, logits: Logits) -> list[float]:
    return [score(make_submission(source.dataset, logits, leak=leak).frame, answers)["accuracy"]
            for leak in (False, True)]


def run_set(name: str, out: Path) -> dict:
    folder, source, answers_path = make_set(name, out)
    run, cpu, _ = train(source, folder / "all", ["data.folds=3", "data.fold=all"])
    answers = pd.read_csv(answers_path, dtype=str)
    candidates = {}
    for prior in ADABN_PRIOR_GRID:
        path = folder / f"prior-{prior}.npz"
        if not path.is_file():
            save_logits(path, predict([run], source, split="test", tta=8, batch_size=64, adabn_prior=prior))
        candidates[prior] = load_logits(path)
    first = candidates[ADABN_PRIOR_GRID[0]]
    wells = source.dataset.wells.set_index("id_code").loc[first.id_code].reset_index()
    agreement = {p: _agreement(source, wells, c.logits, c.classes) for p, c in candidates.items()}
    rows = {f"prior {p:g}": [*accuracy(source, answers, c), agreement[p]] for p, c in candidates.items()}
    best = max(ADABN_PRIOR_GRID, key=lambda p: (agreement[p], -p))
    rows["kept best"] = [*rows[f"prior {best:g}"][:2], best]
    stacked = np.stack([log_softmax(c.logits.astype(np.float64), axis=-1) for c in candidates.values()])
    weights = np.exp(AGREEMENT_SHARPNESS * (np.array(list(agreement.values())) - agreement[best]))
    for label, mixed in (("plain mean", stacked.mean(0)), ("blend (auto)", np.tensordot(weights / weights.sum(),
                                                                                      stacked, 1))):
        rows[label] = accuracy(source, answers, Logits(first.id_code, mixed.astype(np.float32), first.classes))
    return {"cpu s": cpu, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "learning")
    ap.add_argument("--sets", default="A,B,C,D,E,G")
    args = ap.parse_args()
    path = args.out / "priors.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for name in args.sets.split(","):
        results[name] = run_set(name, args.out)
        path.write_text(json.dumps(results, indent=1))
        print(name, "arg-max / + leak:", {k: [round(x, 3) for x in v[:2]] for k, v in results[name]["rows"].items()},
              flush=True)


if __name__ == "__main__":
    main()
