"""Backbone (timm, 6 channels or RGB composite), neck, linear or cosine head, losses, domain statistics."""

from rcic.models.adabn import (
    adapting,
    batchnorms,
    domain_means,
    mix_bn_state,
    restore_bn_state,
    save_bn_state,
    start_domain,
)
from rcic.models.net import CosineHead, RcicNet, create_backbone, loss_per_sample, margin_logits

__all__ = ["CosineHead", "RcicNet", "adapting", "batchnorms", "create_backbone", "domain_means", "loss_per_sample",
           "margin_logits", "mix_bn_state", "restore_bn_state", "save_bn_state", "start_domain"]
