"""rcic: RxRx1 (Recursion Cellular Image Classification) from 6-channel PNGs to a submission.

The package follows the data: ``io`` (metadata, images) -> ``store`` (packed zarr) -> ``data``
(dataset, transforms) -> ``models`` -> ``training`` -> ``predict`` -> ``assign`` (plate leak)
-> ``submit``; ``synth`` and ``reports`` beside it; ``cli`` on top.
"""

from rcic.errors import DataError, RcicError, RecipeError
from rcic.io import load_site, read_dataset, to_rgb

__version__ = "0.1.0"
__all__ = ["DataError", "RcicError", "RecipeError", "load_site", "read_dataset", "to_rgb", "__version__"]
