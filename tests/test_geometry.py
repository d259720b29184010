"""Input geometry: ``squash`` (the default, unchanged) and ``pad`` (aspect ratio kept), evaluated on the same pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from adbench import metrics
from adbench.cli import app
from adbench.datasets import AnomalyDataset, open_family, to_eval_view
from adbench.errors import ConfigError
from adbench.models import Prediction
from adbench.progress import NULL_PROGRESS
from adbench.report import metric_table
from adbench.results import load_results, results_frame, write_run
from adbench.runner import RunSpec, cell_key, predict_all
from adbench.sweep import expand
from conftest import code_now

FAST = ["--image-size", "64", "--epochs", "1", "--set", "flow_steps=2", "--device", "cpu"]


def write_array(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def make_wide(root: Path, w: int = 48, h: int = 24, n: int = 6) -> Path:
    """A non-square MVTec-layout category ``tile`` (w x h images of smooth random texture): n train/good,
    3 test/good, 3 test/crack with a bright patch and its mask."""
    rng = np.random.default_rng(0)

    def texture() -> np.ndarray:
        coarse = rng.integers(0, 256, (h // 4, w // 4, 3), np.uint8)
        return np.array(Image.fromarray(coarse).resize((w, h), Image.BICUBIC))

    for i in range(n):
        write_array(root / "tile" / "train" / "good" / f"{i:03d}.png", texture())
    for i in range(3):
        write_array(root / "tile" / "test" / "good" / f"{i:03d}.png", texture())
        bad = texture()
        bad[4:12, 30:40] = 255
        write_array(root / "tile" / "test" / "crack" / f"{i:03d}.png", bad)
        mask = np.zeros((h, w), np.uint8)
        mask[4:12, 30:40] = 255
        write_array(root / "tile" / "ground_truth" / "crack" / f"{i:03d}_mask.png", mask)
    return root


def test_pad_keeps_the_aspect_ratio_and_fills_the_square(tmp_path):
    src = np.random.default_rng(1).integers(0, 256, (20, 60, 3), np.uint8)  # h 20, w 60: aspect 3
    write_array(tmp_path / "d" / "c" / "train" / "good" / "000.png", src)
    s = AnomalyDataset(open_family("folder", root=tmp_path / "d"), "c", "train", 30, geometry="pad")[0]
    assert s.image.shape == (3, 30, 30) and s.image.dtype == torch.uint8 and s.mask.shape == (30, 30)
    top, left, h, w = s.box
    assert (top, left, h, w) == (10, 0, 10, 30)  # longer side = 30, aspect 3 kept, centred
    inside = s.image[:, top : top + h, left : left + w].permute(1, 2, 0).numpy()
    assert np.array_equal(inside, np.array(Image.fromarray(src).resize((30, 10), Image.BILINEAR)))
    img = s.image.numpy()
    assert np.array_equal(img[:, top - 1], img[:, top + 1]) and np.array_equal(img[:, top + h], img[:, top + h - 2])


def test_squash_is_unchanged_and_a_square_image_pads_to_the_same(tmp_path):
    src = np.random.default_rng(2).integers(0, 256, (24, 48, 3), np.uint8)
    path = write_array(tmp_path / "d" / "c" / "train" / "good" / "000.png", src)
    fam = open_family("folder", root=tmp_path / "d")
    before = np.array(Image.open(path).convert("RGB").resize((32, 32), Image.BILINEAR), dtype=np.uint8)  # the old code
    for s in (AnomalyDataset(fam, "c", "train", 32)[0], AnomalyDataset(fam, "c", "train", 32, "squash")[0]):
        assert s.image.numpy().tobytes() == torch.from_numpy(before).permute(2, 0, 1).contiguous().numpy().tobytes()
        assert s.box == (0, 0, 32, 32)
    write_array(tmp_path / "e" / "c" / "train" / "good" / "000.png", src[:, :24])
    fam = open_family("folder", root=tmp_path / "e")
    squash, pad = (AnomalyDataset(fam, "c", "train", 32, g)[0] for g in ("squash", "pad"))
    assert torch.equal(squash.image, pad.image) and pad.box == (0, 0, 32, 32)


def test_unknown_geometry_is_a_one_line_error_listing_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"^unknown geometry 'crop'; valid: squash, pad$"):
        RunSpec(geometry="crop")
    with pytest.raises(ConfigError, match="valid: squash, pad"):
        AnomalyDataset(open_family("synthetic"), "pattern", "test", 32, geometry="crop")
    result = CliRunner().invoke(app, ["run", "--geometry", "crop", "--results-dir", str(tmp_path)])
    assert result.exit_code == 1 and result.output.strip() == "error: unknown geometry 'crop'; valid: squash, pad"


def test_eval_view_crops_the_box_and_resizes_back():
    maps = np.zeros((2, 8, 8), np.float32)
    maps[0, 2:6] = 1.0  # image 0 lies in rows 2..5, its pad is 0
    boxes = np.array([[2, 0, 4, 8], [0, 0, 8, 8]])
    out = to_eval_view(maps, boxes)
    assert out.shape == (2, 8, 8) and out.dtype == np.float32
    assert np.all(out[0] == 1.0) and out[1].tobytes() == maps[1].tobytes()  # a full box passes bit for bit
    images = np.zeros((1, 3, 8, 8), np.uint8)
    images[0, :, :, 3:5] = 200
    assert np.all(to_eval_view(images, np.array([[0, 3, 8, 2]])) == 200)


class ImageAsMap(torch.nn.Module):
    """A stand-in detector whose anomaly map is its input's first channel: shows where each map pixel came from."""

    def predict(self, x):
        amap = x[:, 0].float()
        return Prediction(score=amap.flatten(1).amax(1), anomaly_map=amap)

    def finalize(self, scores, maps):
        return scores, maps


def test_pad_maps_come_back_on_the_squashed_pixels(tmp_path):
    make_wide(tmp_path / "w")
    fam = open_family("folder", root=tmp_path / "w")
    squash, pad = (AnomalyDataset(fam, "tile", "test", 64, g) for g in ("squash", "pad"))
    boxes = np.array([pad[i].box for i in range(len(pad))])
    assert (boxes == [16, 0, 32, 64]).all()  # 48x24 -> 64x32, centred
    images = torch.stack([pad[i].image for i in range(len(pad))])
    _, maps, _, _ = predict_all(ImageAsMap(), images, 4, torch.device("cpu"), NULL_PROGRESS, boxes=boxes)
    want = torch.stack([squash[i].image[0] for i in range(len(squash))]).float().numpy()
    assert maps.shape == want.shape == (6, 64, 64)
    raw = images[:, 0].float().numpy()  # the padded view, not mapped back
    assert np.abs(maps - want).mean() < 2.0  # the same pixels, resampled twice (measured 0.7 grey levels)
    assert np.abs(raw - want).mean() > 20.0  # unmapped, they would not line up (measured 52)
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(squash, pad, strict=True))


def test_pad_run_is_evaluated_like_squash_and_recorded(tmp_path, monkeypatch):
    make_wide(tmp_path / "w")
    seen: dict[str, tuple] = {}  # geometry -> (maps shape, labels, masks) the run's metrics were computed on
    compute, now = metrics.compute_metrics, {}

    def spy(scores, labels, maps, masks, **kw):
        seen.setdefault(now["geometry"], (np.shape(maps), np.array(labels), np.array(masks)))
        return compute(scores, labels, maps, masks, **kw)

    monkeypatch.setattr(metrics, "compute_metrics", spy)
    results = {}
    for geometry in ("squash", "pad"):
        now["geometry"] = geometry
        args = ["run", "--dataset", "folder", "--root", str(tmp_path / "w"), "--geometry", geometry, "--results-dir",
                str(tmp_path / geometry), "--cache-dir", str(tmp_path / "cache"), "--save-maps", *FAST]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        (path,) = (tmp_path / geometry / "runs").glob("*/result.json")
        results[geometry] = json.loads(path.read_text())
        assert (path.parent / "maps.png").is_file()
    (shape, labels, masks), (pad_shape, pad_labels, pad_masks) = seen["squash"], seen["pad"]
    assert shape == pad_shape == (6, 64, 64)
    assert np.array_equal(labels, pad_labels) and np.array_equal(masks, pad_masks) and masks.any()
    squash, pad = results["squash"], results["pad"]
    assert squash["geometry"] == "squash" and pad["geometry"] == "pad" and squash["n_test"] == pad["n_test"] == 6
    assert "reflect-padded" in pad["protocol"]["geometry"] and squash["cell"] != pad["cell"]
    assert squash["metrics"] != pad["metrics"]  # the detector saw other images
    assert len([p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]) == 2  # one key each


def test_cell_key_differs_and_sweeps_pass_geometry(tmp_path):
    from adbench.models import resolve_config

    config = resolve_config("fastflow", "tf_efficientnet_lite0", {}, None, dataset="synthetic", category="pattern")
    spec = RunSpec(dataset="synthetic", category="pattern")
    assert cell_key(spec, config) != cell_key(RunSpec(dataset="synthetic", category="pattern", geometry="pad"), config)
    grid = {"models": ["fastflow"], "datasets": ["synthetic"], "categories": ["pattern"], "seeds": [0],
            "overrides": {"geometry": "pad", "epochs": 1}}
    (cell,) = expand(grid, tmp_path)
    assert cell.spec.geometry == "pad" and "geometry=pad" in cell.settings() and "geometry" not in cell.spec.overrides
    with pytest.raises(ConfigError, match="unknown geometry 'crop'"):
        expand({**grid, "overrides": {"geometry": "crop"}}, tmp_path)


def test_report_gives_each_geometry_its_own_column(tmp_path):
    m = {"image_auroc": 0.9, "pixel_auroc": 0.8, "image_aupr": 0.7, "pixel_aupr": 0.3, "aupro": 0.6}
    base = {"model": "padim", "dataset": "mtd", "category": "mtd", "seed": 0, "backbone": "tf_efficientnet_lite0",
            "image_size": 256, "metrics": m, "timing": {"fit_s": 1.0, "test_images_per_s": 5.0}, **code_now("padim")}
    write_run(tmp_path, "old", {"result.json": json.dumps(base)})  # before the option: squash
    write_run(tmp_path, "squash", {"result.json": json.dumps({**base, "seed": 1, "geometry": "squash"})})
    write_run(tmp_path, "pad", {"result.json": json.dumps({**base, "geometry": "pad",
                                                           "metrics": {**m, "image_auroc": 0.5}})})
    table = metric_table(results_frame(load_results(tmp_path)), "image_auroc")
    cols = [c for c in table.columns if c.startswith("padim")]
    assert [c.removesuffix(" (reference)") for c in cols] == ["padim (geometry=pad)", "padim (geometry=squash)"]
    assert table.iloc[0][cols[0]] == "50.0" and table.iloc[0][cols[1]] == "90.0 ± 0.0"  # squash: 2 seeds, no pad
