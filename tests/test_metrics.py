"""Tests for adbench.metrics: sklearn parity for AUROC/AP, a brute-force AUPRO reference, hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from adbench.errors import ConfigError
from adbench.metrics import aupro, auroc, average_precision, compute_metrics, f1_max

KEYS = {"image_auroc", "image_aupr", "pixel_auroc", "pixel_aupr", "aupro"}


# ----------------------------------------------------------------------------------------------------------------
# independent brute-force AUPRO reference (one pass over the data per distinct threshold)


def reference_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks, dtype=bool)
    regions = []  # (image index, boolean region mask)
    for i in range(maps.shape[0]):
        lab, k = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, lab == r) for r in range(1, k + 1)]
    normal = ~masks
    n_normal = normal.sum()
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        above = maps >= t
        xs.append((above & normal).sum() / n_normal)
        ys.append(float(np.mean([above[i][r].sum() / r.sum() for i, r in regions])))
    xs.append(1.0)
    ys.append(1.0)
    area = 0.0
    for x0, y0, x1, y1 in zip(xs[:-1], ys[:-1], xs[1:], ys[1:], strict=True):
        if x0 >= limit:
            break
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:  # segment crosses the limit: cut it there
            y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_lim) / 2
            break
    return area / limit


def random_case(seed: int, decimals: int | None, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """4 images of 16x16: image 0 anomaly-free, a few blobs elsewhere, two diagonal-touching pixels in image 1."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.random((4, 16, 16)), (0, 1.5, 1.5))
    masks = noise > np.quantile(noise, 0.85)
    masks[0] = False
    masks[1, :4, :4] = False
    masks[1, 0, 0] = masks[1, 1, 1] = True
    maps = rng.random((4, 16, 16)) + 0.4 * masks
    if decimals is not None:
        maps = np.round(maps, decimals)
    return maps.astype(dtype), masks


# ----------------------------------------------------------------------------------------------------------------
# AUROC / AP vs sklearn


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["float64", "float32", "ties1", "ties2_f32", "negative_f32"])
def test_auroc_ap_match_sklearn(seed: int, kind: str) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(300) < 0.3
    scores = rng.random(300) + 0.3 * labels
    if kind == "float32":
        scores = scores.astype(np.float32)
    elif kind == "ties1":
        scores = np.round(scores, 1)
    elif kind == "ties2_f32":
        scores = np.round(scores, 2).astype(np.float32)
    elif kind == "negative_f32":
        scores = (rng.standard_normal(300) + labels).astype(np.float32)
        scores[:20] = 0.0
        scores[20:40] = -0.0
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize(
    ("scores", "labels"),
    [
        ([0.1, 0.9], [0, 1]),
        ([0.9, 0.1], [0, 1]),
        ([0.5, 0.5], [0, 1]),
        ([0.5, 0.5, 0.5, 0.2], [1, 0, 1, 0]),
        ([3, 1, 2, 2, 0], [1, 0, 1, 0, 0]),
        ([0.2, 0.8, 0.8, 0.4], [True, False, True, False]),
    ],
)
def test_tiny_cases_match_sklearn(scores: list, labels: list) -> None:
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-15)
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-15)


def test_tiny_known_values() -> None:
    assert auroc([0.1, 0.9], [0, 1]) == 1.0
    assert auroc([0.9, 0.1], [0, 1]) == 0.0
    assert auroc([0.5, 0.5], [0, 1]) == 0.5
    assert average_precision([0.5, 0.5], [0, 1]) == 0.5
    assert average_precision([0.1, 0.2, 0.3], [1, 1, 1]) == 1.0


def test_single_class_gives_nan() -> None:
    assert math.isnan(auroc([0.1, 0.5, 0.7], [0, 0, 0]))
    assert math.isnan(auroc([0.1, 0.5, 0.7], [1, 1, 1]))
    assert math.isnan(average_precision([0.1, 0.5, 0.7], [0, 0, 0]))
    assert math.isnan(auroc([], []))
    assert math.isnan(average_precision([], []))


def test_scores_labels_validation() -> None:
    with pytest.raises(ConfigError):
        auroc([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ConfigError):
        auroc([0.1, 0.2], [0, 2])
    with pytest.raises(ConfigError, match="NaN/inf"):
        average_precision([0.1, float("nan")], [0, 1])


# ----------------------------------------------------------------------------------------------------------------
# F1-max


@pytest.mark.parametrize("seed", range(3))
def test_f1_max_matches_bruteforce(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(120) < 0.4
    scores = np.round(rng.random(120) + 0.4 * labels, 1)
    best = max(f1_score(labels, scores >= t) for t in np.unique(scores))
    f1, thr = f1_max(scores, labels)
    assert f1 == pytest.approx(best, abs=1e-12)
    assert f1_score(labels, scores >= thr) == pytest.approx(f1, abs=1e-12)


def test_f1_max_edge_cases() -> None:
    assert f1_max([0.1, 0.9], [0, 1]) == (1.0, 0.9)
    f1, thr = f1_max([0.1, 0.9], [0, 0])
    assert math.isnan(f1) and math.isnan(thr)


# ----------------------------------------------------------------------------------------------------------------
# AUPRO vs the brute-force reference


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    ("decimals", "dtype"), [(None, np.float64), (None, np.float32), (1, np.float64), (2, np.float32)]
)
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_matches_bruteforce(seed: int, decimals: int | None, dtype: type, limit: float) -> None:
    maps, masks = random_case(seed, decimals, dtype)
    assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(reference_aupro(maps, masks, limit), abs=1e-9)


def test_aupro_regions_are_per_image() -> None:
    # image 0: region of 2 px scored 1; image 1: region of 1 px at the same place scored 0. Two regions, not one 3-px
    # region: PRO at t=1 is (1 + 0) / 2 = 0.5 -> curve (0,0),(0,0.5),(1,1) -> 0.3*(0.5 + 0.65)/2 / 0.3 = 0.575.
    masks = np.zeros((2, 3, 3), dtype=bool)
    masks[0, 0, :2] = True
    masks[1, 0, 0] = True
    maps = np.zeros((2, 3, 3))
    maps[0, 0, :2] = 1.0
    assert aupro(maps, masks) == pytest.approx(0.575, abs=1e-12)
    assert aupro(maps, masks) == pytest.approx(reference_aupro(maps, masks), abs=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# AUPRO hand-computed cases


def test_aupro_perfect_map() -> None:
    _, masks = random_case(0, None, np.float64)
    maps = masks.astype(np.float32)  # curve (0,0),(0,1),(1,1)
    assert aupro(maps, masks) == 1.0
    assert aupro(maps, masks, fpr_limit=1.0) == 1.0


def test_aupro_constant_map() -> None:
    # one threshold: every pixel is above it -> curve (0,0),(1,1),(1,1), i.e. PRO = FPR.
    # area up to L is L^2/2, divided by L: 0.3 -> 0.15; 1.0 -> 0.5.
    _, masks = random_case(1, None, np.float64)
    maps = np.full(masks.shape, 0.7, dtype=np.float32)
    assert aupro(maps, masks) == pytest.approx(0.15, abs=1e-12)
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.5, abs=1e-12)


def test_aupro_interpolates_at_the_limit() -> None:
    # one 3x4 image, region = 2 horizontally adjacent pixels, 10 normal pixels.
    # scores: normal 0.95 x1, 0.7 x3, 0.1 x6; region 0.9 and 0.7 (tied with three normal pixels).
    #   t=0.95: FPR 0.1, PRO 0      t=0.9: FPR 0.1, PRO 0.5
    #   t=0.7:  FPR 0.4, PRO 1.0    t=0.1: FPR 1.0, PRO 1.0
    # curve (0,0),(0.1,0),(0.1,0.5),(0.4,1),(1,1),(1,1): segment (0.1,0.5)-(0.4,1) crosses FPR 0.3,
    # PRO(0.3) = 0.5 + 0.5*(0.2/0.3) = 5/6; area = 0.2*(0.5 + 5/6)/2 = 2/15; /0.3 -> 4/9.
    # fpr_limit=1: 0.3*(0.5+1)/2 + 0.6*1 = 0.825.
    maps = np.array([[[0.95, 0.7, 0.7, 0.7], [0.9, 0.7, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1]]])
    masks = np.zeros_like(maps, dtype=bool)
    masks[0, 1, :2] = True
    assert aupro(maps, masks) == pytest.approx(4 / 9, abs=1e-12)
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.825, abs=1e-12)
    assert aupro(maps.astype(np.float32), masks) == pytest.approx(4 / 9, abs=1e-12)


def test_aupro_diagonal_pixels_are_one_region() -> None:
    # 4x4 image: defects (0,0),(1,1) touch diagonally -> ONE region under 8-connectivity; (3,3) is a second region.
    # only (0,0) scores 1, everything else 0.
    # 8-conn: PRO(t=1) = (1/2 + 0)/2 = 0.25, curve (0,0),(0,0.25),(1,1): PRO(0.3) = 0.25 + 0.75*0.3 = 0.475,
    #   area = 0.3*(0.25 + 0.475)/2 = 0.10875, /0.3 -> 0.3625.
    # (4-conn would give 3 regions, PRO(t=1) = 1/3 -> 0.4333.)
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 3, 3] = True
    maps = np.zeros((1, 4, 4))
    maps[0, 0, 0] = 1.0
    assert aupro(maps, masks) == pytest.approx(0.3625, abs=1e-12)


def test_aupro_unweighted_by_region_size() -> None:
    # a 1-px region fully detected and a 9-px region missed: PRO(t=1) = (1 + 0)/2 = 0.5 (size-weighted would be 0.1)
    # curve (0,0),(0,0.5),(1,1) -> 0.575 as in test_aupro_regions_are_per_image.
    masks = np.zeros((1, 8, 8), dtype=bool)
    masks[0, 0, 0] = True
    masks[0, 4:7, 4:7] = True
    maps = masks * 0.0
    maps[0, 0, 0] = 1.0
    assert aupro(maps, masks) == pytest.approx(0.575, abs=1e-12)


def test_aupro_nan_and_validation() -> None:
    maps = np.random.default_rng(0).random((2, 4, 4))
    assert math.isnan(aupro(maps, np.zeros((2, 4, 4), dtype=bool)))  # no defect pixels
    assert math.isnan(aupro(maps, np.ones((2, 4, 4), dtype=bool)))  # no normal pixels
    with pytest.raises(ConfigError):
        aupro(maps, np.zeros((2, 4, 5), dtype=bool))
    with pytest.raises(ConfigError):
        aupro(maps, np.zeros((2, 4, 4), dtype=bool), fpr_limit=0.0)
    with pytest.raises(ConfigError):
        aupro(maps, np.full((2, 4, 4), 2))  # non-binary mask


def test_aupro_accepts_channel_dim_and_float_masks() -> None:
    maps, masks = random_case(2, 2, np.float32)
    expected = aupro(maps, masks)
    assert aupro(maps[:, None], masks[:, None].astype(np.float32)) == expected


# ----------------------------------------------------------------------------------------------------------------
# compute_metrics


def metric_case(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    maps, masks = random_case(seed, None, np.float32)
    masks = np.concatenate([masks, np.zeros((2, 16, 16), dtype=bool)])
    maps = np.concatenate([maps, rng.random((2, 16, 16), dtype=np.float32)])
    labels = masks.any(axis=(1, 2)).astype(np.int64)
    scores = maps.max(axis=(1, 2))
    return scores, labels, maps, masks


def test_compute_metrics_values() -> None:
    scores, labels, maps, masks = metric_case()
    m = compute_metrics(scores, labels, maps, masks)
    assert set(m) == KEYS
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in m.values())
    assert m["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert m["image_aupr"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert m["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert m["pixel_aupr"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert m["aupro"] == pytest.approx(reference_aupro(maps, masks), abs=1e-9)
    assert compute_metrics(scores, labels, maps, masks, pro_limit=1.0)["aupro"] == pytest.approx(
        reference_aupro(maps, masks, 1.0), abs=1e-9
    )


def test_compute_metrics_torch_input() -> None:
    torch = pytest.importorskip("torch")
    scores, labels, maps, masks = metric_case(1)
    expected = compute_metrics(scores, labels, maps, masks)
    got = compute_metrics(
        torch.from_numpy(scores),
        torch.from_numpy(labels),
        torch.from_numpy(maps).requires_grad_(True),
        torch.from_numpy(masks),
    )
    assert got == expected


def test_compute_metrics_without_masks() -> None:
    scores, labels, maps, _ = metric_case()
    for m in (compute_metrics(scores, labels, None, None), compute_metrics(scores, labels, maps, None)):
        assert set(m) == KEYS
        assert all(math.isnan(m[k]) for k in ("pixel_auroc", "pixel_aupr", "aupro"))
        assert 0.0 <= m["image_auroc"] <= 1.0 and 0.0 <= m["image_aupr"] <= 1.0


def test_compute_metrics_without_normal_images_leaves_the_auprs_undefined() -> None:
    """With no normal image (or pixel) every ranking has AP 1 (``average_precision`` keeps sklearn's value); the
    table says "undefined" instead, as it does for the AUROC."""
    scores, _, maps, masks = metric_case()
    m = compute_metrics(scores, np.ones(len(scores), dtype=int), maps, np.ones_like(masks))
    assert all(math.isnan(m[k]) for k in KEYS)
    assert average_precision(scores, np.ones(len(scores), dtype=int)) == 1.0
    m = compute_metrics(scores, np.ones(len(scores), dtype=int), maps, masks)  # normal pixels remain
    assert math.isnan(m["image_aupr"]) and 0.0 < m["pixel_aupr"] < 1.0


def test_compute_metrics_rejects_bad_input() -> None:
    scores, labels, maps, masks = metric_case()
    bad_calls = [
        (scores, labels[:-1], maps, masks),  # lengths differ
        (scores, labels, maps[:-1], masks[:-1]),  # fewer maps than images
        (scores, labels, maps, masks[:, :, :-1]),  # map/mask shapes differ
        (scores, labels, maps[:, :, :, None], masks[:, :, :, None]),  # not [N, H, W]
        (scores, labels * 2, maps, masks),  # labels not binary
    ]
    for args in bad_calls:
        with pytest.raises(ConfigError) as err:
            compute_metrics(*args)
        assert "\n" not in str(err.value)
    nan_maps = maps.copy()
    nan_maps[1, 2, 3] = np.nan
    with pytest.raises(ConfigError, match="anomaly maps contain NaN/inf"):
        compute_metrics(scores, labels, nan_maps, masks)
    with pytest.raises(ConfigError, match="anomaly maps contain NaN/inf"):
        compute_metrics(scores, labels, nan_maps, None)
    inf_scores = scores.copy()
    inf_scores[0] = np.inf
    with pytest.raises(ConfigError, match="NaN/inf"):
        compute_metrics(inf_scores, labels, maps, masks)
