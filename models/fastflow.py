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

import math
from dataclasses import dataclass
from typing import ClassVar

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
import torch.nn.functional as F
from torch import nn

from adbench.errors import ConfigError
from adbench.features import FeatureExtractor, FeatureStore
from adbench.models._coupling import fusable, hard_permutations
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


def global_affine(block: Fm.AllInOneBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """An AllInOneBlock's global affine: (scale, offset), each [C]."""
    return block.global_scale_activation(block.global_scale).flatten(), block.global_offset.flatten()


def permute_affine(y: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, perm: torch.Tensor,
                   k: int) -> torch.Tensor:
    """(y * scale + offset)[:, perm] for fibres y [N, C]: one product with the [C, C] matrix diag(scale) P, which has
    one nonzero per column (in fp32 products no rounding beyond the affine's; TF32, which adbench leaves off, would
    round y), and one pass adding the offset on the [N / k, k * C] view."""
    y = y @ (scale[:, None] * torch.eye(len(perm), dtype=y.dtype, device=y.device)[:, perm])
    y.view(-1, k * len(perm)).add_(offset[perm].repeat(k))
    return y


def mean_sq_z(flow: Ff.SequenceINN, x: torch.Tensor) -> torch.Tensor:
    """The mean over channels of z^2 [B, H, W], z = FrEIA's ``flow(x)[0]``, for ``fusable`` flows of FastFlow's
    subnets (conv-ReLU-conv): all the anomaly map reads of z. Soft permutations: FrEIA's forward.

    FrEIA's operations per block (subnet on x1, a *= 0.1, x2 * exp(clamp * tanh(a_s)) + a_t, global affine, hard
    permutation), arranged for the CPU on the channels-last fibres, one [B * H * W, C] matrix y = [x1 | x2] per block
    (the subnets' convolutions run 1.4-3x faster channels-last for these few channels): the 0.1 folded into the last
    convolution's weights; x2's update written into y; the global affine and the permutation one product with the
    [C, C] matrix diag(scale) P (a one-hot column per output: exact) and one bias pass, instead of two affine passes
    and two gathers; per-channel vectors applied on a [B * H * W / k, k * C] view, which fills the CPU's 16 lanes
    where C does not; the last block's permutation skipped (a mean over channels does not depend on their order).
    ``tests/test_fastflow.py`` checks it against FrEIA.
    """
    b, c, h, w = x.shape
    blocks, perms = list(flow.module_list), hard_permutations(flow)
    if not blocks or any(perm.dtype != torch.long for perm in perms):
        return flow(x)[0].square().mean(1)
    c1 = blocks[0].splits[0]  # the subnet's half (FrEIA: the larger), the same in every block of one flow
    k = math.lcm(c, 16) // c  # k * C: whole 16-lane vectors
    k = k if (b * h * w) % k == 0 else 1
    y = x.new_empty(b * h * w, c)
    y.view(b, h, w, c).copy_(x.permute(0, 2, 3, 1))  # always a copy: the blocks write into y, never into x
    for i, block in enumerate(blocks):
        if i:  # the previous block's global affine and permutation
            y = permute_affine(y, *global_affine(blocks[i - 1]), perms[i - 1], k)
        conv1, _, conv2 = block.subnet
        hidden = conv1(y[:, :c1].contiguous().view(b, h, w, c1).permute(0, 3, 1, 2)).relu_()  # channels-last
        a = F.conv2d(hidden, conv2.weight * 0.1, conv2.bias * 0.1, padding=conv2.padding)
        a_s, a_t = a.permute(0, 2, 3, 1).reshape(len(y), -1).split(c - c1, dim=1)
        torch.addcmul(a_t, y[:, c1:], a_s.contiguous().tanh_().mul_(block.clamp).exp_(), out=y[:, c1:])
    scale, offset = global_affine(blocks[-1])
    z = torch.addcmul(offset.repeat(k), y.view(-1, k * c), scale.repeat(k))
    return z.square_().view(-1, c).mean(1).view(b, h, w)


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
