"""A validation split carved from the training images: what a setting is chosen on, never the test split.

``adbench run --validation F`` holds out a fraction F of the normal training images (the same images for every seed
and setting: a fixed draw), trains on the rest, and scores the held-out images twice: as they are (normal) and with
one synthetic defect each (``adbench.defects``: DRAEM-style Perlin-mask blends, in-domain or procedural sources).
The five metrics on that set go to ``result.json`` under ``validation``, next to the test metrics, together with the
held-out negative log-likelihood per dimension for detectors that have a density (``heldout_nll``): a lower one is a
better density of normal features, with no defect model involved. Choose settings on these, then report the test.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from adbench import metrics as M
from adbench.datasets import AnomalyDataset
from adbench.defects import DefectSynthesizer
from adbench.errors import ConfigError

CARVE_SEED = 20240601  # fixed: the held-out images do not depend on the run's seed or settings
DEFECT_SEED = 7  # fixed: the same synthetic defects on them every time


def carve(train: AnomalyDataset, fraction: float) -> tuple[AnomalyDataset, AnomalyDataset]:
    """(the training images kept, the held-out ones): a fixed random ``fraction`` of ``train`` (at least 2)."""
    n = len(train)
    held = round(n * fraction)
    if not 0 < fraction < 1 or held < 2 or n - held < 2:
        raise ConfigError(f"--validation {fraction} leaves {held} of {n} training images to validate on and "
                          f"{n - held} to train on; both need at least 2 (use a fraction in (0, 1))")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(CARVE_SEED)).numpy()
    keep, out = AnomalyDataset.__new__(AnomalyDataset), AnomalyDataset.__new__(AnomalyDataset)
    for part, rows in ((keep, np.sort(order[held:])), (out, np.sort(order[:held]))):
        part.__dict__.update(train.__dict__)
        part.index = train.index.iloc[rows].reset_index(drop=True)
    return keep, out


def synthetic_set(images: torch.Tensor) -> dict[str, Any]:
    """The held-out images [N, 3, S, S] uint8, then each with a synthetic defect (those whose mask came out empty are
    left out): images, labels, masks, in the runner's ``load_split`` layout."""
    synth = DefectSynthesizer(images, soft_labels=False)
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
    }
    nll = getattr(detector, "heldout_nll", None)
    if nll is not None:
        with torch.no_grad():
            out["heldout_nll_per_dim"] = float(torch.cat([nll(held_out["image"][i : i + batch_size].to(device))
                                                          for i in range(0, len(held_out["image"]), batch_size)])
                                               .mean())
    return out
