"""The network: a timm backbone (6 channels or the RGB composite), a neck, and a head.

``RcicNet.forward`` returns ``{"features", "logits"}`` and, for the cosine head, ``"cosine"``
(what the margin losses need). Logits of the cosine head are ``scale * cosine``. With ``center``
(a domain's mean embedding) or ``domain`` (per-row domain ids: centred by the batch's domain
means) the features are centred before the head, and ``"features"`` are the centred ones.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import timm
import torch
import torch.nn.functional as F
from torch import nn

from rcic.config import LossConfig, ModelConfig
from rcic.errors import RecipeError
from rcic.io.images import RGB_MAP
from rcic.models.adabn import domain_means


class RgbComposite(nn.Module):
    """Fixed 6 -> 3 channel mixing with Recursion's channel colours (the 'RGB composite' input)."""

    def __init__(self):
        super().__init__()
        colours = torch.tensor([RGB_MAP[c][0] for c in range(1, 7)], dtype=torch.float32) / 255.0  # (6, 3)
        self.register_buffer("weight", (colours / colours.sum(0, keepdim=True)).T[:, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight)


class CosineHead(nn.Module):
    """Cosine similarity between L2-normalised features and class centres."""

    def __init__(self, in_features: int, n_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_classes, in_features))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(x), F.normalize(self.weight))


@contextmanager
def _offline_hub():
    """rcic never downloads at run time: pretrained weights come from the local cache or a file."""
    try:
        from huggingface_hub import constants
    except ImportError:  # timm without the hub client: nothing to switch off
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def create_backbone(config: ModelConfig, in_chans: int) -> nn.Module:
    """A timm model without classifier; timm adapts a pretrained first conv to ``in_chans``."""
    if not timm.is_model(config.backbone):
        raise RecipeError(f"recipe key model.backbone: unknown timm model {config.backbone!r}")
    reserved = {"in_chans", "num_classes", "pretrained", "pretrained_cfg_overlay"} & set(config.backbone_args)
    if reserved:
        raise RecipeError(f"recipe key model.backbone_args: {sorted(reserved)[0]!r} is set by rcic, not the recipe")
    kwargs = {**config.backbone_args, "in_chans": in_chans, "num_classes": 0}
    if config.drop_path:
        kwargs["drop_path_rate"] = config.drop_path
    pretrained = config.pretrained or config.pretrained_file is not None
    if config.pretrained_file:
        kwargs["pretrained_cfg_overlay"] = {"file": config.pretrained_file}
    try:
        with _offline_hub():
            return timm.create_model(config.backbone, pretrained=pretrained, **kwargs)
    except (TypeError, AssertionError) as err:  # an argument this architecture does not take, or a bad value
        raise RecipeError(f"recipe key model.backbone_args: {config.backbone} rejects them "
                          f"({type(err).__name__}: {err})") from None
    except (OSError, RuntimeError, ValueError) as err:
        if config.backbone_args and not pretrained:
            raise RecipeError(f"recipe key model.backbone_args: {config.backbone} rejects them "
                              f"({' '.join(str(err).split())[:200]})") from None
        if not pretrained:
            raise
        raise RecipeError(f"recipe key model.pretrained: weights for {config.backbone} are not available offline "
                          f"({type(err).__name__}); set pretrained: false or model.pretrained_file") from None


class RcicNet(nn.Module):
    """Backbone -> (cell-type embedding) -> neck -> head. ``in_channels``: 6, or 3 for RGB composites on disk.

    ``model.input: rgb`` on 6-channel data mixes the channels to Recursion's composite first; on
    the WILDS release (3-channel composites already) the backbone takes the images as they are.
    """

    def __init__(self, config: ModelConfig, n_classes: int, n_cell_types: int, scale: float = 30.0,
                 in_channels: int = 6):
        super().__init__()
        if config.input == "six_channel" and in_channels != 6:
            raise RecipeError(f"recipe key model.input: six_channel needs 6-channel images; this data has "
                              f"{in_channels}-channel images (the WILDS release: set model.input=rgb)")
        self.rgb = RgbComposite() if config.input == "rgb" and in_channels == 6 else None
        self.backbone = create_backbone(config, 6 if config.input == "six_channel" else 3)
        # the pooled (pre-logits) width: models with a hidden head layer (MobileNetV3, LCNet) differ
        width = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.embed = nn.Embedding(n_cell_types, config.cell_type_embedding) if config.cell_type_embedding else None
        width += config.cell_type_embedding
        neck: list[nn.Module] = []
        if config.neck.dim:
            neck += [nn.Linear(width, config.neck.dim)]
            width = config.neck.dim
        if config.neck.batchnorm:
            neck.append(nn.BatchNorm1d(width))
        if config.neck.dropout:
            neck.append(nn.Dropout(config.neck.dropout))
        self.neck = nn.Sequential(*neck)
        self.cosine = config.head == "cosine"
        self.head = CosineHead(width, n_classes) if self.cosine else nn.Linear(width, n_classes)
        self.scale = scale
        self.feature_dim = width

    def no_weight_decay(self) -> set[str]:
        """Parameters kept out of weight decay besides norms and biases (timm's convention)."""
        return {"embed.weight"} if self.embed is not None else set()

    def forward(self, image: torch.Tensor, cell_type: torch.Tensor | None = None, center: torch.Tensor | None = None,
                domain: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x = self.rgb(image) if self.rgb is not None else image
        features = self.backbone(x)
        if self.embed is not None:
            if cell_type is None:
                cell_type = torch.zeros(len(image), dtype=torch.long, device=image.device)
            features = torch.cat([features, self.embed(cell_type)], dim=1)
        features = self.neck(features)
        if domain is not None:
            center = domain_means(features, domain)
        if center is not None:
            features = features - center.to(features.dtype)
        out = {"features": features}
        if self.cosine:
            out["cosine"] = self.head(features)
            out["logits"] = out["cosine"] * self.scale
        else:
            out["logits"] = self.head(features)
        return out


# ----------------------------------------------------------------------------------------------
# Losses (per sample, so mixed targets combine as lam * L(a) + (1 - lam) * L(b))
# ----------------------------------------------------------------------------------------------


def margin_logits(cosine: torch.Tensor, target: torch.Tensor, kind: str, margin: float, scale: float):
    """ArcFace (additive angular) or CosFace (additive cosine) margin on the target class."""
    onehot = F.one_hot(target, cosine.shape[1]).to(cosine.dtype)
    cosine = cosine.float().clamp(-1 + 1e-7, 1 - 1e-7)
    if kind == "cosface":
        target_logit = cosine - margin
    else:
        sine = torch.sqrt(1.0 - cosine**2)
        phi = cosine * math.cos(margin) - sine * math.sin(margin)
        # keep the logit monotonic where theta + m would pass pi (the usual ArcFace fallback)
        fallback = cosine - math.sin(math.pi - margin) * margin
        target_logit = torch.where(cosine > math.cos(math.pi - margin), phi, fallback)
    return scale * (onehot * target_logit + (1 - onehot) * cosine)


def loss_per_sample(out: dict[str, torch.Tensor], target: torch.Tensor, config: LossConfig) -> torch.Tensor:
    logits = out["logits"].float()
    total = torch.zeros(len(target), device=logits.device)
    if config.ce:
        total = total + config.ce * F.cross_entropy(logits, target, reduction="none",
                                                    label_smoothing=config.label_smoothing)
    if config.focal:
        logp = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
        total = total + config.focal * (-((1 - logp.exp()) ** config.focal_gamma) * logp)
    for kind in ("arcface", "cosface"):
        weight = getattr(config, kind)
        if weight:
            z = margin_logits(out["cosine"], target, kind, config.margin, config.scale)
            total = total + weight * F.cross_entropy(z, target, reduction="none",
                                                     label_smoothing=config.label_smoothing)
    return total
