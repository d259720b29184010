"""SSIM's per-pixel map (Wang, Bovik, Sheikh, Simoncelli 2004) as torchmetrics computes it, with a faster window:
AE-FLOW's reconstruction score (``models.aeflow``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _window(x: torch.Tensor, k: list[float]) -> torch.Tensor:
    """[..., H + 2r, W + 2r] -> [..., H, W]: the separable window ``k`` (2r + 1 taps) as in-place shifted adds, rows,
    then columns (4-5x faster on the CPU than a convolution with one input channel)."""
    h, w = x.shape[-2] - len(k) + 1, x.shape[-1] - len(k) + 1
    y = x[..., :h, :] * k[0]
    for t in range(1, len(k)):
        y.add_(x[..., t : t + h, :], alpha=k[t])
    out = y[..., :w] * k[0]
    for t in range(1, len(k)):
        out.add_(y[..., t : t + w], alpha=k[t])
    return out


def ssim_map(a: torch.Tensor, b: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """Local SSIM [B, C, H, W] of images in [0, 1] (Wang et al. 2004: K1 0.01, K2 0.03, Gaussian window sigma 1.5,
    11 taps, reflect padding), as torchmetrics' ``structural_similarity_index_measure(return_full_image=True)``
    computes it (``tests/test_aeflow.py`` checks them equal), but with the window as two 1D passes, one image at a
    time (it stays in cache): 22 multiply-adds per pixel instead of 121, 5x faster, once most of AE-FLOW's inference."""
    r = int(3.5 * sigma + 0.5)  # torchmetrics' Gaussian window: 2 * int(3.5 sigma + 0.5) + 1 taps
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / sigma) ** 2)
    k, c1, c2 = (k / k.sum()).tolist(), 0.01**2, 0.03**2
    out = torch.empty_like(a)
    for i in range(len(a)):
        x = F.pad(torch.stack([a[i], b[i], a[i] * a[i], b[i] * b[i], a[i] * b[i]]), (r, r, r, r), mode="reflect")
        mu_a, mu_b, e_aa, e_bb, e_ab = _window(x, k)
        var_a, var_b = (e_aa - mu_a**2).clamp_min(0), (e_bb - mu_b**2).clamp_min(0)
        num = (2 * mu_a * mu_b + c1) * (2 * (e_ab - mu_a * mu_b) + c2)
        out[i] = num / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return out
