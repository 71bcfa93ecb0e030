"""Site and well datasets (dict samples), experiment folds, and the Lightning DataModule.

Samples carry uint8 sites plus their normalisation statistics; normalisation and augmentation run
either in the DataLoader workers (``augment.on: workers``) or batched on the accelerator
(``device``), through the same kernels (``rcic.data.augment``).
"""

from __future__ import annotations

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from rcic.config import AugmentConfig, DataConfig
from rcic.data.augment import generator, prepare
from rcic.errors import DataError, RecipeError
from rcic.io.metadata import ClassVocab
from rcic.store.source import ImageSource

PREDICT_SPLITS = ("val", "test", "train", "all")
DOMAINS = ("plate", "experiment")
# the phases of a domain-wise evaluation (keys phase * n + index): BatchNorm statistics of the
# domain (AdaBN), its mean embedding (centring), then the prediction itself
PHASE_ADAPT, PHASE_MEAN, PHASE_PREDICT = 0, 1, 2
# AdaBN's batches: the sites of this many wells of one domain (both sites of each: 32 sites)
ADAPT_WELLS = 16


def experiment_folds(wells: pd.DataFrame, folds: int, split_seed: int = 0) -> dict[str, int]:
    """Assign each labelled training experiment to one of ``folds`` folds, stratified by cell type.

    Within each cell type the experiments are shuffled (by ``split_seed``, never the training
    seed) and dealt round-robin, so every fold holds out whole experiments of each cell type.
    """
    experiments = wells.loc[wells["split"] == "train", ["experiment", "cell_type"]].drop_duplicates()
    rng = np.random.default_rng(split_seed)
    fold_of: dict[str, int] = {}
    start = 0
    for _, group in experiments.sort_values("experiment").groupby("cell_type", sort=True):
        names = group["experiment"].to_numpy()[rng.permutation(len(group))]
        for i, name in enumerate(names):
            fold_of[name] = (start + i) % folds
        start += len(names)  # continue dealing where the last cell type stopped: balanced folds
    return fold_of


def class_columns(vocab: ClassVocab, classes: str) -> tuple[str, ...]:
    """The model's output labels: treatments only, or treatments plus control classes."""
    return vocab.treatment_labels if classes == "treatments" else vocab.labels


def group_channel_stats(sites: pd.DataFrame, stats: np.ndarray, by: list[str], mask: np.ndarray | None = None
                        ) -> np.ndarray:
    """Per-site (mean, std) of its group (experiment or plate), pooled from per-site statistics.

    ``stats`` is (n_sites, C, 2) per-site channel mean/std; ``mask`` picks the sites that define
    a group's statistics (e.g. control wells only); groups with none fall back to all their sites.
    Returns (n_sites, C, 2).
    """
    mean, var = stats[..., 0].astype(np.float64), stats[..., 1].astype(np.float64) ** 2
    codes, _ = pd.factorize(sites[by].astype(str).agg("|".join, axis=1))
    use = np.ones(len(sites), bool) if mask is None else np.asarray(mask, bool)
    out = np.zeros_like(stats, dtype=np.float32)
    for code in range(codes.max() + 1 if len(codes) else 0):
        members = codes == code
        pick = members & use
        if not pick.any():
            pick = members
        m = mean[pick].mean(0)
        second = (var[pick] + mean[pick] ** 2).mean(0)
        out[members, :, 0] = m
        out[members, :, 1] = np.sqrt(np.maximum(second - m**2, 1e-6))
    return out


def norm_stats(source: ImageSource, sites: pd.DataFrame, mode: str) -> np.ndarray | None:
    """Each site's normalisation statistics (n_sites, C, 2) for the group modes; None for none/image.

    ``plate_controls``: each plate's own control wells (negative and positive controls: the same
    treatments on every plate, so their statistics move only with the plate's batch effect). A
    plate without control sites is an error, not a silent fall-back to its treatment wells.
    """
    if mode in ("none", "image"):
        return None
    by = ["plate", "experiment"] if mode in ("plate", "plate_controls") else ["experiment"]
    controls = sites["well_type"].ne("treatment").to_numpy()
    mask = controls if mode in ("experiment_controls", "plate_controls") else None
    if mode == "plate_controls":
        counts = pd.Series(controls).groupby([sites["experiment"].to_numpy(), sites["plate"].to_numpy()]).agg(
            ["sum", "size"])
        empty = counts[counts["sum"] == 0]
        if len(empty):
            (experiment, plate), row = empty.index[0], empty.iloc[0]
            raise DataError(f"recipe key data.normalization: plate_controls needs control wells on every plate; "
                            f"{len(empty)} of {len(counts)} plates have none (first: {experiment} plate {plate}, "
                            f"0 control sites of {int(row['size'])})", source.dataset.root)
    per_site = source.channel_stats()[sites["site_index"].to_numpy()]
    return group_channel_stats(sites, per_site, by, mask)


def domain_codes(rows: pd.DataFrame, domain: str) -> np.ndarray:
    """Integer code of each row's domain (``plate``: its experiment and plate; ``experiment``), sorted by name."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    keys = rows["experiment"].astype(str)
    if domain == "plate":
        keys = keys + "|" + rows["plate"].astype(str)
    codes, _ = pd.factorize(keys.to_numpy(), sort=True)
    return codes


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


class RowColumns:
    """A table's rows kept as one numpy array per column (text as fixed-width strings), read as a dict
    per row on demand. A list of one dict per row would be copied page by page into every forked
    DataLoader worker (reference counts and the garbage collector write to each object), so each
    worker would grow by the whole table; arrays of plain values are shared pages that stay shared."""

    def __init__(self, frame: pd.DataFrame):
        self.columns = {str(c): (frame[c].to_numpy() if frame[c].dtype.kind in "biuf"
                                 else frame[c].astype(str).to_numpy().astype(str)) for c in frame.columns}
        self.length = len(frame)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        return {name: values[i] for name, values in self.columns.items()}


class SiteDataset(Dataset):
    """One sample per site: ``{"image", "stats", "label", "cell_type", "experiment", "plate", "index", "phase"}``.

    ``rows`` is a slice of the annotated site table (``target``, ``cell_type_index``,
    ``experiment_index``). ``image`` is the uint8 site, or, when ``augment`` is given (augmentation
    in the workers), the normalised and augmented float32 site, its randomness drawn from a
    generator seeded by (seed, epoch, index): the same with any number of workers, on any rank,
    and after a resume. ``phase`` is the key's quotient: the epoch in training, the phase of a
    domain-wise evaluation (``DomainEvalSampler``) in validation.
    """

    def __init__(self, source: ImageSource, rows: pd.DataFrame, normalization: str, stats: np.ndarray | None,
                 size: int, augment: AugmentConfig | None = None, seed: int = 0):
        self.source = source
        self.rows = rows.reset_index(drop=True)
        self.records = RowColumns(self.rows)
        self.normalization, self.size, self.augment, self.seed = normalization, size, augment, seed
        channels = source.dataset.channels
        self.stats = torch.zeros((len(self.rows), channels, 2)) if stats is None else torch.from_numpy(stats)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int) -> dict:
        # EpochSampler hands out epoch * len + index, so augmentation can be seeded per (epoch, sample)
        epoch, i = divmod(int(key), len(self.records))
        row = self.records[i]
        image = torch.from_numpy(np.ascontiguousarray(self.source.read_site(row)))
        stats = self.stats[i]
        if self.augment is not None:
            gen = generator(self.seed, epoch, i)
            image = prepare(image[None], self.normalization, stats[None], self.size, self.augment, gen)[0]
        return {
            "image": image,
            "stats": stats,
            "label": torch.tensor(row["target"], dtype=torch.long),
            "cell_type": torch.tensor(row["cell_type_index"], dtype=torch.long),
            "experiment": torch.tensor(row["experiment_index"], dtype=torch.long),
            "plate": torch.tensor(row["plate"], dtype=torch.long),
            "index": torch.tensor(i, dtype=torch.long),
            "phase": torch.tensor(epoch, dtype=torch.long),
        }


class WellDataset(Dataset):
    """One sample per well for prediction: ``{"image": (2, C, H, W) uint8, "stats", "cell_type", "real", "index",
    "phase"}``.

    A well with one readable site (the other left out by ``pack --skip-missing``) repeats it, so
    the mean over the two equals that site; ``real`` marks the sites that are not repeats. Keys may be
    ``phase * len + index`` (``DomainEvalSampler``).
    """

    def __init__(self, source: ImageSource, rows: pd.DataFrame, stats: np.ndarray | None,
                 cell_type_index: dict[str, int]):
        self.source = source
        rows = rows.reset_index(drop=True)
        self.records = RowColumns(rows)
        codes, first = np.unique(rows["id_code"].to_numpy(), return_index=True)
        order = np.argsort(first)  # wells in the order they appear
        self.wells = rows.iloc[first[order]][["id_code", "experiment", "plate", "well", "cell_type", "split",
                                              "well_type", "label"]].reset_index(drop=True)
        by_well = rows.groupby("id_code", sort=False).indices
        self.sites = [np.resize(by_well[c], 2) for c in self.wells["id_code"]]
        self.real_sites = np.array([min(len(by_well[c]), 2) for c in self.wells["id_code"]])
        channels = source.dataset.channels
        self.stats = torch.zeros((len(rows), channels, 2)) if stats is None else torch.from_numpy(stats)
        self.cell_type = torch.tensor([cell_type_index[c] for c in self.wells["cell_type"]], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.wells)

    def __getitem__(self, key: int) -> dict:
        phase, i = divmod(int(key), len(self.wells))
        picks = self.sites[i]
        images = [torch.from_numpy(np.ascontiguousarray(self.source.read_site(self.records[j]))) for j in picks]
        return {"image": torch.stack(images), "stats": self.stats[picks], "cell_type": self.cell_type[i],
                "real": torch.arange(2) < self.real_sites[i],  # a repeated site counts once in domain statistics
                "index": torch.tensor(i, dtype=torch.long), "phase": torch.tensor(phase, dtype=torch.long)}


class EpochSampler(Sampler[int]):
    """A shuffle that depends only on (seed, epoch), split across DDP ranks; resumable mid-epoch.

    Keys are ``epoch * n + index`` so that the dataset can seed each sample's augmentation by
    epoch. ``skip_batches`` drops the batches a mid-epoch checkpoint already trained on, once
    (the length stays the full epoch's, as Lightning's loop counts it).
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.epoch = n, seed, 0
        self.rank, self.world_size = rank, world_size
        self.per_rank = -(-n // world_size)
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, samples: int) -> None:
        self._skip = samples

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        order = np.resize(order, self.per_rank * self.world_size)  # pad by wrapping: equal work per rank
        mine = self.epoch * self.n + order[self.rank::self.world_size]
        skip, self._skip = self._skip, 0
        return iter(mine[skip:].tolist())

    def __len__(self) -> int:
        return self.per_rank


class DomainBatchSampler(Sampler[list[int]]):
    """Training batches that each hold one domain (a plate or an experiment); resumable mid-epoch, split by rank.

    Everything depends only on (seed, epoch), so any rank and a resumed run rebuild the same epoch:
    each domain's items are shuffled and cut into batches of ``batch_size``, the last one topped up
    from the start of the same shuffle (every batch full and pure, every item seen at least once per
    epoch); all domains' batches are then shuffled together and dealt to the ranks, wrapped so that
    every rank takes the same number of steps. Keys are ``epoch * n + index`` as in ``EpochSampler``;
    ``skip_batches`` drops the batches a mid-epoch checkpoint already trained on, once.
    """

    def __init__(self, codes: np.ndarray, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        codes = np.asarray(codes)
        self.n, self.batch_size, self.seed, self.epoch = len(codes), batch_size, seed, 0
        self.rank, self.world_size = rank, world_size
        self.members = [np.flatnonzero(codes == c) for c in np.unique(codes)]
        self.total = sum(-(-len(m) // batch_size) for m in self.members)
        self.per_rank = -(-self.total // world_size)
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_batches(self, batches: int) -> None:
        self._skip = batches

    def epoch_batches(self) -> list[np.ndarray]:
        """Every rank's batches of the current epoch, in order (item indices, not keys)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        batches: list[np.ndarray] = []
        for members in self.members:
            order = members[rng.permutation(len(members))]
            count = -(-len(order) // self.batch_size)
            batches.extend(np.resize(order, count * self.batch_size).reshape(count, self.batch_size))
        shuffled = [batches[i] for i in rng.permutation(len(batches))]
        return [shuffled[i % len(shuffled)] for i in range(self.per_rank * self.world_size)]

    def __iter__(self):
        mine = self.epoch_batches()[self.rank::self.world_size]
        skip, self._skip = self._skip, 0
        return iter([(self.epoch * self.n + batch).tolist() for batch in mine[skip:]])

    def __len__(self) -> int:
        return self.per_rank


class DomainEvalSampler(Sampler[list[int]]):
    """Evaluation batches domain by domain, each domain's ``phases`` in turn (keys ``phase * n + index``).

    For AdaBN and embedding centring a domain's statistics must be known before any of its items is
    predicted, so each domain is read once per phase (``PHASE_ADAPT``, ``PHASE_MEAN``, ``PHASE_PREDICT``),
    in batches of one domain only. Under DDP every rank takes whole domains (round-robin; rank and
    world size read from ``torch.distributed`` when iterated), so no statistic needs a cross-rank
    reduction; ranks are padded to the same number of batches with repeats of their last
    prediction batch (results are gathered by index, so a repeat counts once).

    Adaptation batches are cut by wells, not by ``batch_size``: the sites of ``ADAPT_WELLS``
    consecutive wells of the domain (``wells``: each item's well; None: every item its own well).
    BatchNorm in training mode normalises each batch by its own statistics, so AdaBN's result
    depends on how a domain is cut. Cutting by wells gives the same batches to validation (one item
    per site), to prediction (one item per well) and to any ``batch_size`` or number of ranks.
    """

    def __init__(self, codes: np.ndarray, batch_size: int, phases: tuple[int, ...],
                 rank: int | None = None, world_size: int | None = None, wells: np.ndarray | None = None):
        codes = np.asarray(codes)
        self.n, self.batch_size, self.phases = len(codes), batch_size, tuple(phases)
        self.rank, self.world_size = rank, world_size
        self.members = [np.flatnonzero(codes == c) for c in np.unique(codes)]
        self.wells = np.arange(self.n) if wells is None else np.asarray(wells)

    def _rank_world(self) -> tuple[int, int]:
        if self.rank is not None:
            return self.rank, self.world_size or 1
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _domain_batches(self, members: np.ndarray) -> list[list[int]]:
        chunks = [members[i:i + self.batch_size] for i in range(0, len(members), self.batch_size)]
        ordinal, _ = pd.factorize(self.wells[members])  # each item's well, numbered in order within the domain
        by_wells = [members[ordinal // ADAPT_WELLS == c] for c in range(-(-(ordinal.max() + 1) // ADAPT_WELLS))]
        return [(phase * self.n + chunk).tolist() for phase in self.phases
                for chunk in (by_wells if phase == PHASE_ADAPT else chunks)]

    def _plan(self) -> list[list[list[int]]]:
        rank_world = self._rank_world()
        world = rank_world[1]
        domains = [self.members[i % len(self.members)] for i in range(max(len(self.members), world))]
        return [[b for members in domains[r::world] for b in self._domain_batches(members)] for r in range(world)]

    def __iter__(self):
        plan = self._plan()
        mine = plan[self._rank_world()[0]]
        longest = max(len(p) for p in plan)
        return iter(mine + [mine[-1]] * (longest - len(mine)))

    def __len__(self) -> int:
        return max(len(p) for p in self._plan())


# ----------------------------------------------------------------------------------------------
# The DataModule
# ----------------------------------------------------------------------------------------------


class RxRxDataModule(L.LightningDataModule):
    """Train/val datasets of one fold (held-out experiments) or of the WILDS split.

    ``augment_on`` is ``workers`` or ``device`` (resolved by the caller); with ``device`` the
    training samples stay uint8 and ``RcicTask`` normalises and augments them on the accelerator.
    ``data.sampler`` picks random or domain-pure training batches. Validation goes domain by domain
    when the model asks for it (``set_domain_evaluation``: AdaBN, embedding centring).
    """

    def __init__(self, source: ImageSource, data: DataConfig, augment: AugmentConfig, seed: int = 0,
                 augment_on: str = "workers", max_size: int | None = None, extra_train: pd.DataFrame | None = None):
        super().__init__()
        self.source, self.config, self.augment_config, self.seed = source, data, augment, seed
        self.augment_on = augment_on
        dataset = source.dataset
        if data.split == "wilds" and dataset.layout != "wilds":
            raise RecipeError(f"recipe key data.split: wilds needs the WILDS release (metadata.csv with a val "
                              f"split); {dataset.root} is {dataset.layout}")
        self.vocab = dataset.vocab
        self.plate_groups = dataset.plate_groups
        self.classes = class_columns(self.vocab, data.classes)
        self.cell_types = sorted(dataset.sites["cell_type"].unique())
        self.experiments = sorted(dataset.sites["experiment"].unique())
        self.folds = experiment_folds(dataset.wells, data.folds, data.split_seed)
        self.input_size = self._input_size(max_size)
        self.extra_train = extra_train
        self.eval_domain: str | None = None
        self.eval_phases: tuple[int, ...] = (PHASE_PREDICT,)

    def set_domain_evaluation(self, domain: str | None, phases: tuple[int, ...]) -> None:
        """Validate domain by domain (``plate`` / ``experiment``) in these phases; None: plain batches.

        The model decides this (its AdaBN and centring keys), the DataModule only serves the batches.
        """
        self.eval_domain, self.eval_phases = domain, tuple(phases)

    def _input_size(self, max_size: int | None) -> int:
        stored = getattr(self.source, "image_size", None)
        if stored is None:
            first = self.source.dataset.sites.iloc[0]
            stored = self.source.read_site(first).shape[-1]
        size = self.config.image_size or stored
        if max(size, max_size or 0) > stored:
            raise RecipeError(f"recipe key data.image_size: {max(size, max_size or 0)} px asked, but the data's "
                              f"sites are {stored} px")
        return size

    def setup(self, stage: str | None = None) -> None:
        if getattr(self, "sites", None) is None:
            self.sites = self._annotate(self.source.dataset.sites, self.extra_train)
            self._stats = norm_stats(self.source, self.sites, self.config.normalization)
        if stage in (None, "fit") and getattr(self, "train_set", None) is None:
            self.train_set = self.make_dataset(self.train_rows(), train=True)
            self._check_sampler(self.train_set.rows)
            val = self.val_rows()
            self.val_set = self.make_dataset(val, train=False) if len(val) else None

    def _check_sampler(self, rows: pd.DataFrame) -> None:
        """A domain-pure batch must fit in the smallest domain: refused before anything is written."""
        domain, bs = self.config.sampler, self.config.batch_size
        if domain == "random":
            return
        sizes = rows.groupby(["experiment", "plate"] if domain == "plate" else ["experiment"]).size()
        if sizes.min() < bs:
            small = sizes.idxmin()
            name = f"{small[0]} plate {small[1]}" if domain == "plate" else str(small)
            raise RecipeError(f"recipe key data.sampler: {domain} draws every batch from one {domain}, but "
                              f"data.batch_size {bs} is larger than the training sites of the smallest {domain} "
                              f"({name}: {sizes.min()} sites; {len(sizes)} {domain}s of {sizes.min()}-{sizes.max()} "
                              f"sites): lower data.batch_size")

    def _annotate(self, sites: pd.DataFrame, extra: pd.DataFrame | None) -> pd.DataFrame:
        column = {label: i for i, label in enumerate(self.classes)}
        sites = sites.copy()
        sites["site_index"] = np.arange(len(sites))
        sites["target"] = sites["label"].map(column).fillna(-1).astype(np.int64)
        sites["cell_type_index"] = sites["cell_type"].map({c: i for i, c in enumerate(self.cell_types)})
        sites["experiment_index"] = sites["experiment"].map({e: i for i, e in enumerate(self.experiments)})
        sites["fold"] = sites["experiment"].map(self.folds).fillna(-1).astype(int)
        sites["pseudo"] = False
        if extra is not None and len(extra):
            # pseudo-labelled test wells: (id_code, label) -> their sites become training rows
            labels = dict(zip(extra["id_code"], extra["label"]))
            chosen = sites["id_code"].isin(labels) & (sites["split"] == "test")
            sites.loc[chosen, "target"] = [column[labels[i]] for i in sites.loc[chosen, "id_code"]]
            sites.loc[chosen, "pseudo"] = True
        return sites

    # -- splits ------------------------------------------------------------------------------

    def train_rows(self) -> pd.DataFrame:
        s, fold = self.sites, self.config.fold
        labelled = (s["split"] == "train") & (s["target"] >= 0)
        if self.config.split == "wilds":
            labelled &= s["site"] == 1  # the WILDS training set: site 1 of the train experiments
        elif fold != "all":
            labelled &= s["fold"] != fold
        return s[labelled | s["pseudo"]]

    def val_rows(self) -> pd.DataFrame:
        """Treatment sites of the held-out experiments (none for ``data.fold: all``)."""
        s, fold = self.sites, self.config.fold
        treat = s["well_type"] == "treatment"
        if self.config.split == "wilds":
            return s[(s["split"] == "val") & treat]
        if fold == "all":
            return s.iloc[:0]
        return s[(s["split"] == "train") & (s["fold"] == fold) & treat]

    @property
    def val_experiments(self) -> list[str]:
        return sorted(self.val_rows()["experiment"].unique())

    def make_dataset(self, rows: pd.DataFrame, train: bool) -> SiteDataset:
        if rows.empty:
            raise DataError("no sites for this split (check data.folds / data.fold and the data)",
                            self.source.dataset.root)
        stats = None if self._stats is None else self._stats[rows.index.to_numpy()]
        augment = self.augment_config if (train and self.augment_on == "workers") else None
        return SiteDataset(self.source, rows, self.config.normalization, stats, self.input_size, augment, self.seed)

    def well_dataset(self, rows: pd.DataFrame, cell_type_index: dict[str, int]) -> WellDataset:
        stats = None if self._stats is None else self._stats[rows.index.to_numpy()]
        return WellDataset(self.source, rows, stats, cell_type_index)

    def predict_dataloader_for(self, dataset: WellDataset, batch_size: int, workers: int, domain: str | None = None,
                               phases: tuple[int, ...] = (PHASE_PREDICT,)) -> DataLoader:
        """Wells in order; with ``domain``, domain by domain in ``phases`` (``DomainEvalSampler``)."""
        if domain is None:
            return self._loader(dataset, batch_size, workers=workers)
        sampler = DomainEvalSampler(domain_codes(dataset.wells, domain), batch_size, phases,
                                    wells=dataset.wells["id_code"].to_numpy())
        return self._loader(dataset, batch_size, workers=workers, batch_sampler=sampler)

    # -- Lightning hooks ---------------------------------------------------------------------

    def _loader(self, dataset, batch_size, sampler=None, drop_last=False, workers: int | None = None,
                batch_sampler: Sampler | None = None) -> DataLoader:
        workers = self.config.num_workers if workers is None else workers
        # a private generator: creating a loader's iterator never moves the global RNG
        gen = torch.Generator().manual_seed(self.seed)
        common = dict(num_workers=workers, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
                      generator=gen)
        if batch_sampler is not None:
            return DataLoader(dataset, batch_sampler=batch_sampler, **common)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **common)

    def train_dataloader(self) -> DataLoader:
        bs = self.config.batch_size
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        resume, self._resume = getattr(self, "_resume", None), None
        if self.config.sampler != "random":
            batches = DomainBatchSampler(domain_codes(self.train_set.rows, self.config.sampler), bs, self.seed,
                                         rank, world)
            if resume:  # a resumed run: start where the checkpoint stopped, mid-epoch too
                done = resume["batches"] >= resume["epoch_batches"]
                batches.set_epoch(resume["epoch"] + 1 if done else resume["epoch"])
                batches.skip_batches(0 if done else resume["batches"])
            return self._loader(self.train_set, bs, batch_sampler=batches)
        sampler = EpochSampler(len(self.train_set), self.seed, rank, world)
        drop = len(sampler) > bs  # BatchNorm needs more than one sample
        if resume:  # a resumed run: start where the checkpoint stopped, mid-epoch too
            if resume["batches"] >= resume["epoch_batches"]:
                sampler.set_epoch(resume["epoch"] + 1)
            else:
                sampler.set_epoch(resume["epoch"])
                sampler.skip(resume["batches"] * bs)
        return self._loader(self.train_set, bs, sampler, drop)

    # The position in the epoch travels in every checkpoint. Lightning restores a DataModule's state
    # before it first asks for the training loader, so the sampler starts at the right epoch and
    # batch (its loop counters are restored later, after the loader has been built).
    def state_dict(self) -> dict:
        trainer = self.trainer
        if trainer is None or getattr(trainer, "fit_loop", None) is None:
            return {}
        return {"epoch": int(trainer.current_epoch),
                "batches": int(trainer.fit_loop.epoch_loop.batch_progress.current.processed),
                "epoch_batches": int(trainer.num_training_batches)}

    def load_state_dict(self, state: dict) -> None:
        self._resume = state or None

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        bs = self.config.eval_batch_size or self.config.batch_size * 2
        if self.eval_domain is not None:
            sampler = DomainEvalSampler(domain_codes(self.val_set.rows, self.eval_domain), bs, self.eval_phases,
                                        wells=self.val_set.rows["id_code"].to_numpy())
            return self._loader(self.val_set, bs, batch_sampler=sampler)
        sampler = None
        if self.trainer is not None and self.trainer.world_size > 1:  # each rank validates its shard
            sampler = DistributedSampler(self.val_set, num_replicas=self.trainer.world_size,
                                         rank=self.trainer.global_rank, shuffle=False)
        return self._loader(self.val_set, bs, sampler)

    # -- prediction rows -----------------------------------------------------------------------

    def rows_for(self, split: str, val_experiments: list[str] | None = None, controls: bool = False
                 ) -> pd.DataFrame:
        """Sites to predict: ``val`` (the given held-out experiments), ``test``, ``train`` or ``all``.

        Treatment wells only unless ``controls`` (embeddings use every well).
        """
        s = self.sites if getattr(self, "sites", None) is not None else self.source.dataset.sites
        keep = pd.Series(True, index=s.index) if controls else s["well_type"] == "treatment"
        match split:
            case "val":
                keep &= s["experiment"].isin(val_experiments or [])
            case "test":
                keep &= s["split"] == "test"
            case "train":
                keep &= s["split"] == "train"
            case "all":
                pass
            case _:
                raise DataError(f"--split must be one of {', '.join(PREDICT_SPLITS)}, got {split!r}")
        return s[keep]
