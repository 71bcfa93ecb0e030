"""Prediction (D4 TTA, site averaging, run ensembles) and the logits file format.

The logits helpers import without torch, so ``rcic submit`` and ``rcic score`` start fast; the
prediction functions load torch on first use.
"""

from rcic.predict.logits import Logits, average_logits, load_logits, save_logits

_RUNNER = ("find_checkpoint", "load_task", "predict", "predict_run", "run_val_experiments")


def __getattr__(name: str):
    if name in _RUNNER:
        from rcic.predict import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'rcic.predict' has no attribute {name!r}")


__all__ = ["Logits", "average_logits", "find_checkpoint", "load_logits", "load_task", "predict", "predict_run",
           "run_val_experiments", "save_logits"]
