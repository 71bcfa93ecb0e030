"""Metadata readers (three layouts -> one site table) and site image IO."""

from rcic.io.images import load_site, site_png_path, to_rgb
from rcic.io.metadata import (
    LAYOUTS,
    ClassVocab,
    Dataset,
    PlateGroups,
    derive_plate_groups,
    detect_layout,
    read_dataset,
)

__all__ = [
    "LAYOUTS",
    "ClassVocab",
    "Dataset",
    "PlateGroups",
    "derive_plate_groups",
    "detect_layout",
    "load_site",
    "read_dataset",
    "site_png_path",
    "to_rgb",
]
