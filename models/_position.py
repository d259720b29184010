"""A frozen, position-conditional affine layer fitted in closed form: x -> W_p (x - mu_p) at every position p of a
feature map, with W_p L_p = I for L_p L_p^T the covariance of the training features at p (+ epsilon I, PaDiM's
regularisation), or its diagonal. Placed before a flow's coupling blocks it is the flow's first layer: the flow then
starts from PaDiM's Gaussian per position and its blocks learn what that Gaussian misses; ``log_det`` keeps log p a
density of the raw features. It is Glow's ActNorm with data-dependent initialisation, per position and (optionally)
full-covariance, and kept frozen.
"""

from __future__ import annotations

import torch
from torch import nn

from adbench.errors import ConfigError
from adbench.features import FeatureStore

POSITION_NORMS = ("none", "diagonal", "gaussian")  # the config values of the detectors that offer it


class PositionGaussian(nn.Module):
    """The layer for one stage of ``channels`` x ``positions``; ``fit`` fills it, ``forward`` whitens [B, C, H, W]."""

    def __init__(self, channels: int, positions: int, diagonal: bool, epsilon: float) -> None:
        super().__init__()
        self.diagonal, self.epsilon = diagonal, epsilon
        self.register_buffer("mean", torch.zeros(channels, positions))
        self.register_buffer("whiten", torch.zeros(positions, channels, channels))
        self.register_buffer("log_det", torch.zeros(positions))  # log|det W_p|

    @torch.no_grad()
    def fit(self, features: FeatureStore, stage: int, batch_size: int) -> None:
        """Mean and (diagonal or full) covariance of every position of ``stage``'s training maps; sums in float64."""
        n, total, outer = 0, 0.0, 0.0
        for feats in features.batches(batch_size):
            x = feats[stage].to(self.mean.device, torch.float64).flatten(2)  # [B, C, P]
            n += len(x)
            total = total + x.sum(0)
            outer = outer + (x.square().sum(0).T if self.diagonal else torch.einsum("bip,bjp->pij", x, x))
        if n < 2:
            raise ConfigError("position_norm needs at least 2 training images")
        mean = total / n  # [C, P]
        if self.diagonal:
            std = ((outer - n * mean.T.square()) / (n - 1) + self.epsilon).sqrt()  # [P, C]
            whiten, log_det = torch.diag_embed(1 / std), -std.log().sum(1)
        else:
            eye = torch.eye(len(mean), dtype=mean.dtype, device=mean.device)
            chol = torch.linalg.cholesky((outer - n * torch.einsum("ip,jp->pij", mean, mean)) / (n - 1)
                                         + self.epsilon * eye)
            whiten = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
            log_det = -torch.diagonal(chol, dim1=1, dim2=2).log().sum(1)
        self.mean.copy_(mean)
        self.whiten.copy_(whiten)
        self.log_det.copy_(log_det)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        b, c, h, w = feat.shape
        return torch.einsum("pij,bjp->bip", self.whiten, feat.flatten(2) - self.mean).reshape(b, c, h, w)


def position_layers(shapes: list[tuple[int, int, int]], mode: str, epsilon: float) -> nn.ModuleList | None:
    """One ``PositionGaussian`` per stage of ``shapes`` (C, H, W) for ``mode`` diagonal/gaussian; None for none."""
    if mode not in POSITION_NORMS:
        raise ConfigError(f"position_norm must be one of {', '.join(POSITION_NORMS)}, got {mode!r}")
    if mode == "none":
        return None
    return nn.ModuleList(PositionGaussian(c, h * w, mode == "diagonal", epsilon) for c, h, w in shapes)
