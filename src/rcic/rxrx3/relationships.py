"""Known gene relationships: the five sources of the ``efaar-benchmarking`` 1.0 wheel, or a user's file.

The files are located with ``importlib.resources`` and read as CSV; the package's modules are never
imported (they pull in torch, geomloss, scvi-tools and more). Each source's licence is reported the
first time it is used: CORUM and SIGNOR are CC-BY-NC 4.0 (non-commercial use only).

``filter_relationships`` is EFAAR's: the two names of each row sorted, self pairs and duplicate rows
dropped, so (A, B) and (B, A) are one pair.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from rcic.errors import DataError

SOURCES = ("CORUM", "HuMAP", "Reactome", "SIGNOR", "StringDB")
LICENCES = {
    "CORUM": "CC-BY-NC 4.0 (non-commercial use only)",
    "HuMAP": "CC-BY 4.0",
    "Reactome": "CC0 1.0",
    "SIGNOR": "CC-BY-NC 4.0 (non-commercial use only)",
    "StringDB": "CC-BY 4.0",
}
PACKAGE = "efaar_benchmarking"
INSTALL = "pip install --no-deps efaar-benchmarking==1.0"

log = logging.getLogger(__name__)
_reported: set[str] = set()


def source_name(name: str) -> str | None:
    """The canonical spelling of a built-in source (``corum`` -> ``CORUM``), or None."""
    return next((s for s in SOURCES if s.lower() == str(name).lower()), None)


def annotations_dir() -> Path:
    """The wheel's ``benchmark_annotations`` folder, found without importing the package's modules."""
    from importlib import resources
    from importlib.util import find_spec

    if find_spec(PACKAGE) is None:
        raise DataError(f"the relationship sources ship in efaar-benchmarking, which is not installed: run `{INSTALL}`")
    folder = Path(str(resources.files(PACKAGE).joinpath("benchmark_annotations")))
    if not folder.is_dir():
        raise DataError(f"efaar-benchmarking has no benchmark_annotations folder (another version?): run `{INSTALL}`",
                        folder)
    return folder


def source_path(name: str) -> Path:
    canonical = source_name(name)
    if canonical is None:
        raise DataError(f"unknown relationship source {name!r}; choose from {', '.join(s.lower() for s in SOURCES)} "
                        "or give a CSV file (entity1,entity2)")
    path = annotations_dir() / f"{canonical}.txt"
    if not path.is_file():
        raise DataError(f"efaar-benchmarking lacks {canonical}.txt: reinstall it with `{INSTALL}`", path)
    return path


def licence_notice(name: str) -> str | None:
    """The licence line of a built-in source the first time it is used in this process, else None."""
    canonical = source_name(name)
    if canonical is None or canonical in _reported:
        return None
    _reported.add(canonical)
    return f"{canonical} relationships (efaar-benchmarking): licence {LICENCES[canonical]}"


def filter_relationships(pairs: pd.DataFrame) -> pd.DataFrame:
    """EFAAR's filter: each pair's names sorted (entity1 the smaller), self pairs and duplicates dropped."""
    a, b = pairs["entity1"].astype(str).to_numpy(), pairs["entity2"].astype(str).to_numpy()
    smaller = np.where(a <= b, a, b)
    larger = np.where(a <= b, b, a)
    out = pd.DataFrame({"entity1": smaller, "entity2": larger})
    return out[out["entity1"] != out["entity2"]].drop_duplicates().reset_index(drop=True)


def read_relationships(name_or_path: str | Path) -> pd.DataFrame:
    """The filtered pairs (``entity1``, ``entity2``) of a built-in source or of a CSV file.

    A file has the header ``entity1,entity2`` (EFAAR's) or ``gene_a,gene_b`` (rcic map's)."""
    path = Path(name_or_path)
    if source_name(str(name_or_path)) is not None and not path.is_file():
        path = source_path(str(name_or_path))
    elif not path.is_file():
        if path.suffix == "" and "/" not in str(name_or_path):
            source_path(str(name_or_path))  # an unknown source name: the error lists the known ones
        raise DataError("relationship file not found" if not path.exists() else "is not a file", path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"not a readable CSV ({str(err).splitlines()[0][:120]})", path) from None
    frame = frame.rename(columns={"gene_a": "entity1", "gene_b": "entity2"})
    if not {"entity1", "entity2"} <= set(frame.columns):
        raise DataError("needs the columns entity1,entity2 (or gene_a,gene_b)", path)
    return filter_relationships(frame)


def relationship_sets(names: list[str], notify=None) -> dict[str, pd.DataFrame]:
    """{source: pairs} for built-in names and files; ``notify(line)`` gets each licence once."""
    out = {}
    for name in names:
        canonical = source_name(name)
        label = canonical or Path(name).stem
        out[label] = read_relationships(name)
        notice = licence_notice(name) if canonical else None
        if notice and notify is not None:
            notify(notice)
    return out
