"""``rcic evaluate``: well-level scores of logits, equal to what ``rcic submit`` + ``rcic score`` give.

The treatment wells of the logits are scored among the treatment classes, arg-max and plate leak
(``rcic.assign.score_wells``, the function validation uses too). On the WILDS release the
benchmark's own numbers are added: accuracy per image (site) over all classes, every well type,
overall and per cell type, and the worst cell type, as the wilds package's RxRx1 evaluation
reports them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from rcic.assign.plates import treatment_log_probs
from rcic.assign.scoring import score_wells
from rcic.errors import DataError
from rcic.io.metadata import Dataset
from rcic.predict.logits import Logits


def evaluate_logits(dataset: Dataset, logits: Logits, balance: str = "none", center: str = "none") -> dict:
    """``{"acc", "acc_leak", "wells", "per_cell_type", "experiments"}`` (+ ``"wilds"`` on that layout).

    ``balance``: the plates' balancing before the leak assignment (as ``rcic submit --balance``);
    ``center``: ``plate`` scores plate-centred log-probabilities (as ``rcic submit --center``).
    """
    wells = dataset.wells.set_index("id_code")
    unknown = [i for i in logits.id_code if i not in wells.index]
    if unknown:
        raise DataError(f"{len(unknown)} logits ids are not wells of this data (first {unknown[0]!r})", dataset.root)
    frame = wells.loc[list(logits.id_code)].reset_index()
    if logits.wells is not None and "real_sites" in logits.wells:
        frame["real_sites"] = logits.wells["real_sites"].to_numpy()
    treat = (frame["well_type"] == "treatment").to_numpy()
    frame_t = frame[treat].reset_index(drop=True)
    if frame_t.empty:
        raise DataError("no treatment wells among the logits", dataset.root)
    unlabelled = frame_t["label"] == ""
    if unlabelled.any():
        raise DataError(f"{int(unlabelled.sum())} of these wells have no label in the data (test wells of a "
                        "Kaggle download: score a submission with rcic score --answers instead)", dataset.root)
    log_probs, classes = treatment_log_probs(logits.logits[treat], logits.classes,
                                             set(dataset.vocab.treatment_labels))
    if not classes:
        raise DataError("the logits have no treatment classes", dataset.root)
    result = score_wells(frame_t, log_probs, classes, dataset.plate_groups, balance, center)
    if dataset.layout == "wilds" and logits.site_logits is not None:
        result["wilds"] = wilds_scores(frame, logits)
    return result


def wilds_scores(wells: pd.DataFrame, logits: Logits) -> dict:
    """Per-image accuracy over all of the model's classes, as the WILDS RxRx1 evaluation computes it."""
    classes = np.asarray(logits.classes)
    real = wells["real_sites"].to_numpy() if "real_sites" in wells else np.full(len(wells), 2)
    site_pred = classes[logits.site_logits.argmax(-1)]  # (wells, 2)
    keep = np.arange(site_pred.shape[1])[None, :] < real[:, None]  # a repeated missing site is no image
    truth = np.repeat(wells["label"].to_numpy().astype(str)[:, None], site_pred.shape[1], axis=1)
    correct = (site_pred == truth)[keep]
    cell = np.repeat(wells["cell_type"].to_numpy()[:, None], site_pred.shape[1], axis=1)[keep]
    per_cell = {c: float(correct[cell == c].mean()) for c in sorted(set(cell))}
    return {"acc_avg": float(correct.mean()), "acc_wg": min(per_cell.values()), "per_cell_type": per_cell,
            "images": int(correct.size)}
