"""PatchCore (Roth, Pemula, Zepeda, Schölkopf, Brox, Gehler, CVPR 2022): nearest neighbours in a memory bank of
locally aggregated patch features, subsampled by a greedy k-center coreset.

A reference baseline, not a flow (see ``padim.py``). Official code: amazon-science/patchcore-inspection
(``patchcore.py``, ``common.py``, ``sampler.py``); the image-score re-weighting follows the paper's eq. 7 as anomalib
implements it (``torch_model.py``), whose MTD numbers on adbench's setting are in ``../shared/reference/baselines.md``.

- features: two middle stages (ResNet layer2+3, strides 8/16), each averaged over its 3x3 neighbourhood (§3.1,
  ``patchsize 3``), the coarser map bilinearly upsampled to the finer and concatenated, channels average-pooled down
  to ``embed_dim`` when wider (official ``target_embed_dimension 1024``);
- memory bank: every patch of every training image, subsampled to ``coreset_ratio`` by exact greedy k-center
  selection (§3.2) on a fixed random projection to ``projection_dim`` dims (official
  ``ApproximateGreedyCoresetSampler`` projects to 128); the selection itself is exact, with lower bounds on the
  projection's principal axes (``greedy_coreset``);
- score: each patch's distance to its nearest memory patch; the image score is the largest, re-weighted by how
  isolated its nearest memory patch is among its ``neighbours`` nearest (eq. 7, b = 9); the patch map is bilinearly
  upsampled to the input and blurred with sigma 4 (official ``RescaleSegmentor``).
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
class PatchCoreConfig:
    """PatchCore hyperparameters; defaults from the paper and the official code (PatchCore-10%)."""

    layers: tuple[int, ...] = (2, 3)  # paper §3.1 / §4.1: layer2 + layer3 of ResNet-like backbones (strides 8, 16)
    patch_size: int = 3  # paper §3.1 / official ``--patchsize 3``: 3x3 local neighbourhood aggregation
    embed_dim: int = 1024  # official ``target_embed_dimension``: patch features average-pooled to this when wider
    coreset_ratio: float = 0.1  # paper §4.1 "PatchCore-10%" (official ``-p 0.1``)
    projection_dim: int = 128  # official ``ApproximateGreedyCoresetSampler``: random projection to 128 for selection
    neighbours: int = 9  # paper eq. 7: b = 9 nearest memory patches for the image-score re-weighting (anomalib)
    sigma: float = 4.0  # official ``RescaleSegmentor``: Gaussian blur sigma 4 of the upsampled map
    batch_size: int = 32  # images per batch when fitting and predicting (no effect on results)

    def __post_init__(self) -> None:
        if not 0 < self.coreset_ratio <= 1:
            raise ConfigError(f"patchcore: coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if self.patch_size < 1 or self.patch_size % 2 == 0:
            raise ConfigError(f"patchcore: patch_size must be an odd number >= 1, got {self.patch_size}")
        if min(self.embed_dim, self.projection_dim, self.neighbours) < 1 or self.sigma < 0:
            raise ConfigError("patchcore: embed_dim, projection_dim and neighbours must be >= 1, sigma >= 0")


_MARGIN = 1e-4  # relative slack on every bound, far above float32 rounding (~1e-6): a bound never drops a row
_GROUP = 1024  # rows per group of the running maximum


def _sq_distances(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distance of every row of ``x`` [N, D] to the point ``c`` [D], row by row (the same value
    per row whatever slice of ``x`` it is given, which keeps the pruned and the brute-force selections identical)."""
    return (x - c).square_().sum(1)


def _rows_near(aug: torch.Tensor, coef: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """For each candidate (row of ``coef`` [M, K]), the ascending rows (columns of ``aug`` [K, N]) where the bound
    ``coef @ aug`` is negative; the product is formed a cache-sized slice of rows at a time."""
    chunk = max(4096, 2**18 // len(coef))
    cands, rows = [], []
    for s in range(0, aug.shape[1], chunk):
        v = torch.mm(coef, aug[:, s : s + chunk])
        hit = torch.nonzero(v.amin(0) < 0).squeeze(1)  # rows that some candidate may bring closer
        j, r = torch.nonzero(v.index_select(1, hit) < 0).unbind(1)
        cands.append(j)
        rows.append(hit.index_select(0, r) + s)
    cands, rows = torch.cat(cands), torch.cat(rows)
    return rows.index_select(0, cands.argsort(stable=True)).split(cands.bincount(minlength=len(coef)).tolist())


def greedy_coreset(x: torch.Tensor, k: int, start: int = 0, lead: int = 32, batch: int = 128) -> torch.Tensor:
    """Indices of ``k`` rows of ``x`` [N, D] picked by greedy k-center (Gonzalez 1985; PatchCore §3.2, algorithm 1):
    from row ``start``, repeatedly the row farthest from every row picked so far, the lowest index among equals.

    Exact: the same picks as recomputing all N distances per pick (``tests/test_baselines.py``). Each row keeps its
    squared distance to the picked set, lowered only by the same row-wise sum as that brute force, and skipped only
    where a lower bound shows the new centre cannot bring it closer: (i) the squared distance over the first ``lead``
    dims, |x|^2 + |c|^2 - 2 x.c against the row's current distance, for a batch of up to ``batch`` likely next
    centres at once (the rows farthest now) in one matrix product; (ii) the sum over the first ``2 * lead`` dims for
    the rows that pass. Distances only fall, so a row ruled out when its batch was formed stays ruled out. Bounds
    carry a relative margin (``_MARGIN``) far above float rounding, so rounding can keep a row that cannot change,
    never drop one that can; a pick outside the batch starts a new one, which only costs time. The farthest row comes
    from per-group maxima over consecutive rows. Fast when the leading dims carry most of the variance (the caller
    rotates onto principal axes): MTD's 779k x 128 patches, k = 78k, in about 2 minutes on one core instead of 12.
    Runs on one intra-op thread: its many small ops lost 2-3x to thread hand-offs on a shared 2-core machine.
    """
    n, dims = x.shape
    k, p, q = min(k, n), min(lead, dims), min(2 * lead, dims)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        aug = torch.empty(p + 3, n, dtype=x.dtype)  # columns [x' | 1, |x'|^2, -dist], x' = first p dims, centred
        aug[:p] = (x[:, :p] - x[:, :p].mean(0)).T
        aug[p], aug[p + 1] = 1, aug[:p].square().sum(0)
        groups = -(-n // _GROUP)
        dist = torch.full((groups * _GROUP,), -torch.inf, dtype=x.dtype)  # the padding is never the farthest
        dist[:n] = _sq_distances(x, x[start])
        blocks = dist.view(groups, _GROUP)
        top = blocks.amax(1)
        picks, slot, near, size = [start], {}, (), 1
        while len(picks) < k:
            g = int(top.argmax())  # the first group holding the maximum, then its first row: the lowest index
            best = g * _GROUP + int(blocks[g].argmax())
            picks.append(best)
            if best not in slot:  # a new batch: this pick and the rows now farthest
                cands = torch.cat([torch.tensor([best]), dist[:n].topk(min(size, n)).indices])
                aug[p + 2] = -dist[:n]
                coef = torch.cat([-2 * aug[:p, cands].T, (1 - _MARGIN) * aug[p + 1, cands, None],
                                  torch.tensor([[1 - _MARGIN, 1 + _MARGIN]], dtype=x.dtype).expand(len(cands), 2)], 1)
                near = _rows_near(aug, coef)  # (1-m)(|x'|^2 + |c'|^2) - 2 x'.c' - (1+m) dist < 0
                slot = {int(r): i for i, r in enumerate(cands)}
                size = max(1, min(batch, 2 * n * len(cands) // max(1, sum(map(len, near)))))  # ~2N rows a batch
            rows, c = near[slot[best]], x[best]
            if q < dims:
                part = _sq_distances(x[:, :q].index_select(0, rows), c[:q])
                rows = rows.masked_select(part < dist.index_select(0, rows) * (1 + _MARGIN))
            d = _sq_distances(x.index_select(0, rows), c)
            closer = d < dist.index_select(0, rows)
            rows = rows.masked_select(closer)
            dist.index_copy_(0, rows, d.masked_select(closer))
            touched = rows.div(_GROUP, rounding_mode="floor").unique()
            top.index_copy_(0, touched, blocks.index_select(0, touched).amax(1))
    finally:
        torch.set_num_threads(threads)
    return torch.tensor(picks, dtype=torch.long)


def principal_axes(x: torch.Tensor) -> torch.Tensor:
    """``x`` [N, D] rotated onto its principal axes, largest variance first: an orthogonal map (distances kept up to
    float rounding) that lets ``greedy_coreset`` bound distances by their leading dims."""
    centred = x - x.mean(0)
    _, vectors = torch.linalg.eigh(centred.T @ centred)
    return (x @ vectors.flip(1)).contiguous()


def nearest(queries: torch.Tensor, bank: torch.Tensor, k: int = 1,
            chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances [N, k] and indices [N, k] of the ``k`` nearest rows of ``bank`` to each query, ascending;
    chunks of ``chunk`` queries (a chunk's distance matrix is chunk x len(bank) floats)."""
    bank_sq = bank.square().sum(1)
    dists, idx = [], []
    for q in queries.split(chunk):
        d2 = torch.addmm(bank_sq, q, bank.T, alpha=-2).add_(q.square().sum(1, keepdim=True))  # |q|^2 - 2 q.m + |m|^2
        d, i = d2.topk(k, dim=1, largest=False)
        dists.append(d.clamp_min_(0).sqrt_())
        idx.append(i)
    return torch.cat(dists), torch.cat(idx)


def nearest_distances(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 1024, tile: int = 1024) -> torch.Tensor:
    """[N] Euclidean distance of each query to its nearest row of ``bank``, without the index: each ``chunk`` x
    ``tile`` block of |m|^2 - 2 q.m is reduced to its row minima while it is in cache (|q|^2, the same along a row,
    is added at the end). The block is one product of [q, 1] and [-2m, |m|^2] (no bias copied into it first, as
    ``addmm`` does): on MTD's bank 83 % of the matrix product's rate against 77 % (``results/roofline.md``), 2x
    ``nearest``'s, whose minimum with its index costs 9x a plain minimum."""
    augmented = torch.cat([bank * -2, bank.square().sum(1, keepdim=True)], dim=1)
    out = []
    for q in queries.split(chunk):
        best = torch.full((len(q),), torch.inf, dtype=q.dtype, device=q.device)
        q1 = torch.cat([q, torch.ones_like(q[:, :1])], dim=1)
        for s in range(0, len(bank), tile):
            torch.minimum(best, torch.mm(q1, augmented[s : s + tile].T).amin(1), out=best)
        out.append(best.add_(q.square().sum(1)).clamp_min_(0).sqrt_())
    return torch.cat(out)


@register_model("patchcore")
class PatchCore(Detector):
    """PatchCore: a coreset memory bank of locally aware patch features; nearest-neighbour distance as anomaly score."""

    Config = PatchCoreConfig
    reference = True

    def __init__(self, extractor: FeatureExtractor, image_size: int, config: PatchCoreConfig) -> None:
        super().__init__(extractor, image_size, config)
        shapes = extractor.feature_shapes(image_size)
        self.dim = min(sum(c for c, _, _ in shapes), config.embed_dim)
        self.register_buffer("memory", torch.zeros(0, self.dim))

    def embed(self, features: list[torch.Tensor]) -> torch.Tensor:
        """[B, h*w, D] patch features: each map averaged over its local neighbourhood, the coarser ones bilinearly
        upsampled to the finest grid, concatenated, channels average-pooled to ``embed_dim`` when wider."""
        p = self.config.patch_size
        pooled = [F.avg_pool2d(f, p, stride=1, padding=p // 2) for f in features]  # anomalib: AvgPool2d(3, 1, 1)
        size = pooled[0].shape[-2:]
        x = torch.cat([pooled[0], *(F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                                    for f in pooled[1:])], dim=1).flatten(2).transpose(1, 2)
        if x.shape[-1] > self.dim:  # official ``Aggregator``: adaptive average pooling over the channels
            x = F.adaptive_avg_pool1d(x, self.dim)
        return x.contiguous()

    def fit(self, features: FeatureStore, progress: Progress = NULL_PROGRESS,
            images: torch.Tensor | None = None) -> dict[str, list[float]]:
        """Memory bank = every training patch, subsampled by greedy k-center on a fixed random projection."""
        cfg, device = self.config, self.device
        parts = []
        with progress.task("patchcore embed", total=len(features)) as advance:
            for feats in features.batches(cfg.batch_size):
                parts.append(self.embed([f.to(device) for f in feats]).flatten(0, 1).cpu())
                advance(len(feats[0]))
        bank = torch.cat(parts)
        del parts
        k = max(1, int(len(bank) * cfg.coreset_ratio))
        if k < len(bank):
            with progress.task(f"patchcore coreset {k} of {len(bank)}", total=None):
                selection = bank
                if bank.shape[1] > cfg.projection_dim:  # official: a random linear map, drawn from the seeded RNG
                    proj = torch.randn(bank.shape[1], cfg.projection_dim) / cfg.projection_dim ** 0.5
                    selection = bank @ proj
                selection = principal_axes(selection)  # a rotation: the same distances, leading dims for the bounds
                start = int(torch.randint(len(bank), (1,)))  # anomalib: a random first centre
                bank = bank[greedy_coreset(selection, k, start=start)]
        self.memory = bank.to(device)
        return {}

    @torch.no_grad()
    def patch_scores(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, h, w] nearest-memory distances and [B] re-weighted image scores (paper eq. 7, anomalib's form)."""
        if len(self.memory) == 0:
            raise ConfigError("patchcore: predict called before fit")
        b, _, h, w = features[0].shape
        emb = self.embed(features)  # [B, P, D]
        dist = nearest_distances(emb.flatten(0, 1), self.memory).view(b, h * w)
        rows = torch.arange(b, device=dist.device)
        top = dist.argmax(1)
        score, (_, idx) = dist[rows, top], nearest(emb[rows, top], self.memory)  # the most anomalous patch
        anchor = self.memory[idx[:, 0]]  # its nearest memory patch
        _, support = nearest(anchor, self.memory, k=min(self.config.neighbours, len(self.memory)))  # incl. itself
        to_support = (emb[rows, top].unsqueeze(1) - self.memory[support]).norm(dim=2)  # [B, b]
        weight = 1 - torch.softmax(to_support, dim=1)[:, 0]
        return dist.view(b, h, w), weight * score

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        dist, score = self.patch_scores(self.extractor(images.to(self.device)))
        return Prediction(score=score, anomaly_map=upsample_blur(dist, self.image_size, self.config.sigma))

    def protocol(self) -> dict[str, str]:
        return {"reference_baseline": "PatchCore (not a flow): coreset memory bank, nearest-neighbour distance",
                "coreset": f"exact greedy k-center, {self.config.coreset_ratio:.0%} of the training patches, on a "
                           f"random projection to {self.config.projection_dim} dims",
                "image_score": f"max patch distance re-weighted over {self.config.neighbours} neighbours (eq. 7)",
                "map": f"bilinear to the input, Gaussian blur sigma {self.config.sigma}"}
