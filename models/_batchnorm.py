"""BatchNorm statistics for inference computed as the BatchNorm paper does, not by torch's moving average."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


@torch.no_grad()
def population_batchnorm(module: nn.Module, inputs: Iterable, forward: Callable | None = None) -> None:
    """Every BatchNorm's inference statistics := the average over ``inputs`` (the training batches) of the batch mean
    and unbiased variance (Ioffe & Szegedy 2015, Alg. 2), through ``module`` in training mode (``forward(x)``, default
    ``module(x)``, per input); no weight changes. Leaves ``module`` in training mode."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # torch: a cumulative average of the batches' statistics
    module.train()
    for x in inputs:
        (forward or module)(x)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
