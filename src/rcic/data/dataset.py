"""Site datasets (dict samples), experiment folds, and the Lightning DataModule."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from rcic.config import Recipe
from rcic.data.transforms import build_augment, group_channel_stats, normalize
from rcic.errors import DataError, RecipeError
from rcic.io.metadata import ClassVocab
from rcic.store.source import ImageSource


def experiment_folds(wells: pd.DataFrame, folds: int, seed: int = 0) -> dict[str, int]:
    """Assign each labelled training experiment to one of ``folds`` folds, stratified by cell type.

    Within each cell type the experiments are shuffled (seeded) and dealt round-robin, so every
    fold holds out whole experiments (both sites of every well together) of each cell type.
    """
    experiments = wells.loc[wells["split"] == "train", ["experiment", "cell_type"]].drop_duplicates()
    rng = np.random.default_rng(seed)
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


class SiteDataset(Dataset):
    """One sample per site: ``{"image", "label", "cell_type", "experiment", "index"}``.

    ``rows`` is a slice of the site table with ``target`` (class column, -1 if unlabelled),
    ``cell_type_index`` and ``experiment_index``; ``norm_stats`` holds the (6, 2) mean/std of
    each row's normalisation group where normalisation is per experiment or plate.
    """

    def __init__(self, source: ImageSource, rows: pd.DataFrame, normalization: str,
                 augment: Callable[[np.ndarray, np.random.Generator | None], np.ndarray],
                 norm_stats: np.ndarray | None = None, seed: int = 0):
        self.source = source
        self.rows = rows.reset_index(drop=True)
        self.records = self.rows.to_dict("records")
        self.normalization = normalization
        self.augment = augment
        self.norm_stats = norm_stats
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int) -> dict:
        # EpochSampler hands out epoch * len + index, so augmentation can be seeded per (epoch, sample)
        epoch, i = divmod(int(key), len(self.records))
        row = self.records[i]
        image = self.source.read_site(row).transpose(1, 2, 0)  # (H, W, 6)
        stats = None if self.norm_stats is None else self.norm_stats[i]
        rng = np.random.default_rng([self.seed, epoch, i])
        image = self.augment(normalize(image, self.normalization, stats), rng)
        return {
            "image": torch.from_numpy(image.transpose(2, 0, 1).copy()),
            "label": torch.tensor(row["target"], dtype=torch.long),
            "cell_type": torch.tensor(row["cell_type_index"], dtype=torch.long),
            "experiment": torch.tensor(row["experiment_index"], dtype=torch.long),
            "index": torch.tensor(i, dtype=torch.long),
        }


class EpochSampler(Sampler[int]):
    """A shuffle that depends only on (seed, epoch), split across DDP ranks.

    A resumed run sees the same order. Keys are ``epoch * n + index`` so that the dataset can
    seed each sample's augmentation by epoch (see ``SiteDataset.__getitem__``).
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.epoch = n, seed, 0
        self.rank, self.world_size = rank, world_size
        self.per_rank = -(-n // world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        order = np.resize(order, self.per_rank * self.world_size)  # pad by wrapping: equal work per rank
        return iter((self.epoch * self.n + order[self.rank::self.world_size]).tolist())

    def __len__(self) -> int:
        return self.per_rank


def _worker_seed(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)


class RxRxDataModule(L.LightningDataModule):
    """Train/val datasets of one fold (held-out experiments), from a PNG folder or a packed store."""

    def __init__(self, source: ImageSource, recipe: Recipe, extra_train: pd.DataFrame | None = None):
        super().__init__()
        self.source, self.recipe = source, recipe
        dataset = source.dataset
        self.vocab = dataset.vocab
        self.classes = class_columns(self.vocab, recipe.data.classes)
        self.cell_types = sorted(dataset.sites["cell_type"].unique())
        self.experiments = sorted(dataset.sites["experiment"].unique())
        self.folds = experiment_folds(dataset.wells, recipe.data.folds, recipe.seed)
        self.input_size = self._input_size()
        self.sites = self._annotate(dataset.sites, extra_train)
        self._norm = self._norm_stats() if recipe.data.normalization not in ("none", "image") else None

    def _input_size(self) -> int:
        stored = getattr(self.source, "image_size", None)
        if stored is None:
            first = self.source.dataset.sites.iloc[0]
            stored = self.source.read_site(first).shape[-1]
        size = self.recipe.data.image_size or stored
        schedule = self.recipe.trainer.image_size_schedule or {}
        biggest = max([size, *schedule.values()])
        if biggest > stored:
            raise RecipeError(f"recipe key data.image_size: {biggest} px asked, but the data's sites are {stored} px")
        return size

    def _annotate(self, sites: pd.DataFrame, extra: pd.DataFrame | None) -> pd.DataFrame:
        column = {label: i for i, label in enumerate(self.classes)}
        sites = sites.copy()
        sites["target"] = [column.get(label, -1) for label in sites["label"]]
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

    def _norm_stats(self) -> np.ndarray:
        mode = self.recipe.data.normalization
        stats = self.source.channel_stats()
        by = ["plate", "experiment"] if mode == "plate" else ["experiment"]
        mask = self.sites["well_type"].ne("treatment").to_numpy() if mode == "experiment_controls" else None
        return group_channel_stats(self.sites, stats, by, mask)

    # -- splits ------------------------------------------------------------------------------

    def train_rows(self) -> pd.DataFrame:
        s = self.sites
        labelled = (s["split"] == "train") & (s["target"] >= 0) & (s["fold"] != self.recipe.data.fold)
        return s[labelled | s["pseudo"]]

    def val_rows(self) -> pd.DataFrame:
        s = self.sites
        return s[(s["split"] == "train") & (s["fold"] == self.recipe.data.fold) & (s["well_type"] == "treatment")]

    def rows_for(self, split: str) -> pd.DataFrame:
        """Rows to predict: ``val`` (held-out experiments of the fold) or ``test`` (test treatment wells)."""
        if split == "val":
            return self.val_rows()
        s = self.sites
        return s[(s["split"] == "test") & (s["well_type"] == "treatment")]

    def make_dataset(self, rows: pd.DataFrame, train: bool) -> SiteDataset:
        if rows.empty:
            raise DataError("no sites for this split (check data.folds / data.fold and the data)",
                            self.source.dataset.root)
        augment = build_augment(self.recipe.augment, self.input_size, train)
        norm = None if self._norm is None else self._norm[rows.index.to_numpy()]
        return SiteDataset(self.source, rows, self.recipe.data.normalization, augment, norm, self.recipe.seed)

    # -- Lightning hooks ---------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        self.train_set = self.make_dataset(self.train_rows(), train=True)
        self.val_set = self.make_dataset(self.val_rows(), train=False)

    def _loader(self, dataset, batch_size, sampler=None, drop_last=False) -> DataLoader:
        workers = self.recipe.data.num_workers
        # a private generator: creating a loader's iterator never moves the global RNG (dropout, mixing)
        generator = torch.Generator().manual_seed(self.recipe.seed)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
                          drop_last=drop_last, worker_init_fn=_worker_seed, generator=generator)

    def train_dataloader(self) -> DataLoader:
        bs = self.recipe.data.batch_size
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        sampler = EpochSampler(len(self.train_set), self.recipe.seed, rank, world)
        drop = len(sampler) > bs  # BatchNorm needs more than one sample
        return self._loader(self.train_set, bs, sampler, drop)

    def val_dataloader(self) -> DataLoader:
        sampler = None
        if self.trainer is not None and self.trainer.world_size > 1:  # each rank validates its shard
            sampler = DistributedSampler(self.val_set, num_replicas=self.trainer.world_size,
                                         rank=self.trainer.global_rank, shuffle=False)
        return self._loader(self.val_set, self.recipe.data.eval_batch_size or self.recipe.data.batch_size * 2,
                            sampler)
