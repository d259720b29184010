"""The CUDA path, run where torch sees a GPU (`pytest -m gpu`; skipped elsewhere, CI has none).

What they hold the GPU path to: fp32 features equal the CPU's up to float rounding (no TF32), fp16 features differ
from them by no more than fp16 rounding; CFLOW-AD's fused training step gives FrEIA's loss and gradients on CUDA; a
CUDA run through the CLI records its device; training twice with one seed on CUDA gives the same losses to float
rounding (not bit for bit: index_select's backward adds with atomics); the local sweep gives each GPU one cell.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from adbench.features import create_extractor

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch sees no GPU)")]


def test_fp32_features_on_cuda_equal_the_cpus_and_fp16_stays_within_its_rounding():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 128, 128), dtype=torch.uint8)
    cpu = create_extractor("tf_efficientnet_lite0", (2, 3, 4), "random")
    cuda32 = create_extractor("tf_efficientnet_lite0", (2, 3, 4), "random", precision="fp32")
    cuda32.load_state_dict(cpu.state_dict())
    cuda16 = create_extractor("tf_efficientnet_lite0", (2, 3, 4), "random", precision="fp16")
    cuda16.load_state_dict(cpu.state_dict())
    for ref, f32, f16 in zip(cpu(images), cuda32.cuda()(images.cuda()), cuda16.cuda()(images.cuda()), strict=True):
        scale = ref.abs().max()
        assert (f32.cpu() - ref).abs().max() <= 1e-4 * scale  # fp32 on both: rounding only
        assert (f16.cpu() - ref).abs().max() <= 2e-2 * scale  # fp16 autocast: about 3 decimal digits
        assert f32.dtype == f16.dtype == torch.float32


def test_fused_cflow_step_on_cuda_equals_freia():
    from adbench.models._coupling import hard_permutations
    from adbench.models.cflow import (
        CFlowConfig,
        build_flow,
        fiber_log_prob,
        fiber_loss,
        log_prob_per_dim,
        positional_encoding_2d,
    )

    torch.manual_seed(0)
    cfg = dataclasses.replace(CFlowConfig(), coupling_blocks=4, condition_dims=16)
    flow = build_flow(24, cfg).cuda()
    with torch.no_grad():
        for p in flow.parameters():
            p += 0.2 * torch.randn_like(p) if p.requires_grad else 0
    params = [p for p in flow.parameters() if p.requires_grad]
    pos = positional_encoding_2d(16, 6, 5).cuda()
    x, where = torch.randn(256, 24, device="cuda"), torch.randint(0, 30, (256,), device="cuda")
    fused = fiber_loss(fiber_log_prob(flow, x, pos, hard_permutations(flow), where), "logsigmoid")
    freia = fiber_loss(log_prob_per_dim(*flow(x, c=[pos.flatten(1).T[where]])), "logsigmoid")
    assert torch.allclose(fused, freia, atol=1e-4)
    for g, h in zip(torch.autograd.grad(fused, params), torch.autograd.grad(freia, params), strict=True):
        assert torch.allclose(g, h, atol=1e-4, rtol=1e-3)


def _run(tmp_path, name: str) -> dict:
    """A 2-epoch CFLOW-AD run on CUDA (synthetic pattern, 64 px, 2 coupling blocks)."""
    from adbench.runner import RunSpec, run_one

    spec = RunSpec(model="cflow", dataset="synthetic", category="pattern", image_size=64, device="cuda",
                   overrides={"epochs": 2, "coupling_blocks": 2}, results_dir=tmp_path / name, save_maps=False)
    return json.loads((run_one(spec) / "result.json").read_text())


def test_cuda_training_is_reproducible_to_float_rounding(tmp_path):
    first, second = _run(tmp_path, "a"), _run(tmp_path, "b")
    assert first["device"]["type"] == "cuda" and first["device"]["feature_precision"] == "fp32"
    assert first["loss_history"]["cflow"] == pytest.approx(second["loss_history"]["cflow"], rel=1e-5, abs=1e-6)
    assert first["metrics"] == pytest.approx(second["metrics"], abs=1e-3)


def test_cli_runs_on_cuda(tmp_path):
    from typer.testing import CliRunner

    from adbench.cli import app

    result = CliRunner().invoke(app, ["run", "--device", "cuda", "--category", "pattern", "--image-size", "64",
                                      "--set", "epochs=1", "--results-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (path,) = (tmp_path / "runs").glob("*/result.json")
    assert json.loads(path.read_text())["device"]["type"] == "cuda"


def test_local_sweep_gives_each_gpu_one_cell(tmp_path):
    """Two cells: on two or more GPUs each runs in its own process on its own GPU; on one, both on it in turn."""
    from adbench.sweep import expand, load_grid, run_sweep

    grid = tmp_path / "grid.toml"
    grid.write_text('models = ["fastflow"]\ndatasets = ["synthetic"]\ncategories = ["pattern"]\nseeds = [0, 1]\n\n'
                    '[overrides]\nimage_size = 64\nepochs = 1\nflow_steps = 2\n')
    statuses = run_sweep(expand(load_grid(grid), tmp_path / "out", need_data=False))
    assert [s["status"] for s in statuses] == ["ran", "ran"], statuses
    devices = [json.loads(p.read_text())["device"] for p in sorted((tmp_path / "out" / "runs").glob("*/result.json"))]
    assert all(d["type"] == "cuda" for d in devices)
    assert sorted(d["index"] for d in devices) == ([0, 1] if torch.cuda.device_count() >= 2 else [0, 0])
