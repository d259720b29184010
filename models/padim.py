"""PaDiM (Defard, Setkaliev, Loesch, Audigier, ICPR 2021): one Gaussian per patch position of a frozen CNN's features.

A reference baseline, not a flow: it shows what the flow detectors are up against on the same images, backbone and
size, and checks the shared spine (data, features, metrics) against other implementations of the same method.
Official code: none released by the authors; defaults follow the paper and anomalib's PaDiM (``torch_model.py``,
``anomaly_map.py``), whose MTD numbers on adbench's setting are in ``../shared/reference/baselines.md``.

- features: the first three stages (ResNet layer1-3, strides 4/8/16), the coarser maps upsampled (nearest) to the
  finest and concatenated, then a fixed random subset of the channels (seeded);
- fit: at every position, the mean and covariance of the training features, + epsilon * I (paper §3.2);
- score: the Mahalanobis distance of each position, bilinear to the input, Gaussian blur sigma 4; image score = map max.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adbench.errors import ConfigError
from adbench.features import FeatureExtractor, FeatureStore
from adbench.models._maps import upsample_blur
from adbench.models._registry import Detector, Prediction, register_model
from adbench.progress import NULL_PROGRESS, Progress


@dataclass(frozen=True)
class PadimConfig:
    """PaDiM hyperparameters; defaults from the paper for ResNet-18-sized features."""

    layers: tuple[int, ...] = (1, 2, 3)  # paper §4.1: layer1-3 of ResNet (strides 4, 8, 16); anomalib's default
    n_features: int = 100  # paper §3.2 / Table 1: 100 random dims of ResNet-18's 448 (550 of WRN-50's 1792)
    epsilon: float = 0.01  # paper §3.2: regularisation term 0.01 * I added to every covariance
    sigma: float = 4.0  # Gaussian blur of the map (official PaDiM evaluation and anomalib: sigma 4)
    batch_size: int = 32  # images per batch when fitting and predicting (no effect on results)

    def __post_init__(self) -> None:
        if self.n_features < 1 or self.epsilon <= 0 or self.sigma < 0:
            raise ConfigError("padim: n_features must be >= 1, epsilon > 0 and sigma >= 0")


def embed(features: list[torch.Tensor], channels: torch.Tensor | None = None) -> torch.Tensor:
    """[B, sum C, H, W] at the finest map's grid: coarser maps upsampled by nearest neighbour, concatenated; only the
    ``channels`` (ascending indices into that concatenation) when given, picked before upsampling (the same values)."""
    size, start, parts = features[0].shape[-2:], 0, []
    for f in features:
        width = f.shape[1]
        if channels is not None:
            f = f[:, channels[(channels >= start) & (channels < start + width)] - start]
        start += width
        parts.append(f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="nearest"))
    return torch.cat(parts, dim=1)


@register_model("padim")
class Padim(Detector):
    """PaDiM: per-position Gaussians of randomly selected feature channels, Mahalanobis distance as anomaly score."""

    Config = PadimConfig
    reference = True
    BACKBONE_DEFAULTS = {
        "wide_resnet50_2": {"n_features": 550},  # paper §3.2: 550 of 1792 for WRN-50
        "resnet50": {"n_features": 550},  # same stage widths as WRN-50 (256 + 512 + 1024)
    }

    def __init__(self, extractor: FeatureExtractor, image_size: int, config: PadimConfig) -> None:
        super().__init__(extractor, image_size, config)
        shapes = extractor.feature_shapes(image_size)
        total = sum(c for c, _, _ in shapes)
        if config.n_features > total:
            raise ConfigError(f"padim: n_features={config.n_features} but the layers give only {total} channels")
        _, h, w = shapes[0]
        # a fixed random subset, drawn from the run's seeded torch RNG (anomalib: random.sample over the channels)
        self.register_buffer("channels", torch.randperm(total)[: config.n_features].sort().values)
        self.register_buffer("mean", torch.zeros(config.n_features, h * w))
        self.register_buffer("precision", torch.zeros(h * w, config.n_features, config.n_features))

    def _embedding(self, features: list[torch.Tensor]) -> torch.Tensor:
        """[B, D, H*W] selected channels at every position."""
        return embed(features, self.channels).flatten(2)

    def fit(self, features: FeatureStore, progress: Progress = NULL_PROGRESS,
            images: torch.Tensor | None = None) -> dict[str, list[float]]:
        """Two passes over the cached features: the mean, then the centred covariance of every position."""
        bs, device = self.config.batch_size, self.device
        n = len(features)
        if n < 2:
            raise ConfigError("padim needs at least 2 training images to estimate a covariance")
        total = torch.zeros_like(self.mean, dtype=torch.float64)
        with progress.task("padim mean", total=n) as advance:
            for feats in features.batches(bs):
                x = self._embedding([f.to(device) for f in feats])
                total += x.sum(0, dtype=torch.float64)
                advance(len(x))
        mean = (total / n).float()
        d, positions = mean.shape
        cov = torch.zeros(positions, d, d, device=device)
        with progress.task("padim covariance", total=n) as advance:
            for feats in features.batches(bs):
                x = (self._embedding([f.to(device) for f in feats]) - mean).permute(2, 1, 0)  # [P, D, B]
                cov.baddbmm_(x, x.transpose(1, 2))
                advance(x.shape[-1])
        cov = cov / (n - 1) + self.config.epsilon * torch.eye(d, device=device)
        self.mean.copy_(mean)
        self.precision.copy_(torch.linalg.inv(cov))
        return {}

    @torch.no_grad()
    def distances(self, features: list[torch.Tensor], chunk: int = 256) -> torch.Tensor:
        """[B, H, W] Mahalanobis distance of every position to its Gaussian, ``chunk`` positions at a time (their
        deltas, transposed to [positions, B, D], stay in cache: 5x faster than one pass on MTD's 4096 positions)."""
        b, _, h, w = features[0].shape
        emb = self._embedding(features)  # [B, D, P]
        squared = torch.empty(h * w, b, device=emb.device)
        for s in range(0, h * w, chunk):
            delta = (emb[..., s : s + chunk] - self.mean[:, s : s + chunk]).permute(2, 0, 1).contiguous()  # [p, B, D]
            squared[s : s + chunk] = (torch.bmm(delta, self.precision[s : s + chunk]) * delta).sum(2)
        return squared.clamp_min(0).sqrt().T.reshape(b, h, w)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        dist = self.distances(self.extractor(images.to(self.device)))
        amap = upsample_blur(dist, self.image_size, self.config.sigma)
        return Prediction(score=amap.flatten(1).max(dim=1).values, anomaly_map=amap)

    def protocol(self) -> dict[str, str]:
        return {"reference_baseline": "PaDiM (not a flow): per-position Gaussians, Mahalanobis distance",
                "map": f"bilinear to the input, Gaussian blur sigma {self.config.sigma}; image score = map max"}
