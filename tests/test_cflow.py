"""CFLOW-AD: positional encoding, conditional flows, fiber training, train-set normalised maps."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from adbench.features import FeatureStore, create_extractor
from adbench.models import create_model, resolve_config
from adbench.models.cflow import CFlowConfig, build_flow, fiber_loss, log_prob_per_dim, positional_encoding_2d


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    cfg = resolve_config("cflow", "resnet18", {"coupling_blocks": 2, "epochs": 2, "batch_size": 4,
                                               "condition_dims": 16, "fiber_batch": 64, "lr": "1e-3"})
    ext = create_extractor("resnet18", cfg.layers, "random")
    model = create_model("cflow", ext, 64, cfg)
    feats = ext(torch.rand(8, 3, 64, 64))
    history = model.fit(FeatureStore([f.clone() for f in feats]))["cflow"]
    return model, history


def test_defaults_from_official_code():
    cfg = CFlowConfig()
    assert (cfg.layers, cfg.coupling_blocks, cfg.condition_dims, cfg.clamp) == ((2, 3, 4), 8, 128, 1.9)
    assert (cfg.fiber_batch, cfg.lr, cfg.batch_size, cfg.loss) == (256, 2e-4, 32, "logsigmoid")
    paper = resolve_config("cflow", "wide_resnet50_2", preset="paper")
    assert (paper.epochs, paper.warmup_epochs, paper.permute_soft) == (200, 16, True)


def test_positional_encoding_formula_and_halves():
    pe = positional_encoding_2d(8, 3, 5)
    assert pe.shape == (8, 3, 5)
    div = [math.exp(-k * math.log(1e4) / 4) for k in (0, 2)]
    for y in range(3):
        for x in range(5):
            assert pe[0, y, x] == pytest.approx(math.sin(x * div[0]), abs=1e-6)
            assert pe[3, y, x] == pytest.approx(math.cos(x * div[1]), abs=1e-6)
            assert pe[4, y, x] == pytest.approx(math.sin(y * div[0]), abs=1e-6)
            assert pe[7, y, x] == pytest.approx(math.cos(y * div[1]), abs=1e-6)
    # the x half varies only along width, the y half only along height
    assert torch.equal(pe[:4], pe[:4, :1].expand(-1, 3, -1)) and torch.equal(pe[4:], pe[4:, :, :1].expand(-1, -1, 5))


def test_conditional_flow_round_trip():
    torch.manual_seed(0)
    flow = build_flow(6, dataclasses.replace(CFlowConfig(), coupling_blocks=3, condition_dims=8))
    x, c = torch.randn(10, 6), torch.randn(10, 8)
    z, lj = flow(x, c=[c])
    back, lj_rev = flow(z, c=[c], rev=True)
    assert torch.allclose(x, back, atol=1e-5) and torch.allclose(lj, -lj_rev, atol=1e-4)


def test_log_prob_and_losses():
    z, lj = torch.zeros(2, 4), torch.tensor([0.0, 4.0])
    lp = log_prob_per_dim(z, lj)
    assert torch.allclose(lp, torch.tensor([-0.5 * math.log(2 * math.pi), -0.5 * math.log(2 * math.pi) + 1]))
    assert fiber_loss(lp, "nll").item() == pytest.approx(-lp.mean().item())
    assert fiber_loss(lp, "logsigmoid").item() == pytest.approx(-torch.nn.functional.logsigmoid(lp).mean().item())


def test_fit_learns_and_shapes(small):
    model, history = small
    assert len(history) == 2 and history[-1] < history[0]
    assert torch.isfinite(model.train_max).all()
    pred = model.predict(torch.rand(3, 3, 64, 64))
    assert pred.anomaly_map.shape == (3, 64, 64) and torch.isfinite(pred.anomaly_map).all()
    assert torch.equal(pred.score, pred.anomaly_map.flatten(1).max(1).values)


def test_map_does_not_depend_on_the_test_batch(small):
    model, _ = small
    images = torch.rand(6, 3, 64, 64)
    whole = model.predict(images).anomaly_map
    parts = torch.cat([model.predict(images[i : i + 2]).anomaly_map for i in range(0, 6, 2)])
    single = model.predict(images[4:5]).anomaly_map
    assert torch.allclose(whole, parts, atol=1e-5) and torch.allclose(whole[4:5], single, atol=1e-5)


def test_bad_cflow_values_are_config_errors():
    from adbench.errors import ConfigError

    with pytest.raises(ConfigError, match="fiber_batch=0 is invalid"):
        resolve_config("cflow", "resnet18", {"fiber_batch": "0"})
    with pytest.raises(ConfigError, match="condition_dims=30 is invalid; it must be a positive multiple of 4"):
        resolve_config("cflow", "resnet18", {"condition_dims": "30"})
    with pytest.raises(ConfigError, match="cflow loss must be logsigmoid or nll, got 'mse'"):
        resolve_config("cflow", "resnet18", {"loss": "mse"})
