"""Anomaly-detection metrics: pure functions, arrays in, floats out.

Definitions (reference notes, section B):

- AUROC: exact ROC area, one curve point per distinct score, trapezoid rule (same as ``roc_auc_score``).
- AUPR is reported as *average precision* (step-wise, same as ``average_precision_score``), NOT trapezoid AUPR.
- AUPRO: the exact MVTec AD definition (Bergmann et al., IJCV 2021): 8-connected ground-truth regions per image,
  pooled; PRO = unweighted mean region overlap; FPR over all anomaly-free pixels of all images; one point per
  distinct score; trapezoid up to FPR = ``fpr_limit`` (0.3) with linear interpolation there, divided by the limit.
- Pixel metrics pool every pixel of every image (good images contribute negatives only).
- F1-max: max over the PR curve of 2PR/(P+R).

Pixel AUROC, pixel AP and AUPRO share a single sort of the pooled pixel scores (see ``_descending_curve``). The curves
behind the areas (``roc_curve``, ``pro_curve``, ``pixel_curves``; for plots) come from the same sort and the same code,
so an area drawn next to a curve is exactly the metric.
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

from adbench.errors import ConfigError

__all__ = [
    "PixelCurves",
    "ProCurve",
    "RocCurve",
    "aupro",
    "auroc",
    "average_precision",
    "compute_metrics",
    "f1_max",
    "pixel_curves",
    "pro_curve",
    "roc_curve",
]

# 8-connectivity inside each image, no connectivity across the image axis of an [N, H, W] stack.
_STRUCTURE_3D = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_3D[1] = True


class _Curve(NamedTuple):
    """Cumulative counts at every distinct score, highest score first (one entry per run of tied scores)."""

    thresholds: np.ndarray  # [T] distinct scores, descending
    tps: np.ndarray  # [T] int64, positives with score >= threshold
    fps: np.ndarray  # [T] int64, negatives with score >= threshold
    pro: np.ndarray | None  # [T] float64, mean region overlap at threshold (None without region weights)


class RocCurve(NamedTuple):
    """ROC curve points (sklearn's ``roc_curve(..., drop_intermediate=False)``) and the exact area under them."""

    fpr: np.ndarray  # [T+1] float64, from 0: fraction of negatives with score >= threshold
    tpr: np.ndarray  # [T+1] float64, from 0: fraction of positives with score >= threshold
    thresholds: np.ndarray  # [T+1] distinct scores, descending, after a leading +inf
    auroc: float  # equals ``auroc(scores, labels)``; NaN with a single class


class ProCurve(NamedTuple):
    """Per-region-overlap curve cut at the FPR limit (interpolated there) and its normalized area."""

    fpr: np.ndarray  # [K] float64, from 0 up to ``fpr_limit``: fraction of anomaly-free pixels above threshold
    pro: np.ndarray  # [K] float64, mean overlap of the ground-truth regions at the same thresholds
    fpr_limit: float
    aupro: float  # equals ``aupro(maps, masks, fpr_limit)``; NaN without defect or without anomaly-free pixels


class PixelCurves(NamedTuple):
    """Everything drawn about the pooled pixels of a test set, from one sort."""

    roc: RocCurve  # pixel ROC; ``roc.auroc`` is the Pixel AUROC
    pro: ProCurve  # ``pro.aupro`` is the AUPRO
    f1: float  # best pixel F1 (``f1_max`` of maps vs masks)
    f1_threshold: float  # a pixel is predicted defective when its score >= this (NaN without defect pixels)


# ----------------------------------------------------------------------------------------------------------------
# input conversion and validation


def _to_numpy(x: Any) -> np.ndarray:
    """A numpy view/copy of a numpy array, torch tensor (duck-typed) or array-like."""
    if hasattr(x, "detach"):
        t = x.detach().cpu()
        if str(getattr(t, "dtype", "")) == "torch.bfloat16":  # numpy has no bfloat16
            t = t.float()
        return t.numpy()
    return np.asarray(x)


def _as_scores(x: np.ndarray, name: str) -> np.ndarray:
    """Scores as float32 when that is lossless (saves memory, enables the fast sort), else float64; must be finite."""
    if x.dtype == np.float32:
        out = x
    elif x.dtype.kind in "fiub":
        if x.dtype.kind == "f" and x.dtype.itemsize < 4:
            out = x.astype(np.float32)
        else:
            x64 = x.astype(np.float64, copy=False)
            x32 = x64.astype(np.float32)
            # only downcast when every value survives exactly, so ties are detected on the real values
            out = x32 if np.array_equal(x32, x64) else x64
    else:
        raise ConfigError(f"{name} must be numeric, got dtype {x.dtype}")
    if not np.isfinite(out).all():
        raise ConfigError(f"{name} contain NaN/inf")
    return out


def _as_binary(x: np.ndarray, name: str) -> np.ndarray:
    """A bool array from a bool or 0/1-valued array."""
    if x.dtype == np.bool_:
        return x
    if x.dtype.kind not in "fiu" or not ((x == 0) | (x == 1)).all():
        raise ConfigError(f"{name} must be binary (bool or 0/1 values)")
    return x != 0


def _scores_labels(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = _to_numpy(scores)
    y = _to_numpy(labels)
    if s.shape != y.shape:
        raise ConfigError(f"scores and labels differ in shape: {s.shape} vs {y.shape}")
    return _as_scores(s.ravel(), "scores"), _as_binary(y.ravel(), "labels")


def _maps_masks(anomaly_maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    m = _to_numpy(anomaly_maps)
    g = _to_numpy(masks)
    if m.ndim == 4 and m.shape[1] == 1:  # [N, 1, H, W] -> [N, H, W]
        m = m[:, 0]
    if g.ndim == 4 and g.shape[1] == 1:
        g = g[:, 0]
    if m.ndim != 3:
        raise ConfigError(f"anomaly maps must be [N, H, W], got shape {m.shape}")
    if m.shape != g.shape:
        raise ConfigError(f"anomaly maps and masks differ in shape: {m.shape} vs {g.shape}")
    return _as_scores(m, "anomaly maps"), _as_binary(g, "masks")


def _check_limit(fpr_limit: float) -> float:
    limit = float(fpr_limit)
    if not 0.0 < limit <= 1.0:
        raise ConfigError(f"AUPRO FPR limit must be in (0, 1], got {fpr_limit}")
    return limit


# ----------------------------------------------------------------------------------------------------------------
# the shared sort


def _f32_desc_keys(scores: np.ndarray) -> np.ndarray:
    """uint32 keys whose ASCENDING order is the DESCENDING order of the float32 ``scores``; equal values, equal keys."""
    bits = (scores + np.float32(0.0)).view(np.uint32)  # +0.0 turns -0.0 into +0.0, so equal values share bits
    # non-negative floats: key = 0x7FFFFFFF - bits; negative floats (sign bit set): key = bits
    return bits ^ (((bits >> np.uint32(31)) - np.uint32(1)) & np.uint32(0x7FFFFFFF))


def _descending_curve(scores: np.ndarray, groups: np.ndarray, region_weights: np.ndarray | None = None) -> _Curve:
    """Sort once by descending score and accumulate the counts all metrics need.

    Args:
        scores: [M] float32 or float64, finite.
        groups: [M] non-negative ints: 0 = negative, > 0 = positive (for pixels: the region id).
        region_weights: optional [n_groups] float64 weight per group (index 0 must be 0); its running sum is PRO.

    Returns:
        A ``_Curve`` with one entry per distinct score (the last point of every run of tied scores).
    """
    if scores.size == 0:
        empty_i = np.zeros(0, dtype=np.int64)
        return _Curve(scores[:0], empty_i, empty_i, None if region_weights is None else np.zeros(0))
    if scores.dtype == np.float32 and int(groups.max()) < 2**32:
        # Fast path: pack (descending score key, group) into uint64 and sort the keys themselves (no argsort, no
        # gather). Tie detection uses the high 32 bits, i.e. the exact float32 values.
        packed = _f32_desc_keys(scores).astype(np.uint64)
        packed <<= np.uint64(32)
        packed |= groups.astype(np.uint64, copy=False)
        packed.sort()
        if sys.byteorder == "little":  # strided uint32 views of the two halves avoid two copies
            hi, g_sorted = packed.view(np.uint32)[1::2], packed.view(np.uint32)[0::2]
        else:
            hi, g_sorted = (packed >> np.uint64(32)).astype(np.uint32), packed.astype(np.uint32)
        ends = np.flatnonzero(hi[1:] != hi[:-1])
        keys = hi[np.append(ends, hi.size - 1)]
        thresholds = (keys ^ (((keys >> np.uint32(31)) - np.uint32(1)) & np.uint32(0x7FFFFFFF))).view(np.float32)
    else:
        order = np.argsort(-scores)  # negation is exact; order inside ties is irrelevant
        s_sorted = scores[order]
        g_sorted = groups[order]
        del order
        ends = np.flatnonzero(s_sorted[1:] != s_sorted[:-1])
        thresholds = s_sorted[np.append(ends, s_sorted.size - 1)]
        del s_sorted
    ends = np.append(ends, g_sorted.size - 1)
    run = (g_sorted > 0).astype(np.int64)  # in-place cumsum of a native int64 array is the fastest variant
    tps = np.cumsum(run, out=run)[ends]
    fps = ends.astype(np.int64) + 1 - tps
    del run
    pro = None
    if region_weights is not None:
        acc = region_weights.astype(np.float64, copy=False)[g_sorted]
        pro = np.cumsum(acc, out=acc)[ends]
    return _Curve(thresholds, tps, fps, pro)


def _pixel_curve(maps: np.ndarray, masks: np.ndarray) -> _Curve:
    """One sorted curve over all pixels, with 8-connected per-image regions as groups and PRO weights."""
    regions, n_regions = ndimage.label(masks, structure=_STRUCTURE_3D)
    regions = regions.ravel()
    weights = np.zeros(n_regions + 1, dtype=np.float64)
    if n_regions:
        sizes = np.bincount(regions, minlength=n_regions + 1)[1:]
        weights[1:] = 1.0 / (sizes.astype(np.float64) * n_regions)
    return _descending_curve(maps.ravel(), regions, weights)


# ----------------------------------------------------------------------------------------------------------------
# metrics from a curve


def _aupr_from(c: _Curve) -> float:
    """The AP of a table: NaN, like the AUROC, when either class is absent (without negatives every ranking has AP
    1, sklearn's value, which says nothing about the detector)."""
    return float("nan") if c.tps.size == 0 or c.fps[-1] == 0 else _ap_from(c)


def _auroc_from(c: _Curve) -> float:
    if c.tps.size == 0 or c.tps[-1] == 0 or c.fps[-1] == 0:
        return float("nan")
    tp = np.concatenate(([0.0], c.tps.astype(np.float64)))
    fp = np.concatenate(([0.0], c.fps.astype(np.float64)))
    # integer-valued terms, exact in float64 for any realistic pixel count
    twice_area = np.sum(np.diff(fp) * (tp[1:] + tp[:-1]))
    return float(twice_area / (2.0 * tp[-1] * fp[-1]))


def _ap_from(c: _Curve) -> float:
    if c.tps.size == 0 or c.tps[-1] == 0:
        return float("nan")
    tp = c.tps.astype(np.float64)
    precision = tp / (tp + c.fps)
    d_tp = np.diff(tp, prepend=0.0)
    return float(np.sum(d_tp * precision) / tp[-1])


def _cut_at(x: np.ndarray, y: np.ndarray, x_max: float) -> tuple[int, float | None]:
    """``k`` with ``x[:k] <= x_max`` (x non-decreasing) and y linearly interpolated at x_max when the curve crosses it.

    ``y_at`` is None when a point lies exactly at ``x_max`` or the curve ends before it.
    """
    k = int(np.searchsorted(x, x_max, side="right"))
    if k < x.size and x[k - 1] < x_max:
        x0, y0, x1, y1 = x[k - 1], y[k - 1], x[k], y[k]
        return k, y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
    return k, None


def _trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under (x, y) for x in [x[0], x_max], x non-decreasing, PRO linearly interpolated at x_max."""
    k, y_at = _cut_at(x, y, x_max)
    area = float(np.sum(np.diff(x[:k]) * (y[1:k] + y[: k - 1])) / 2.0)
    if y_at is not None:
        area += float((x_max - x[k - 1]) * (y[k - 1] + y_at) / 2.0)
    return area


def _pro_points(c: _Curve) -> tuple[np.ndarray, np.ndarray] | None:
    """The whole PRO curve (FPR, PRO) from (0, 0) to (1, 1); None when it is undefined."""
    if c.pro is None or c.tps.size == 0 or c.tps[-1] == 0 or c.fps[-1] == 0:
        return None
    fpr = np.minimum(c.fps / float(c.fps[-1]), 1.0)
    pro = np.minimum(c.pro, 1.0)
    fpr = np.concatenate(([0.0], fpr, [1.0]))
    pro = np.concatenate(([0.0], pro, [1.0]))
    return fpr, pro


def _aupro_from(c: _Curve, fpr_limit: float) -> float:
    points = _pro_points(c)
    if points is None:
        return float("nan")
    return _trapezoid_to(*points, fpr_limit) / fpr_limit


def _pro_curve_from(c: _Curve, fpr_limit: float) -> ProCurve:
    """The PRO curve cut at ``fpr_limit`` (the points ``_aupro_from`` integrates) and its normalized area."""
    points = _pro_points(c)
    if points is None:
        return ProCurve(np.zeros(0), np.zeros(0), fpr_limit, float("nan"))
    fpr, pro = points
    k, y_at = _cut_at(fpr, pro, fpr_limit)
    if y_at is not None:
        fpr, pro = np.append(fpr[:k], fpr_limit), np.append(pro[:k], y_at)
    else:
        fpr, pro = fpr[:k], pro[:k]
    return ProCurve(fpr, pro, fpr_limit, _aupro_from(c, fpr_limit))


def _roc_curve_from(c: _Curve) -> RocCurve:
    """ROC points from the counts (fractions; all zero for a class that is absent) and the exact area."""
    tp = np.concatenate(([0.0], c.tps.astype(np.float64)))
    fp = np.concatenate(([0.0], c.fps.astype(np.float64)))
    tpr = tp / tp[-1] if tp[-1] > 0 else tp
    fpr = fp / fp[-1] if fp[-1] > 0 else fp
    thresholds = np.concatenate(([np.inf], c.thresholds.astype(np.float64)))
    return RocCurve(fpr, tpr, thresholds, _auroc_from(c))


def _f1_from(c: _Curve) -> tuple[float, float]:
    if c.tps.size == 0 or c.tps[-1] == 0:
        return float("nan"), float("nan")
    tp = c.tps.astype(np.float64)
    precision = tp / (tp + c.fps)
    recall = tp / tp[-1]
    denom = precision + recall
    f1 = np.divide(2.0 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    i = int(np.argmax(f1))
    return float(f1[i]), float(c.thresholds[i])


# ----------------------------------------------------------------------------------------------------------------
# public API


def auroc(scores: Any, labels: Any) -> float:
    """Exact ROC AUC (ties as in sklearn: one point per distinct score, trapezoid rule).

    Args:
        scores: [N] scores, higher = more anomalous (any shape, flattened).
        labels: [N] 0 = normal, 1 = anomalous (same shape as ``scores``).

    Returns:
        The AUROC, or NaN if only one class is present.
    """
    s, y = _scores_labels(scores, labels)
    return _auroc_from(_descending_curve(s, y.view(np.uint8)))


def average_precision(scores: Any, labels: Any) -> float:
    """Average precision, step-wise: sum over distinct thresholds of (R_n - R_{n-1}) * P_n (sklearn semantics).

    Args:
        scores: [N] scores, higher = more anomalous (any shape, flattened).
        labels: [N] 0 = normal, 1 = anomalous (same shape as ``scores``).

    Returns:
        The AP, or NaN if there are no positives.
    """
    s, y = _scores_labels(scores, labels)
    return _ap_from(_descending_curve(s, y.view(np.uint8)))


def f1_max(scores: Any, labels: Any) -> tuple[float, float]:
    """Best F1 over the PR curve and the threshold reaching it (predict anomalous when score >= threshold).

    Args:
        scores: [N] scores, higher = more anomalous (any shape, flattened).
        labels: [N] 0 = normal, 1 = anomalous (same shape as ``scores``).

    Returns:
        ``(f1, threshold)``; the highest such threshold on ties; ``(nan, nan)`` if there are no positives.
    """
    s, y = _scores_labels(scores, labels)
    return _f1_from(_descending_curve(s, y.view(np.uint8)))


def aupro(anomaly_maps: Any, masks: Any, fpr_limit: float = 0.3) -> float:
    """Normalized area under the per-region-overlap curve up to ``fpr_limit`` (exact MVTec AD definition).

    Args:
        anomaly_maps: [N, H, W] float scores (``[N, 1, H, W]`` is accepted too).
        masks: [N, H, W] bool or 0/1 ground truth, same shape as ``anomaly_maps``.
        fpr_limit: upper FPR integration limit in (0, 1]; the area is divided by it.

    Returns:
        AUPRO in [0, 1], or NaN if there are no defect pixels or no anomaly-free pixels.
    """
    limit = _check_limit(fpr_limit)
    maps, gt = _maps_masks(anomaly_maps, masks)
    return _aupro_from(_pixel_curve(maps, gt), limit)


def roc_curve(scores: Any, labels: Any) -> RocCurve:
    """ROC curve points, one per distinct score, and the AUROC computed from the same sort.

    Args:
        scores: [N] scores, higher = more anomalous (any shape, flattened).
        labels: [N] 0 = normal, 1 = anomalous (same shape as ``scores``).

    Returns:
        A ``RocCurve``; its ``auroc`` is exactly ``auroc(scores, labels)``.
    """
    s, y = _scores_labels(scores, labels)
    return _roc_curve_from(_descending_curve(s, y.view(np.uint8)))


def pro_curve(anomaly_maps: Any, masks: Any, fpr_limit: float = 0.3) -> ProCurve:
    """The per-region-overlap curve up to ``fpr_limit`` (the points AUPRO integrates) and the AUPRO.

    Args:
        anomaly_maps: [N, H, W] float scores (``[N, 1, H, W]`` is accepted too).
        masks: [N, H, W] bool or 0/1 ground truth, same shape as ``anomaly_maps``.
        fpr_limit: upper FPR limit in (0, 1].

    Returns:
        A ``ProCurve``; its ``aupro`` is exactly ``aupro(anomaly_maps, masks, fpr_limit)``; empty points and a NaN
        area if there are no defect pixels or no anomaly-free pixels.
    """
    return pixel_curves(anomaly_maps, masks, fpr_limit).pro


def pixel_curves(anomaly_maps: Any, masks: Any, fpr_limit: float = 0.3) -> PixelCurves:
    """Pixel ROC, PRO curve and the pixel-F1-optimal threshold of a test set, from one sort of all pixel scores.

    Args:
        anomaly_maps: [N, H, W] float scores (``[N, 1, H, W]`` is accepted too).
        masks: [N, H, W] bool or 0/1 ground truth, same shape as ``anomaly_maps``.
        fpr_limit: FPR limit of the PRO curve, in (0, 1].

    Returns:
        ``PixelCurves``; ``roc.auroc`` and ``pro.aupro`` equal ``compute_metrics``' ``pixel_auroc`` and ``aupro``.
    """
    limit = _check_limit(fpr_limit)
    maps, gt = _maps_masks(anomaly_maps, masks)
    c = _pixel_curve(maps, gt)
    f1, threshold = _f1_from(c)
    return PixelCurves(_roc_curve_from(c), _pro_curve_from(c, limit), f1, threshold)


def compute_metrics(
    image_scores: Any,
    image_labels: Any,
    anomaly_maps: Any | None,
    masks: Any | None,
    pro_limit: float = 0.3,
) -> dict[str, float]:
    """All standard metrics for one category; the pixel metrics share one sort of all pixel scores.

    Args:
        image_scores: [N] image anomaly scores (numpy array or torch tensor).
        image_labels: [N] 0 = normal, 1 = anomalous.
        anomaly_maps: [N, H, W] float maps, or None for image-only datasets.
        masks: [N, H, W] bool/0-1 ground truth, or None.
        pro_limit: FPR integration limit for AUPRO.

    Returns:
        ``image_auroc``, ``image_aupr`` (average precision), ``pixel_auroc``, ``pixel_aupr`` (average precision),
        ``aupro``; pixel metrics are NaN when ``anomaly_maps`` or ``masks`` is None; each is NaN when its labels
        lack a class (the AUPRs too, unlike ``average_precision``).

    Raises:
        ConfigError: mismatched lengths/shapes, non-binary labels/masks, NaN/inf scores or maps.
    """
    limit = _check_limit(pro_limit)
    s = _to_numpy(image_scores)
    y = _to_numpy(image_labels)
    if s.ndim != 1 or y.ndim != 1:
        raise ConfigError(f"image scores and labels must be 1-D, got shapes {s.shape} and {y.shape}")
    if s.shape != y.shape:
        raise ConfigError(f"image scores and labels differ in length: {s.shape[0]} vs {y.shape[0]}")
    s = _as_scores(s, "image scores")
    y = _as_binary(y, "image labels")
    maps = None if anomaly_maps is None else _to_numpy(anomaly_maps)
    gt = None if masks is None else _to_numpy(masks)
    for name, arr in (("anomaly maps", maps), ("masks", gt)):
        if arr is not None and (arr.ndim == 0 or arr.shape[0] != s.shape[0]):
            raise ConfigError(f"{name} have shape {arr.shape} but there are {s.shape[0]} image scores")

    img = _descending_curve(s, y.view(np.uint8))
    out = {"image_auroc": _auroc_from(img), "image_aupr": _aupr_from(img)}
    nan = float("nan")
    if maps is None or gt is None:
        if maps is not None:  # still reject a malformed or non-finite map
            _maps_masks(maps, np.zeros(maps.shape, dtype=bool))
        out.update(pixel_auroc=nan, pixel_aupr=nan, aupro=nan)
        return out
    maps, gt = _maps_masks(maps, gt)
    pix = _pixel_curve(maps, gt)
    out.update(pixel_auroc=_auroc_from(pix), pixel_aupr=_aupr_from(pix), aupro=_aupro_from(pix, limit))
    return out
