"""Datasets (dict samples), normalisation and augmentation kernels, the DataModule."""

from rcic.data.augment import TTA_SETS, AugmentParams, apply_params, d4_transform, draw_params, mix_batch, normalize
from rcic.data.dataset import (
    DomainBatchSampler,
    DomainEvalSampler,
    EpochSampler,
    RxRxDataModule,
    SiteDataset,
    WellDataset,
    class_columns,
    domain_codes,
    experiment_folds,
    group_channel_stats,
)

__all__ = ["TTA_SETS", "AugmentParams", "DomainBatchSampler", "DomainEvalSampler", "EpochSampler", "RxRxDataModule",
           "SiteDataset", "WellDataset", "apply_params", "class_columns", "d4_transform", "domain_codes", "draw_params",
           "experiment_folds", "group_channel_stats", "mix_batch", "normalize"]
