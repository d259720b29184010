"""The one training loop every detector plugs into: Adam, epochs, an optional LR schedule, gradient clipping, tail
averaging of the weights, progress, a NaN guard.

A detector describes each training stage as a ``Stage`` (its parameters, a loss on one batch, the batches of an
epoch) and calls ``run_stage``. Stages that need something else (two optimisers, GAN-style) can still call it twice.
The loop never waits for the device between steps: the losses stay there and are checked every ``check_every`` steps.
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
        check_every: steps between two looks at the losses (NaN/inf guard and epoch mean; each one waits for the
            device), and at the end of every epoch.
        average_last: if > 0, the weights after every step of this final fraction of the epochs (at least one
            epoch) enter a running mean, copied into the parameters when the stage ends (Polyak-Ruppert tail averaging,
            as SWA does per step). Buffers (BatchNorm statistics) are not averaged: recompute them for the averaged
            weights, as SWA does (``models/_batchnorm.py``).
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
    check_every: int = 64
    average_last: float = 0.0
    history: list[float] = field(default_factory=list)


STAGE_TASK = "train "  # the progress task of each stage's loop is STAGE_TASK + its name (one step per epoch)


def adam(params: list[dict], lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam over param groups, fused (one kernel for all tensors) where torch has it for every parameter's device.

    Same update as the per-tensor loop, to float rounding, and the fastest: one step of CFLOW-AD (Lite0, 144 tensors,
    48 with a gradient) takes 0.44 ms fused, 1.05 ms with ``foreach=True``, 1.30 ms with the loop on one CPU thread.
    """
    every = [p for group in params for p in group["params"]]
    fused = bool(every) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in every)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def _checked(stage: Stage, losses: list[torch.Tensor], epoch: int, first: int) -> float:
    """Sum of ``losses`` (steps ``first``.. of ``epoch``, 0-based), in float64; raises if any is NaN or infinite."""
    if not losses:
        return 0.0
    values = torch.stack(losses).double().flatten()
    total = float(values.sum())
    if not math.isfinite(total):
        bad = int((~torch.isfinite(values)).nonzero()[0])
        raise TrainingError(
            f"{stage.name}: loss became {float(values[bad])} at epoch {epoch + 1}, step {first + bad + 1} (steps "
            f"{first + 1}-{first + len(losses)} checked together); no result written (try a lower learning rate, "
            "e.g. --set lr=...)"
        )
    return total


def run_stage(stage: Stage, progress: Progress = NULL_PROGRESS) -> list[float]:
    """Train ``stage.params`` for ``stage.epochs`` epochs; returns the mean loss of each epoch.

    Raises:
        TrainingError: the loss became NaN or infinite (which epoch and step is said, found at the next check, up to
            ``check_every`` steps later); nothing is kept.
    """
    if stage.epochs < 1:
        return stage.history
    groups = stage.params if stage.params and isinstance(stage.params[0], dict) else [{"params": stage.params}]
    opt = adam([{**g, "params": list(g["params"])} for g in groups], stage.lr, stage.weight_decay)
    base_lrs = [group["lr"] for group in opt.param_groups]
    every = [p for group in opt.param_groups for p in group["params"]]
    mean, averaged = [], 0  # the tail average (``average_last``) and how many steps it holds
    average_from = stage.epochs - max(1, round(stage.average_last * stage.epochs)) if stage.average_last > 0 else None
    with progress.task(f"{STAGE_TASK}{stage.name}", total=stage.epochs) as advance:
        for epoch in range(stage.epochs):
            total, count, losses = 0.0, 0, []
            if stage.lr_factor is not None:
                for group, lr in zip(opt.param_groups, base_lrs, strict=True):
                    group["lr"] = lr * stage.lr_factor(epoch)
            for batch in stage.batches(epoch):
                loss = stage.loss(batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if stage.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(every, stage.grad_clip)
                opt.step()
                if average_from is not None and epoch >= average_from:
                    averaged += 1
                    with torch.no_grad():
                        if averaged == 1:
                            mean = [p.detach().clone() for p in every]
                        for m, p in zip(mean, every, strict=True):  # running mean: m += (p - m) / n
                            m.lerp_(p, 1.0 / averaged)
                losses.append(loss.detach())
                if len(losses) == stage.check_every:
                    total, count, losses = total + _checked(stage, losses, epoch, count), count + len(losses), []
            total, count = total + _checked(stage, losses, epoch, count), count + len(losses)
            stage.history.append(total / max(count, 1))
            advance(1, loss=stage.history[-1])
    with torch.no_grad():
        for m, p in zip(mean, every, strict=False):  # empty unless averaged
            p.copy_(m)
    return stage.history
