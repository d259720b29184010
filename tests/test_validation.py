"""The validation split: held-out training images, scored as they are and with synthetic defects, recorded next to
the test metrics, the same images whatever the seed; bad fractions fail in one line before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from adbench.datasets import AnomalyDataset, open_family
from adbench.errors import ConfigError
from adbench.runner import RunSpec, run_one
from adbench.validation import carve, synthetic_set


def test_carve_is_a_fixed_disjoint_split_of_the_training_images():
    train = AnomalyDataset(open_family("synthetic"), "pattern", "train", 64)
    keep, held = carve(train, 0.25)
    again_keep, again_held = carve(AnomalyDataset(open_family("synthetic"), "pattern", "train", 64), 0.25)
    assert len(held) == round(len(train) * 0.25) and len(keep) + len(held) == len(train)
    assert not set(keep.index.image_path) & set(held.index.image_path)
    assert list(held.index.image_path) == list(again_held.index.image_path)
    assert torch.equal(held[0].image, train[int(np.flatnonzero(train.index.image_path == held.index.image_path[0])[0])]
                       .image)
    for bad in (0.0, 1.0, 0.001):
        with pytest.raises(ConfigError, match="training images to validate on"):
            carve(train, bad)


def test_synthetic_set_is_the_held_out_images_then_each_with_a_defect():
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(6, 3, 32, 32, generator=g) * 255).to(torch.uint8)
    data = synthetic_set(images)
    n_bad = int(data["label"].sum())
    assert 0 < n_bad <= 6 and len(data["image"]) == 6 + n_bad and torch.equal(data["image"][:6], images)
    assert not data["mask"][:6].any() and all(m.any() for m in data["mask"][6:])
    assert np.array_equal(synthetic_set(images)["mask"], data["mask"])  # fixed defects


def test_a_run_with_validation_records_it_and_trains_on_the_rest(tmp_path):
    spec = RunSpec(model="cflow", dataset="synthetic", category="pattern", image_size=64, backbone="resnet18",
                   weights="random", results_dir=tmp_path, validation=0.25, save_maps=False,
                   overrides={"epochs": 1, "coupling_blocks": 1, "condition_dims": 8, "position_norm": "diagonal"})
    result = json.loads((run_one(spec) / "result.json").read_text())
    full = len(AnomalyDataset(open_family("synthetic"), "pattern", "train", 64))
    v = result["validation"]
    assert result["n_train"] == full - v["n_held_out"] and v["fraction"] == 0.25
    assert set(v["metrics"]) == set(result["metrics"]) and np.isfinite(v["heldout_nll_per_dim"])
    assert v["n_defective"] > 0 and sum(v["defect_sources"].values()) == v["n_held_out"]
    assert len(v["scores"]) == v["n_held_out"] + v["n_defective"] and np.isfinite(v["scores"]).all()
    plain = RunSpec(**{**spec.__dict__, "validation": 0.0})
    from adbench.models import resolve_config
    from adbench.runner import cell_key

    config = resolve_config("cflow", "resnet18", spec.overrides)
    assert result["cell"] == cell_key(spec, config) != cell_key(plain, config)
    from adbench.report import build_report

    report = build_report(tmp_path)
    assert "## Validation split (%)" in report
    assert f"| {v['metrics']['image_auroc'] * 100:.1f}" in report.split("## Validation split")[1]


def test_seed_agreement_is_the_mean_spearman_correlation_of_the_seeds_validation_scores():
    import pandas as pd

    from adbench.report import seed_agreement

    def runs(*scores):
        return pd.DataFrame({"category": ["a"] * len(scores), "validation": [{"scores": s} for s in scores]})

    assert seed_agreement(runs([1, 2, 3, 4], [10, 20, 30, 40])) == "1.000"  # ranks alike, whatever the scale
    assert seed_agreement(runs([1, 2, 3, 4], [4, 3, 2, 1])) == "-1.000"
    assert seed_agreement(runs([1, 2, 3, 4], [1, 2, 3, 4], [4, 3, 2, 1])) == f"{(1 - 1 - 1) / 3:.3f}"  # 3 pairs
    assert seed_agreement(runs([1, 2, 3])) == "–" and seed_agreement(runs([1, 2], [1, 2, 3])) == "–"
