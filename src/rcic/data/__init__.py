"""Datasets (dict samples), transforms (normalisation, augmentation, D4 kernels), the DataModule."""

from rcic.data.dataset import EpochSampler, RxRxDataModule, SiteDataset, class_columns, experiment_folds
from rcic.data.transforms import TTA_SETS, build_augment, d4_transform, group_channel_stats, mix_batch, normalize

__all__ = ["TTA_SETS", "EpochSampler", "RxRxDataModule", "SiteDataset", "build_augment", "class_columns",
           "d4_transform", "experiment_folds", "group_channel_stats", "mix_batch", "normalize"]
