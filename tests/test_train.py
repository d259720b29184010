"""The shared training loop (parameter groups under one schedule) and the process settings every run records."""

from __future__ import annotations

import torch

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
