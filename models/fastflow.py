"""FastFlow (Yu et al., arXiv 2111.07677, 2021): one 2D normalizing flow per feature scale of a frozen CNN.

There is no official code; defaults follow the best-known reproduction, gathierry/FastFlow (``fastflow.py``,
``configs/*.yaml``, ``constants.py``), from which anomalib's FastFlow is derived.

- features: the last layer of each of the first three stages (strides 4, 8, 16), a trainable LayerNorm over
  [C, H, W] on each ("unmentioned but critical", gathierry issue 3), whose affine weights are one per position
  (``norm="channel"``: the same normalisation with one weight per channel, for tiles that are not aligned);
- flow: FrEIA ``AllInOneBlock``s, subnet conv(k)-ReLU-conv(k) with k alternating 3x3 / 1x1 (3x3 only for small
  backbones), hidden width ``hidden_ratio * C``, affine clamp 2.0, hard permutations;
- loss: mean over the batch of sum over scales of 0.5 * ||z||^2 - log|det J| (constant dropped, so it can be < 0);
- anomaly map: per scale -exp(-0.5 * mean_c z^2), bilinear upsampling, mean over scales; image score = map max.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
import torch.nn.functional as F
from torch import nn

from adbench.errors import ConfigError
from adbench.features import FeatureExtractor, FeatureStore
from adbench.models._coupling import fusable, mean_sq_z
from adbench.models._position import POSITION_NORMS, position_layers
from adbench.models._registry import Detector, Prediction, register_model
from adbench.progress import NULL_PROGRESS, Progress
from adbench.train import Stage, run_stage

NORMS = ("layer", "channel")


@dataclass(frozen=True)
class FastFlowConfig:
    """FastFlow hyperparameters; defaults are gathierry/FastFlow's ResNet-18 configuration."""

    layers: tuple[int, ...] = (1, 2, 3)  # stages 1-3: "the first three blocks" (paper §4.1; gathierry out_indices)
    flow_steps: int = 8  # gathierry configs/resnet18.yaml and wide_resnet50_2.yaml
    hidden_ratio: float = 1.0  # subnet width / C, same configs (transformers use 0.16)
    conv3x3_only: bool = True  # resnet18.yaml: True; wide_resnet50_2.yaml: False (alternating 3x3 / 1x1)
    clamp: float = 2.0  # affine_clamping in gathierry fastflow.py
    lr: float = 1e-3  # gathierry constants.py LR
    weight_decay: float = 1e-5  # gathierry constants.py WEIGHT_DECAY
    batch_size: int = 32  # gathierry constants.py BATCH_SIZE
    epochs: int = 20  # adbench CPU default (see README: measured on MTD); the reference trains 500 (preset "paper")
    position_norm: str = "none"  # adbench named option: "none" = the reference; "gaussian" / "diagonal" = a frozen
    # layer whitening each position by its training Gaussian before the LayerNorm (models/_position.py), so the flow
    # starts from PaDiM's per-position Mahalanobis distance (the map reads z only, as in the reference)
    norm_epsilon: float = 0.01  # PaDiM's regularisation of every covariance (+ 0.01 I), for position_norm
    norm: str = "layer"  # gathierry fastflow.py: LayerNorm([C, H, W]), affine weights tied to each position; adbench
    # named option "channel": GroupNorm(1, C), the same statistics with one affine weight per channel (the paper
    # argues position-tied parts suffer on non-aligned data, and MTD's tiles are not aligned)
    KEY_SKIP_AT_DEFAULT: ClassVar[tuple[str, ...]] = ("position_norm", "norm_epsilon", "norm")  # added later: runs
    # made before them keep their cell keys (adbench.runner._config_part)

    def __post_init__(self) -> None:
        if self.position_norm not in POSITION_NORMS:
            raise ConfigError(f"fastflow position_norm must be one of {', '.join(POSITION_NORMS)}, "
                              f"got {self.position_norm!r}")
        if self.norm not in NORMS:
            raise ConfigError(f"fastflow norm must be one of {', '.join(NORMS)}, got {self.norm!r}")


def make_norm(shape: tuple[int, int, int], kind: str) -> nn.Module:
    """The trainable normalisation of one [C, H, W] scale: statistics over all of it, affine per position or channel."""
    return nn.LayerNorm(list(shape), elementwise_affine=True) if kind == "layer" else nn.GroupNorm(1, shape[0])


def subnet_conv(kernel_size: int, hidden_ratio: float):
    """FrEIA subnet factory: conv(k)-ReLU-conv(k), 'same' padding (gathierry fastflow.py ``subnet_conv_func``)."""

    def make(c_in: int, c_out: int) -> nn.Module:
        hidden = int(c_in * hidden_ratio)
        pad = kernel_size // 2
        return nn.Sequential(
            nn.Conv2d(c_in, hidden, kernel_size, padding=pad),
            nn.ReLU(),
            nn.Conv2d(hidden, c_out, kernel_size, padding=pad),
        )

    return make


def build_flow(shape: tuple[int, int, int], cfg: FastFlowConfig) -> Ff.SequenceINN:
    """A 2D flow over a [C, H, W] map: ``cfg.flow_steps`` AllInOneBlocks."""
    flow = Ff.SequenceINN(*shape)
    for i in range(cfg.flow_steps):
        k = 3 if (i % 2 == 0 or cfg.conv3x3_only) else 1
        flow.append(
            Fm.AllInOneBlock, subnet_constructor=subnet_conv(k, cfg.hidden_ratio), affine_clamping=cfg.clamp,
            permute_soft=False,
        )  # fmt: skip
    return flow


def loss(z: list[torch.Tensor], log_jac: list[torch.Tensor]) -> torch.Tensor:
    """Negative log-likelihood without the constant, summed over scales, averaged over the batch."""
    return sum(torch.mean(0.5 * torch.sum(zi**2, dim=(1, 2, 3)) - lj) for zi, lj in zip(z, log_jac, strict=True))


def anomaly_map(mean_sq: list[torch.Tensor], size: int) -> torch.Tensor:
    """[B, size, size] map in [-1, 0] from each scale's mean_c z^2 [B, h, w]: per scale -exp(-0.5 mean_c z^2),
    upsampled bilinearly, averaged."""
    maps = [F.interpolate(-torch.exp(-0.5 * m[:, None]), size=(size, size), mode="bilinear", align_corners=False)
            for m in mean_sq]
    return (sum(maps) / len(maps))[:, 0]


@register_model("fastflow")
class FastFlow(Detector):
    """FastFlow: LayerNorm + one 2D flow per scale of a frozen extractor."""

    Config = FastFlowConfig
    PRESETS = {"paper": {"epochs": 500}}  # gathierry constants.py NUM_EPOCHS
    BACKBONE_DEFAULTS = {
        "wide_resnet50_2": {"conv3x3_only": False},  # gathierry configs/wide_resnet50_2.yaml
        "resnet50": {"conv3x3_only": False},  # same family as wide_resnet50_2
    }

    def __init__(self, extractor: FeatureExtractor, image_size: int, config: FastFlowConfig) -> None:
        super().__init__(extractor, image_size, config)
        shapes = extractor.feature_shapes(image_size)
        self.norms = nn.ModuleList(make_norm(s, config.norm) for s in shapes)
        self.flows = nn.ModuleList(build_flow(s, config) for s in shapes)
        self.position = position_layers(shapes, config.position_norm, config.norm_epsilon)  # filled by ``fit``
        self.fused = all(map(fusable, self.flows))  # predict's mean z^2 by ``mean_sq_z`` (False: FrEIA's forward)

    def _inputs(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each scale's flow input: the features (whitened per position when ``position_norm`` is set), normalised."""
        return [norm(feat if self.position is None else self.position[i](feat))
                for i, (feat, norm) in enumerate(zip(features, self.norms, strict=True))]

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Features of each scale -> (z of each scale, log|det J| of each scale [B])."""
        z, log_jac = zip(*(flow(x) for x, flow in zip(self._inputs(features), self.flows, strict=True)), strict=True)
        return list(z), list(log_jac)

    def fit(self, features: FeatureStore, progress: Progress = NULL_PROGRESS,
            images: torch.Tensor | None = None) -> dict[str, list[float]]:
        cfg, device = self.config, self.device
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
        for i, layer in enumerate(self.position or []):
            layer.fit(features, i, cfg.batch_size)
        self.train()
        stage = Stage(
            name="fastflow",
            params=[p for p in self.parameters() if p.requires_grad],
            loss=lambda batch: loss(*self([f.to(device, non_blocking=True) for f in batch])),
            batches=lambda epoch: features.batches(cfg.batch_size, gen),
            epochs=cfg.epochs,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
        )
        history = run_stage(stage, progress)
        self.eval()
        return {"fastflow": history}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        inputs = self._inputs(self.extractor(images.to(self.device)))
        mean_sq = [mean_sq_z(flow, x) if self.fused else flow(x)[0].square().mean(1)
                   for x, flow in zip(inputs, self.flows, strict=True)]
        amap = anomaly_map(mean_sq, self.image_size)
        return Prediction(score=amap.flatten(1).max(dim=1).values, anomaly_map=amap)
