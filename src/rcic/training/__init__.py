"""Training: the LightningModule (step maths), callbacks (side effects), and ``fit``."""

from rcic.training.fit import FitResult, fit, resolve_precision
from rcic.training.module import RcicTask

__all__ = ["FitResult", "RcicTask", "fit", "resolve_precision"]
