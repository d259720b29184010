"""The one training loop every detector plugs into: Adam, epochs, an optional LR schedule, progress, a NaN guard.

A detector describes each training stage as a ``Stage`` (its parameters, a loss on one batch, the batches of an
epoch) and calls ``run_stage``. Stages that need something else (two optimisers, GAN-style) can still call it twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from adbench.errors import TrainingError
from adbench.progress import NULL_PROGRESS, Progress


@dataclass
class Stage:
    """One training stage.

    Attributes:
        name: shown in progress and error messages.
        params: the parameters the optimiser updates, or param groups (dicts with ``params`` and optionally their own
            ``lr``; ``lr_factor`` scales every group's own rate).
        loss: loss of one batch (a scalar tensor).
        batches: ``batches(epoch)`` yields the batches of that epoch.
        epochs: number of passes.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        lr_factor: ``lr_factor(epoch)`` multiplies ``lr`` during that epoch (schedules); constant 1 by default.
        grad_clip: clip the gradient norm to this value if set.
    """

    name: str
    params: list[torch.nn.Parameter] | list[dict]
    loss: Callable[[object], torch.Tensor]
    batches: Callable[[int], Iterable]
    epochs: int
    lr: float
    weight_decay: float = 0.0
    lr_factor: Callable[[int], float] | None = None
    grad_clip: float | None = None
    history: list[float] = field(default_factory=list)


def run_stage(stage: Stage, progress: Progress = NULL_PROGRESS) -> list[float]:
    """Train ``stage.params`` for ``stage.epochs`` epochs; returns the mean loss of each epoch.

    Raises:
        TrainingError: the loss became NaN or infinite (which epoch and step is said); nothing is kept.
    """
    if stage.epochs < 1:
        return stage.history
    groups = stage.params if stage.params and isinstance(stage.params[0], dict) else [{"params": stage.params}]
    opt = torch.optim.Adam([{**g, "params": list(g["params"])} for g in groups], lr=stage.lr,
                           weight_decay=stage.weight_decay)
    base_lrs = [group["lr"] for group in opt.param_groups]
    every = [p for group in opt.param_groups for p in group["params"]]
    with progress.task(f"train {stage.name}", total=stage.epochs) as advance:
        for epoch in range(stage.epochs):
            total, count = 0.0, 0
            if stage.lr_factor is not None:
                for group, lr in zip(opt.param_groups, base_lrs, strict=True):
                    group["lr"] = lr * stage.lr_factor(epoch)
            for step, batch in enumerate(stage.batches(epoch)):
                loss = stage.loss(batch)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TrainingError(
                        f"{stage.name}: loss became {value} at epoch {epoch + 1}, step {step + 1}; no result written "
                        "(try a lower learning rate, e.g. --set lr=...)"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if stage.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(every, stage.grad_clip)
                opt.step()
                total, count = total + value, count + 1
            stage.history.append(total / max(count, 1))
            advance(1, loss=stage.history[-1])
    return stage.history
