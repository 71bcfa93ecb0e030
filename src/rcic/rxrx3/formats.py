"""RxRx3-core as downloaded: the metadata CSV, an embeddings parquet keyed by ``well_id``, image shards.

- ``metadata_rxrx3_core.csv``: one row per well, ``METADATA_COLUMNS`` in this order (222,601 rows).
  ``gene`` is empty for compound wells, ``concentration`` (µM) empty for CRISPR and control wells,
  ``SMILES`` may hold commas inside quotes (a ChemAxon ``|c:...|`` suffix).
- Embeddings: any parquet with a ``well_id`` (or rcic's ``id_code``) column and ``feature_*``
  (OpenPhenom's file) or ``emb_*`` (``rcic embed``) columns; rows averaged per well.
- Image shards ``data/train-*.parquet``: one row per channel image, ``__key__`` =
  ``{experiment}/Plate{plate}/{address}_s1_{channel}`` and ``jp2`` (JPEG 2000 bytes, or the
  Hugging Face ``Image`` struct of ``bytes`` and ``path``); 512 x 512 8-bit, 6 channels, one site.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rcic.errors import DataError

METADATA_FILE = "metadata_rxrx3_core.csv"
METADATA_COLUMNS = ["well_id", "experiment_name", "plate", "address", "gene", "treatment", "SMILES",
                    "concentration", "perturbation_type", "cell_type"]
PERTURBATION_TYPES = ("CRISPR", "COMPOUND")
EMPTY_CONTROL = "EMPTY_control"
CRISPR_CONTROL = "CRISPR_control"
# 1,536-well plates: rows A-Z then AA-AF, columns 01-48
ADDRESS_RE = re.compile(r"^([A-Z]|A[A-F])(0[1-9]|[1-3][0-9]|4[0-8])$")
KEY_RE = re.compile(r"^(?P<experiment>[A-Za-z0-9][A-Za-z0-9_.+-]*)/Plate(?P<plate>\d+)/(?P<address>[A-Z]{1,2}\d{2})"
                    r"_s(?P<site>\d+)_(?P<channel>\d+)$")
N_CHANNELS = 6


def read_metadata(path: str | Path) -> pd.DataFrame:
    """The metadata CSV, checked: the 10 columns, unique ``well_id``, known perturbation types."""
    path = Path(path)
    if not path.is_file():
        raise DataError("metadata file not found" if not path.exists() else "is not a file", path)
    strings = {c: str for c in METADATA_COLUMNS if c not in ("plate", "concentration")}
    try:
        frame = pd.read_csv(path, dtype=strings, keep_default_na=False, na_values={"concentration": [""]})
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"not a readable CSV ({str(err).splitlines()[0][:120]})", path) from None
    missing = [c for c in METADATA_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"missing column(s) {', '.join(missing)}: an RxRx3-core metadata file has "
                        f"{', '.join(METADATA_COLUMNS)}", path)
    frame = frame[METADATA_COLUMNS]
    if frame.empty:
        raise DataError("no wells", path)
    for column in ("plate", "concentration"):
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = values.isna() & frame[column].notna() & (frame[column].astype(str) != "")
        if column == "plate":
            bad |= values.isna()
        if bad.any():
            row = int(np.argmax(bad.to_numpy()))
            raise DataError(f"row {row + 2}: {column} {frame[column].iloc[row]!r} is not a number", path)
        frame[column] = values.astype(int) if column == "plate" else values.astype(float)
    kinds = ~frame["perturbation_type"].isin(PERTURBATION_TYPES)
    if kinds.any():
        row = int(np.argmax(kinds.to_numpy()))
        raise DataError(f"row {row + 2}: perturbation_type {frame['perturbation_type'].iloc[row]!r} is not CRISPR "
                        "or COMPOUND", path)
    empty = frame["treatment"].str.strip() == ""
    if empty.any():
        raise DataError(f"row {int(np.argmax(empty.to_numpy())) + 2}: empty treatment", path)
    duplicated = frame["well_id"].duplicated()
    if duplicated.any():
        raise DataError(f"duplicate well_id {frame['well_id'][duplicated].iloc[0]!r}", path)
    return frame.reset_index(drop=True)


def perturbation(metadata: pd.DataFrame) -> pd.Series:
    """EFAAR's ``perturbation``: the treatment for controls, else its part before the first ``_``
    (a CRISPR guide ``PEX6_guide_2`` pools into its gene ``PEX6``; compound names pass unchanged)."""
    treatment = metadata["treatment"].astype(str)
    return treatment.where(treatment.str.contains("_control", regex=False), treatment.str.split("_", n=1).str[0])


@dataclass
class Embeddings:
    """Well embeddings aligned to a metadata table: ``metadata`` (one row per embedded well) and ``x``."""

    metadata: pd.DataFrame
    x: np.ndarray  # (wells, features) float64
    feature_names: list[str]
    wells_without_embedding: int


def _feature_columns(names: list[str], path: Path) -> list[str]:
    for prefix in ("feature_", "emb_"):
        columns = [c for c in names if c.startswith(prefix) and c[len(prefix):].isdigit()]
        if columns:
            return sorted(columns, key=lambda c: int(c[len(prefix):]))
    raise DataError("no feature columns: an embeddings parquet has well_id and feature_0, feature_1, ... "
                    "(OpenPhenom) or emb_0, emb_1, ... (rcic embed)", path)


def read_embeddings(path: str | Path, metadata: pd.DataFrame, metadata_path: str | Path | None = None
                    ) -> Embeddings:
    """Embeddings keyed by ``well_id`` joined to ``metadata``: rows of one well averaged (EFAAR's step 2);
    a well unknown to the metadata, a NaN or an infinite feature is an error naming the file."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise DataError("embeddings file not found" if not path.exists() else "is not a file", path)
    try:
        schema = pq.read_schema(path)
    except Exception as err:  # pyarrow raises its own types for a file that is not parquet
        raise DataError(f"not a readable parquet file ({type(err).__name__})", path) from None
    key = next((c for c in ("well_id", "id_code") if c in schema.names), None)
    if key is None:
        raise DataError("no well_id column: the embeddings must be keyed by the metadata's well_id", path)
    features = _feature_columns(list(schema.names), path)
    table = pq.read_table(path, columns=[key, *features])
    ids = table.column(key).to_pandas().astype(str).to_numpy()
    x = np.empty((table.num_rows, len(features)), np.float64)
    for j, name in enumerate(features):  # column by column: no second copy of the whole table in memory
        column = table.column(name)
        if not _is_number(column.type):
            raise DataError(f"column {name} is not numeric ({column.type})", path)
        x[:, j] = column.to_numpy(zero_copy_only=False)
    del table
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise DataError(f"{int(bad.sum())} wells have NaN or infinite features (first {ids[int(np.argmax(bad))]!r})",
                        path)
    position = pd.Index(metadata["well_id"]).get_indexer(ids)
    unknown = position < 0
    if unknown.any():
        named = f" {Path(metadata_path).name}" if metadata_path else ""
        raise DataError(f"{int(unknown.sum())} of {len(ids)} well_ids are not in the metadata{named} (first "
                        f"{ids[int(np.argmax(unknown))]!r}): embeddings of another dataset or metadata file?", path)
    if len(np.unique(position)) != len(position):  # several rows of one well: their mean
        codes, first = np.unique(position, return_inverse=True)
        sums = np.zeros((len(codes), x.shape[1]))
        np.add.at(sums, first, x)
        x = sums / np.bincount(first)[:, None]
        position = codes
    order = np.argsort(position, kind="stable")
    meta = metadata.iloc[position[order]].reset_index(drop=True)
    return Embeddings(meta, x[order], features, len(metadata) - len(meta))


def _is_number(kind) -> bool:
    import pyarrow.types as t

    return t.is_floating(kind) or t.is_integer(kind) or t.is_decimal(kind)


def profiles_metadata(metadata: pd.DataFrame) -> pd.DataFrame:
    """The metadata in rcic's embeddings columns (``rcic.profiles.META_COLUMNS``), for ``rcic map`` and
    the corrections: ``EMPTY_control`` wells are negative controls, ``CRISPR_control`` wells positive ones;
    labels are gene symbols (guides pooled) and ``compound@concentration`` for compounds."""
    pert = perturbation(metadata)
    well_type = np.where(metadata["treatment"] == EMPTY_CONTROL, "negative_control",
                         np.where(metadata["treatment"] == CRISPR_CONTROL, "positive_control", "treatment"))
    compound = (metadata["perturbation_type"] == "COMPOUND") & (well_type == "treatment")
    concentration = metadata["concentration"].map(lambda c: "" if pd.isna(c) else f"@{c:g}uM")
    label = pert.where(~compound, pert + concentration)
    return pd.DataFrame({
        "id_code": metadata["well_id"].to_numpy(), "experiment": metadata["experiment_name"].to_numpy(),
        "plate": metadata["plate"].to_numpy(), "well": metadata["address"].to_numpy(),
        "cell_type": metadata["cell_type"].to_numpy(), "well_type": well_type,
        "label": label.where(well_type != "negative_control", "").to_numpy()})


def is_rxrx3_core_folder(root: str | Path) -> bool:
    """Whether ``root`` is an RxRx3-core download (its metadata CSV, image shards under ``data/``)."""
    root = Path(root)
    return (root / METADATA_FILE).is_file() and any((root / "data").glob("*.parquet"))


def image_key(experiment: str, plate: int, address: str, channel: int, site: int = 1) -> str:
    return f"{experiment}/Plate{int(plate)}/{address}_s{site}_{channel}"
