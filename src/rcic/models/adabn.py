"""Domain BatchNorm (AdaBN) and embedding centring: the per-domain statistics of a network.

AdaBN (Li et al., 2016; the 5th place of RxRx1 used it per plate) replaces the BatchNorm running
statistics learnt on the training plates by those of the plate (or experiment) being predicted:
reset the running statistics, run the domain's images through the network with BatchNorm in
training mode and ``momentum=None`` (PyTorch's cumulative average of the batch statistics) and no
gradient, then predict the domain in eval mode. The trained statistics are saved first and put
back afterwards, so the weights of a run never change. With ``model.adabn_prior`` the adapted
statistics are pulled towards the trained ones once a domain's adaptation is complete
(``mix_bn_state``).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorms(net: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers that keep running statistics (timm's BatchNormAct2d is one)."""
    return [m for m in net.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def save_bn_state(net: nn.Module) -> list[dict]:
    """Copies of every BatchNorm layer's running statistics and momentum (for ``restore_bn_state``)."""
    return [{"momentum": m.momentum, "mean": m.running_mean.clone(), "var": m.running_var.clone(),
             "count": m.num_batches_tracked.clone()} for m in batchnorms(net)]


@torch.no_grad()
def restore_bn_state(net: nn.Module, state: list[dict]) -> None:
    for m, saved in zip(batchnorms(net), state, strict=True):
        m.momentum = saved["momentum"]
        m.running_mean.copy_(saved["mean"])
        m.running_var.copy_(saved["var"])
        m.num_batches_tracked.copy_(saved["count"])


@torch.no_grad()
def mix_bn_state(net: nn.Module, trained: list[dict], prior: float) -> None:
    """Pull the adapted statistics towards the trained ones: ``prior`` x trained + (1 - prior) x domain.

    Schneider et al. (NeurIPS 2020) mix source and target statistics this way: a domain estimated
    from a few hundred images is noisy, and the trained statistics are a prior that a domain with
    no shift should keep. ``prior`` 0 is plain AdaBN.
    """
    for m, saved in zip(batchnorms(net), trained, strict=True):
        m.running_mean.mul_(1.0 - prior).add_(saved["mean"], alpha=prior)
        m.running_var.mul_(1.0 - prior).add_(saved["var"], alpha=prior)


@torch.no_grad()
def start_domain(net: nn.Module) -> None:
    """Forget the running statistics; the next forwards in ``adapting`` average theirs cumulatively."""
    for m in batchnorms(net):
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch of the domain weighs the same


@contextmanager
def adapting(net: nn.Module):
    """BatchNorm layers in training mode (batch statistics, running averages updated); the rest unchanged."""
    layers = [(m, m.training) for m in batchnorms(net)]
    for m, _ in layers:
        m.train()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, was in layers:
            m.train(was)


def domain_means(features: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
    """Each row's domain mean over the rows of this batch (same shape as ``features``; differentiable)."""
    _, inverse = torch.unique(domain, return_inverse=True)
    groups = int(inverse.max()) + 1
    sums = torch.zeros(groups, features.shape[1], dtype=features.dtype, device=features.device)
    sums = sums.index_add(0, inverse, features)
    counts = torch.bincount(inverse, minlength=groups).to(features.dtype)
    return (sums / counts[:, None])[inverse]
