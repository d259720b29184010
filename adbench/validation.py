"""A validation split carved from the training images: what a setting is chosen on, never the test split.

``adbench run --validation F`` holds out a fraction F of the normal training images (the same images for every seed
and setting: a fixed draw), trains on the rest, and scores the held-out images twice: as they are (normal) and with
one synthetic defect each (``adbench.defects``: DRAEM-style Perlin-mask blends, in-domain or procedural sources).
The five metrics on that set go to ``result.json`` under ``validation``, next to the test metrics, together with the
held-out negative log-likelihood per dimension for detectors that have a density (``heldout_nll``): a lower one is a
better density of normal features, with no defect model involved. Choose settings on these, then report the test.

A detector that chooses a setting itself inside ``fit`` (clscnf: its fusion weight) uses the same pieces on its own
training images: the fixed draw (``held_out_rows``), the defective set (``synthetic_set``), the choice
(``choose_fusion``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from adbench import metrics as M
from adbench.datasets import AnomalyDataset
from adbench.defects import DefectSynthesizer
from adbench.errors import ConfigError
from adbench.progress import NULL_PROGRESS, Progress

CARVE_SEED = 20240601  # fixed: the held-out images do not depend on the run's seed or settings
DEFECT_SEED = 7  # fixed: the same synthetic defects on them every time


def held_out_rows(n: int, fraction: float, option: str = "--validation",
                  hint: str = "use a fraction in (0, 1)") -> tuple[np.ndarray, np.ndarray]:
    """(rows kept, rows held out) of ``n`` training images, each sorted: a fixed random ``fraction`` (at least 2 of
    each), the same draw whatever the run's seed or settings (``CARVE_SEED``); ``option`` and ``hint`` for errors."""
    held = round(n * fraction)
    if not 0 < fraction < 1 or held < 2 or n - held < 2:
        raise ConfigError(f"{option} {fraction} leaves {held} of {n} training images to validate on and "
                          f"{n - held} to train on; both need at least 2 ({hint})")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(CARVE_SEED)).numpy()
    return np.sort(order[held:]), np.sort(order[:held])


def carve(train: AnomalyDataset, fraction: float) -> tuple[AnomalyDataset, AnomalyDataset]:
    """(the training images kept, the held-out ones): a fixed random ``fraction`` of ``train`` (``held_out_rows``)."""
    keep, out = AnomalyDataset.__new__(AnomalyDataset), AnomalyDataset.__new__(AnomalyDataset)
    for part, rows in zip((keep, out), held_out_rows(len(train), fraction), strict=True):
        part.__dict__.update(train.__dict__)
        part.index = train.index.iloc[rows].reset_index(drop=True)
    return keep, out


def synthetic_set(images: torch.Tensor, *, object_mask: str = "none", fill_holes: bool = True) -> dict[str, Any]:
    """The held-out images [N, 3, S, S] uint8, then each with a synthetic defect (those whose mask came out empty are
    left out): images, labels, masks, in the runner's ``load_split`` layout. ``object_mask`` / ``fill_holes``: where
    defects may land (``DefectSynthesizer``); sources are in-domain or procedural, never a texture folder."""
    synth = DefectSynthesizer(images, soft_labels=False, object_mask=object_mask, fill_holes=fill_holes)
    defects = synth(torch.arange(len(images)), torch.Generator().manual_seed(DEFECT_SEED))
    made = defects.masks.flatten(1).any(1)
    bad = (defects.images[made] * 255).round().to(torch.uint8)
    n, size = len(images), images.shape[-1]
    return {"image": torch.cat([images, bad]),
            "label": np.r_[np.zeros(n, dtype=int), np.ones(len(bad), dtype=int)],
            "mask": torch.cat([torch.zeros(n, size, size, dtype=torch.bool), defects.masks[made]]).numpy(),
            "sources": dict(synth.source_counts)}


def validate(detector, held_out: dict[str, Any], predict_all, batch_size: int, device: torch.device,
             progress) -> dict[str, Any]:
    """Metrics of ``detector`` on the synthetic validation set built from the held-out images (``held_out``: a
    ``load_split`` dict), plus its held-out NLL per dimension where it has a density."""
    data = synthetic_set(held_out["image"])
    scores, maps, _, _ = predict_all(detector, data["image"], batch_size, device, progress)
    out: dict[str, Any] = {
        "how": "fixed held-out fraction of the training images, scored as they are and with one synthetic defect "
               "each (adbench.defects, seed fixed); trained on the rest",
        "n_held_out": len(held_out["image"]), "n_defective": int(data["label"].sum()),
        "defect_sources": data["sources"],
        "metrics": M.compute_metrics(scores, data["label"], maps, data["mask"]),
        "scores": [float(s) for s in scores],  # the held-out images, then their defective copies
    }
    nll = getattr(detector, "heldout_nll", None)
    if nll is not None:
        with torch.no_grad():
            out["heldout_nll_per_dim"] = float(torch.cat([nll(held_out["image"][i : i + batch_size].to(device))
                                                          for i in range(0, len(held_out["image"]), batch_size)])
                                               .mean())
    return out


FUSION_SCALINGS = ("raw", "standardised")


def auroc_se(auroc: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUROC from ``n_pos`` positives and ``n_neg`` negatives (Hanley & McNeil 1982)."""
    q1, q2 = auroc / (2 - auroc), 2 * auroc**2 / (1 + auroc)
    var = (auroc * (1 - auroc) + (n_pos - 1) * (q1 - auroc**2) + (n_neg - 1) * (q2 - auroc**2)) / (n_pos * n_neg)
    return math.sqrt(max(var, 0.0))


def choose_fusion(base: torch.Tensor, extra: torch.Tensor, labels: np.ndarray, grid: Sequence[float],
                  scalings: Sequence[str] = FUSION_SCALINGS, names: tuple[str, str] = ("base", "extra"),
                  tie_se: float = 1.0) -> dict[str, Any]:
    """The weight w and scaling of joint = base + w * extra (image score = joint max) by the Image AUROC on a labelled
    validation set (``synthetic_set``).

    ``raw`` sums the maps as they are; ``standardised`` first makes each (map - mean) / std, both over all pixels of
    the normal validation images, so w weighs the two maps' spreads rather than their units (in raw units it is
    w * std_base / std_extra). Candidates within ``tie_se`` standard errors of the best AUROC (``auroc_se``; 0 =
    exact ties only) tie, and a tie goes to the smallest weight in raw units, raw first: a max over many noisy
    estimates is optimistic (with a pure-noise ``extra`` the best AUROC is often at a w > 0; tests/test_clscnf.py),
    and the synthetic defects are of the family a defect classifier learnt, so the set flatters ``extra``.

    Args:
        base: [N, H, W] maps of the first part (weight 1) on the validation images.
        extra: [N, H, W] maps of the weighted part.
        labels: [N] 0 = normal, 1 = synthetic defect.
        grid: candidate weights w >= 0.
        scalings: the candidate scalings, of ``FUSION_SCALINGS``.
        names: the two parts' names in the record.
        tie_se: the tie margin, in standard errors of the best AUROC.

    Returns:
        ``weight``, ``scaling``, ``image_auroc`` (of the choice), ``best_image_auroc`` and ``tie_margin`` (AUROC),
        ``affine`` (mean, std of base, mean, std of extra: joint = (base - m_b) / s_b + w (extra - m_e) / s_e; 0, 1,
        0, 1 for raw), ``candidates`` (scaling -> w -> Image AUROC), ``alone`` (each part's own Image AUROC, its map
        max) and ``stats`` (each part's normal-pixel mean and std).
    """
    normal = torch.from_numpy(np.asarray(labels) == 0)
    if normal.all() or not normal.any():
        raise ConfigError(f"choosing the fusion weight needs normal and defective validation images, got "
                          f"{int(normal.sum())} and {int((~normal).sum())} (hold out more training images)")
    stats = {name: (float(m[normal].mean()), max(float(m[normal].std()), 1e-12))
             for name, m in zip(names, (base, extra), strict=True)}
    rows, candidates = [], {}
    for scaling in scalings:
        (m_b, s_b), (m_e, s_e) = stats.values() if scaling == "standardised" else ((0.0, 1.0), (0.0, 1.0))
        b, e = (base - m_b) / s_b, (extra - m_e) / s_e
        for w in grid:
            auroc = M.auroc((b + w * e).flatten(1).amax(1).numpy(), labels)
            candidates.setdefault(scaling, {})[f"{w:g}"] = auroc
            rows.append((w * s_b / s_e, scaling != "raw", -auroc, w, scaling, [m_b, s_b, m_e, s_e]))
    best = -min(r[2] for r in rows)
    margin = tie_se * auroc_se(best, int((~normal).sum()), int(normal.sum()))
    chosen = min(r for r in rows if -r[2] >= best - margin - 1e-12)
    return {"weight": chosen[3], "scaling": chosen[4], "image_auroc": -chosen[2], "best_image_auroc": best,
            "tie_margin": margin, "affine": chosen[5], "candidates": candidates,
            "alone": {name: M.auroc(m.flatten(1).amax(1).numpy(), labels) for name, m in zip(names, (base, extra),
                                                                                               strict=True)},
            "stats": {name: {"mean": m, "std": s} for name, (m, s) in stats.items()}}


@torch.no_grad()
def held_out_fusion(part_maps: Callable[[torch.Tensor], dict[str, torch.Tensor]], held: torch.Tensor,
                    bases: Sequence[str | tuple[str, ...]], extra: str, grid: Sequence[float],
                    scalings: Sequence[str] = FUSION_SCALINGS, *, tie_se: float = 1.0, batch_size: int = 32,
                    progress: Progress = NULL_PROGRESS, **defects) -> dict[str, dict[str, Any]]:
    """``choose_fusion`` of each map named in ``bases`` with the map ``extra``, on held-out training images ``held``
    [N, 3, S, S] uint8, as they are and with one synthetic defect each (``synthetic_set(held, **defects)``, built
    once); ``part_maps`` gives the named [B, S, S] maps of a uint8 batch (one pass for all). A base that is a tuple of
    names is the sum of those maps, each standardised by the normal held-out pixels (``standardised_sum``), recorded
    under the names joined by ``+`` with ``sum_affine`` (mean, std of each). One record per base; each adds ``how``,
    ``n_held_out``, ``n_defective`` and ``defect_sources``."""
    data = synthetic_set(held, **defects)
    parts: dict[str, list[torch.Tensor]] = {}
    with progress.task("choose fusion (held-out training images)", total=len(data["image"])) as advance:
        for start in range(0, len(data["image"]), batch_size):
            batch = data["image"][start : start + batch_size]
            for name, m in part_maps(batch).items():
                parts.setdefault(name, []).append(m.float().cpu())
            advance(len(batch))
    maps = {name: torch.cat(m) for name, m in parts.items()}
    normal, sums = torch.from_numpy(data["label"] == 0), {}
    for names in (b for b in bases if not isinstance(b, str)):
        key = "+".join(names)
        sums[key] = [v for name in names for v in (float(maps[name][normal].mean()),
                                                   max(float(maps[name][normal].std()), 1e-12))]
        maps[key] = standardised_sum([maps[name] for name in names], sums[key])
    how = ("validation: Image AUROC of the joint map max on held-out training images, as they are and with one "
           "synthetic defect each (adbench.validation: draw and defects fixed); candidates within tie_margin of the "
           "best tie, and a tie goes to the smallest w in raw units (raw first)")
    record = {"n_held_out": len(held), "n_defective": int(data["label"].sum()), "defect_sources": data["sources"]}
    keys = [b if isinstance(b, str) else "+".join(b) for b in bases]
    return {key: {"how": how, **choose_fusion(maps[key], maps[extra], data["label"], grid, scalings, (key, extra),
                                              tie_se), **record, **({"sum_affine": sums[key]} if key in sums else {})}
            for key in keys}


def standardised_sum(maps: Sequence[torch.Tensor], affine: Sequence[float]) -> torch.Tensor:
    """sum_k (maps[k] - affine[2k]) / affine[2k + 1]: maps of different units summed with equal say."""
    return sum((m - affine[2 * k]) / affine[2 * k + 1] for k, m in enumerate(maps))
