"""CFLOW-AD (Gudovskiy, Ishizaka, Kozuka, WACV 2022): conditional flows on feature "fibers" with positional conditions.

Official code: gudovskiy/cflow-ad (``model.py``, ``train.py``, ``config.py``, ``custom_models/utils.py``).

- features: three stages of a frozen CNN (layer2-4 for ResNets); every position of a map is one sample (a "fiber",
  C dims) conditioned on a 2D sinusoidal encoding of where it is (128 dims: half x, half y);
- one conditional flow per stage: FrEIA ``AllInOneBlock`` x 8, subnet Linear(d, 2d)-ReLU-Linear(2d, out), clamp 1.9;
- loss per fiber batch of 256: -logsigmoid(log p / C), log p = -C ln sqrt(2 pi) - |z|^2 / 2 + log|det J|;
- anomaly map: per stage exp(log p / C - max over the TRAINING set), bilinear (align_corners) to the input, summed over
  stages and inverted (then blurred if ``map_blur``); image score = map max. The official code subtracts the
  test-set maximum instead (cflow-ad issue 24), which makes every score depend on the whole test set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adbench.errors import ConfigError
from adbench.features import FeatureExtractor, FeatureStore
from adbench.models import _fibers
from adbench.models._coupling import hard_permutations
from adbench.models._maps import blur
from adbench.models._position import POSITION_NORMS, position_layers
from adbench.models._registry import Detector, Prediction, register_model
from adbench.models._resize import resize
from adbench.progress import NULL_PROGRESS, Progress
from adbench.train import Stage, run_stage

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class CFlowConfig:
    """CFLOW-AD hyperparameters; defaults from the official code unless marked adbench."""

    layers: tuple[int, ...] = (2, 3, 4)  # layer2, layer3, layer4 (official ``-pl 3``)
    coupling_blocks: int = 8  # official ``-cb 8``
    condition_dims: int = 128  # official ``condition_vec`` (2D positional encoding, half x, half y)
    clamp: float = 1.9  # official ``clamp_alpha``
    permute_soft: bool = False  # official True (random orthogonal); adbench: hard, same cost, instant to build for
    # 2048 channels (FrEIA warns soft is "very slow" above 512); the preset "paper" switches it back on
    fiber_batch: int = 256  # official N = 256 (``train.py``)
    loss: str = "logsigmoid"  # official -logsigmoid(log p / C) (cflow-ad issue 23); "nll" = mean of -log p / C
    lr: float = 2e-4  # official ``lr``
    batch_size: int = 32  # official ``batch_size`` (images per batch, each giving H*W fibers per stage)
    epochs: int = 3  # adbench CPU default (passes over the data); official 25 meta-epochs x 8 sub-epochs = 200
    warmup_epochs: int = 0  # official: linear warm-up from lr/10 over 2 meta-epochs (= 16 passes, preset "paper")
    cosine: bool = True  # official cosine annealing to lr * 0.1^3 over the schedule
    normalization: str = "train"  # adbench: subtract each stage's TRAINING-set max log p (batch-independent maps);
    # "official" = the official code's test-set max (``train.py``), for reproducing the paper protocol: every score
    # then depends on the whole test set; the result's protocol says which was used
    position_norm: str = "none"  # adbench named option: "none" = the official flow on raw fibers; "gaussian" /
    # "diagonal" = a frozen first layer whitening each position by its training Gaussian (models/_position.py), its
    # log-determinant part of log p: the coupling blocks start from PaDiM's per-position density
    norm_epsilon: float = 0.01  # PaDiM's regularisation of every covariance (+ 0.01 I), for position_norm
    positional_condition: bool = True  # official; False = the condition zeroed (an unconditional flow per stage), for
    # the ablation of position on tiles that are not aligned
    map_blur: float = 0.0  # official 0: the map is the bilinear sum of the stages; adbench named option: sigma (px) of
    # a Gaussian blur of the final map, as PaDiM and PatchCore post-process theirs (sigma 4, models/_maps.py)
    # added later: runs made before them keep their cell keys (adbench.runner._config_part)
    KEY_SKIP_AT_DEFAULT: ClassVar[tuple[str, ...]] = ("position_norm", "norm_epsilon", "positional_condition",
                                                      "map_blur")

    def __post_init__(self) -> None:  # checked when the config is resolved, before any work
        for name, valid in (("position_norm", POSITION_NORMS), ("loss", ("logsigmoid", "nll")),
                            ("normalization", ("train", "official"))):
            if getattr(self, name) not in valid:
                raise ConfigError(f"cflow {name} must be one of {', '.join(valid)}, got {getattr(self, name)!r}")
        if not 0 <= self.map_blur <= 16:  # the kernel's radius (4 sigma) stays below a 128-pixel map
            raise ConfigError(f"cflow map_blur must be a sigma in [0, 16] pixels, got {self.map_blur}")


def positional_encoding_2d(dims: int, height: int, width: int) -> torch.Tensor:
    """[dims, H, W] sinusoidal encoding: first half sin/cos of the x position, second half of y (official formula)."""
    if dims % 4:
        raise ConfigError(f"condition_dims must be a multiple of 4, got {dims}")
    half = dims // 2
    div = torch.exp(torch.arange(0.0, half, 2) * -(math.log(1e4) / half))
    pos_w = torch.arange(0.0, width).unsqueeze(1)
    pos_h = torch.arange(0.0, height).unsqueeze(1)
    pe = torch.zeros(dims, height, width)
    pe[0:half:2] = torch.sin(pos_w * div).T.unsqueeze(1).expand(-1, height, -1)
    pe[1:half:2] = torch.cos(pos_w * div).T.unsqueeze(1).expand(-1, height, -1)
    pe[half::2] = torch.sin(pos_h * div).T.unsqueeze(2).expand(-1, -1, width)
    pe[half + 1 :: 2] = torch.cos(pos_h * div).T.unsqueeze(2).expand(-1, -1, width)
    return pe


def subnet_fc(c_in: int, c_out: int) -> nn.Module:
    """FrEIA subnet factory: Linear(d, 2d)-ReLU-Linear(2d, out) (official ``subnet_fc``)."""
    return nn.Sequential(nn.Linear(c_in, 2 * c_in), nn.ReLU(), nn.Linear(2 * c_in, c_out))


def build_flow(channels: int, cfg: CFlowConfig) -> Ff.SequenceINN:
    """A conditional flow over C-dim fibers: ``cfg.coupling_blocks`` AllInOneBlocks conditioned on the encoding."""
    flow = Ff.SequenceINN(channels)
    for _ in range(cfg.coupling_blocks):
        flow.append(Fm.AllInOneBlock, cond=0, cond_shape=(cfg.condition_dims,), subnet_constructor=subnet_fc,
                    affine_clamping=cfg.clamp, global_affine_type="SOFTPLUS", permute_soft=cfg.permute_soft)
    return flow


def log_prob_per_dim(z: torch.Tensor, log_jac: torch.Tensor) -> torch.Tensor:
    """log p(x) / C of each fiber [N] (the official ``get_logp`` divided by C)."""
    c = z.shape[1]
    return (-c * _LOG_SQRT_2PI - 0.5 * torch.sum(z**2, dim=1) + log_jac) / c


def cosine_lr_factor(epoch: int, epochs: int, warmup_epochs: int = 0, cosine: bool = True) -> float:
    """Official schedule (``adjust_learning_rate``/``warmup_learning_rate``): linear warm-up from lr/10 over
    ``warmup_epochs``, then cosine annealing to lr * 0.1^3 over ``epochs`` (constant if not ``cosine``)."""
    if epoch < warmup_epochs:
        return 0.1 + 0.9 * epoch / warmup_epochs
    if not cosine:
        return 1.0
    eta_min = 0.1**3
    return eta_min + (1 - eta_min) * 0.5 * (1 + math.cos(math.pi * epoch / max(epochs, 1)))


def fiber_loss(log_p: torch.Tensor, kind: str) -> torch.Tensor:
    """Official -logsigmoid(log p / C) averaged over fibers, or plain per-dimension NLL."""
    return -F.logsigmoid(log_p).mean() if kind == "logsigmoid" else -log_p.mean()


def fiber_log_prob(flow: Ff.SequenceINN, x: torch.Tensor, pos: torch.Tensor, perms: list[torch.Tensor],
                   where: torch.Tensor) -> torch.Tensor:
    """log p / C [N] of fibers ``x`` [N, C] at the positions ``where`` [N] (row-major indices) of ``pos`` [P, H, W]
    (``positional_encoding_2d``, or zeros) under ``flow``: the FrEIA flow's function by ``models._fibers``, whose
    backward is written out (the training step). ``tests/test_cflow.py`` checks it and its gradients against FrEIA."""
    fixed, tensors = _fibers.flow_tensors(flow, pos, perms)
    return log_prob_per_dim(*_fibers.FiberFlow.apply(x, where % pos.shape[2], where // pos.shape[2], fixed, *tensors))


def fused_log_prob(flow: Ff.SequenceINN, feat: torch.Tensor, pos: torch.Tensor, rows: int = 8192) -> torch.Tensor:
    """log p / C of every fiber of ``feat`` [B, C, H, W] under ``flow`` conditioned on ``pos`` [P, H, W]: [B, H*W].

    ``models._fibers.forward`` with all blocks on chunks of about ``rows`` fibers: fewer chunks, fewer calls of each
    small operation, until a chunk's passes no longer stay in cache (MTD's Lite0 maps, batch 32, 2 cores: 6.2 / 5.9 /
    5.7 / 5.9 / 6.1 ms per image at 2048 / 4096 / 8192 / 16384 / all 32768 rows; the same values bitwise).
    """
    b, c, h, w = feat.shape
    per_chunk = max(1, min(b, rows // (h * w)))  # whole images per chunk, so the position addend lines up
    where = torch.arange(h * w, device=feat.device)
    fixed, tensors = _fibers.flow_tensors(flow, pos, hard_permutations(flow))
    blocks = _fibers.parts(fixed, where % w, where // w, *tensors)
    fibers = feat.permute(0, 2, 3, 1).flatten(0, 2)
    out = torch.empty(len(fibers), dtype=fibers.dtype, device=fibers.device)
    for start in range(0, len(fibers), per_chunk * h * w):
        x = fibers[start : start + per_chunk * h * w]
        out[start : start + len(x)] = log_prob_per_dim(*_fibers.forward(x, blocks))
    return out.reshape(b, h * w)


@register_model("cflow")
class CFlow(Detector):
    """CFLOW-AD: one conditional flow per feature stage, trained on positional-conditioned fibers."""

    Config = CFlowConfig
    PRESETS = {"paper": {"epochs": 200, "warmup_epochs": 16, "permute_soft": True}}  # official 25 x 8, 2 x 8 warm-up

    def __init__(self, extractor: FeatureExtractor, image_size: int, config: CFlowConfig) -> None:
        super().__init__(extractor, image_size, config)
        shapes = extractor.feature_shapes(image_size)
        self.flows = nn.ModuleList(build_flow(c, config) for c, _, _ in shapes)
        for i, (_, h, w) in enumerate(shapes):
            pe = positional_encoding_2d(config.condition_dims, h, w)
            self.register_buffer(f"pos{i}", pe if config.positional_condition else torch.zeros_like(pe))
        self.register_buffer("train_max", torch.zeros(len(shapes)))
        self.position = position_layers(shapes, config.position_norm, config.norm_epsilon)  # filled by ``fit``
        self._test_maps: list[list[torch.Tensor]] = []  # "official" normalization: log p maps seen by predict
        self.fused = True  # training and inference through ``models._fibers`` (False: FrEIA's forward; same
        # numbers to float rounding, slower)

    def _normalise(self, i: int, feat: torch.Tensor) -> torch.Tensor:
        """Stage ``i``'s features through the position-conditional affine layer (identity for position_norm none)."""
        return feat if self.position is None else self.position[i](feat)

    def log_prob_maps(self, features: list[torch.Tensor], fused: bool = True) -> list[torch.Tensor]:
        """Per-dimension log-likelihood of every position, [B, H, W] per stage (all fibers of the batch at once).

        ``fused`` evaluates the same function as the FrEIA flows, faster (``fused_log_prob``); False calls FrEIA.
        """
        maps = []
        for i, (feat, flow) in enumerate(zip(features, self.flows, strict=True)):
            b, c, h, w = feat.shape
            feat, pos = self._normalise(i, feat), getattr(self, f"pos{i}")
            if fused:
                log_p = fused_log_prob(flow, feat, pos).reshape(b, h, w)
            else:  # every fiber [B*H*W, C] (b, y, x order) with its condition
                z, log_jac = flow(feat.permute(0, 2, 3, 1).flatten(0, 2), c=[pos.flatten(1).T.repeat(b, 1)])
                log_p = log_prob_per_dim(z, log_jac).reshape(b, h, w)
            log_det = 0.0 if self.position is None else self.position[i].log_det.view(h, w)  # the layer's log|det|
            maps.append(log_p + log_det / c)
        return maps

    def fit(self, features: FeatureStore, progress: Progress = NULL_PROGRESS,
            images: torch.Tensor | None = None) -> dict[str, list[float]]:
        cfg, device = self.config, self.device
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
        for i, layer in enumerate(self.position or []):
            layer.fit(features, i, cfg.batch_size)

        perms = [hard_permutations(flow) for flow in self.flows]

        def batches(epoch: int):  # official order: per image batch and stage, the fibers shuffled, 256 at a time
            for feats in features.batches(cfg.batch_size, gen):
                for i, feat in enumerate(feats):
                    x = self._normalise(i, feat.to(device))
                    hw, x = x.shape[2] * x.shape[3], x.permute(0, 2, 3, 1).flatten(0, 2)  # fibers in (b, y, x) order
                    order = torch.randperm(len(x), generator=gen).to(device)
                    for start in range(0, len(x), cfg.fiber_batch):
                        idx = order[start : start + cfg.fiber_batch]
                        yield i, x[idx], idx % hw  # fibers and their positions

        def loss(batch) -> torch.Tensor:  # the FrEIA flow's function; ``fiber_log_prob`` computes it faster
            i, x, where = batch
            pos = getattr(self, f"pos{i}")
            if self.fused:
                return fiber_loss(fiber_log_prob(self.flows[i], x, pos, perms[i], where), cfg.loss)
            return fiber_loss(log_prob_per_dim(*self.flows[i](x, c=[pos.flatten(1).T[where]])), cfg.loss)

        self.train()
        stage = Stage(name="cflow", params=list(self.flows.parameters()), loss=loss, batches=batches,
                      epochs=cfg.epochs, lr=cfg.lr,
                      lr_factor=lambda epoch: cosine_lr_factor(epoch, cfg.epochs, cfg.warmup_epochs, cfg.cosine))
        history = run_stage(stage, progress)
        self.calibrate(features)
        return {"cflow": history}

    @torch.no_grad()
    def calibrate(self, features: FeatureStore) -> None:
        """Store each stage's maximum log-likelihood over the training set (the anomaly map's reference)."""
        self.eval()
        top = torch.full((len(self.flows),), -torch.inf, device=self.device)
        for feats in features.batches(self.config.batch_size):
            maps = self.log_prob_maps([f.to(self.device) for f in feats])
            top = torch.maximum(top, torch.stack([m.max() for m in maps]))
        self.train_max.copy_(top)
        self._test_maps.clear()

    def _anomaly_map(self, maps: list[torch.Tensor], tops) -> torch.Tensor:
        """Sum over stages of exp(log p - top), bilinear to the input size, inverted: constant - likelihood; then
        blurred by ``map_blur`` (none by default)."""
        size = (self.image_size, self.image_size)
        likelihood = sum(resize(torch.exp(m - top), size) for m, top in zip(maps, tops, strict=True))  # align_corners
        return blur(len(maps) - likelihood, self.config.map_blur)

    @torch.no_grad()
    def features_map(self, features: list[torch.Tensor]) -> torch.Tensor:
        """[B, S, S] anomaly map of already extracted features, training-set normalised (for detectors that share
        one backbone pass between CFLOW flows and another head, e.g. ``clscnf``)."""
        return self._anomaly_map(self.log_prob_maps(features, fused=self.fused), self.train_max)

    @torch.no_grad()
    def heldout_nll(self, images: torch.Tensor) -> torch.Tensor:
        """[B] negative log-likelihood per dimension of each image's fibers, mean over positions and stages."""
        maps = self.log_prob_maps(self.extractor(images), fused=self.fused)
        return -torch.stack([m.flatten(1).mean(1) for m in maps]).mean(0)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        maps = self.log_prob_maps(self.extractor(images.to(self.device)), fused=self.fused)
        if self.config.normalization == "official":  # kept for ``finalize``, which needs the whole test set
            self._test_maps.append([m.cpu() for m in maps])
        amap = self._anomaly_map(maps, self.train_max)
        return Prediction(score=amap.flatten(1).max(dim=1).values, anomaly_map=amap)

    def finalize(self, scores: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Official mode: recompute every map with the test-set maximum of each stage (cflow-ad ``train.py``)."""
        if self.config.normalization != "official":
            return scores, maps
        stages = [torch.cat(parts) for parts in zip(*self._test_maps, strict=True)]
        self._test_maps.clear()
        tops = [m.max() for m in stages]
        likelihood = torch.cat([-self._anomaly_map([m[i : i + 64] for m in stages], tops)
                                for i in range(0, len(stages[0]), 64)])
        amap = (likelihood.max() - likelihood).numpy()  # official: score_map.max() - score_map over the test set
        return amap.reshape(len(amap), -1).max(axis=1), amap

    def protocol(self) -> dict[str, str]:
        cfg, out = self.config, {}
        out["map_normalization"] = ("official: test-set maximum per stage, so scores depend on the whole test set "
                                    "(cflow-ad train.py)" if cfg.normalization == "official" else
                                    "training-set maximum per stage (maps do not depend on the test set)")
        if cfg.map_blur:
            out["map_blur"] = f"Gaussian blur of the final map, sigma {cfg.map_blur:g} px (adbench option)"
        if cfg.position_norm != "none":
            out["position_norm"] = (f"{cfg.position_norm}: a frozen per-position affine layer fitted on the "
                                    "training features before the coupling blocks (adbench option)")
        return out
