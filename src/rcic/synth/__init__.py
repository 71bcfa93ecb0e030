"""Synthetic RxRx1 generator (real Kaggle layout, realistic structure and batch effects)."""

from rcic.synth.generator import PRESETS, SynthConfig, generate, preset

__all__ = ["PRESETS", "SynthConfig", "generate", "preset"]
