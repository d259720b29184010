"""SSIM's per-pixel map (Wang, Bovik, Sheikh, Simoncelli 2004) as torchmetrics computes it, with a faster window:
AE-FLOW's reconstruction score (``models.aeflow``)."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=16)
def window_blocks(n: int, sigma: float) -> tuple[torch.Tensor, int, int]:
    """The Gaussian window along one axis of length ``n`` with reflect padding, as products with blocks of its
    banded [n, n] matrix: [n / size, size, size + 2r] float32 (block j maps input rows j size - r ... j size + size + r,
    reflections folded in, to output rows j size ... j size + size), the block size and r. Blocks are ~32 rows (a
    divisor of n; n itself when none of 8-32 divides it)."""
    r = int(3.5 * sigma + 0.5)  # torchmetrics' Gaussian window: 2 * int(3.5 sigma + 0.5) + 1 taps
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / sigma) ** 2)
    k = k / k.sum()
    size = next((s for s in range(32, 7, -1) if n % s == 0), n)
    m = torch.zeros(n, n + 2 * r, dtype=torch.float64)  # columns: input rows -r ... n + r - 1
    for i in range(n):
        for t in range(-r, r + 1):
            j = abs(i + t) if i + t < n else 2 * (n - 1) - (i + t)  # reflect without repeating the edge
            m[i, j + r] += k[t + r]
    blocks = torch.stack([m[j : j + size, j : j + size + 2 * r] for j in range(0, n, size)])
    return blocks.float(), size, r


def _window(padded: torch.Tensor, planes: int, rows: torch.Tensor, cols: torch.Tensor, r: int) -> torch.Tensor:
    """The window along H and W of the first ``planes`` planes [H, W] stacked in ``padded`` [planes * H + 2r, W + 2r]
    (r zero rows and columns around them), with ``window_blocks``' ``rows`` (repeated per plane) and ``cols``:
    [W / size, planes * H, size] (columns in blocks of ``size``)."""
    (_, size_h, win), (n_w, size_w, _) = rows.shape, cols.shape
    h, w = (len(rows) // planes) * size_h, n_w * size_w
    # along H: one product per block of rows of each plane; a window reaches into the neighbouring plane, where its
    # weights are zero (the reflection is folded into the block), so all windows are one strided batch
    windows = padded.as_strided((planes * h // size_h, win, w + 2 * r), (size_h * (w + 2 * r), w + 2 * r, 1))
    along_h = torch.bmm(rows, windows).view(planes * h, w + 2 * r)
    windows = along_h.as_strided((n_w, planes * h, size_w + 2 * r), (size_w, w + 2 * r, 1))
    return torch.bmm(windows, cols.transpose(1, 2))


def ssim_map(a: torch.Tensor, b: torch.Tensor, sigma: float = 1.5, chunk: int = 1) -> torch.Tensor:
    """Local SSIM [B, C, H, W] of images in [0, 1] (Wang et al. 2004: K1 0.01, K2 0.03, Gaussian window sigma 1.5,
    11 taps, reflect padding), as torchmetrics' ``structural_similarity_index_measure(return_full_image=True)``
    computes it (``tests/test_aeflow.py`` checks them equal), but faster: the separable window as products with the
    blocks of its banded matrix (``window_blocks``; 2 x 42 multiply-adds per pixel at 32-row blocks, at the matrix
    product's rate, against 121 in torchmetrics' 2D convolution), ``chunk`` images at a time (they stay in cache),
    whose five maps per channel (a, b, a^2, b^2, ab) are written straight into one zero-bordered buffer."""
    c1, c2 = 0.01**2, 0.03**2
    n_c, h, w = a.shape[1:]
    (rows, _, r), (cols, _, _) = window_blocks(h, sigma), window_blocks(w, sigma)
    planes = 5 * n_c * min(chunk, len(a))
    padded = a.new_zeros(planes * h + 2 * r, w + 2 * r)  # borders stay zero; each chunk rewrites the planes
    stacked = padded[r : r + planes * h, r : r + w].view(-1, 5, n_c, h, w)
    rows = rows.repeat(planes, 1, 1)
    out = torch.empty_like(a)
    for s in range(0, len(a), chunk):
        x, y = a[s : s + chunk], b[s : s + chunk]
        n, dst = len(x), stacked[: len(x)]
        dst[:, 0], dst[:, 1] = x, y
        for i, (u, v) in enumerate(((x, x), (y, y), (x, y)), start=2):
            torch.mul(u, v, out=dst[:, i])
        maps = _window(padded, 5 * n_c * n, rows[: len(rows) * n // len(stacked)], cols, r)
        mu_a, mu_b, e_aa, e_bb, e_ab = maps.view(len(maps), n, 5, n_c, h, -1).unbind(2)  # [W / size, n, C, H, size]
        mu_ab, mu_aa, mu_bb = mu_a * mu_b, mu_a * mu_a, mu_b * mu_b
        var = (e_aa - mu_aa).clamp_min_(0).add_((e_bb - mu_bb).clamp_min_(0)).add_(c2)
        num = (mu_ab * 2 + c1).mul_((e_ab - mu_ab).mul_(2).add_(c2))
        target = out[s : s + chunk].view(n, n_c, h, len(maps), -1).permute(3, 0, 1, 2, 4)
        torch.div(num, (mu_aa + mu_bb + c1).mul_(var), out=target)
    return out
