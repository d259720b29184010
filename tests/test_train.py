"""The shared training loop (parameter groups under one schedule) and the process settings every run records."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from adbench.errors import TrainingError
from adbench.train import Stage, run_stage


def test_param_groups_keep_their_own_rates_under_the_schedule():
    fast, slow = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    stage = Stage(name="t", params=[{"params": [fast]}, {"params": [slow], "lr": 0.01}],
                  loss=lambda _: (fast + slow).sum(), batches=lambda epoch: [None], epochs=2, lr=0.1,
                  lr_factor=lambda epoch: 0.5 ** epoch)
    run_stage(stage)
    # Adam's step is lr * sign(grad) at a constant gradient: 0.1 + 0.05 for the group at lr, 0.01 + 0.005 for the other
    assert torch.allclose(fast.detach(), torch.full((3,), -0.15), atol=1e-6)
    assert torch.allclose(slow.detach(), torch.full((3,), -0.015), atol=1e-6)


def test_runs_keep_freed_memory_and_record_it():
    import platform

    from adbench.runner import environment, keep_freed_memory

    expected = "glibc mmap and trim thresholds 1 GiB" if platform.libc_ver()[0] == "glibc" else "default"
    assert keep_freed_memory() == expected and environment(torch.device("cpu"))["malloc"] == expected


def test_stage_matches_the_straightforward_loop_and_checks_losses_in_windows():
    """Fused Adam and losses read every ``check_every`` steps: the same step losses, epoch means and parameters as
    plain Adam with a host read of every loss (schedule, weight decay and clipping included)."""
    torch.manual_seed(0)
    data = [(torch.randn(16, 5), torch.randn(16, 1)) for _ in range(150)]
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    reference = copy.deepcopy(net)
    settings = {"epochs": 3, "lr": 1e-2, "weight_decay": 1e-3, "grad_clip": 1.0, "lr_factor": lambda e: 0.5 ** e}
    steps = []

    def loss(batch):
        steps.append(float((value := torch.nn.functional.mse_loss(net(batch[0]), batch[1])).detach()))
        return value

    history = run_stage(Stage(name="t", params=list(net.parameters()), loss=loss, batches=lambda epoch: data,
                              **settings))
    opt = torch.optim.Adam(reference.parameters(), lr=1e-2, weight_decay=1e-3, foreach=False)
    expected, means = [], []
    for epoch in range(3):
        opt.param_groups[0]["lr"] = 1e-2 * 0.5 ** epoch
        for x, y in data:
            value = torch.nn.functional.mse_loss(reference(x), y)
            opt.zero_grad()
            value.backward()
            torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 1.0)
            opt.step()
            expected.append(float(value.detach()))
        means.append(sum(expected[-len(data) :]) / len(data))
    assert np.allclose(steps, expected, atol=1e-5) and np.allclose(history, means, atol=1e-5)
    for p, q in zip(net.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5)
    # the epoch mean is the mean of the step losses, whatever the windows (150 steps = 64 + 64 + 22)
    assert history == pytest.approx([sum(steps[i : i + 150]) / 150 for i in (0, 150, 300)], rel=1e-12, abs=0)


@pytest.mark.parametrize("last, averaged_epochs", [(0.25, 1), (0.5, 2), (0.01, 1)])
def test_tail_averaging_ends_on_the_mean_of_the_last_epochs_weights(last, averaged_epochs):
    """``average_last``: the same steps and losses as without it, and the parameters end as the mean of the weights
    after every step of the last epochs (at least one), which a plain run passes through."""
    torch.manual_seed(0)
    data = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(5)]
    start = torch.nn.Linear(3, 1)

    def train(average_last: float) -> tuple[torch.nn.Module, list[torch.Tensor], list[float]]:
        net, seen = copy.deepcopy(start), []

        def loss(batch):  # the weights each step starts from: the previous step's result
            seen.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
            return torch.nn.functional.mse_loss(net(batch[0]), batch[1])

        history = run_stage(Stage(name="t", params=list(net.parameters()), loss=loss, batches=lambda epoch: data,
                                  epochs=4, lr=0.05, average_last=average_last))
        return net, seen, history

    plain, iterates, plain_history = train(0.0)
    averaged, _, history = train(last)
    after_steps = [*iterates[1:], torch.cat([p.detach().flatten() for p in plain.parameters()])]
    expected = torch.stack(after_steps[-averaged_epochs * len(data) :]).mean(0)
    assert history == plain_history
    got = torch.cat([p.detach().flatten() for p in averaged.parameters()])
    assert torch.allclose(got, expected, atol=1e-6) and not torch.allclose(got, after_steps[-1], atol=1e-3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_guard_names_the_epoch_the_step_and_the_window(bad):
    param = torch.nn.Parameter(torch.zeros(1))
    calls = []

    def loss(batch):
        epoch, step = batch
        calls.append(batch)
        return 0 * param.sum() + (bad if (epoch, step) == (1, 69) else 1.0)

    stage = Stage(name="t", params=[param], loss=loss, epochs=3, lr=0.1,
                  batches=lambda epoch: [(epoch, step) for step in range(100)])
    with pytest.raises(TrainingError, match=rf"t: loss became {bad} at epoch 2, step 70 \(steps 65-100 checked "):
        run_stage(stage)
    assert calls[-1] == (1, 99) and stage.history == [1.0]  # found at the epoch's end; epoch 3 never starts
    stage = Stage(name="t", params=[param], loss=lambda batch: param.sum() + float("nan"), epochs=1, lr=0.1,
                  batches=lambda epoch: range(200), check_every=64)
    with pytest.raises(TrainingError, match=r"at epoch 1, step 1 \(steps 1-64 checked together\)"):
        run_stage(stage)
