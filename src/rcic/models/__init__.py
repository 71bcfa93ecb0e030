"""Backbone (timm, 6 channels or RGB composite), neck, linear or cosine head, and losses."""

from rcic.models.net import CosineHead, RcicNet, create_backbone, loss_per_sample, margin_logits

__all__ = ["CosineHead", "RcicNet", "create_backbone", "loss_per_sample", "margin_logits"]
