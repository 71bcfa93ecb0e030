"""Read an RxRx1 download in any of its four layouts into one site table.

Layouts (see FACTS.md):
- ``kaggle-2019``: train/test CSVs with integer ``sirna`` labels (0..1138).
- ``kaggle-2023``: the current Kaggle download, ``sirna_<k>`` strings and ``UNTREATED``.
- ``rxrx1``: the full release, one ``metadata.csv`` with one row per site (``dataset`` train/test).
- ``wilds``: the WILDS release, a ``metadata.csv`` whose ``dataset`` column names the WILDS split
  (train / val / test), labels in ``sirna_id`` (0..1138), 3-channel composite PNGs.

Everything downstream works on the *site table*: one row per site with the columns in
``SITE_COLUMNS``. ``split`` is ``train`` or ``test`` (the WILDS release also has ``val``).
Labels keep the data's own spelling (always held as strings); the class vocabulary maps them to
column indices (treatments, then positive controls, then negative). Labels are checked against
the layout's spelling, so a stray ``99999`` or ``sirna_5`` in a 2019 file is refused with its row
instead of becoming a new class; whitespace around any value is stripped everywhere.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from rcic.errors import DataError

LAYOUTS = ("kaggle-2019", "kaggle-2023", "rxrx1", "wilds")
SITE_COLUMNS = ["id_code", "experiment", "plate", "well", "site", "cell_type", "split", "well_type", "label"]
WELL_TYPES = ("treatment", "positive_control", "negative_control")
N_SITES = 2
N_CHANNELS = 6
N_PLATES = 4

KAGGLE_FILES = {
    "train.csv": ["id_code", "experiment", "plate", "well", "sirna"],
    "test.csv": ["id_code", "experiment", "plate", "well"],
    "train_controls.csv": ["id_code", "experiment", "plate", "well", "sirna", "well_type"],
    "test_controls.csv": ["id_code", "experiment", "plate", "well", "sirna", "well_type"],
}
RELEASE_COLUMNS = ["experiment", "plate", "well", "site", "well_type", "dataset"]
WILDS_SPLITS = ("train", "val", "test")
_WELL_RE = re.compile(r"^[A-P](0[1-9]|1[0-9]|2[0-4])$")
# experiment names become folder names: plain names only (no separators, no leading dot)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_INTEGER_RE = r"(0|[1-9]\d*)"
_SIRNA_2023_RE = r"sirna_\d+"
NEGATIVE_2023 = "UNTREATED"


# ----------------------------------------------------------------------------------------------
# CSV reading
# ----------------------------------------------------------------------------------------------


def read_csv_strict(path: Path, columns: list[str], nrows: int | None = None) -> pd.DataFrame:
    """A CSV as strings (values stripped), with the ``columns`` required; any defect is a one-line error."""
    if not path.is_file():
        raise DataError("file not found" if not path.exists() else
                        "is a folder, not a CSV file" if path.is_dir() else
                        "is not a regular file (a FIFO, socket or device): not a CSV file", path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, nrows=nrows, index_col=False)
    except PermissionError:
        raise DataError("cannot read the file (permission denied)", path) from None
    except pd.errors.ParserWarning:
        raise DataError("rows have more fields than the header", path) from None
    except pd.errors.EmptyDataError:
        raise DataError("empty file (no header)", path) from None
    except pd.errors.ParserError as err:
        raise DataError(f"not a readable CSV ({str(err).strip().splitlines()[-1]})", path) from None
    except UnicodeDecodeError:
        raise DataError("not a text CSV (not UTF-8)", path) from None
    except OSError as err:
        raise DataError(f"cannot read the file ({err.strerror or err})", path) from None
    header = _header(path)
    repeated = sorted({c for c in header if c and header.count(c) > 1})  # empty names: trailing commas
    if repeated:  # pandas would rename the second one (sirna.1) and use the first, without a word
        raise DataError(f"column {repeated[0]!r} appears {header.count(repeated[0])} times in the header", path)
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"missing column(s) {', '.join(missing)}; found {', '.join(frame.columns)}", path)
    for column in frame.columns:
        frame[column] = frame[column].str.strip()
    return frame


def _header(path: Path) -> list[str]:
    """The column names of a CSV as written (stripped), before pandas renames repeated ones."""
    import csv

    with open(path, newline="", encoding="utf-8-sig") as f:
        return [name.strip() for name in next(csv.reader(f), [])]


def _numbers(values: pd.Series) -> pd.Series:
    """``pd.to_numeric(errors="coerce")`` over the distinct values only (a few, in 125,510 rows)."""
    codes, distinct = pd.factorize(values)
    numbers = pd.to_numeric(pd.Series(distinct, dtype=object), errors="coerce").to_numpy(dtype=float)
    return pd.Series(np.where(codes >= 0, numbers[codes], np.nan), index=values.index)


def _row(frame: pd.DataFrame, mask: pd.Series) -> int:
    """The 1-based line number (header = line 1) of the first row where ``mask`` holds."""
    return int(np.flatnonzero(mask.to_numpy())[0]) + 2


def _check_wells(frame: pd.DataFrame, path: Path, unique_ids: bool = True) -> pd.DataFrame:
    """Validate plate, well, experiment and id_code columns; return the frame with an integer plate."""
    plate = _numbers(frame["plate"])
    bad = plate.isna() | ~plate.isin(range(1, N_PLATES + 1))
    if bad.any():
        raise DataError(f"plate {frame['plate'][bad].iloc[0]!r} outside 1-{N_PLATES} (row {_row(frame, bad)})", path)
    bad = ~frame["well"].str.fullmatch(_WELL_RE)
    if bad.any():
        raise DataError(f"unknown well name {frame['well'][bad].iloc[0]!r} (row {_row(frame, bad)})", path)
    bad = frame["experiment"] == ""
    if bad.any():
        raise DataError(f"empty experiment (row {_row(frame, bad)})", path)
    bad = ~frame["experiment"].str.fullmatch(NAME_RE)
    if bad.any():
        raise DataError(f"experiment {frame['experiment'][bad].iloc[0]!r} is not a plain name "
                        f"(letters, digits, - _ . only; row {_row(frame, bad)})", path)
    frame = frame.assign(plate=plate.astype(int))
    if "id_code" in frame.columns:
        expected = frame["experiment"] + "_" + frame["plate"].astype(str) + "_" + frame["well"]
        bad = frame["id_code"] != expected
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"id_code {frame['id_code'].iloc[i]!r} disagrees with its columns (expected "
                            f"{expected.iloc[i]!r}, row {i + 2})", path)
        dup = frame["id_code"].duplicated() if unique_ids else pd.Series(False, index=frame.index)
        if dup.any():
            raise DataError(f"duplicate id_code {frame['id_code'][dup].iloc[0]!r} (row {_row(frame, dup)})", path)
    return frame


def _expand_sites(wells: pd.DataFrame) -> pd.DataFrame:
    sites = wells.loc[wells.index.repeat(N_SITES)].reset_index(drop=True)
    sites["site"] = np.tile(np.arange(1, N_SITES + 1), len(wells))
    return sites


# ----------------------------------------------------------------------------------------------
# Label spelling: each layout has one, and a label outside it is refused with its row
# ----------------------------------------------------------------------------------------------


def _label_spelling(labels: pd.Series) -> str:
    """``kaggle-2019`` when the labels are integers, ``kaggle-2023`` when ``sirna_<k>``/``UNTREATED``."""
    labels = labels[labels != ""]
    integers = labels.str.fullmatch(_INTEGER_RE).mean() if len(labels) else 1.0
    return "kaggle-2019" if integers >= 0.5 else "kaggle-2023"


def _check_spelling(frame: pd.DataFrame, layout: str, path: Path, column: str = "label") -> None:
    labels = frame[column]
    given = labels != ""
    if layout in ("kaggle-2019", "wilds"):
        bad = given & ~labels.str.fullmatch(_INTEGER_RE)
        expected = "an integer label (0, 1, ...)"
    elif layout == "kaggle-2023":
        bad = given & ~(labels.str.fullmatch(_SIRNA_2023_RE) | (labels == NEGATIVE_2023))
        expected = f"a label spelt sirna_<k> or {NEGATIVE_2023}"
    else:
        return
    if bad.any():
        raise DataError(f"label {labels[bad].iloc[0]!r} (row {_row(frame, bad)}) is not {expected} as in the "
                        f"rest of this {layout} data (mixed label spellings?)", path)


def _check_label_roles(wells: pd.DataFrame, layout: str, root: Path, file: Path | str | None = None) -> None:
    """A label names one kind of well, and (integer spellings) treatments come before the controls.

    In the 2019 numbering treatments are 0..1107 and controls 1108..1138, so a treatment label at
    or above the first control label (``99999``) is a typing error, not a new class.
    """
    labelled = wells[wells["label"] != ""]
    kinds = labelled.groupby("label")["well_type"].nunique()
    if (kinds > 1).any():
        label = kinds[kinds > 1].index[0]
        where = labelled[labelled["label"] == label].drop_duplicates("well_type")
        places = ", ".join(f"{t} in {s}" for t, s in zip(where["well_type"], where["source"]))
        raise DataError(f"label {label!r} names different kinds of well ({places})", file or root)
    treat = labelled["well_type"] == "treatment"
    if layout == "kaggle-2023":
        bad = treat & (labelled["label"] == NEGATIVE_2023)
        if bad.any():
            row = labelled[bad].iloc[0]
            raise DataError(f"treatment well {row['id_code']} has the negative-control label {NEGATIVE_2023}",
                            file or root / row["source"])
    if layout in ("kaggle-2019", "wilds") and (~treat).any() and treat.any():
        values = labelled["label"].astype(np.int64)
        first_control = int(values[~treat].min())
        bad = treat & (values >= first_control)
        if bad.any():
            row = labelled[bad].iloc[0]
            raise DataError(f"treatment label {row['label']!r} of well {row['id_code']} is outside the treatment "
                            f"range of this data (controls start at {first_control})", file or root / row["source"])


# ----------------------------------------------------------------------------------------------
# The layouts
# ----------------------------------------------------------------------------------------------


def detect_layout(root: str | Path) -> str:
    """Name the layout of the folder ``root``: one of ``LAYOUTS``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError("data folder not found" if not root.exists() else "is not a folder", root)
    if (root / "metadata.csv").is_file():
        dataset = read_csv_strict(root / "metadata.csv", RELEASE_COLUMNS)["dataset"]
        return "wilds" if (dataset == "val").any() else "rxrx1"
    train = root / "train.csv"
    if not train.is_file():
        raise DataError("no train.csv (Kaggle layout) or metadata.csv (RxRx1 / WILDS release) in this folder", root)
    return _label_spelling(read_csv_strict(train, KAGGLE_FILES["train.csv"])["sirna"])


def _read_kaggle(root: Path) -> tuple[pd.DataFrame, str, list[str] | None]:
    frames = []
    layout = None
    for name, columns in KAGGLE_FILES.items():
        path = root / name
        frame = _check_wells(read_csv_strict(path, columns), path)
        split = "train" if name.startswith("train") else "test"
        if "well_type" not in frame.columns:
            frame["well_type"] = "treatment"
        bad = ~frame["well_type"].isin(WELL_TYPES)
        if bad.any():
            raise DataError(f"unknown well_type {frame['well_type'][bad].iloc[0]!r} (row {_row(frame, bad)})", path)
        label = frame["sirna"] if "sirna" in frame.columns else pd.Series("", index=frame.index)
        if name != "test.csv" and (label == "").any():
            raise DataError(f"empty sirna label (row {_row(frame, label == '')})", path)
        if name == "test.csv" and (label != "").any():
            label = pd.Series("", index=frame.index)  # a test.csv with labels: not a Kaggle file; ignore them
        if layout is None:
            layout = _label_spelling(label)
        frame = frame.assign(split=split, label=label, source=name)
        _check_spelling(frame, layout, path)
        frames.append(frame[["id_code", "experiment", "plate", "well", "split", "well_type", "label", "source"]])
    wells = pd.concat(frames, ignore_index=True)
    dup = wells["id_code"].duplicated(keep=False)
    if dup.any():
        first = wells[dup].iloc[0]["id_code"]
        files = ", ".join(sorted(wells[wells["id_code"] == first]["source"]))
        raise DataError(f"duplicate id_code {first!r} (in {files})", root)
    _check_label_roles(wells, layout, root)
    order = None
    sample = root / "sample_submission.csv"
    if sample.exists():  # a folder or FIFO of that name is refused by the reader, not silently skipped
        order = read_csv_strict(sample, ["id_code", "sirna"])["id_code"].tolist()
    return wells.drop(columns="source"), layout, order


def _read_release(root: Path, layout: str) -> pd.DataFrame:
    """The full RxRx1 release or the WILDS release: one ``metadata.csv`` row per site."""
    path = root / "metadata.csv"
    frame = read_csv_strict(path, RELEASE_COLUMNS)
    if layout == "wilds":
        label_column = "sirna_id"
    else:
        label_column = "sirna" if "sirna" in frame.columns else "sirna_id"
    if label_column not in frame.columns:
        raise DataError(f"missing column {label_column} (the labels of the {layout} layout)", path)
    frame = _check_wells(frame, path)
    sites = pd.DataFrame(
        {
            "id_code": frame["experiment"] + "_" + frame["plate"].astype(str) + "_" + frame["well"],
            "experiment": frame["experiment"],
            "plate": frame["plate"],
            "well": frame["well"],
            "site": frame["site"],
            "split": frame["dataset"],
            "well_type": frame["well_type"],
            "label": frame[label_column],
            "source": "metadata.csv",
        }
    )
    sites = _check_sites(sites, layout, path, f"{label_column} label", "dataset")
    return sites.drop(columns="source")


def _check_sites(sites: pd.DataFrame, layout: str, path: Path | str, label_name: str = "label",
                 split_name: str = "split") -> pd.DataFrame:
    """The checks a site table passes wherever it comes from (a release's metadata.csv, a store's sites.csv).

    Returns it with an integer ``site``. An experiment is in one split: a single row with another
    ``dataset`` value is a typing error, and must not turn a full release into the WILDS layout.
    """
    site = _numbers(sites["site"])
    bad = site.isna() | ~site.isin(range(1, N_SITES + 1))
    if bad.any():
        raise DataError(f"site {sites['site'][bad].iloc[0]!r} outside 1-{N_SITES} (row {_row(sites, bad)})", path)
    sites = sites.assign(site=site.astype(int))
    splits = WILDS_SPLITS if layout == "wilds" else ("train", "test")
    bad = ~sites["split"].isin(splits)
    if bad.any():
        raise DataError(f"unknown {split_name} {sites['split'][bad].iloc[0]!r} (row {_row(sites, bad)}; expected "
                        f"{' / '.join(splits)})", path)
    bad = ~sites["well_type"].isin(WELL_TYPES)
    if bad.any():
        raise DataError(f"unknown well_type {sites['well_type'][bad].iloc[0]!r} (row {_row(sites, bad)})", path)
    if layout in ("rxrx1", "wilds"):
        counts = sites.groupby(["experiment", "split"]).size()
        mixed = counts.groupby(level="experiment").size() > 1
        if mixed.any():
            experiment = mixed[mixed].index[0]
            mine = counts[experiment]
            odd = mine.idxmin()
            bad = (sites["experiment"] == experiment) & (sites["split"] == odd)
            raise DataError(f"experiment {experiment} has {split_name} {odd!r} on {int(mine.min())} row(s) (first: "
                            f"row {_row(sites, bad)}) and {mine.idxmax()!r} on {int(mine.max())}: an experiment is in "
                            "one split", path)
    if layout == "wilds":
        needs_label = pd.Series(True, index=sites.index)
    elif layout == "rxrx1":
        needs_label = sites["split"] != "test"
    else:  # Kaggle: only test treatment wells are unlabelled
        needs_label = ~((sites["split"] == "test") & (sites["well_type"] == "treatment"))
    missing = needs_label & (sites["label"] == "")
    if missing.any():
        raise DataError(f"empty {label_name} (row {_row(sites, missing)})", path)
    _check_spelling(sites, layout, path)
    dup = sites.duplicated(["id_code", "site"])
    if dup.any():
        row = sites[dup].iloc[0]
        raise DataError(f"duplicate site {row['id_code']}_s{row['site']} (row {_row(sites, dup)})", path)
    kinds = sites.groupby("id_code")[["split", "well_type", "label"]].nunique()
    if (kinds > 1).any(axis=None):
        raise DataError(f"the sites of well {kinds[(kinds > 1).any(axis=1)].index[0]!r} disagree on its split, "
                        "well type or label", path)
    _check_label_roles(sites.drop_duplicates("id_code"), layout, Path(), file=path)
    return sites


def check_site_table(frame: pd.DataFrame, layout: str, path: Path | str) -> pd.DataFrame:
    """A stored site table (``SITE_COLUMNS`` as strings, e.g. a packed store's ``sites.csv``), checked as the
    CSVs it was made from; returned with integer ``plate`` and ``site``."""
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r} (expected one of {', '.join(LAYOUTS)})", path)
    if list(frame.columns) != SITE_COLUMNS:
        raise DataError(f"columns {', '.join(map(str, frame.columns))} are not the site table's "
                        f"({', '.join(SITE_COLUMNS)})", path)
    frame = _check_wells(frame, path, unique_ids=False)
    pairs = frame[["experiment", "cell_type"]].drop_duplicates()  # per experiment: a string split per row is slow
    wrong = pairs[pairs["cell_type"] != pairs["experiment"].str.split("-").str[0]]
    if len(wrong):
        bad = (frame["experiment"] == wrong["experiment"].iloc[0]) & (frame["cell_type"] == wrong["cell_type"].iloc[0])
        raise DataError(f"cell_type {wrong['cell_type'].iloc[0]!r} disagrees with its experiment "
                        f"(row {_row(frame, bad)})", path)
    sites = _check_sites(frame.assign(source=str(path).rsplit("/", 1)[-1]), layout, path)
    return sites.drop(columns="source")


# ----------------------------------------------------------------------------------------------
# Class vocabulary and plate groups
# ----------------------------------------------------------------------------------------------


def _natural_key(label: str) -> tuple:
    match = re.fullmatch(r"(.*?)(\d+)", label)
    return (match.group(1), int(match.group(2)), "") if match else (label, -1, label)


@dataclass(frozen=True)
class ClassVocab:
    """Class labels in column order: treatments, positive controls, negative control(s)."""

    labels: tuple[str, ...]
    n_treatments: int
    n_positive: int

    @classmethod
    def from_wells(cls, wells: pd.DataFrame) -> ClassVocab:
        labelled = wells[wells["label"] != ""]
        by_type = {t: set(labelled.loc[labelled["well_type"] == t, "label"]) for t in WELL_TYPES}
        treatments = sorted(by_type["treatment"], key=_natural_key)
        positive = sorted(by_type["positive_control"] - by_type["treatment"], key=_natural_key)
        negative = sorted(
            by_type["negative_control"] - by_type["treatment"] - by_type["positive_control"], key=_natural_key
        )
        return cls(tuple(treatments + positive + negative), len(treatments), len(positive))

    def __len__(self) -> int:
        return len(self.labels)

    def __contains__(self, label: object) -> bool:
        return label in self._index

    @property
    def treatment_labels(self) -> tuple[str, ...]:
        return self.labels[: self.n_treatments]

    @cached_property
    def _index(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    def encode(self, labels) -> np.ndarray:
        """Column index of each label; -1 for an empty or unknown label."""
        return np.array([self._index.get(str(label), -1) for label in labels], dtype=np.int64)

    def to_dict(self) -> dict:
        return {"labels": list(self.labels), "n_treatments": self.n_treatments, "n_positive": self.n_positive}


@dataclass(frozen=True)
class PlateGroups:
    """The treatment groups of the plate leak and each labelled experiment's group order.

    ``groups[g]`` is the set of treatment labels of group g. Group indices are chosen so that
    the first fully labelled experiment carries groups (0, 1, 2, 3) on plates 1-4; an order is
    the tuple of group indices on plates 1..4. ``candidate_orders`` are the cyclic rotations of
    the base order plus any other order seen in the labels.
    """

    groups: tuple[frozenset[str], ...]
    orders: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        """Whether the leak applies: one group per plate, disjoint, every plate one group."""
        return len(self.groups) == N_PLATES

    @property
    def candidate_orders(self) -> list[tuple[int, ...]]:
        n = len(self.groups)
        cyclic = [tuple((p + r) % n for p in range(n)) for r in range(n)]
        seen = [o for o in dict.fromkeys(self.orders.values()) if o not in cyclic and len(o) == n]
        return cyclic + seen

    def rotation(self, order: tuple[int, ...]) -> int | None:
        """The cyclic shift r for which plate p carries group (p - 1 + r) % n, or None."""
        orders = self.candidate_orders[: len(self.groups)]
        return orders.index(order) if order in orders else None


def derive_plate_groups(wells: pd.DataFrame) -> PlateGroups:
    """Derive the treatment groups from the labelled treatment wells.

    Two treatments are in one group when they share most of the plates they appear on (a
    treatments x treatments co-occurrence count, connected components over the strong links),
    so a stray well with a label from another group does not merge two groups. The groups come
    from the labels and are never pasted in as literals.
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    treated = wells[(wells["well_type"] == "treatment") & (wells["label"] != "")]
    if treated.empty:
        return PlateGroups(groups=())
    labels = sorted(treated["label"].unique(), key=_natural_key)
    label_index = {label: i for i, label in enumerate(labels)}
    plate_keys = treated["experiment"] + "|" + treated["plate"].astype(str)
    plate_codes, plate_names = pd.factorize(plate_keys, sort=True)
    incidence = csr_matrix((np.ones(len(treated)), (plate_codes, treated["label"].map(label_index).to_numpy())),
                           shape=(len(plate_names), len(labels)))
    incidence.data[:] = 1.0
    shared = (incidence.T @ incidence).toarray()  # plates shared by each pair of treatments
    seen = np.diag(shared)
    strong = shared * 2 > np.minimum.outer(seen, seen)  # together on most of their plates
    n_groups, component = connected_components(csr_matrix(strong), directed=False)

    # order the groups so that the first fully labelled experiment reads (0, 1, 2, 3)
    by_plate = pd.DataFrame({"plate": plate_keys.to_numpy(), "group": component[treated["label"].map(label_index)]})
    plate_group = by_plate.groupby("plate")["group"].agg(lambda g: g.value_counts().index[0])
    experiments = sorted(treated["experiment"].unique())
    full = [e for e in experiments if all(f"{e}|{p}" in plate_group.index for p in range(1, N_PLATES + 1))]
    ordered: list[int] = []
    if full:
        for p in range(1, N_PLATES + 1):
            g = int(plate_group[f"{full[0]}|{p}"])
            if g not in ordered:
                ordered.append(g)
    members = [[labels[i] for i in np.flatnonzero(component == g)] for g in range(n_groups)]
    rest = sorted((g for g in range(n_groups) if g not in ordered), key=lambda g: _natural_key(members[g][0]))
    ordered.extend(rest)
    rank = {g: k for k, g in enumerate(ordered)}
    orders = {e: tuple(rank[int(plate_group[f"{e}|{p}"])] for p in range(1, N_PLATES + 1)) for e in full}
    return PlateGroups(groups=tuple(frozenset(members[g]) for g in ordered), orders=orders)


# ----------------------------------------------------------------------------------------------
# The dataset: site table + vocabulary + plate groups
# ----------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    """An RxRx1 download read into one site table (one row per site, ``SITE_COLUMNS``)."""

    root: Path
    layout: str
    sites: pd.DataFrame
    submission_order: list[str] | None = None

    @cached_property
    def wells(self) -> pd.DataFrame:
        """One row per well (the site table without the site column)."""
        cols = [c for c in SITE_COLUMNS if c != "site"]
        return self.sites.drop_duplicates("id_code")[cols].reset_index(drop=True)

    @cached_property
    def vocab(self) -> ClassVocab:
        return ClassVocab.from_wells(self.wells)

    @cached_property
    def plate_groups(self) -> PlateGroups:
        return derive_plate_groups(self.wells[self.wells["split"] == "train"])

    @property
    def channels(self) -> int:
        """Image channels: 6 fluorescence channels, or 3 for the WILDS release's composites."""
        return 3 if self.layout == "wilds" else N_CHANNELS

    @property
    def test_ids(self) -> list[str]:
        """Test treatment wells in submission order (sample_submission where the data has it)."""
        if self.submission_order is not None:
            return self.submission_order
        wells = self.wells
        return wells.loc[(wells["split"] == "test") & (wells["well_type"] == "treatment"), "id_code"].tolist()

    def check_trainable(self) -> None:
        """Training needs labelled treatment wells; controls alone would make a model of 1 + 30 classes."""
        wells = self.wells
        if not ((wells["split"] == "train") & (wells["well_type"] == "treatment") & (wells["label"] != "")).any():
            csv = Path(self.root) / "train.csv"
            where = csv if "://" not in str(self.root) and csv.is_file() else self.root
            raise DataError("no labelled treatment wells to train on (a train.csv with a header but no rows?)", where)

    def summary(self) -> dict:
        """Counts a user checks first (the keys of ``rcic info --json``)."""
        w = self.wells
        is_treat = w["well_type"] == "treatment"
        train, test = w["split"] == "train", w["split"] == "test"
        summary = {
            "layout": self.layout,
            "root": str(self.root),
            "train_wells": int((train & is_treat).sum()),
            "test_wells": int((test & is_treat).sum()),
            "train_control_wells": int((train & ~is_treat).sum()),
            "test_control_wells": int((test & ~is_treat).sum()),
            "train_experiments": int(w.loc[train, "experiment"].nunique()),
            "test_experiments": int(w.loc[test, "experiment"].nunique()),
            "cell_types": sorted(w["cell_type"].unique().tolist()),
            "treatment_classes": self.vocab.n_treatments,
            "positive_control_classes": self.vocab.n_positive,
            "negative_control_classes": len(self.vocab) - self.vocab.n_treatments - self.vocab.n_positive,
            "plate_groups": len(self.plate_groups.groups),
            "sites": len(self.sites),
        }
        if self.layout == "wilds":
            val = w["split"] == "val"
            summary.update(val_wells=int((val & is_treat).sum()), val_control_wells=int((val & ~is_treat).sum()),
                           val_experiments=int(w.loc[val, "experiment"].nunique()))
        return summary


def read_dataset(root: str | Path) -> Dataset:
    """Read the metadata of an RxRx1 download (images need not be present)."""
    root = Path(root)
    layout = detect_layout(root)
    order = None
    if layout in ("rxrx1", "wilds"):
        sites = _read_release(root, layout)
    else:
        wells, layout, order = _read_kaggle(root)
        sites = _expand_sites(wells)
    sites["cell_type"] = sites["experiment"].str.split("-").str[0]
    sites = sites[SITE_COLUMNS].sort_values(["split", "experiment", "plate", "well", "site"], kind="stable")
    sites = sites.reset_index(drop=True)
    if order is not None:
        test_treat = set(sites.loc[(sites["split"] == "test") & (sites["well_type"] == "treatment"), "id_code"])
        if set(order) != test_treat or len(order) != len(test_treat):
            raise DataError("id_code values do not match test.csv", root / "sample_submission.csv")
    return Dataset(root=root, layout=layout, sites=sites, submission_order=order)
