"""CFLOW-AD: positional encoding, conditional flows, fiber training, train-set normalised maps."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

import adbench.models.cflow as cflow_module
from adbench.errors import ConfigError, TrainingError
from adbench.features import FeatureStore, create_extractor
from adbench.models import _fibers, create_model, resolve_config
from adbench.models._coupling import hard_permutations
from adbench.models.cflow import (
    CFlowConfig,
    build_flow,
    fiber_log_prob,
    fiber_loss,
    fused_log_prob,
    log_prob_per_dim,
    positional_encoding_2d,
)


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
    with pytest.raises(ConfigError, match="fiber_batch=0 is invalid"):
        resolve_config("cflow", "resnet18", {"fiber_batch": "0"})
    with pytest.raises(ConfigError, match="condition_dims=30 is invalid; it must be a positive multiple of 4"):
        resolve_config("cflow", "resnet18", {"condition_dims": "30"})
    with pytest.raises(ConfigError, match="cflow loss must be one of logsigmoid, nll, got 'mse'"):
        resolve_config("cflow", "resnet18", {"loss": "mse"})
    with pytest.raises(ConfigError, match="cflow map_blur must be a sigma in"):
        resolve_config("cflow", "resnet18", {"map_blur": "-1"})
    wide = resolve_config("cflow", "resnet18", {"map_blur": "8", "condition_dims": "16", "coupling_blocks": "1"})
    with pytest.raises(ConfigError, match="map_blur=8 is too wide for 32-pixel maps"):  # before any training
        create_model("cflow", create_extractor("resnet18", wide.layers, "random"), 32, wide)


def test_map_blur_is_a_gaussian_blur_of_the_unblurred_map(small):
    """map_blur = sigma blurs the final map (models/_maps.blur, as PaDiM and PatchCore) and the score is its max; 0
    (the official map) leaves it as it is; the cell key of a default run does not name the option."""
    from adbench.models._maps import blur
    from adbench.runner import _config_part

    model, _ = small
    images = torch.rand(3, 3, 64, 64)
    plain = model.predict(images)
    blurred_model = copy.deepcopy(model)
    blurred_model.config = dataclasses.replace(model.config, map_blur=2.0)
    blurred = blurred_model.predict(images)
    assert torch.allclose(blurred.anomaly_map, blur(plain.anomaly_map, 2.0), atol=1e-6)
    assert not torch.allclose(blurred.anomaly_map, plain.anomaly_map, atol=1e-4)
    assert torch.equal(blurred.score, blurred.anomaly_map.flatten(1).max(1).values)
    # the blur smooths: a lower total variation
    assert blurred.anomaly_map.diff(dim=-1).abs().sum() < plain.anomaly_map.diff(dim=-1).abs().sum()
    assert "sigma 2 px" in blurred_model.protocol()["map_blur"] and "map_blur" not in model.protocol()
    assert "map_blur" not in _config_part(model.config) and _config_part(blurred_model.config)["map_blur"] == 2.0


@pytest.mark.parametrize("soft", [False, True])
def test_fused_inference_equals_freia(soft):
    torch.manual_seed(0)
    cfg = dataclasses.replace(CFlowConfig(), coupling_blocks=3, condition_dims=8, permute_soft=soft)
    flow = build_flow(7, cfg).eval()
    with torch.no_grad():
        for p in flow.parameters():  # move away from the identity-like initialisation
            p += 0.2 * torch.randn_like(p) if p.requires_grad else 0
        feat, pos = torch.randn(5, 7, 3, 4), positional_encoding_2d(8, 3, 4)
        x = feat.permute(0, 2, 3, 1).reshape(-1, 7)
        cond = pos.unsqueeze(0).expand(5, -1, -1, -1).permute(0, 2, 3, 1).reshape(-1, 8)
        z, log_jac = flow(x, c=[cond])
        reference = log_prob_per_dim(z, log_jac).reshape(5, 12)
        for rows in (1, 24, 30, 10_000):  # chunks of 1, 2 (uneven tail) and all images
            assert torch.allclose(fused_log_prob(flow, feat, pos, rows=rows), reference, atol=1e-5)


@pytest.mark.parametrize("soft", [False, True])
def test_fused_training_loss_and_gradients_equal_freia(soft):
    """The training step's loss on a fiber batch (positions drawn at random, conditions zeroed or not) and its
    gradient with respect to every parameter are FrEIA's, away from the initialisation."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(CFlowConfig(), coupling_blocks=3, condition_dims=8, permute_soft=soft)
    flow = build_flow(7, cfg)
    with torch.no_grad():
        for p in flow.parameters():
            p += 0.2 * torch.randn_like(p) if p.requires_grad else 0
    params = [p for p in flow.parameters() if p.requires_grad]
    x, where = torch.randn(64, 7), torch.randint(0, 12, (64,))
    for pos in (positional_encoding_2d(8, 3, 4), torch.zeros(8, 3, 4)):
        losses, grads = [], []
        for fused in (True, False):
            if fused:
                log_p = fiber_log_prob(flow, x, pos, hard_permutations(flow), where)
            else:
                log_p = log_prob_per_dim(*flow(x, c=[pos.flatten(1).T[where]]))
            losses.append(fiber_loss(log_p, "logsigmoid"))
            grads.append(torch.autograd.grad(losses[-1], params))
        assert torch.allclose(losses[0], losses[1], atol=1e-6)
        for g, h in zip(*grads, strict=True):
            assert torch.allclose(g, h, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("soft", [False, True])
def test_written_out_backward_equals_autograd_in_float64(soft):
    """``models._fibers.FiberFlow``'s backward against autograd through its own forward, in float64 so that only a
    wrong formula (not rounding) can fail: every parameter's gradient and the fibers' own, with a weight on log|det J|
    that differs from z's, and the forward equal to the inference path's bit for bit."""
    torch.manual_seed(1)
    np.random.seed(1)  # FrEIA draws its permutations with numpy
    cfg = dataclasses.replace(CFlowConfig(), coupling_blocks=3, condition_dims=8, permute_soft=soft)
    flow = build_flow(7, cfg).double()
    with torch.no_grad():
        for p in flow.parameters():
            p += 0.3 * torch.randn_like(p) if p.requires_grad else 0
    params = [p for p in flow.parameters() if p.requires_grad]
    pos, where = positional_encoding_2d(8, 3, 4).double(), torch.randint(0, 12, (50,))
    x = torch.randn(50, 7, dtype=torch.float64, requires_grad=True)
    (fixed, tensors), (_, again) = (_fibers.flow_tensors(flow, pos, hard_permutations(flow)) for _ in range(2))
    outputs = [_fibers.FiberFlow.apply(x, where % 4, where // 4, fixed, *tensors),  # written out
               _fibers.forward(x, _fibers.parts(fixed, where % 4, where // 4, *again))]  # recorded by autograd
    weight = torch.randn(50, 7, dtype=torch.float64)
    grads = [torch.autograd.grad((z * weight).sum() + 3 * log_jac.square().sum(), [x, *params])
             for z, log_jac in outputs]
    assert all(torch.equal(a, b) for a, b in zip(*outputs, strict=True))
    for g, h in zip(*grads, strict=True):
        assert g.shape == h.shape and torch.allclose(g, h, rtol=1e-10, atol=1e-12)
        assert h.abs().max() > 0


def test_fused_training_follows_the_freia_trajectory(monkeypatch):
    """The same fibers in the same order, the same step losses and the same trained parameters (to float rounding) as
    training the FrEIA flows fiber by fiber; the NaN guard still names the epoch and the step."""
    steps: list[list[float]] = []  # the loss of every step, per fit

    def recording(stage, progress):
        loss, steps_of_fit = stage.loss, []

        def recorded(batch):
            value = loss(batch)
            steps_of_fit.append(float(value.detach()))
            return value

        stage.loss = recorded
        steps.append(steps_of_fit)
        return run_stage(stage, progress)

    run_stage = cflow_module.run_stage
    monkeypatch.setattr(cflow_module, "run_stage", recording)
    torch.manual_seed(0)
    cfg = resolve_config("cflow", "resnet18", {"coupling_blocks": 2, "epochs": 2, "batch_size": 2, "lr": "2e-3",
                                               "condition_dims": 16, "fiber_batch": 64})
    ext = create_extractor("resnet18", cfg.layers, "random")
    model = create_model("cflow", ext, 64, cfg)
    reference = copy.deepcopy(model)
    feats = [f.clone() for f in ext(torch.rand(4, 3, 64, 64))]
    reference.fused = False
    histories = []
    for m in (model, reference):
        torch.manual_seed(1)
        histories.append(m.fit(FeatureStore(feats))["cflow"])
    assert len(steps[0]) == len(steps[1]) == 2 * 2 * (2 + 1 + 1)  # epochs x image batches x (64, 16, 4 positions x 2)
    assert np.allclose(steps[0], steps[1], atol=1e-5) and steps[0][-1] < steps[0][0]
    assert np.allclose(histories[0], histories[1], atol=1e-5)
    for (name, p), q in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.allclose(p, q, atol=1e-5), name
    feats[1][1, 0, 2, 3] = float("nan")
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 1, step \d+ \(steps 1-\d+ checked together\)"):
        model.fit(FeatureStore(feats))


def test_official_normalization_uses_the_test_set_maximum(small):
    model, _ = small
    official = copy.deepcopy(model)
    official.config = dataclasses.replace(model.config, normalization="official")
    images = torch.rand(6, 3, 64, 64)
    preds = [official.predict(images[i : i + 4]) for i in (0, 4)]
    scores, maps = official.finalize(torch.cat([p.score for p in preds]).numpy(),
                                     torch.cat([p.anomaly_map for p in preds]).numpy())
    with torch.no_grad():
        log_p = model.log_prob_maps(model.extractor(images))
    likelihood = sum(torch.nn.functional.interpolate(torch.exp(m - m.max()).unsqueeze(1), size=(64, 64),
                                                     mode="bilinear", align_corners=True)[:, 0] for m in log_p)
    expected = likelihood.max() - likelihood
    assert np.allclose(maps, expected.numpy(), atol=1e-5) and np.allclose(scores, maps.max(axis=(1, 2)))
    assert official.protocol()["map_normalization"].startswith("official")
    assert model.protocol()["map_normalization"].startswith("training-set")
    train_scores = np.concatenate([p.score.numpy() for p in preds])
    same = model.finalize(train_scores, maps)  # the default mode changes nothing
    assert same[0] is train_scores and same[1] is maps
    with pytest.raises(ConfigError, match="normalization must be one of train, official"):
        resolve_config("cflow", "resnet18", {"normalization": "test"})


@pytest.mark.parametrize("mode", ["gaussian", "diagonal"])
def test_position_norm_is_the_per_position_gaussian_before_the_flow(mode):
    """With the coupling blocks made the identity, log p of every fiber is exactly the log-density of the Gaussian
    fitted at its position (full or diagonal covariance + epsilon I): whitening, log-determinant and per-dimension
    scaling are all right; the fused and FrEIA paths agree."""
    torch.manual_seed(0)
    cfg = resolve_config("cflow", "resnet18", {"coupling_blocks": 1, "epochs": 0, "batch_size": 8,
                                               "condition_dims": 8, "position_norm": mode, "norm_epsilon": 0.05})
    ext = create_extractor("resnet18", cfg.layers, "random")
    model = create_model("cflow", ext, 32, cfg)
    train = [f.clone() for f in ext(torch.rand(40, 3, 32, 32))]
    model.fit(FeatureStore(train))
    with torch.no_grad():
        for block in model.flows.modules():  # the identity: no coupling, unit global scale, no offset
            if hasattr(block, "subnet"):
                block.subnet[-1].weight.zero_()
                block.subnet[-1].bias.zero_()
                block.global_offset.zero_()
                block.w_perm.copy_(torch.eye(block.w_perm.shape[0]).view_as(block.w_perm))
    test = ext(torch.rand(3, 3, 32, 32))
    fused, freia = model.log_prob_maps(test, fused=True), model.log_prob_maps(test, fused=False)
    for i, (x, f, g) in enumerate(zip(train, fused, freia, strict=True)):
        assert torch.allclose(f, g, atol=1e-4)
        c, h, w = x.shape[1:]
        fibers = x.double().flatten(2).permute(2, 0, 1)  # [P, N, C]
        cov = torch.einsum("pni,pnj->pij", fibers - fibers.mean(1, keepdim=True),
                           fibers - fibers.mean(1, keepdim=True)) / (len(x) - 1)
        if mode == "diagonal":
            cov = torch.diag_embed(torch.diagonal(cov, dim1=1, dim2=2))
        gauss = torch.distributions.MultivariateNormal(fibers.mean(1), cov + 0.05 * torch.eye(c, dtype=cov.dtype))
        expected = gauss.log_prob(test[i].double().flatten(2).permute(0, 2, 1)) / c  # [B, P]
        assert torch.allclose(f.flatten(1).double(), expected, atol=2e-3), i
    with pytest.raises(ConfigError, match="position_norm must be one of none, diagonal, gaussian"):
        resolve_config("cflow", "resnet18", {"position_norm": "full"})
