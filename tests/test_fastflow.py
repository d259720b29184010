"""FastFlow: shapes, invertibility, loss/map formulas, config resolution, and a short fit that learns."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adbench.errors import ConfigError
from adbench.features import FeatureStore, create_extractor
from adbench.models import _coupling, create_model, list_models, resolve_config
from adbench.models._coupling import flow_z, fusable, mean_sq_z
from adbench.models.fastflow import FastFlowConfig, anomaly_map, build_flow, loss
from conftest import predict_both_paths, script_module


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    cfg = resolve_config("fastflow", "resnet18", {"flow_steps": 2, "epochs": 3, "batch_size": 4})
    ext = create_extractor("resnet18", cfg.layers, "random")
    return create_model("fastflow", ext, 64, cfg)


def test_registered_with_paper_defaults():
    assert "fastflow" in list_models()
    cfg = FastFlowConfig()
    assert (cfg.flow_steps, cfg.clamp, cfg.lr, cfg.weight_decay, cfg.batch_size) == (8, 2.0, 1e-3, 1e-5, 32)
    assert resolve_config("fastflow", "tf_efficientnet_lite0", preset="paper").epochs == 500
    assert resolve_config("fastflow", "wide_resnet50_2").conv3x3_only is False


def test_resolve_config_coerces_and_rejects():
    cfg = resolve_config("fastflow", "resnet18", {"lr": "3e-4", "conv3x3_only": "false", "layers": "1,2"})
    assert cfg.lr == 3e-4 and cfg.conv3x3_only is False and cfg.layers == (1, 2)
    with pytest.raises(ConfigError, match="no config field 'lrr'; valid: .*lr"):
        resolve_config("fastflow", "resnet18", {"lrr": "1"})
    with pytest.raises(ConfigError, match="bad value 'fast' for epochs"):
        resolve_config("fastflow", "resnet18", {"epochs": "fast"})
    with pytest.raises(ConfigError, match="unknown preset 'quick'"):
        resolve_config("fastflow", "resnet18", preset="quick")
    with pytest.raises(ConfigError, match="unknown model 'fastflw'; valid: .*fastflow"):
        resolve_config("fastflw", "resnet18")


def test_forward_shapes_and_finite(small):
    feats = small.extractor(torch.rand(2, 3, 64, 64))
    z, log_jac = small(feats)
    assert [t.shape for t in z] == [f.shape for f in feats]
    assert all(lj.shape == (2,) and torch.isfinite(lj).all() for lj in log_jac)
    pred = small.predict(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    assert pred.anomaly_map.shape == (2, 64, 64) and pred.score.shape == (2,)
    assert (pred.anomaly_map <= 0).all() and (pred.anomaly_map >= -1).all()
    assert torch.equal(pred.score, pred.anomaly_map.flatten(1).max(1).values)


@pytest.mark.parametrize("conv3x3_only", [True, False])
def test_flow_round_trip(conv3x3_only):
    torch.manual_seed(0)
    flow = build_flow((6, 5, 7), dataclasses.replace(FastFlowConfig(), flow_steps=4, conv3x3_only=conv3x3_only))
    x = torch.randn(3, 6, 5, 7)
    z, lj = flow(x)
    x_back, lj_rev = flow(z, rev=True)
    assert torch.allclose(x, x_back, atol=1e-5)
    assert torch.allclose(lj, -lj_rev, atol=1e-4)


@pytest.mark.parametrize("conv3x3_only", [True, False])
def test_flow_z_computes_the_freia_flows_z(conv3x3_only):
    """``models._coupling.flow_z`` (AE-FLOW's scoring path) gives FrEIA's z on the flows FastFlow builds, for
    trained-looking parameters (random global affine), planar or channels-last maps."""
    torch.manual_seed(0)
    flow = build_flow((7, 5, 6), dataclasses.replace(FastFlowConfig(), flow_steps=4, conv3x3_only=conv3x3_only))
    with torch.no_grad():
        for block in flow.module_list:
            block.global_scale.uniform_(-0.5, 1.0)
            block.global_offset.normal_()
    x = torch.randn(5, 7, 5, 6)
    assert fusable(flow)
    with torch.no_grad():
        torch.testing.assert_close(flow_z(flow, x), flow(x)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(flow_z(flow, x.contiguous(memory_format=torch.channels_last)), flow(x)[0],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv3x3_only", [True, False])
@pytest.mark.parametrize("shape", [(5, 7, 5, 6), (8, 7, 4, 4), (2, 24, 8, 8)])
def test_mean_sq_z_is_the_mean_square_of_the_freia_flows_z(conv3x3_only, shape):
    """FastFlow's scoring path (``mean_sq_z``) gives mean_c z^2 of FrEIA's z for trained-looking parameters (random
    global affine), odd and even channel counts, with and without the k-row view (150 fibres: none; 128: k = 16)."""
    torch.manual_seed(0)
    flow = build_flow(shape[1:], dataclasses.replace(FastFlowConfig(), flow_steps=4, conv3x3_only=conv3x3_only))
    with torch.no_grad():
        for block in flow.module_list:
            block.global_scale.uniform_(-0.5, 1.0)
            block.global_offset.normal_()
        x = torch.randn(shape)
        expected = flow(x)[0].square().mean(1)
        torch.testing.assert_close(mean_sq_z(flow, x), expected, rtol=1e-5, atol=1e-5)
        x_last = x.contiguous(memory_format=torch.channels_last)  # its fibres are x's memory: must stay untouched
        torch.testing.assert_close(mean_sq_z(flow, x_last), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(x_last, x)


def test_roofline_counts_the_permutations_as_gathers_and_puts_them_back():
    """``scripts/roofline.py`` counts ``permute_affine``'s one-hot product (the k > 1 path) as the gather it computes
    (no FLOPs), with the same values, and restores it; the k = 1 path (an affine pass and a gather) gives them too."""
    roofline = script_module("roofline")
    y, scale, offset, perm = torch.randn(64, 24), torch.rand(24) + 0.5, torch.randn(24), torch.randperm(24)
    expected = (y * scale + offset)[:, perm]
    torch.testing.assert_close(_coupling.permute_affine(y.clone(), scale, offset, perm, 2), expected)
    assert roofline.flops_of(lambda: _coupling.permute_affine(y, scale, offset, perm, 2)) == 2 * 64 * 24 * 24
    with roofline.reference_kernels():
        assert roofline.flops_of(lambda: _coupling.permute_affine(y, scale, offset, perm, 2)) == 0
        torch.testing.assert_close(_coupling.permute_affine(y, scale, offset, perm, 2), expected)
    assert _coupling.permute_affine.__module__ == _coupling.__name__  # put back
    torch.testing.assert_close(_coupling.permute_affine(y, scale, offset, perm, 1), expected)  # affine and gather


def test_predict_is_the_same_on_both_paths(small):
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    fused, frei = predict_both_paths(small, images)
    torch.testing.assert_close(fused.anomaly_map, frei.anomaly_map, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.score, frei.score, rtol=1e-5, atol=1e-6)


def test_loss_and_map_formulas():
    z = [torch.full((2, 3, 4, 4), 2.0), torch.zeros(2, 5, 2, 2)]
    log_jac = [torch.tensor([1.0, 3.0]), torch.tensor([0.5, 0.5])]
    # scale 1: 0.5 * 48 * 4 - mean(1, 3) = 94; scale 2: 0 - 0.5
    assert loss(z, log_jac).item() == pytest.approx(93.5)
    amap = anomaly_map([zi.square().mean(1) for zi in z], 8)
    # scale 1: -exp(-0.5 * 4) everywhere; scale 2: -1 everywhere; mean of the two
    assert torch.allclose(amap, torch.full((2, 8, 8), (-torch.exp(torch.tensor(-2.0)) - 1) / 2))


def test_fit_reduces_loss_and_guards_nan(small):
    feats = small.extractor(torch.rand(8, 3, 64, 64))
    history = small.fit(FeatureStore([f.clone() for f in feats]))["fastflow"]
    assert len(history) == 3 and history[-1] < history[0]
    from adbench.errors import TrainingError

    bad = [f.clone() for f in feats]
    bad[0][0, 0, 0, 0] = float("nan")
    with pytest.raises(TrainingError, match="loss became nan at epoch 1"):
        small.fit(FeatureStore(bad))


@pytest.mark.parametrize("mode", ["gaussian", "diagonal"])
def test_position_norm_whitens_every_position_of_the_training_maps(mode):
    """The frozen first layer (models/_position.py) maps each position's training features to mean 0 and (up to the
    epsilon regularisation) identity covariance, or unit variances for diagonal; then the flow trains as usual."""
    torch.manual_seed(0)
    cfg = resolve_config("fastflow", "resnet18", {"flow_steps": 2, "epochs": 1, "batch_size": 8, "layers": "2",
                                                  "position_norm": mode, "norm_epsilon": 1e-6})
    ext = create_extractor("resnet18", cfg.layers, "random")
    model = create_model("fastflow", ext, 32, cfg)
    c, h, w = ext.feature_shapes(32)[0]  # correlated features with a different Gaussian at every position
    mix = 0.3 * torch.randn(h * w, c, c) / c**0.5 + torch.eye(c)  # well conditioned
    fibers = torch.einsum("pij,npj->npi", mix, torch.randn(300, h * w, c)) + torch.randn(h * w, c)
    train = [fibers.permute(0, 2, 1).reshape(300, c, h, w).contiguous()]
    history = model.fit(FeatureStore(train))["fastflow"]
    white = model.position[0](train[0]).flatten(2).permute(2, 0, 1).double()  # [P, N, C]
    assert white.mean(1).abs().max() < 1e-3
    cov = torch.einsum("pni,pnj->pij", white - white.mean(1, keepdim=True), white - white.mean(1, keepdim=True))
    cov = cov / (len(train[0]) - 1)
    assert torch.allclose(torch.diagonal(cov, dim1=1, dim2=2), torch.ones(1, dtype=cov.dtype), atol=1e-3)
    off = cov - torch.diag_embed(torch.diagonal(cov, dim1=1, dim2=2))
    assert off.abs().max() < 1e-3 if mode == "gaussian" else off.abs().max() > 0.1  # diagonal keeps correlations
    assert len(history) == 1 and torch.isfinite(model.predict(torch.rand(2, 3, 32, 32)).score).all()
    with pytest.raises(ConfigError, match="position_norm must be one of none, diagonal, gaussian"):
        resolve_config("fastflow", "resnet18", {"position_norm": "full"})


def test_channel_norm_has_the_layer_norms_statistics_and_no_position_tied_weights():
    """norm="channel": GroupNorm(1, C) normalises over [C, H, W] as the reference LayerNorm does, with one affine
    weight per channel; so it is translation-equivariant where the LayerNorm's per-position weights are not."""
    from adbench.models.fastflow import make_norm

    shape = (4, 6, 6)
    layer, channel = make_norm(shape, "layer"), make_norm(shape, "channel")
    x = torch.randn(3, *shape)
    assert torch.allclose(layer(x), channel(x), atol=1e-5)  # both at their initial affine (1, 0)
    assert channel.weight.shape == (4,) and layer.weight.shape == shape
    with torch.no_grad():
        layer.weight.normal_(), channel.weight.normal_()
    shifted = torch.roll(x, 2, dims=-1)
    assert torch.allclose(channel(shifted), torch.roll(channel(x), 2, dims=-1), atol=1e-5)
    assert not torch.allclose(layer(shifted), torch.roll(layer(x), 2, dims=-1), atol=1e-3)
    cfg = resolve_config("fastflow", "resnet18", {"flow_steps": 2, "norm": "channel"})
    model = create_model("fastflow", create_extractor("resnet18", cfg.layers, "random"), 32, cfg)
    assert all(isinstance(n, torch.nn.GroupNorm) for n in model.norms)
    with pytest.raises(ConfigError, match="fastflow norm must be one of layer, channel"):
        resolve_config("fastflow", "resnet18", {"norm": "batch"})
