"""Prediction (D4 TTA, site averaging, run ensembles) and the logits file format."""

from rcic.predict.logits import Logits, average_logits, load_logits, save_logits
from rcic.predict.predict import find_checkpoint, load_task, predict

__all__ = ["Logits", "average_logits", "find_checkpoint", "load_logits", "load_task", "predict", "save_logits"]
