"""Oh & Kim (IEEE Access 2024): a pixelwise classifier on synthetic defects fine-tunes the extractor that CFLOW flows
then use; the two anomaly maps are fused. Official code: seungmi-oh/AD-CLSCNFs (``train_methods/finetune_enc.py``,
``train_CNFs_finetune.py``, ``evaluate.py``, ``custom_models/wideresnet50_dec.py``, ``run_scripts/*/*.sh``).

- stage 1: a U-Net-like decoder on the extractor's stages (the CNF stages) predicts, per pixel, a sigmoid defect
  probability of DRAEM-style synthetic defects (``adbench.defects``), BCE with soft labels; one Adam over encoder and
  decoder, the encoder run without gradients for the first ``cls_frozen_epochs`` and trained jointly afterwards; the
  encoder's BatchNorm stays in eval mode (ImageNet statistics, as their ``encoder.eval()``) while its weights learn.
  The encoder is a copy of the shared extractor, which itself stays frozen;
- stage 2: CFLOW flows (``models.cflow``, 6 coupling blocks) on the normal training images through the fine-tuned
  encoder, maps normalised by the training-set maximum;
- fusion: joint map = CNF map + w * classifier map, image score = joint max. Their w is per category (their scripts,
  ``--preset paper``); adbench's default chooses w, whether the two maps are standardised before the sum, and which
  CNF (fine-tuned or ImageNet features, ``baseline_cnf``, or both where they tie, ``cnf_ensemble``) on a fixed
  held-out part of the training images with synthetic defects (``fusion``), never on test labels; then both CNFs
  train again on every training image (``refit``).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from adbench.defects import OBJECT_MASK_MODES, DefectSynthesizer
from adbench.errors import ConfigError
from adbench.features import FeatureExtractor, FeatureStore
from adbench.models._batchnorm import population_batchnorm
from adbench.models._clscnf_paper import NO_FILL, OBJECT_MASK, PAPER_CLASSES, W_FE
from adbench.models._decoder import Decoder
from adbench.models._registry import Detector, Prediction, register_model
from adbench.models.cflow import CFlow, CFlowConfig, cosine_lr_factor
from adbench.progress import NULL_PROGRESS, Progress
from adbench.train import Stage, run_stage
from adbench.validation import FUSION_SCALINGS, auroc_se, held_out_fusion, held_out_rows

CNF_CHOICES = ("finetuned", "imagenet", "both")  # the joint map's CNF part (``cnf_choice``); both: standardised sum
_CNF_KEYS = ("cnf", "cnf_imagenet", "cnf+cnf_imagenet")  # each choice's record in ``held_out_fusion``'s answer
_CNF_FIELDS = ("layers", "coupling_blocks", "condition_dims", "clamp", "permute_soft", "fiber_batch", "lr",
               "batch_size", "epochs", "warmup_epochs", "position_norm", "map_blur")  # the CNFs' CFlowConfig fields


@dataclass(frozen=True)
class ClsCnfConfig:
    """Hyperparameters; defaults from the official code (MVTec scripts) unless marked adbench (CPU budget)."""

    layers: tuple[int, ...] = (2, 3, 4)  # their ``-pl 1 2 3``: layer2-4 (strides 8-32), shared by decoder and CNFs
    batch_size: int = 32  # their ``-bs 32`` (both stages on MVTec)
    # stage 1: pixelwise classifier on synthetic defects
    cls_frozen_epochs: int = 3  # passes with fresh defects, encoder frozen; theirs 85 meta x 2 sub x 5 repeats = 850
    cls_finetune_epochs: int = 1  # passes training encoder + decoder; theirs 15 x 2 x 5 = 150 (preset "paper")
    cls_lr: float = 1e-3  # their ``--lr 1e-4`` for ``fe_only`` (preset "paper"), Adam, cosine to lr * 0.1^3, no
    # warm-up; adbench CPU 1e-3: the CPU schedule has ~300x fewer steps, and at 1e-4 the decoder barely leaves
    # the base rate in a few epochs (measured on tiny data; tests/test_clscnf.py)
    cls_encoder_lr: float = 1e-4  # the encoder's rate while fine-tuned: their one Adam runs encoder and decoder at
    # ``--lr 1e-4``; adbench keeps the encoder there while the CPU schedule's decoder runs at cls_lr (with the encoder
    # at 1e-3 too, the CNF on the fine-tuned features fell to 67.9 Img AUROC on MTD, 83.8 on ImageNet's; README)
    cls_weight_decay: float = 1e-4  # their ``--w_decay`` (5e-4 for BTAD 01/03)
    decoder_width: int = 64  # their 128 (``up_layers_channel_init``; level outputs 2w, w, w/2, w/4); adbench CPU 64
    decoder_stride: int = 4  # their 1 (head at full resolution); adbench CPU 4: head at 1/4, logits bilinear to the
    # input (on 2 cores the bicubic steps and narrow convs at 128-256 px cost more than the whole encoder)
    decoder_blocks: tuple[int, ...] = (1, 1)  # bottlenecks per level; their [3, 6, 4, 3] (stride 1); CPU 1 per level
    soft_labels: bool = True  # their ``smooth_cls``: label = mean sigmoid(5 colour change) of the region; False = 1
    in_domain_prob: float = 0.5  # their ``use_in_domain_data yes``: source = another normal image half the time
    dtd_root: str = ""  # a DTD (or any texture) folder; empty: procedural textures instead (DTD is not downloadable)
    object_mask: str = "none"  # Otsu foreground: none/dark/bright, per MVTec/BTAD category from their class lists
    fill_holes: bool = True  # fill holes of the object mask (not for grid, metal_nut, BTAD 01)
    beta_max: float = 0.8  # blend opacity beta ~ U(0, 0.8) (DRAEM)
    bn_stats: str = "population"  # decoder BatchNorm at inference: Ioffe & Szegedy's Alg. 2 statistics over one more
    # pass of synthetic training batches; "running": torch's moving average (theirs), mostly the last ~20 batches
    # stage 2: CFLOW flows on the fine-tuned encoder
    coupling_blocks: int = 6  # their ``-cb 6`` (CFLOW: 8)
    condition_dims: int = 128  # their ``condition_vec``
    clamp: float = 1.9  # their ``clamp_alpha``
    permute_soft: bool = False  # theirs True; adbench: hard permutation (see models/cflow.py), preset "paper" True
    fiber_batch: int = 256  # their ``--p_bs``
    lr: float = 2e-4  # their default ``--lr`` for ``nf_only`` (BTAD scripts 2e-5-1e-4)
    epochs: int = 1  # CNF passes; theirs 25 meta x 8 sub = 200 (CFLOW on MTD gains 0.4 Img AUROC from 1 to 3)
    warmup_epochs: int = 0  # theirs 2 meta-epochs = 16 passes from lr/10 (preset "paper")
    position_norm: str = "none"  # theirs: the CNFs on raw features; adbench named options for both CNFs, CFLOW-AD's
    map_blur: float = 0.0  # (models/cflow.py): "gaussian" whitens each position first; map_blur blurs the CNF map
    baseline_cnf: bool = True  # adbench: also train CNFs on the frozen ImageNet features (part "cnf_imagenet",
    # their ``base-nf_only``), and with fusion "validation" fuse whichever CNF scores higher on the held-out images
    # (ties: the fine-tuned one, theirs): at the CPU budget the fine-tuning may cost the CNF more than it gives (MTD:
    # results/sweep_mtd.md); +1 CNF training, about 20 % of the fit on MTD. False: the fine-tuned CNF only
    cnf_ensemble: bool = False  # adbench option, prompted by MTD seed 2's test result: with baseline_cnf and fusion
    # "validation", where the two CNFs' held-out choices tie within fusion_tie_se standard errors, the joint map's CNF
    # part is the sum of both CNF maps, each standardised by the normal held-out pixels. Off: on MTD's held-out images
    # the sum scored below the better CNF on 5 of 6 runs (results/clscnf_mtd.md)
    fusion: str = "validation"  # adbench: w and the scaling chosen on held-out training images with synthetic
    # defects (their per-category w looks tuned on test sets, and for their schedule); "fixed": classifier_weight,
    # the raw sum (preset "paper")
    fusion_holdout: float = 0.2  # training images held out for that choice (the same draw for every seed): 20 %, as
    # the MTD validation sweeps; about 150 normal + 150 defective images on MTD, both stages train on the rest first
    fusion_grid: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.6, 1.0, 2.0, 5.0, 10.0)  # 0 = the CNF
    # alone, their W_FE values (0.05-1) and 0.2, then the classifier leading (2-10); small, so little to overfit
    fusion_scalings: tuple[str, ...] = FUSION_SCALINGS  # raw sum (theirs) and/or standardised maps (each by its
    # normal held-out pixels' mean and std): the CNF map's spread is not the sigmoid's, so a raw w may weigh little
    refit: bool = True  # adbench, fusion "validation": after the held-out choice the CNF(s) train again, from
    # scratch, on every training image (the paper's CNFs see the whole training set; choose on held-out, then refit,
    # as model selection does); the choice and the held-out map statistics stay (each CNF map is scaled by its own
    # training maximum); the classifier and fine-tuned encoder stay as trained on the rest (a 2nd stage 1: 2x fit)
    fusion_tie_se: float = 1.0  # candidates within this many standard errors of the best held-out AUROC tie, and a
    # tie goes to the smallest w (the one-standard-error rule): without it a pure-noise map often wins a w > 0
    classifier_weight: float = 1.0  # fusion "fixed": their ``--w_fe`` per category (W_FE), elsewhere 1.0
    # added later: runs made before them keep their cell keys (adbench.runner._config_part)
    KEY_SKIP_AT_DEFAULT: ClassVar[tuple[str, ...]] = ("position_norm", "map_blur", "cnf_ensemble")
    VALUE_BEFORE: ClassVar[dict] = {"bn_stats": "running", "refit": False}  # what runs made before them ran with

    def __post_init__(self) -> None:
        for name, valid in (("object_mask", OBJECT_MASK_MODES), ("bn_stats", ("population", "running"))):
            if getattr(self, name) not in valid:
                raise ConfigError(f"clscnf {name} must be one of {', '.join(valid)}, got {getattr(self, name)!r}")
        if not self.decoder_blocks or min(self.decoder_blocks) < 1:
            raise ConfigError(f"clscnf decoder_blocks must be positive counts, got {self.decoder_blocks}")
        if self.dtd_root and not Path(self.dtd_root).is_dir():  # checked before any work
            raise ConfigError(f"clscnf dtd_root {self.dtd_root} is not a folder")
        if self.fusion not in ("validation", "fixed") or not 0 < self.fusion_holdout < 1 or self.fusion_tie_se < 0:
            raise ConfigError(f"clscnf fusion must be validation or fixed, fusion_holdout in (0, 1), fusion_tie_se >= "
                              f"0; got {self.fusion!r}, {self.fusion_holdout}, {self.fusion_tie_se}")
        CFlowConfig(position_norm=self.position_norm, map_blur=self.map_blur)  # checks the CNFs' options now
        if not self.fusion_grid or min(self.fusion_grid) < 0 or not set(self.fusion_scalings) <= {*FUSION_SCALINGS}:
            raise ConfigError(f"clscnf fusion_grid must be weights >= 0 and fusion_scalings of {FUSION_SCALINGS}, "
                              f"got {self.fusion_grid}, {self.fusion_scalings}")


def encode(extractor: FeatureExtractor, images: torch.Tensor) -> list[torch.Tensor]:
    """The extractor's features with autograd (its ``forward`` runs without): [0, 1] floats in, normalised here.

    Their encoder's convolutions pad by reflection; timm's zero padding is kept here (the ImageNet weights were
    trained with it, and the CNFs and the shared extractor see the same features)."""
    return extractor.net((images - extractor.mean) / extractor.std)


@register_model("clscnf")
class ClsCnf(Detector):
    """Pixelwise classifier + CNFs on a shared, fine-tuned extractor; maps fused."""

    Config = ClsCnfConfig
    # their MVTec scripts: (85 + 15) meta x 2 sub x 5 repeats classifier passes, 25 x 8 CNF passes, 2 x 8 warm-up
    PRESETS = {"paper": {"cls_frozen_epochs": 850, "cls_finetune_epochs": 150, "cls_lr": 1e-4, "cls_encoder_lr": 1e-4,
                         "decoder_width": 128, "decoder_stride": 1, "decoder_blocks": (3, 6, 4, 3), "epochs": 200,
                         "warmup_epochs": 16, "permute_soft": True, "baseline_cnf": True, "fusion": "fixed",
                         "refit": False}}  # fixed fusion: every stage trains on every image, nothing to refit
    CATEGORY_DEFAULTS = {key: {"classifier_weight": W_FE.get(key, 1.0), "object_mask": OBJECT_MASK[key],
                               "fill_holes": key not in NO_FILL} for key in OBJECT_MASK}
    PRESET_CATEGORIES = {"paper": PAPER_CLASSES}
    needs_images = True

    def __init__(self, extractor: FeatureExtractor, image_size: int, config: ClsCnfConfig) -> None:
        super().__init__(extractor, image_size, config)
        self.encoder = copy.deepcopy(extractor)  # fine-tuned in stage 1; the shared extractor stays as it is
        self.encoder.precision = "fp32"  # trained in fp32 (``encode``), so its CNF features and maps are fp32 too
        self.decoder = Decoder(extractor.channels, extractor.strides, config.decoder_width, config.decoder_blocks,
                               config.decoder_stride)
        flow_cfg = CFlowConfig(**{name: getattr(config, name) for name in _CNF_FIELDS})
        self.cnf = CFlow(self.encoder, image_size, flow_cfg)
        self.baseline = CFlow(extractor, image_size, flow_cfg) if config.baseline_cnf else None
        # joint = (CNF - a) / b + w (classifier - c) / d: [w, a, b, c, d], raw sum until ``select_fusion``
        self.register_buffer("fusion_params", torch.tensor([config.classifier_weight, 0.0, 1.0, 0.0, 1.0],
                                                             dtype=torch.float64))
        self.register_buffer("cnf_choice", torch.tensor(0))  # the joint map's CNF part: an index of CNF_CHOICES
        self.register_buffer("ensemble_affine", torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64))  # "both"
        self.stage_seconds: dict[str, float] = {}
        self.source_counts: dict[str, int] = {}
        self.selection: dict[str, dict] = {}  # what fit chose and on what (the result's ``selection``)

    def fit(self, features: FeatureStore, progress: Progress = NULL_PROGRESS,
            images: torch.Tensor | None = None) -> dict[str, list[float]]:
        if images is None:
            raise ConfigError("clscnf trains on the training images: fit needs images=")
        cfg, held, every = self.config, None, (images, features)
        if cfg.fusion == "validation":  # both stages (and the baseline) train on the rest only
            keep, held = held_out_rows(len(images), cfg.fusion_holdout, "clscnf fusion_holdout",
                                       "hold out more, or --set fusion=fixed")
            images, held = images[keep], images[held]
            if self.baseline is not None:
                features = FeatureStore([t[torch.from_numpy(keep)] for t in features.tensors])
        history = self.fit_classifier(images, progress)
        history.update(self.fit_cnfs(images, features, progress))
        if held is None:
            self.selection = {"fusion": {"how": "fixed: classifier_weight (their W_FE for MVTec/BTAD), raw sum",
                                         "weight": cfg.classifier_weight, "scaling": "raw", "n_trained": len(images)}}
            return history
        self.select_fusion(held, len(images), progress)
        if cfg.refit:  # fresh CNFs (same config) on every image; the held-out ones were scored by the first ones
            self.cnf = CFlow(self.encoder, self.image_size, self.cnf.config).to(self.device)
            if self.baseline is not None:
                self.baseline = CFlow(self.extractor, self.image_size, self.baseline.config).to(self.device)
            history.update({f"{k}_refit": v for k, v in self.fit_cnfs(*every, progress, "_refit").items()})
            which = "both CNFs" if self.baseline is not None else "the CNF"
            self.selection["fusion"]["refit"] = f"{which} retrained on all {len(every[0])} training images"
        return history

    def fit_cnfs(self, images: torch.Tensor, features: FeatureStore, progress: Progress = NULL_PROGRESS,
                 tag: str = "") -> dict[str, list[float]]:
        """Stage 2: the CNF on the fine-tuned encoder and, with ``baseline_cnf``, the one on ImageNet's features."""
        history = {"cnf": self.fit_cnf(images, progress, tag)}
        if self.baseline is not None:
            t0 = time.perf_counter()
            history["cnf_imagenet"] = self.baseline.fit(features, progress)["cflow"]
            self.stage_seconds[f"cnf_imagenet{tag}"] = time.perf_counter() - t0
        return history

    def fit_classifier(self, images: torch.Tensor, progress: Progress = NULL_PROGRESS) -> dict[str, list[float]]:
        """Stage 1: one Adam over decoder + encoder; the encoder gets gradients only after the frozen epochs."""
        cfg, device = self.config, self.device
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
        synth = DefectSynthesizer(images, dtd_root=cfg.dtd_root or None, in_domain_prob=cfg.in_domain_prob,
                                  object_mask=cfg.object_mask, fill_holes=cfg.fill_holes, beta_max=cfg.beta_max,
                                  soft_labels=cfg.soft_labels)
        store = FeatureStore([images])  # only for its shuffled index batches
        epochs = cfg.cls_frozen_epochs + cfg.cls_finetune_epochs
        starts: list[float] = []

        def batches(epoch: int):
            starts.append(time.perf_counter())
            self.encoder.net.requires_grad_(epoch >= cfg.cls_frozen_epochs)
            for idx in store.index_batches(cfg.batch_size, gen):
                d = synth(idx, gen)
                yield d.images.to(device), d.labels[:, 0].to(device), epoch >= cfg.cls_frozen_epochs

        def loss(batch) -> torch.Tensor:
            x, y, tune = batch
            with torch.set_grad_enabled(tune):
                feats = encode(self.encoder, x)
            # their Sigmoid + BCELoss, computed from the logits (same value, stable)
            return F.binary_cross_entropy_with_logits(self.decoder(feats, self.image_size), y)

        self.decoder.train()
        params = [{"params": self.decoder.parameters()},
                  {"params": self.encoder.net.parameters(), "lr": cfg.cls_encoder_lr}]
        stage = Stage(name="classifier", params=params, loss=loss, batches=batches, epochs=epochs, lr=cfg.cls_lr,
                      weight_decay=cfg.cls_weight_decay, lr_factor=lambda e: cosine_lr_factor(e, epochs))
        try:
            losses = run_stage(stage, progress)
        finally:
            self.encoder.net.requires_grad_(False)
        if cfg.bn_stats == "population":  # one more pass of fresh synthetic batches, no weight changes
            population_batchnorm(self.decoder, (encode(self.encoder, synth(idx, gen).images.to(device))
                                                for idx in store.index_batches(cfg.batch_size, gen)),
                                 forward=lambda feats: self.decoder(feats, self.image_size))
        self.decoder.eval()
        starts.append(time.perf_counter())
        split = min(cfg.cls_frozen_epochs, epochs)
        self.stage_seconds["classifier_frozen"] = starts[split] - starts[0] if epochs else 0.0
        self.stage_seconds["classifier_finetune"] = starts[-1] - starts[split] if epochs else 0.0
        self.source_counts = dict(sorted(synth.source_counts.items()))
        return {"classifier_frozen": losses[:split], "classifier_finetune": losses[split:]}

    def fit_cnf(self, images: torch.Tensor, progress: Progress = NULL_PROGRESS, tag: str = "") -> list[float]:
        """Stage 2: features of the normal images through the fine-tuned encoder, then CFLOW training on them."""
        t0 = time.perf_counter()
        parts = []
        with progress.task("features (fine-tuned encoder)", total=len(images)) as advance:
            for start in range(0, len(images), self.config.batch_size):
                batch = images[start : start + self.config.batch_size]
                parts.append([f.cpu() for f in self.encoder(batch.to(self.device))])
                advance(len(batch))
        store = FeatureStore([torch.cat(layer) for layer in zip(*parts, strict=True)])
        t1 = time.perf_counter()
        history = self.cnf.fit(store, progress)["cflow"]
        self.stage_seconds[f"cnf_features{tag}"], self.stage_seconds[f"cnf{tag}"] = t1 - t0, time.perf_counter() - t1
        return history

    @torch.no_grad()
    def select_fusion(self, held: torch.Tensor, n_trained: int, progress: Progress = NULL_PROGRESS) -> None:
        """Choose w and the scaling (``choose_fusion``) on ``held`` [N, 3, S, S] uint8 (training images neither stage
        saw), as they are and with one synthetic defect each; sets ``fusion_params``, records ``selection``."""
        t0, cfg = time.perf_counter(), self.config
        self.eval()
        bases: list[str | tuple[str, str]] = ["cnf"]  # and the ImageNet CNF, both CNFs' sum: same classifier and set
        if self.baseline is not None:
            bases += ["cnf_imagenet", ("cnf", "cnf_imagenet")] if cfg.cnf_ensemble else ["cnf_imagenet"]
        choices = held_out_fusion(self.part_maps, held, bases, "classifier", cfg.fusion_grid, cfg.fusion_scalings,
                                  tie_se=cfg.fusion_tie_se, batch_size=cfg.batch_size, progress=progress,
                                  object_mask=cfg.object_mask, fill_holes=cfg.fill_holes)
        choice = choices["cnf"]
        if self.baseline is not None:  # which CNF part (CNF_CHOICES), by the CNFs' fused held-out AUROCs
            ft, im = choice["image_auroc"], choices["cnf_imagenet"]["image_auroc"]
            margin = cfg.fusion_tie_se * auroc_se(max(ft, im), choice["n_defective"], choice["n_held_out"])
            pick = 2 if cfg.cnf_ensemble and abs(ft - im) <= margin else int(im > ft)  # else ties: fine-tuned, theirs
            self.cnf_choice.fill_(pick)
            self.ensemble_affine.copy_(torch.tensor(choices[_CNF_KEYS[pick]].get("sum_affine", [0.0, 1.0, 0.0, 1.0]),
                                                    dtype=torch.float64))
            held_out = {c: choices[k]["image_auroc"] for c, k in zip(CNF_CHOICES, _CNF_KEYS, strict=True)
                        if k in choices}
            choice = {**choices[_CNF_KEYS[pick]], "cnf": CNF_CHOICES[pick], "cnf_image_auroc": held_out,
                      "alone": {k: v for c in choices.values() for k, v in c["alone"].items()},
                      **({"tie_margin_cnf": margin} if cfg.cnf_ensemble else {})}
        self.fusion_params.copy_(torch.tensor([choice["weight"], *choice["affine"]], dtype=torch.float64))
        self.selection = {"fusion": {**choice, "n_trained": n_trained}}
        self.stage_seconds["fusion"] = time.perf_counter() - t0

    def fuse(self, cnf_map: torch.Tensor, cls_map: torch.Tensor) -> torch.Tensor:
        """Joint map = CNF map + w * classifier map (their ``aggregate_anomaly_score_map``), each map standardised
        first when that was chosen (``fusion_params``)."""
        w, a, b, c, d = self.fusion_params.tolist()
        return (cnf_map - a) / b + w * (cls_map - c) / d

    @torch.no_grad()
    def part_maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each part's map [B, S, S]: classifier (sigmoid) and CNF, one pass of the fine-tuned encoder feeding both,
        and with ``baseline_cnf`` the CNFs on the frozen ImageNet features (``cnf_imagenet``)."""
        images = images.to(self.device)
        feats = self.encoder(images)
        maps = {"classifier": torch.sigmoid(self.decoder(feats, self.image_size)), "cnf": self.cnf.features_map(feats)}
        if self.baseline is not None:
            maps["cnf_imagenet"] = self.baseline.features_map(self.extractor(images))
        return maps

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        maps = self.part_maps(images)
        pick, (m1, s1, m2, s2) = int(self.cnf_choice), self.ensemble_affine.tolist()
        cnf = (maps["cnf"] - m1) / s1 + (maps["cnf_imagenet"] - m2) / s2 if pick == 2 else maps[_CNF_KEYS[pick]]
        joint = self.fuse(cnf, maps["classifier"])
        parts = {name: (m.flatten(1).max(1).values, m) for name, m in maps.items()}
        return Prediction(score=joint.flatten(1).max(1).values, anomaly_map=joint, parts=parts)

    def protocol(self) -> dict[str, str]:
        cfg, (w, a, b, c, d) = self.config, self.fusion_params.tolist()
        sources = ", ".join(f"{k} {v}" for k, v in self.source_counts.items())
        m1, s1, m2, s2 = self.ensemble_affine.tolist()
        name = ("CNF", "CNF (ImageNet features)", f"[(CNF - {m1:.4g}) / {s1:.4g} + (CNF (ImageNet features) - "
                f"{m2:.4g}) / {s2:.4g}]")[int(self.cnf_choice)]
        cnf, cls = (name, "classifier") if (a, b, c, d) == (0, 1, 0, 1) else \
            (f"({name} - {a:.4g}) / {b:.4g}", f"(classifier - {c:.4g}) / {d:.4g}")
        how = "chosen on held-out training images" if cfg.fusion == "validation" else "fixed"
        return {
            "fusion": f"joint map = {cnf} + {w:g} x {cls} (maps: CNF, classifier sigmoid); image score = joint map "
                      f"max; w {how} (result selection.fusion); parts: classifier / CNF alone (each its map max)",
            "map_normalization": "CNF: training-set maximum per stage (maps do not depend on the test set)",
            "synthetic_defects": f"sources per training sample ({sources}); "
                                 + (f"textures from {cfg.dtd_root}" if cfg.dtd_root else
                                    "no dtd_root: procedural textures replace DTD")
                                 + f"; object mask {cfg.object_mask}",
            "encoder": "copy of the extractor, BatchNorm in eval mode; decoder-only for cls_frozen_epochs, then "
                       "fine-tuned jointly; CNFs trained and evaluated on the fine-tuned copy",
            "stage_seconds": ", ".join(f"{k} {v:.1f}" for k, v in self.stage_seconds.items()),
        }

