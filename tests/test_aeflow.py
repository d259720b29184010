"""AE-FLOW: shapes, flow round trip, loss and score formulas, training, standardisation, parts in the result."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from adbench.cli import app
from adbench.errors import ConfigError, TrainingError
from adbench.features import FeatureStore, create_extractor
from adbench.models import create_model, list_models, resolve_config
from adbench.models._batchnorm import population_batchnorm
from adbench.models._coupling import flow_z, mean_sq_z
from adbench.models._ssim import ssim_map
from adbench.models.aeflow import AEFlowConfig, build_flow, flow_nll_per_dim, flow_scores, loss, recon_scores
from adbench.runner import seed_everything
from conftest import predict_both_paths

SMALL = {"flow_steps": 2, "decoder_channels": "32,16,8", "hidden_channels": 32, "batch_size": 4, "lr": "2e-3"}


def smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 images of smooth random blobs (learnable by a tiny autoencoder, unlike pixel noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    return (F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False) * 255).to(torch.uint8)


def make(overrides: dict, size: int = 32):
    seed_everything(0)  # numpy too: FrEIA draws the hard permutations with it
    cfg = resolve_config("aeflow", "resnet18", {**SMALL, **overrides})
    ext = create_extractor("resnet18", cfg.layers, "random")
    return create_model("aeflow", ext, size, cfg)


@pytest.fixture(scope="module")
def trained():
    """A tiny AE-FLOW before and after 40 epochs (80 steps) on 8 smooth 32 px images."""
    model = make({"epochs": 40})
    images = smooth_images(8, 32)
    store = FeatureStore([t.clone() for t in model.extractor(images)])
    with torch.no_grad():
        before = model(store.tensors[0])[2]
    history = model.fit(store, images=images)["aeflow"]
    return model, images, store, history, before


def test_registered_with_paper_defaults():
    assert "aeflow" in list_models()
    cfg = AEFlowConfig()
    assert (cfg.layers, cfg.flow_steps, cfg.clamp, cfg.alpha, cfg.beta) == ((3,), 8, 2.0, 0.5, 0.9)
    assert (cfg.decoder_channels, cfg.subnet, cfg.lr, cfg.weight_decay) == ((512, 256, 64), "resnet", 2e-3, 1e-4)
    assert (cfg.batch_size, cfg.epochs, cfg.grad_clip) == (16, 15, 1.0)
    paper = resolve_config("aeflow", "wide_resnet50_2", preset="paper")
    assert (paper.epochs, paper.batch_size, paper.decoder_channels) == (100, 64, (512, 256, 64))


@pytest.mark.parametrize("backbone", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2",
                                      "resnet18", "wide_resnet50_2", "efficientnet_b5", "mobilenetv3_large_100",
                                      "resnet50"])
def test_decoder_widths_mirror_the_encoder(backbone):
    """The paper's rule: decoder widths = the backbone's stage widths at strides 8, 4, 2 (WRN-50: 512, 256, 64)."""
    import timm

    info = timm.create_model(backbone, pretrained=False, features_only=True).feature_info
    widths = dict(zip(info.reduction(), info.channels(), strict=True))
    assert resolve_config("aeflow", backbone).decoder_channels == (widths[8], widths[4], widths[2])
    assert widths[16] == info.channels()[resolve_config("aeflow", backbone).layers[0]]


@pytest.mark.parametrize("backbone, channels, decoder", [("resnet18", 256, (128, 64, 64)),
                                                          ("wide_resnet50_2", 1024, (512, 256, 64))])
def test_shapes_at_256_and_small(backbone, channels, decoder):
    """The paper's shapes with WRN-50 (1024 x 16 x 16 latent, decoder 512-256-64 to 3 x 256 x 256), and resnet18."""
    torch.manual_seed(0)
    cfg = resolve_config("aeflow", backbone, {"flow_steps": 1})
    ext = create_extractor(backbone, cfg.layers, "random")
    model = create_model("aeflow", ext, 256, cfg).eval()
    with torch.no_grad():
        (feat,) = ext(torch.rand(1, 3, 256, 256))
        z, log_jac, recon = model(feat)
    assert feat.shape == (1, channels, 16, 16) and z.shape == feat.shape and log_jac.shape == (1,)
    widths = [m.out_channels for m in model.decoder if isinstance(m, torch.nn.ConvTranspose2d)]
    assert tuple(widths) == (*decoder, 3) and recon.shape == (1, 3, 256, 256)
    small = make({}, size=32).eval()
    pred = small.predict(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert pred.score.shape == (2,) and pred.anomaly_map.shape == (2, 32, 32)
    assert set(pred.parts) == {"flow", "recon"} and all(m.shape == (2, 32, 32) for _, m in pred.parts.values())


@pytest.mark.parametrize("subnet", ["conv", "resnet"])
def test_flow_round_trip(subnet):
    torch.manual_seed(0)
    cfg = dataclasses.replace(AEFlowConfig(), flow_steps=3, subnet=subnet, hidden_channels=8)
    flow = build_flow((6, 4, 5), cfg).eval()  # eval: BatchNorm of the resnet subnet uses running statistics
    x = torch.randn(3, 6, 4, 5)
    with torch.no_grad():
        z, lj = flow(x)
        back, lj_rev = flow(z, rev=True)
    assert torch.allclose(x, back, atol=1e-5) and torch.allclose(lj, -lj_rev, atol=1e-4)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in flow.modules()) == (subnet == "resnet")


@pytest.mark.parametrize("subnet", ["conv", "resnet"])
@pytest.mark.parametrize("shape", [(3, 7, 4, 5), (2, 112, 4, 4)])
def test_flow_z_and_mean_sq_z_compute_the_freia_flows_z(subnet, shape):
    """``models._coupling``'s inference path on AE-FLOW's flows, both subnets (the 0.1 folded into the "conv"
    subnet's last convolution; a pass after the "resnet" one, with BatchNorm's running statistics), for trained-looking
    parameters: FrEIA's z, and mean_c z^2, from planar or channels-last maps, which stay untouched."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(AEFlowConfig(), flow_steps=3, subnet=subnet, hidden_channels=8)
    flow = build_flow(shape[1:], cfg).eval()
    with torch.no_grad():
        for block in flow.module_list:
            block.global_scale.uniform_(-0.5, 1.0)
            block.global_offset.normal_()
            for bn in (m for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d)):
                bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.0), bn.weight.uniform_(0.5, 1.5)
        x = torch.randn(shape)
        expected = flow(x)[0]
        for inputs in (x, x.contiguous(memory_format=torch.channels_last)):
            torch.testing.assert_close(flow_z(flow, inputs), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(mean_sq_z(flow, inputs), expected.square().mean(1), rtol=1e-5, atol=1e-5)
            assert torch.equal(inputs, x)


def test_loss_and_score_formulas():
    z, log_jac = torch.zeros(2, 4, 2, 2), torch.tensor([0.0, 8.0])  # D = 16
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    assert torch.allclose(flow_nll_per_dim(z, log_jac), torch.tensor([half_log_2pi, half_log_2pi - 0.5]))
    recon, target = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    expected = 0.5 * (half_log_2pi - 0.25) + 0.5 * 0.25
    assert loss(z, log_jac, recon, target, 0.5).item() == pytest.approx(expected)
    assert loss(z, log_jac, recon, target, 0.0).item() == pytest.approx(0.25)
    score, amap = flow_scores(torch.full((2, 4, 2, 2), 2.0), 8, "nll")
    assert torch.allclose(score, torch.full((2,), 2 + half_log_2pi)) and amap.shape == (2, 8, 8)
    assert torch.allclose(amap, torch.full((2, 8, 8), 2 + half_log_2pi))
    lik, lik_map = flow_scores(torch.full((2, 4, 2, 2), 2.0), 8, "likelihood")
    assert torch.allclose(lik, -torch.exp(-score)) and torch.allclose(lik_map, -torch.exp(-amap))


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 1, 40, 24), (6, 3, 48, 40)])
def test_ssim_map_equals_torchmetrics(shape):
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    g = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=g)
    y = (x + 0.2 * torch.randn(shape, generator=g)).clamp(0, 1)
    value, full = tm_ssim(y, x, data_range=1.0, reduction="none", return_full_image=True)
    torch.testing.assert_close(ssim_map(y, x), full, rtol=0, atol=1e-5)
    torch.testing.assert_close(-recon_scores(x, y)[0], value, rtol=0, atol=1e-5)


def test_ssim_terms():
    x = torch.rand(2, 3, 32, 32)
    s, m = recon_scores(x, x)
    assert torch.allclose(s, torch.full((2,), -1.0), atol=1e-5) and m.abs().max() < 1e-4
    y = x.clone()
    y[1, :, 8:16, 8:16] = 1 - y[1, :, 8:16, 8:16]  # a defect in the second image only
    s, m = recon_scores(x, y)
    assert s[1] > s[0] + 0.05 and m.shape == (2, 32, 32)
    assert m[1, 8:16, 8:16].mean() > 5 * m[1, 24:, 24:].mean() + 0.1  # the map finds the defect
    # the image value is the mean of the map (torchmetrics >= 1.9: reflect-padded borders included)
    assert torch.allclose(1 + s, m.mean(dim=(1, 2)), atol=1e-5)


def test_training_lowers_loss_and_reconstruction_error(trained):
    model, images, store, history, before = trained
    assert len(history) == 40 and all(math.isfinite(v) for v in history) and history[-1] < history[0]
    target = images.float() / 255 * 2 - 1
    with torch.no_grad():
        after = model(store.tensors[0])[2]
    mse_before, mse_after = F.mse_loss(before, target).item(), F.mse_loss(after, target).item()
    assert mse_after < 0.8 * mse_before, (mse_before, mse_after)


def test_encoder_map_is_standardised_before_the_flow(trained):
    model, _, store, _, _ = trained
    feats = store.tensors[0]
    assert torch.allclose(model.feat_mean.flatten(), feats.mean(dim=(0, 2, 3)), atol=1e-4)
    assert torch.allclose(model.feat_std.flatten(), feats.std(dim=(0, 2, 3), correction=0), atol=1e-4)
    seen = []
    handle = model.flow.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        model(feats)
    handle.remove()
    live = feats.std(dim=(0, 2, 3)) > 1e-3  # a random ReLU network has dead (constant) channels
    assert seen[0].mean(dim=(0, 2, 3)).abs().max() < 1e-4 and torch.isfinite(seen[0]).all()
    assert torch.allclose(seen[0].std(dim=(0, 2, 3), correction=0)[live], torch.ones(int(live.sum())), atol=1e-3)
    plain = make({"standardize": "false", "epochs": 1})
    plain.fit(FeatureStore([feats.clone()]), images=smooth_images(8, 32))
    assert torch.equal(plain.feat_mean, torch.zeros_like(plain.feat_mean)) and torch.equal(plain.feat_std,
                                                                                          torch.ones_like(plain.feat_std))


def test_population_batchnorm_averages_the_batches_statistics():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4, momentum=0.3)).eval()
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "tracked" not in k}
    batches = [torch.randn(n, 3, 5, 5) * (i + 1) + i for i, n in enumerate((4, 4, 3))]
    population_batchnorm(net, batches)
    hidden = [net[0](x) for x in batches]  # the first BatchNorm's inputs
    means = torch.stack([h.mean(dim=(0, 2, 3)) for h in hidden]).mean(0)
    variances = torch.stack([h.transpose(0, 1).flatten(1).var(dim=1) for h in hidden]).mean(0)  # unbiased
    assert torch.allclose(net[1].running_mean, means, atol=1e-5)
    assert torch.allclose(net[1].running_var, variances, rtol=1e-4)
    assert net[1].momentum == 0.1 and net[4].momentum == 0.3  # restored
    assert int(net[1].num_batches_tracked) == 3
    assert all(torch.equal(net.state_dict()[k], v) for k, v in weights.items())  # no weight moved


def test_fit_sets_population_batchnorm_statistics(trained):
    model, images, store, history, _ = trained
    assert (model.config.bn_stats, model.config.average_last) == ("population", 0.25)
    norms = [m for m in model.flow.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(int(m.num_batches_tracked) == 2 for m in norms)  # 8 images in batches of 4, once
    running = make({"epochs": 40, "bn_stats": "running", "average_last": "0"})  # the last step's weights
    assert running.fit(FeatureStore([t.clone() for t in store.tensors]), images=images)["aeflow"] == history
    same = dict(running.flow.named_parameters())  # the same steps; the averaged weights are not the last ones
    assert not all(torch.equal(p, same[k]) for k, p in model.flow.named_parameters())
    other = [m for m in running.flow.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert int(other[0].num_batches_tracked) == 80  # torch's moving average over every step
    assert not torch.allclose(norms[0].running_var, other[0].running_var)


def test_scores_are_standardised_on_the_training_set(trained):
    model, images, _, _, _ = trained
    pred = model.predict(images)
    for name, (score, amap) in pred.parts.items():
        assert abs(score.mean().item()) < 1e-4 and score.std(correction=0).item() == pytest.approx(1, abs=1e-3), name
        assert abs(amap.mean().item()) < 1e-3 and amap.std(correction=0).item() == pytest.approx(1, abs=1e-3), name
    beta = model.config.beta
    (sf, mf), (sr, mr) = pred.parts["flow"], pred.parts["recon"]
    assert torch.allclose(pred.score, beta * sf + (1 - beta) * sr, atol=1e-6)
    assert torch.allclose(pred.anomaly_map, beta * mf + (1 - beta) * mr, atol=1e-6)
    halves = torch.cat([model.predict(images[i : i + 3]).score for i in range(0, 8, 3)])
    assert torch.allclose(halves, pred.score, atol=1e-5)  # batch-independent (BatchNorm in eval mode)
    protocol = model.protocol()
    assert "0.9 * (S_flow" in protocol["image_score"] and "training" in protocol["anomaly_map"]


def test_scoring_z_is_the_freia_flows_z(trained):
    """Scoring computes z' by ``models._coupling.flow_z`` (BatchNorm of the trained resnet subnets in eval mode);
    FrEIA's forward gives the same z' and the same predictions."""
    model, images, store, _, _ = trained
    assert model.fused
    with torch.no_grad():
        z_fused, log_jac, recon = model(store.tensors[0], fused=True)
        z, _, recon_frei = model(store.tensors[0])
    assert log_jac is None
    torch.testing.assert_close(z_fused, z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recon, recon_frei, rtol=1e-5, atol=1e-5)
    fused, frei = predict_both_paths(model, images)
    torch.testing.assert_close(fused.score, frei.score, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused.anomaly_map, frei.anomaly_map, rtol=1e-4, atol=1e-4)


def test_fit_needs_images_and_guards_nan():
    model = make({"epochs": 1})
    images = smooth_images(4, 32)
    feats = [t.clone() for t in model.extractor(images)]
    with pytest.raises(TrainingError, match="needs the training images"):
        model.fit(FeatureStore(feats))
    with pytest.raises(TrainingError, match="needs the training images"):
        model.calibrate(FeatureStore(feats))
    feats[0][0, 0, 0, 0] = float("nan")
    with pytest.raises(TrainingError, match="loss became nan at epoch 1"):
        model.fit(FeatureStore(feats), images=images)


def test_finetune_encoder_trains_a_copy_and_keeps_the_extractor():
    model = make({"epochs": 2, "finetune_encoder": "true"})
    images = smooth_images(4, 32)
    store = FeatureStore([t.clone() for t in model.extractor(images)])
    frozen = {k: v.clone() for k, v in model.extractor.state_dict().items()}
    start = [p.detach().clone() for p in model.encoder.parameters()]
    history = model.fit(store, images=images)["aeflow"]
    assert len(history) == 2 and all(math.isfinite(v) for v in history)
    assert any(not torch.equal(a, b) for a, b in zip(start, model.encoder.parameters(), strict=True))
    assert all(torch.equal(v, model.extractor.state_dict()[k]) for k, v in frozen.items())
    model.train()
    assert model.decoder.training and not any(m.training for m in model.encoder.modules())  # BN stays ImageNet's
    pred = model.eval().predict(images)
    assert torch.isfinite(pred.score).all() and torch.isfinite(pred.anomaly_map).all()
    assert make({}).encoder is None


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"subnet": "mlp"}, "aeflow subnet must be conv or resnet, got 'mlp'"),
        ({"flow_score": "p"}, "aeflow flow_score must be nll or likelihood"),
        ({"alpha": "1.5"}, "aeflow: alpha=1.5 is invalid; it must be in [0, 1]"),
        ({"beta": "-0.1"}, "aeflow: beta=-0.1 is invalid"),
        ({"layers": "2,3"}, "aeflow encodes with ONE feature stage"),
        ({"decoder_channels": "0,4"}, "every decoder_channels entry must be >= 1"),
        ({"flow_steps": "0"}, "flow_steps=0 is invalid"),
        ({"grad_clip": "-1"}, "aeflow: grad_clip=-1.0 is invalid; it must be >= 0"),
        ({"bn_stats": "ema"}, "aeflow bn_stats must be population or running, got 'ema'"),
        ({"average_last": "1"}, "aeflow: average_last=1.0 must be in"),
        ({"bn_stats": "running"}, "average_last=0.25 .* needs bn_stats=population"),
    ],
)
def test_bad_config_values(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        resolve_config("aeflow", "resnet18", overrides)


def test_decoder_must_match_the_encoder_stride():
    with pytest.raises(ConfigError, match="decoder upsamples x16 .* gives 4x4 for 32 px"):
        make({"layers": "2"})  # stride 8
    with pytest.raises(ConfigError, match="image size divisible by 16"):
        make({}, size=40)
    assert make({"layers": "2", "decoder_channels": "16,8"}).decoder[-2].stride == (2, 2)  # x8 decoder fits


def test_cli_run_records_the_parts(tmp_path):
    result = CliRunner().invoke(app, ["run", "--model", "aeflow", "--category", "pattern", "--image-size", "64",
                                      "--epochs", "1", "--set", "flow_steps=2", "--set", "decoder_channels=32,16,8",
                                      "--results-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (path,) = (tmp_path / "runs").glob("aeflow_tf_efficientnet_lite0_synthetic_pattern_s0/result.json")
    r = json.loads(path.read_text())
    keys = {"image_auroc", "image_aupr", "pixel_auroc", "pixel_aupr", "aupro"}
    assert set(r["parts"]) == {"flow", "recon"} and all(set(p) == keys for p in r["parts"].values())
    assert all(0 <= v <= 1 for p in [r["metrics"], *r["parts"].values()] for v in p.values())
    assert r["config"]["decoder_channels"] == [32, 16, 8] and r["config"]["beta"] == 0.9
    assert "S_flow" in r["protocol"]["image_score"] and list(r["loss_history"]) == ["aeflow"]


def test_short_run_loss_never_jumps_on_synthetic_data(tmp_path):
    """Issue 13's stability target on the built-in synthetic data, Lite0 at its defaults (grad_clip 1): from epoch 2 on,
    no epoch's mean loss exceeds the previous one's by more than 10 %."""
    result = CliRunner().invoke(app, ["run", "--model", "aeflow", "--category", "texture", "--image-size", "64",
                                      "--epochs", "6", "--device", "cpu", "--no-save-maps", "--results-dir",
                                      str(tmp_path)])
    assert result.exit_code == 0, result.output
    (path,) = (tmp_path / "runs").glob("aeflow_*/result.json")
    history = json.loads(path.read_text())["loss_history"]["aeflow"]
    assert len(history) == 6
    rises = [b / a for a, b in zip(history, history[1:], strict=False)]
    assert max(rises) <= 1.10, history
    # scripts/aeflow_steps.py (how the stabiliser was found on MTD) trains exactly as the run did
    script = Path(__file__).parents[1] / "scripts" / "aeflow_steps.py"
    out = subprocess.run([sys.executable, str(script), "--dataset", "synthetic", "--category", "texture",
                          "--image-size", "64", "--epochs", "6", "--jump", "1e9"], capture_output=True, text=True,
                         check=True).stdout
    means = [json.loads(line)["mean_loss"] for line in out.splitlines()]
    assert means == pytest.approx(history, rel=1e-5)


@pytest.mark.parametrize("clip, expected, average", [("1.0", 1.0, "0"), ("0", None, "0.25")])
def test_stabilisers_reach_the_training_stage(monkeypatch, clip, expected, average):
    """Clipping and tail averaging are the shared loop's (grad_clip 0 = the paper's plain Adam; average_last 0 = the
    last step's weights)."""
    import adbench.models.aeflow as aeflow_module

    seen = []
    monkeypatch.setattr(aeflow_module, "run_stage",
                        lambda stage, progress: seen.append((stage.grad_clip, stage.average_last)) or [1.0])
    monkeypatch.setattr(aeflow_module.AEFlow, "calibrate", lambda self, features: None)
    model = make({"epochs": 1, "grad_clip": clip, "average_last": average})
    images = smooth_images(4, 32)
    model.fit(FeatureStore([t.clone() for t in model.extractor(images)]), images=images)
    assert seen == [(expected, float(average))]
