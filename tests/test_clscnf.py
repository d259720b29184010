"""Oh & Kim classifier + CNF ensemble: config, decoder, stage 1 learning and freezing, stage 2, fusion (its weight
chosen on held-out training images), CLI."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from adbench import validation
from adbench.cli import app
from adbench.datasets.synthetic import generate
from adbench.defects import DefectSynthesizer
from adbench.errors import ConfigError
from adbench.features import FeatureStore, create_extractor
from adbench.models import clscnf, create_model, resolve_config
from adbench.models.clscnf import CNF_CHOICES, W_FE, ClsCnfConfig, Decoder
from adbench.validation import FUSION_SCALINGS, choose_fusion, held_out_fusion, held_out_rows, synthetic_set

SIZE = 64


def texture_images(n: int, size: int = SIZE) -> torch.Tensor:
    """uint8 [n, 3, size, size] normal images of the synthetic ``texture`` category."""
    return torch.from_numpy(np.stack([generate("texture", "train", i, "good", 0, size=size)[0] for i in range(n)])
                            ).permute(0, 3, 1, 2).contiguous()


def tiny(**overrides):
    torch.manual_seed(0)
    settings = {"coupling_blocks": 2, "condition_dims": 16, "fiber_batch": 64, "batch_size": 8, "epochs": 1,
                "decoder_width": 16, "cls_frozen_epochs": 1, "cls_finetune_epochs": 1, **overrides}
    cfg = resolve_config("clscnf", "resnet18", settings)
    ext = create_extractor("resnet18", cfg.layers, "random")
    return create_model("clscnf", ext, SIZE, cfg)


def params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return texture_images(16)


def test_defaults_follow_the_official_code_and_categories():
    cfg = ClsCnfConfig()
    assert (cfg.layers, cfg.coupling_blocks, cfg.clamp, cfg.condition_dims, cfg.fiber_batch) == ((2, 3, 4), 6, 1.9,
                                                                                                  128, 256)
    assert (cfg.cls_weight_decay, cfg.lr, cfg.in_domain_prob, cfg.beta_max) == (1e-4, 2e-4, 0.5, 0.8)
    paper = resolve_config("clscnf", "wide_resnet50_2", preset="paper")
    schedule = (paper.cls_frozen_epochs, paper.cls_finetune_epochs, paper.epochs, paper.warmup_epochs)
    assert schedule == (850, 150, 200, 16)
    assert (paper.decoder_width, paper.decoder_stride, paper.decoder_blocks) == (128, 1, (3, 6, 4, 3))
    assert paper.permute_soft and paper.baseline_cnf and paper.cls_lr == 1e-4 and cfg.refit and not paper.refit
    assert (cfg.fusion, cfg.fusion_holdout, cfg.fusion_scalings, cfg.fusion_tie_se) == ("validation", 0.2,
                                                                                      FUSION_SCALINGS, 1.0)
    assert cfg.fusion_grid[0] == 0 and set(W_FE.values()) <= set(cfg.fusion_grid)  # CNF alone and all their w
    cable = resolve_config("clscnf", "resnet18", dataset="mvtec", category="cable")
    assert (cable.classifier_weight, cable.object_mask, cable.fill_holes) == (0.05, "bright", True)
    grid = resolve_config("clscnf", "resnet18", dataset="mvtec", category="grid")
    assert (grid.classifier_weight, grid.object_mask, grid.fill_holes) == (1.0, "dark", False)
    btad = resolve_config("clscnf", "resnet18", dataset="btad", category="02")
    assert (btad.classifier_weight, btad.object_mask) == (0.05, "none")
    mtd = resolve_config("clscnf", "resnet18", dataset="mtd", category="mtd")
    assert (mtd.classifier_weight, mtd.object_mask) == (1.0, "none")
    mine = resolve_config("clscnf", "resnet18", {"classifier_weight": "0.7"}, dataset="mvtec", category="cable")
    assert mine.classifier_weight == 0.7  # the user's value wins over the category's


def test_paper_preset_applies_their_per_class_schedule_exceptions():
    def schedule(category, dataset="mvtec", preset="paper", **overrides):
        c = resolve_config("clscnf", "resnet18", overrides, preset, dataset=dataset, category=category)
        return c.cls_frozen_epochs, c.cls_finetune_epochs, c.batch_size, c.cls_lr, c.cls_weight_decay, c.epochs, c.lr

    assert schedule("bottle") == (850, 150, 32, 1e-4, 1e-4, 200, 2e-4)  # their MVTec default: 85 + 15 x 2 sub x 5
    assert schedule("screw") == (175, 25, 16, 5e-4, 1e-4, 200, 2e-4)  # 35 + 5 meta, 1 sub, bs 16, lr 5e-4
    assert schedule("transistor")[:3] == (700, 300, 16)
    assert schedule("03", "btad") == (240, 60, 16, 1e-4, 5e-4, 48, 1e-4)  # 8 + 2 x 6 sub; CNFs 8 x 6, lr 1e-4
    assert schedule("02", "btad")[4:] == (1e-4, 48, 2e-5)
    assert schedule("screw", preset=None)[:3] == (3, 1, 32)  # only with the preset: the CPU defaults stay
    assert schedule("screw", cls_lr=1e-3)[3] == 1e-3  # and the user's value still wins


def test_bad_values_are_config_errors():
    with pytest.raises(ConfigError, match="object_mask must be one of"):
        resolve_config("clscnf", "resnet18", {"object_mask": "left"})
    with pytest.raises(ConfigError, match="bn_stats must be one of population, running, got 'ema'"):
        resolve_config("clscnf", "resnet18", {"bn_stats": "ema"})
    with pytest.raises(ConfigError, match="decoder_blocks must be positive"):
        resolve_config("clscnf", "resnet18", {"decoder_blocks": "1,0,1,1"})
    with pytest.raises(ConfigError, match="dtd_root /no/such/dtd is not a folder"):
        resolve_config("clscnf", "resnet18", {"dtd_root": "/no/such/dtd"})
    with pytest.raises(ConfigError, match="in_domain_prob=1.5 is invalid"):
        resolve_config("clscnf", "resnet18", {"in_domain_prob": "1.5"})
    for bad in ({"fusion": "best"}, {"fusion_holdout": "1.0"}, {"fusion_tie_se": "-1"}):
        with pytest.raises(ConfigError, match="fusion must be validation or fixed"):
            resolve_config("clscnf", "resnet18", bad)
    for bad in ({"fusion_grid": "0,-1"}, {"fusion_scalings": "raw,zscore"}):
        with pytest.raises(ConfigError, match="fusion_grid must be weights >= 0"):
            resolve_config("clscnf", "resnet18", bad)
    with pytest.raises(ConfigError, match="cflow position_norm must be one of none, diagonal, gaussian"):
        resolve_config("clscnf", "resnet18", {"position_norm": "full"})
    with pytest.raises(ConfigError, match="decoder_blocks needs 2 entries"):
        tiny(decoder_blocks="1,1,1")
    with pytest.raises(ConfigError, match="fusion_holdout 0.2 leaves 1 of 6 training images .* or --set fusion=fixed"):
        tiny().fit(FeatureStore([torch.zeros(6, 1)]), images=texture_images(6))
    with pytest.raises(ConfigError, match="needs images"):
        tiny().fit(FeatureStore([torch.zeros(2, 1)]))


def test_decoder_shapes():
    dec = Decoder([128, 256, 512], [8, 16, 32], 16, (1, 2, 1, 1))
    feats = [torch.randn(2, c, SIZE // s, SIZE // s) for c, s in ((128, 8), (256, 16), (512, 32))]
    assert dec(feats, SIZE).shape == (2, SIZE, SIZE)
    coarse = Decoder([128, 256, 512], [8, 16, 32], 16, (1, 1), out_stride=4)  # the head at 1/4, then bilinear
    assert coarse(feats, SIZE).shape == (2, SIZE, SIZE) and len(coarse.groups) == 2
    with pytest.raises(ConfigError, match="decoder_stride must be a power of two <= 4, got 3"):
        Decoder([128, 256, 512], [8, 16, 32], 16, (1, 1), out_stride=3)


def test_decoder_resizes_as_torch_bicubic():
    dec = Decoder([128, 256, 512], [8, 16, 32], 16, (1, 2, 1, 1)).eval()
    feats = [torch.randn(2, c, SIZE // s, SIZE // s) for c, s in ((128, 8), (256, 16), (512, 32))]
    with torch.no_grad():
        fast = dec(feats, SIZE)
        dec.resize = lambda t, target: F.interpolate(t, size=target, mode="bicubic", align_corners=True)
        assert (fast - dec(feats, SIZE)).abs().max() <= 1e-5 * fast.abs().max()


def test_classifier_learns_synthetic_defects():
    rng = np.random.default_rng(0)  # 32 plain colour ramps: a defect is any texture on them
    ramp = np.linspace(40, 200, SIZE)[None, None, :] * rng.uniform(0.6, 1.0, (32, 3, 1, 1))
    images = torch.from_numpy(np.clip(ramp + rng.normal(0, 2, (32, 3, SIZE, SIZE)), 0, 255).astype(np.uint8))
    torch.manual_seed(0)
    cfg = resolve_config("clscnf", "tf_efficientnet_lite0", {"decoder_width": 16, "cls_frozen_epochs": 12,
                                                             "cls_finetune_epochs": 3, "batch_size": 8,
                                                             "cls_lr": "3e-3", "coupling_blocks": 1})
    model = create_model("clscnf", create_extractor("tf_efficientnet_lite0", cfg.layers), SIZE, cfg)
    history = model.fit_classifier(images)
    losses = history["classifier_frozen"] + history["classifier_finetune"]
    assert len(losses) == 15 and np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])
    defects = DefectSynthesizer(images)(torch.arange(32), torch.Generator().manual_seed(123))  # unseen defects
    with torch.no_grad():
        prob = torch.sigmoid(model.decoder(model.encoder(defects.images), SIZE))
    assert defects.masks.sum() > 500
    assert prob[defects.masks].mean() > 1.5 * prob[~defects.masks].mean()
    assert roc_auc_score(defects.masks.flatten().numpy(), prob.flatten().numpy()) > 0.7


def test_stages_freeze_and_train_the_right_parameters(images):
    model = tiny(cls_finetune_epochs=0)
    original, encoder, decoder = params(model.extractor), params(model.encoder), params(model.decoder)
    model.fit_classifier(images)
    assert same(params(model.encoder), encoder) and not same(params(model.decoder), decoder)  # frozen epochs

    model = tiny(cls_frozen_epochs=1, cls_finetune_epochs=1, baseline_cnf=False)  # features: unused, a dummy
    history = model.fit(FeatureStore([torch.zeros(len(images), 1)]), images=images)
    assert list(history) == ["classifier_frozen", "classifier_finetune", "cnf", "cnf_refit"]
    assert list(model.stage_seconds) == ["classifier_frozen", "classifier_finetune", "cnf_features", "cnf", "fusion",
                                         "cnf_features_refit", "cnf_refit"]
    assert not same(params(model.encoder), encoder) and same(params(model.extractor), original)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert model.cnf.extractor is model.encoder  # stage 2 runs on the fine-tuned encoder
    # trained in fp32, so on CUDA it also runs in fp32 (no fp16 autocast) for the CNFs and predict, whatever the
    # shared one's precision
    shared = copy.deepcopy(model.extractor)
    shared.precision = "fp16"
    assert model.encoder.precision == create_model("clscnf", shared, SIZE, model.config).encoder.precision == "fp32"

    encoder, decoder, flows = params(model.encoder), params(model.decoder), params(model.cnf.flows)
    model.fit_cnf(images)
    assert same(params(model.encoder), encoder) and same(params(model.decoder), decoder)
    assert not same(params(model.cnf.flows), flows) and torch.isfinite(model.cnf.train_max).all()


@pytest.mark.parametrize("bn_stats,passes", [("population", 1), ("running", 2)])
def test_decoder_batchnorm_statistics(images, bn_stats, passes):
    """population: after training, one more pass of synthetic batches sets every decoder BatchNorm's statistics (the
    batches' average); running: torch's moving average over the training steps. The weights are the same."""
    model = tiny(cls_frozen_epochs=1, cls_finetune_epochs=1, bn_stats=bn_stats)
    model.fit_classifier(images)
    norms = [m for m in model.decoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(int(m.num_batches_tracked) == passes * 2 for m in norms)  # 16 images, batches of 8
    assert not model.decoder.training
    weights = params(model.decoder)
    other = tiny(cls_frozen_epochs=1, cls_finetune_epochs=1, bn_stats="running" if passes == 1 else "population")
    other.fit_classifier(images)
    assert same(params(other.decoder), weights)


def test_fusion_arithmetic_and_parts(images):
    model = tiny(baseline_cnf=True, fusion="fixed")
    store = FeatureStore([f.clone() for f in model.extractor(images)])
    history = model.fit(store, images=images)
    assert list(history)[-1] == "cnf_imagenet"
    model.eval()
    test = texture_images(4)
    pred = model.predict(test)
    cls_score, cls_map = pred.parts["classifier"]
    cnf_score, cnf_map = pred.parts["cnf"]
    assert set(pred.parts) == {"classifier", "cnf", "cnf_imagenet"}
    assert pred.anomaly_map.shape == (4, SIZE, SIZE) and 0 <= cls_map.min() and cls_map.max() <= 1
    assert torch.allclose(pred.anomaly_map, cnf_map + model.config.classifier_weight * cls_map)
    assert torch.equal(pred.score, pred.anomaly_map.flatten(1).amax(1))
    assert torch.equal(cls_score, cls_map.flatten(1).amax(1)) and torch.equal(cnf_score, cnf_map.flatten(1).amax(1))
    heavy = copy.deepcopy(model)
    heavy.fusion_params.copy_(torch.tensor([3.0, 0.5, 2.0, 0.1, 4.0]))  # w, then CNF and classifier mean, std
    assert torch.allclose(heavy.predict(test).anomaly_map, (cnf_map - 0.5) / 2 + 3.0 * (cls_map - 0.1) / 4, atol=1e-5)
    base = model.baseline.predict(test)  # the ImageNet-feature CNFs alone, through CFLOW's own predict
    assert torch.allclose(pred.parts["cnf_imagenet"][1], base.anomaly_map, atol=1e-5)
    heavy.cnf_choice.fill_(1)  # chosen on the held-out images: the ImageNet-feature CNF joins the classifier
    imagenet_map = pred.parts["cnf_imagenet"][1]
    assert torch.allclose(heavy.predict(test).anomaly_map, (imagenet_map - 0.5) / 2 + 3.0 * (cls_map - 0.1) / 4,
                          atol=1e-5)
    assert "= (CNF (ImageNet features) - 0.5) / 2 +" in heavy.protocol()["fusion"]
    heavy.cnf_choice.fill_(2)  # both CNFs, each standardised, then the fusion's own affine
    heavy.ensemble_affine.copy_(torch.tensor([0.2, 3.0, 0.4, 5.0]))
    both = (cnf_map - 0.2) / 3 + (imagenet_map - 0.4) / 5
    assert torch.allclose(heavy.predict(test).anomaly_map, (both - 0.5) / 2 + 3.0 * (cls_map - 0.1) / 4, atol=1e-5)
    assert "(CNF - 0.2) / 3 + (CNF (ImageNet features) - 0.4) / 5" in heavy.protocol()["fusion"]
    assert "procedural textures replace DTD" in model.protocol()["synthetic_defects"]


def test_cli_run_on_the_synthetic_default(tmp_path):
    result = CliRunner().invoke(app, ["run", "--model", "clscnf", "--category", "object", "--image-size", "64",
                                      "--epochs", "1", "--set", "coupling_blocks=2", "--set", "cls_frozen_epochs=1",
                                      "--set", "cls_finetune_epochs=1", "--results-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (path,) = (tmp_path / "runs").glob("clscnf_*_synthetic_object_s0/result.json")
    r = json.loads(path.read_text())
    keys = {"image_auroc", "image_aupr", "pixel_auroc", "pixel_aupr", "aupro"}
    assert set(r["parts"]) == {"classifier", "cnf", "cnf_imagenet"}
    assert all(set(m) == keys for m in r["parts"].values())
    assert all(0 <= v <= 1 for m in [r["metrics"], *r["parts"].values()] for v in m.values())
    assert r["config"]["object_mask"] == "bright" and r["config"]["coupling_blocks"] == 2
    assert set(r["timing"]["fit_stages_s"]) == {"classifier_frozen", "classifier_finetune", "cnf_features", "cnf",
                                                "cnf_imagenet", "fusion", "cnf_features_refit", "cnf_refit",
                                                "cnf_imagenet_refit"}
    assert list(r["loss_history"]) == ["classifier_frozen", "classifier_finetune", "cnf", "cnf_imagenet",
                                       "cnf_refit", "cnf_imagenet_refit"]
    assert r["selection"]["fusion"]["cnf"] in CNF_CHOICES[:2] and not r["config"]["cnf_ensemble"]
    assert all(len(v) == 1 for v in r["loss_history"].values())
    assert "procedural" in r["protocol"]["synthetic_defects"]
    # the fusion weight: chosen on held-out training images, every candidate's held-out AUROC and each part's recorded
    fusion = r["selection"]["fusion"]
    assert fusion["how"].startswith("validation") and r["config"]["fusion"] == "validation"
    assert fusion["n_held_out"] == round(0.2 * r["n_train"])
    assert fusion["n_trained"] + fusion["n_held_out"] == r["n_train"]
    assert fusion["refit"] == f"both CNFs retrained on all {r['n_train']} training images" and r["config"]["refit"]
    assert 0 < fusion["n_defective"] <= fusion["n_held_out"]
    grid = [f"{w:g}" for w in r["config"]["fusion_grid"]]
    assert set(fusion["candidates"]) == {"raw", "standardised"} and all(list(c) == grid
                                                                        for c in fusion["candidates"].values())
    assert fusion["image_auroc"] == fusion["candidates"][fusion["scaling"]][f"{fusion['weight']:g}"]
    assert fusion["image_auroc"] >= fusion["best_image_auroc"] - fusion["tie_margin"] - 1e-12
    assert fusion["best_image_auroc"] == max(v for c in fusion["candidates"].values() for v in c.values())
    fused_cnf = "cnf" if fusion["cnf"] == "finetuned" else "cnf_imagenet"  # w = 0: that CNF alone
    assert set(fusion["alone"]) == {"cnf", "classifier", "cnf_imagenet"}
    assert fusion["alone"][fused_cnf] == fusion["candidates"]["raw"]["0"]
    assert f"+ {fusion['weight']:g} x" in r["protocol"]["fusion"] and "held-out" in r["protocol"]["fusion"]


GRID = ClsCnfConfig().fusion_grid


def spotted(n: int, defective: np.ndarray, g: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """[n, 16, 16] Gaussian noise maps (std 0.5) with a 4x4 spot of +``strength`` on the rows marked defective."""
    maps = torch.randn(n, 16, 16, generator=g) * 0.5
    for i in np.flatnonzero(defective):
        y, x = torch.randint(0, 12, (2,), generator=g).tolist()
        maps[i, y : y + 4, x : x + 4] += strength
    return maps


@pytest.mark.parametrize("seed", range(5))
def test_fusion_weight_follows_the_informative_map(seed):
    g = torch.Generator().manual_seed(seed)
    labels = np.r_[np.zeros(40, int), np.ones(40, int)]
    useful, noise = spotted(80, labels == 1, g), torch.rand(80, 16, 16, generator=g)
    # a classifier map of pure noise: the CNF alone (a plain argmax picks a w > 0 for 4 of 10 such seeds)
    choice = choose_fusion(useful, noise, labels, GRID, names=("cnf", "classifier"))
    assert (choice["weight"], choice["scaling"]) == (0.0, "raw") and choice["image_auroc"] == choice["alone"]["cnf"]
    assert choice == choose_fusion(useful, noise, labels, GRID, names=("cnf", "classifier"))  # deterministic
    exact = choose_fusion(useful, noise, labels, GRID, tie_se=0)
    assert exact["image_auroc"] == exact["best_image_auroc"] >= choice["image_auroc"]  # the plain argmax
    # a useless CNF map: the classifier leads
    choice = choose_fusion(torch.randn(80, 16, 16, generator=g) * 0.5, useful, labels, GRID)
    assert choice["weight"] >= 2 and choice["alone"]["extra"] > 0.85 > 0.65 > choice["alone"]["base"]
    # each part sees half the defects, and the classifier's map is 1000x smaller: a raw w of at most 10 cannot use
    # it; standardised maps can, and the fusion beats both parts
    kind = np.r_[np.zeros(40, int), np.tile([1, 2], 20)]
    cnf, cls = spotted(80, kind == 1, g, 1.5), spotted(80, kind == 2, g, 1.5) * 1e-3
    choice = choose_fusion(cnf, cls, labels, GRID, names=("cnf", "classifier"))
    assert choice["scaling"] == "standardised" and choice["weight"] > 0
    assert choice["image_auroc"] > max(choice["alone"].values()) + 0.05
    assert max(choice["candidates"]["raw"].values()) < choice["alone"]["cnf"] + 0.02
    assert choice["stats"]["classifier"]["std"] == pytest.approx(5e-4, rel=0.2) and choice["affine"] == [
        *choice["stats"]["cnf"].values(), *choice["stats"]["classifier"].values()]
    with pytest.raises(ConfigError, match="needs normal and defective validation images"):
        choose_fusion(cnf, cls, np.zeros(80, int), GRID)


@pytest.mark.parametrize("refit", [True, False])
def test_held_out_images_are_never_trained_on(images, monkeypatch, refit):
    """Both stages train on the kept images and the choice is made on the held-out ones; with ``refit`` fresh CNFs
    then train on every image (the choice and the classifier stay)."""
    torch.manual_seed(1)
    keep, held = held_out_rows(len(images), 0.2)
    torch.manual_seed(2)
    assert all(np.array_equal(a, b) for a, b in zip((keep, held), held_out_rows(len(images), 0.2), strict=True))
    assert len(held) == 3 and not set(keep) & set(held) and len(keep) + len(held) == len(images)
    model = tiny(baseline_cnf=True, cnf_ensemble=True, refit=refit)
    seen: dict[str, list] = {}

    def spy(name, method):
        def call(*args, **kwargs):
            seen.setdefault(name, []).append(args[:2])
            return method(*args, **kwargs)
        monkeypatch.setattr(model, name, call)

    first, chosen = (model.cnf, model.baseline), {}

    def select(held, n, progress=None):  # the choice is made with the first CNFs, and the refit keeps it
        assert model.cnf is first[0] and model.baseline is first[1]
        select_fusion(held, n)
        chosen.update(params=model.fusion_params.clone(), affine=model.ensemble_affine.clone(),
                      pick=int(model.cnf_choice))

    select_fusion = model.select_fusion
    monkeypatch.setattr(model, "select_fusion", select)
    for name in ("fit_classifier", "select_fusion"):
        spy(name, getattr(model, name))
    spy("fit_cnfs", lambda *args, **kwargs: {"cnf": [], "cnf_imagenet": []})  # untrained CNFs still make maps
    built = []  # the held-out set with its synthetic defects is built once for both CNFs
    monkeypatch.setattr(validation, "synthetic_set", lambda *a, **k: built.append(1) or synthetic_set(*a, **k))
    store = FeatureStore([torch.arange(len(images), dtype=torch.float32).view(-1, 1)])  # row i holds i
    history = model.fit(store, images=images)
    assert len(built) == 1
    assert torch.equal(seen["fit_classifier"][0][0], images[keep]) and torch.equal(seen["fit_cnfs"][0][0], images[keep])
    assert seen["fit_cnfs"][0][1].tensors[0].flatten().long().tolist() == keep.tolist()
    assert torch.equal(seen["select_fusion"][0][0], images[held])
    fusion = model.selection["fusion"]
    assert (fusion["n_trained"], fusion["n_held_out"]) == (len(keep), len(held))
    assert set(fusion["alone"]) == {"cnf", "classifier", "cnf_imagenet", "cnf+cnf_imagenet"}  # the same set
    ft, im = fusion["cnf_image_auroc"]["finetuned"], fusion["cnf_image_auroc"]["imagenet"]
    assert fusion["cnf"] == ("both" if abs(ft - im) <= fusion["tie_margin_cnf"] else "imagenet" if im > ft
                             else "finetuned") == CNF_CHOICES[int(model.cnf_choice)]
    assert fusion["image_auroc"] == fusion["cnf_image_auroc"][fusion["cnf"]]
    assert len(seen["fit_cnfs"]) == 1 + refit and ("cnf_refit" in history) == refit == ("refit" in fusion)
    assert (model.cnf is first[0], model.baseline is first[1]) == (not refit, not refit)
    assert torch.equal(model.fusion_params, chosen["params"]) and torch.equal(model.ensemble_affine, chosen["affine"])
    assert int(model.cnf_choice) == chosen["pick"]
    if refit:  # fresh CNFs on every image, the same config; the fine-tuned one on the fine-tuned encoder
        assert torch.equal(seen["fit_cnfs"][1][0], images) and seen["fit_cnfs"][1][1] is store
        assert model.cnf.config == first[0].config and model.cnf.extractor is model.encoder
        assert model.baseline.extractor is model.extractor


@pytest.mark.parametrize(("ft", "im", "ensemble", "pick"), [(0.90, 0.95, True, "imagenet"), (0.95, 0.90, True,
                         "finetuned"), (0.95, 0.95, False, "finetuned"), (0.95, 0.949, True, "both"),
                         (0.95, 0.949, False, "finetuned"), (0.949, 0.95, False, "imagenet")])
def test_two_cnfs_that_tie_on_the_held_out_images_are_both_fused(images, monkeypatch, ft, im, ensemble, pick):
    """The CNF part: the higher held-out choice, or with ``cnf_ensemble`` both CNFs' standardised sum when the two
    tie within one standard error (about 0.016 of AUROC at 0.95 on 100 + 100 images); w comes with the choice."""
    model = tiny(baseline_cnf=True, cnf_ensemble=ensemble)
    records = {"cnf": (ft, 0.1), "cnf_imagenet": (im, 0.2), "cnf+cnf_imagenet": (0.96, 0.3)}
    if not ensemble:
        del records["cnf+cnf_imagenet"]

    def fake(part_maps, held, bases, extra, *args, **kwargs):
        assert extra == "classifier" and ["+".join(b) if isinstance(b, tuple) else b for b in bases] == [*records]
        return {name: {"image_auroc": auroc, "weight": w, "affine": [0.0, 1.0, 0.0, 1.0], "alone": {name: auroc},
                       "n_defective": 100, "n_held_out": 100, **({"sum_affine": [1.0, 2.0, 3.0, 4.0]} if "+" in name
                                                                  else {})} for name, (auroc, w) in records.items()}

    monkeypatch.setattr(clscnf, "held_out_fusion", fake)
    model.select_fusion(images[:2], 10)
    fusion, key = model.selection["fusion"], ("cnf", "cnf_imagenet", "cnf+cnf_imagenet")[CNF_CHOICES.index(pick)]
    assert fusion["cnf"] == CNF_CHOICES[int(model.cnf_choice)] == pick
    assert (fusion["image_auroc"], model.fusion_params[0].item()) == pytest.approx(records[key])
    assert fusion["cnf_image_auroc"] == dict(zip(CNF_CHOICES, (v[0] for v in records.values()), strict=False))
    assert model.ensemble_affine.tolist() == ([1.0, 2.0, 3.0, 4.0] if pick == "both" else [0.0, 1.0, 0.0, 1.0])


def test_held_out_fusion_sums_standardised_maps(images):
    def part_maps(batch):
        x = batch.float().mean(1)
        return {"a": x, "b": 10 * x.flip(-1) + 3, "c": x.pow(2)}

    out = held_out_fusion(part_maps, images[:6], ["a", ("a", "b")], "c", (0.0, 1.0), tie_se=0, batch_size=4)
    data = synthetic_set(images[:6])
    normal, maps = torch.from_numpy(data["label"] == 0), part_maps(data["image"])
    stats = [v for m in (maps["a"], maps["b"]) for v in (float(m[normal].mean()), float(m[normal].std()))]
    assert set(out) == {"a", "a+b"} and "sum_affine" not in out["a"]
    assert out["a+b"]["sum_affine"] == pytest.approx(stats, rel=1e-5)
    both = (maps["a"] - stats[0]) / stats[1] + (maps["b"] - stats[2]) / stats[3]
    assert out["a+b"]["alone"]["a+b"] == pytest.approx(roc_auc_score(data["label"], both.flatten(1).amax(1)))


def test_fusion_weight_is_chosen_from_the_grid_deterministically(images):
    grid = (0.0, 0.5, 4.0)

    def trained():
        np.random.seed(0)  # FrEIA draws its permutations from numpy
        model = tiny(fusion_grid="0,0.5,4", baseline_cnf=False)  # and tiny seeds torch: the same training every time
        model.fit(FeatureStore([torch.zeros(len(images), 1)]), images=images)
        return model

    first, second = trained(), trained()
    a, b = first.selection["fusion"], second.selection["fusion"]
    assert a == b and a["weight"] in grid and list(a["candidates"]["raw"]) == ["0", "0.5", "4"]
    assert first.fusion_params.tolist() == [a["weight"], *a["affine"]]
    first.eval()
    pred = first.predict(texture_images(3))
    (_, cnf_map), (_, cls_map) = pred.parts["cnf"], pred.parts["classifier"]
    m_c, s_c, m_k, s_k = a["affine"]
    assert torch.allclose(pred.anomaly_map, (cnf_map - m_c) / s_c + a["weight"] * (cls_map - m_k) / s_k, atol=1e-4)


def test_preset_paper_keeps_their_fixed_weight_and_trains_on_every_image(images):
    for category, w in (("cable", 0.05), ("zipper", 0.15), ("grid", 1.0)):
        paper = resolve_config("clscnf", "resnet18", preset="paper", dataset="mvtec", category=category)
        assert (paper.fusion, paper.classifier_weight) == ("fixed", w)
    assert resolve_config("clscnf", "resnet18", preset="paper", dataset="btad", category="02").classifier_weight == 0.05
    assert resolve_config("clscnf", "resnet18", dataset="mvtec", category="cable").fusion == "validation"
    model = tiny(fusion="fixed", classifier_weight="0.3", baseline_cnf=False)
    model.fit(FeatureStore([torch.zeros(len(images), 1)]), images=images)
    assert model.selection["fusion"] == {"how": "fixed: classifier_weight (their W_FE for MVTec/BTAD), raw sum",
                                         "weight": 0.3, "scaling": "raw", "n_trained": len(images)}
    assert "fusion" not in model.stage_seconds and "+ 0.3 x classifier" in model.protocol()["fusion"]
    model.eval()
    pred = model.predict(texture_images(2))
    assert torch.allclose(pred.anomaly_map, pred.parts["cnf"][1] + 0.3 * pred.parts["classifier"][1])


def test_cflow_named_options_reach_both_cnfs():
    """position_norm and map_blur (CFLOW-AD's named options) configure the fine-tuned and the ImageNet CNFs alike;
    at their defaults a cell key does not name them."""
    from adbench.runner import _config_part

    model = tiny(position_norm="gaussian", map_blur="4", baseline_cnf="true")
    for cnf in (model.cnf, model.baseline):
        assert (cnf.config.position_norm, cnf.config.map_blur) == ("gaussian", 4.0) and cnf.position is not None
    assert tiny().cnf.position is None
    assert not {"position_norm", "map_blur"} & set(_config_part(tiny().config))
