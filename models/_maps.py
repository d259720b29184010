"""Map post-processing shared by the reference baselines (upsample a patch-score map to the input, then blur it) and
by the flows' optional blur (CFLOW-AD's ``map_blur``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """1D Gaussian of radius int(4 sigma + 0.5), summing to 1 (scipy's ``gaussian_filter`` truncation at 4 sigma,
    used by the official PaDiM and PatchCore code; anomalib's ``GaussianBlur2d`` has the same size)."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """[B, S, S] maps blurred by a separable Gaussian of ``sigma`` pixels with reflect padding (anomalib's
    ``GaussianBlur2d``); ``sigma`` 0 returns them as they are."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel(sigma).to(maps)
    r = len(k) // 2
    if r >= min(maps.shape[-2:]):  # reflect padding needs the kernel radius below the map size
        raise ValueError(f"blur sigma {sigma} is too wide for {maps.shape[-1]}-pixel maps")
    out = F.conv2d(F.pad(maps.unsqueeze(1), (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(out, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))[:, 0]


def upsample_blur(maps: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """[B, h, w] patch scores -> [B, size, size]: bilinear (align_corners=False), then ``blur`` by ``sigma``."""
    out = F.interpolate(maps.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
    return blur(out[:, 0], sigma)


def patch_grid(n: int) -> int:
    """Side of a square grid of ``n`` patches (maps are square: inputs are resized to squares)."""
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} patches do not form a square grid")
    return side
