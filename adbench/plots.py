"""Pictures: a run's anomaly-map grid and ROC/PRO curves; the report's bar charts, speed scatter and heatmap.

Everything is drawn with matplotlib's object API on an Agg canvas (no pyplot, so no global state and no display) and
comes back as PNG bytes; the caller decides where they go. Plotting only reads its inputs, and every area printed on
a figure comes from ``adbench.metrics`` (the same code as the metrics in ``result.json``).

Readable in colour and in grey:

- anomaly maps and the heatmap use ``viridis`` (perceptually uniform, lightness rises monotonically, so it prints as a
  grey ramp); masks and thresholded maps use ``gray``; ground-truth outlines are white with a black edge;
- each detector keeps one colour (Okabe-Ito palette, colour-blind safe), one marker and one bar hatch in every figure,
  picked by its position in the model registry (``adbench list models``); hatches and markers keep detectors apart
  in grey;
- axes carry units: rates are fractions, metrics are in %, speed is test images per second.
"""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib import patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg  # the Agg backend, without pyplot
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from adbench import metrics as M

__all__ = ["MAP_CMAP", "category_heatmap", "detector_style", "metric_bars", "run_figures", "speed_scatter",
           "telling_samples"]

MAP_CMAP = "viridis"  # maps and heatmap: monotonic lightness, prints as grey
# Okabe & Ito (2008), colour-blind safe; black last
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
HATCHES = ("", "//", "..", "xx", "\\\\", "++", "oo", "--")
DPI = 100
BAR_IN = 0.3  # inches per bar or heatmap row of a report figure
LABEL_CHAR_IN = 0.062  # about the width of one character of an 8-point label, inches
PANEL_IN = 2.1  # inches per image panel of the map grid
CURVE_POINTS = 4000  # at most ~this many points per drawn curve (pixel curves have millions)
OUTLINE = [patheffects.withStroke(linewidth=2.6, foreground="black")]


# ----------------------------------------------------------------------------------------------------------------
# shared helpers


def detector_style(model: str) -> dict[str, str]:
    """Colour, marker and hatch of a detector, fixed by its position in the model registry.

    A name that is not registered (e.g. a result from another version) gets a style from a hash of the name.
    """
    from adbench.models import list_models

    names = list_models()
    i = names.index(model) if model in names else len(names) + zlib.crc32(model.encode())
    return {"color": PALETTE[i % len(PALETTE)], "marker": MARKERS[i % len(MARKERS)], "hatch": HATCHES[i % len(HATCHES)]}


def _png(fig: Figure) -> bytes:
    """The figure as PNG bytes (no timestamp or version metadata, so equal figures give equal bytes)."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _label_inches(labels) -> float:
    """About the width the longest of ``labels`` takes at 8 points, inches (a report figure grows with it)."""
    return 0.6 + LABEL_CHAR_IN * max((len(str(label)) for label in labels), default=0)


def _thin(x: np.ndarray, y: np.ndarray, n: int = CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """About ``n`` points of a monotone curve (x and y non-decreasing) that draw the same line.

    Points are kept at equal steps of the L1 arc length in units of the axis ranges; every dropped point lies within
    one step (2/n of the ranges) of the drawn line, far below a pixel.
    """
    if x.size <= n:
        return x, y
    span_x = float(x[-1] - x[0]) or 1.0
    span_y = float(y[-1] - y[0]) or 1.0
    s = (x - x[0]) / span_x + (y - y[0]) / span_y
    keep = np.unique(np.concatenate([[0], np.searchsorted(s, np.linspace(0.0, s[-1], n)).clip(max=x.size - 1),
                                     [x.size - 1]]))
    return x[keep], y[keep]


def _pct(v: float) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{100 * v:.1f}%"


def _as_numpy(x: Any) -> np.ndarray:
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


# ----------------------------------------------------------------------------------------------------------------
# per run


def telling_samples(scores: np.ndarray, labels: np.ndarray, per_class: int = 3) -> list[int]:
    """The most telling test samples: the highest-scored good images, then the lowest-scored defective ones.

    Args:
        scores: [N] image scores (higher = more anomalous).
        labels: [N] 0 = good, 1 = defective.
        per_class: how many of each (fewer when a class has fewer images).

    Returns:
        Indices: false-alarm candidates (most anomalous-looking good image first), then miss candidates (least
        anomalous-looking defect first).
    """
    scores, labels = np.asarray(scores), np.asarray(labels)
    good, bad = np.flatnonzero(labels == 0), np.flatnonzero(labels != 0)
    good = good[np.argsort(-scores[good], kind="stable")][:per_class]
    bad = bad[np.argsort(scores[bad], kind="stable")][:per_class]
    return [int(i) for i in (*good, *bad)]


def _outline(ax, mask: np.ndarray, dashed: bool = False) -> None:
    """The ground truth's outline: white with a black edge (visible on any colour and in grey)."""
    if mask.any():
        cs = ax.contour(mask.astype(np.float32), levels=[0.5], colors="white", linewidths=1.1,
                        linestyles="--" if dashed else "-")
        cs.set_path_effects(OUTLINE)


def _map_grid(images, masks, labels, defects, paths, scores, maps, rows: list[int], threshold: float, f1: float,
              title: str) -> bytes:
    n_rows, n_cols = len(rows), 5
    # fixed geometry in inches (a constrained layout of 30 panels costs seconds): row labels left, colour bar right
    left, right, top, bottom, gap = 1.2, 1.15, 1.05, 0.12, 0.08
    width, height = n_cols * PANEL_IN + (n_cols - 1) * gap + left + right, n_rows * PANEL_IN + (n_rows - 1) * gap
    height += top + bottom
    fig = Figure(figsize=(width, height))
    grid = fig.add_gridspec(n_rows, n_cols, left=left / width, right=1 - right / width, top=1 - top / height,
                            bottom=bottom / height, wspace=gap / PANEL_IN, hspace=gap / PANEL_IN)
    axes = grid.subplots(squeeze=False)
    # one colour scale for every map of the test set: lowest value to the 99.9th percentile (a few hot pixels would
    # otherwise darken everything); the colour bar marks the clipping
    vmin, vmax = float(maps.min()), float(np.percentile(maps, 99.9))
    if not vmax > vmin:
        vmax = vmin + 1.0
    norm = Normalize(vmin, vmax, clip=True)
    cmap = matplotlib.colormaps[MAP_CMAP]
    rank = np.empty(len(scores), dtype=np.int64)
    rank[np.argsort(-scores, kind="stable")] = np.arange(1, len(scores) + 1)
    has_threshold = math.isfinite(threshold)
    heads = ["input", "ground truth", "anomaly map", "overlay\n(line = truth)",
             f"map ≥ {threshold:.4g} in white\n(best pixel F1 {f1:.2f}; dashed = truth)" if has_threshold
             else "thresholded map"]
    im = None
    for r, i in enumerate(rows):
        image = images[i].transpose(1, 2, 0)
        mask, amap = masks[i], maps[i]
        gray = image.astype(np.float32).mean(axis=2) / 255.0
        ax = axes[r]
        ax[0].imshow(image)
        ax[1].imshow(mask, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        im = ax[2].imshow(amap, cmap=cmap, norm=norm)
        overlay = cmap(norm(amap))
        overlay[..., 3] = 0.15 + 0.6 * norm(amap)  # low scores mostly transparent: the image shows through
        ax[3].imshow(gray, cmap="gray", vmin=0, vmax=1)
        ax[3].imshow(overlay)
        _outline(ax[3], mask)
        if has_threshold:
            ax[4].imshow(amap >= threshold, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            _outline(ax[4], mask, dashed=True)
        else:
            ax[4].text(0.5, 0.5, "no defect pixels:\nno F1 threshold", ha="center", va="center",
                       transform=ax[4].transAxes, fontsize=8)
        kind = "good" if labels[i] == 0 else str(defects[i])
        name = Path(str(paths[i])).name
        name = name if len(name) <= 22 else name[:10] + "…" + name[-11:]
        ax[0].set_ylabel(f"{kind}\nscore {scores[i]:.4g}\nrank {rank[i]} of {len(scores)}\n{name}", fontsize=8)
        for a in ax:
            a.set_xticks([])
            a.set_yticks([])
    for a, head in zip(axes[0], heads, strict=True):
        a.set_title(head, fontsize=9)
    bar_h = min(3.2, n_rows * PANEL_IN) / height
    cax = fig.add_axes(((width - right + 0.15) / width, 0.5 * (1 - top / height + bottom / height) - bar_h / 2,
                        0.15 / width, bar_h))
    fig.colorbar(im, cax=cax, extend="max", label="anomaly score (one scale for all maps of the test set)")
    fig.suptitle(f"{title}\nhighest-scored good images (false alarms) and lowest-scored defects (misses); "
                 "rank 1 = most anomalous", fontsize=10, y=1 - 0.08 / height, va="top")
    return _png(fig)


def _roc_figure(image_roc: M.RocCurve, pixel_roc: M.RocCurve | None, style: dict, title: str) -> bytes:
    fig = Figure(figsize=(5.6, 5.2), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.6", ls=":", lw=1, label="chance (AUROC 50%)")
    ax.plot(*_thin(image_roc.fpr, image_roc.tpr), color=style["color"], lw=2,
            label=f"image ROC (AUROC {_pct(image_roc.auroc)})")
    if pixel_roc is not None and math.isfinite(pixel_roc.auroc):
        ax.plot(*_thin(pixel_roc.fpr, pixel_roc.tpr), color=style["color"], lw=1.6, ls="--",
                label=f"pixel ROC (AUROC {_pct(pixel_roc.auroc)})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.set_xlabel("false positive rate (fraction of good images / good pixels)")
    ax.set_ylabel("true positive rate (fraction of defective images / pixels)")
    ax.legend(loc="lower right", fontsize=9)
    ax.set_title(f"{title}: ROC", fontsize=10)
    return _png(fig)


def _pro_figure(pro: M.ProCurve | None, style: dict, title: str) -> bytes:
    fig = Figure(figsize=(6.0, 4.6), layout="constrained")
    ax = fig.subplots()
    limit = 0.3 if pro is None else pro.fpr_limit
    if pro is not None and math.isfinite(pro.aupro):
        x, y = _thin(pro.fpr, pro.pro)
        ax.fill_between(x, y, color=style["color"], alpha=0.15, lw=0)
        ax.plot(x, y, color=style["color"], lw=2, label=f"PRO curve (AUPRO {_pct(pro.aupro)} = area ÷ {limit:g})")
        ax.legend(loc="lower right", fontsize=9)
    else:
        ax.text(0.5, 0.5, "no defect pixels (or no good pixels):\nPRO undefined", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlim(0, limit)
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.set_xlabel(f"false positive rate (fraction of good pixels, up to {limit:g})")
    ax.set_ylabel("per-region overlap (mean fraction of each defect region)")
    ax.set_title(f"{title}: PRO curve", fontsize=10)
    return _png(fig)


def run_figures(
    *,
    images: Any,
    masks: Any,
    labels: Any,
    defects: Sequence[str],
    paths: Sequence[str],
    scores: Any,
    maps: Any,
    model: str,
    title: str,
    per_class: int = 3,
    pro_limit: float = 0.3,
) -> dict[str, bytes]:
    """The pictures of one run: ``maps.png`` (a grid of telling test samples), ``roc.png`` and ``pro.png``.

    The grid's columns are the input, the ground truth, the anomaly map (viridis, one scale for every map of the
    test set, clipped at its 99.9th percentile), the map over the grey image with the truth outlined, and the map
    thresholded at the pixel-F1-optimal threshold of the whole test set (``metrics.pixel_curves``). Its rows are
    the ``per_class`` highest-scored good images and the ``per_class`` lowest-scored defective ones. The areas in
    the legends are computed by ``adbench.metrics`` from the same sort as the metrics, so they equal them.

    Args:
        images: [N, 3, S, S] uint8 test images (numpy or torch).
        masks: [N, S, S] bool ground truth.
        labels: [N] 0 = good, 1 = defective.
        defects: [N] defect type per image.
        paths: [N] source path per image (its file name labels a row).
        scores: [N] image scores.
        maps: [N, S, S] anomaly maps.
        model: detector name (picks its colour).
        title: shown on every figure, e.g. ``fastflow on mtd/mtd``.
        per_class: rows per class in the grid.
        pro_limit: FPR limit of the PRO curve.

    Returns:
        File name -> PNG bytes. Inputs are only read.
    """
    images, masks, labels = _as_numpy(images), _as_numpy(masks).astype(bool, copy=False), _as_numpy(labels)
    scores, maps = _as_numpy(scores), _as_numpy(maps)
    style = detector_style(model)
    image_roc = M.roc_curve(scores, labels)
    pixel = M.pixel_curves(maps, masks, pro_limit) if masks.any() else None
    rows = telling_samples(scores, labels, per_class)
    threshold, f1 = (pixel.f1_threshold, pixel.f1) if pixel is not None else (float("nan"), float("nan"))
    return {
        "maps.png": _map_grid(images, masks, labels, defects, paths, scores, maps, rows, threshold, f1, title),
        "roc.png": _roc_figure(image_roc, pixel.roc if pixel else None, style, title),
        "pro.png": _pro_figure(pixel.pro if pixel else None, style, title),
    }


# ----------------------------------------------------------------------------------------------------------------
# report


def metric_bars(summary: pd.DataFrame, ylabel: str) -> bytes:
    """Horizontal bars: one panel per dataset, one bar per detector column with its full label beside it, the seed
    standard deviation as error bars and the value written after each bar.

    Args:
        summary: rows with ``dataset``, ``column`` (detector label), ``model``, ``mean`` and ``std`` (in %; std NaN
            for a single seed) and ``n`` (seeds).
        ylabel: the metric and its unit, e.g. ``Image AUROC (%)``.
    """
    datasets = sorted(summary.dataset.unique())
    columns = sorted(summary.column.unique())
    models = summary.groupby("column").model.first()
    fig = Figure(figsize=(_label_inches(columns) + 3.4 * len(datasets), max(2.6, 1.4 + BAR_IN * len(columns))),
                 layout="constrained")
    axes = fig.subplots(1, len(datasets), squeeze=False, sharey=True)[0]
    for ax, dataset in zip(axes, datasets, strict=True):
        rows = summary[summary.dataset == dataset].set_index("column").reindex(columns)
        for j, (column, row) in enumerate(rows.iterrows()):
            style = detector_style(str(models[column]))
            mean, std, n = float(row["mean"]), float(row["std"]), int(np.nan_to_num(row["n"]))
            ax.barh(j, np.nan_to_num(mean), 0.8, color=style["color"], hatch=style["hatch"], edgecolor="black",
                    linewidth=0.6)
            spread = math.isfinite(std) and math.isfinite(mean)  # error bars only where there are several seeds
            if spread:
                ax.errorbar(mean, j, xerr=std, fmt="none", ecolor="black", capsize=2, lw=1)
            text = "–" if not math.isfinite(mean) else \
                f"{mean:.1f}" + (f" ± {std:.1f}" if spread else "") + f" ({n} seed{'s' * (n != 1)})"
            ax.annotate(text, (np.nan_to_num(mean) + (std if spread else 0.0), j), textcoords="offset points",
                        xytext=(3, 0), ha="left", va="center", fontsize=8)
        ax.set_xlim(0, 140)  # room for the values written after the bars
        ax.set_xticks(np.arange(0, 101, 20))
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlabel(ylabel)
        ax.set_title(f"{dataset} (mean over its categories)", fontsize=10)
    axes[0].set_yticks(np.arange(len(columns)), columns, fontsize=8)
    axes[0].invert_yaxis()  # the first column on top (the panels share the axis)
    fig.suptitle(f"{ylabel.split(' (')[0]} per dataset: mean over seeds, error bar = std over seeds", fontsize=10)
    return _png(fig)


def speed_scatter(summary: pd.DataFrame) -> bytes:
    """Test images/s against Image AUROC, one numbered point per detector column, one panel per dataset, and the
    numbers' key below (labels beside the points would overlap).

    Args:
        summary: rows with ``dataset``, ``column``, ``model``, ``speed`` / ``speed_std`` (test images/s) and
            ``auroc`` / ``auroc_std`` (Image AUROC in %); std NaN for a single seed.
    """
    datasets = sorted(summary.dataset.unique())
    number = {column: i + 1 for i, column in enumerate(sorted(summary.column.unique()))}
    key_in = 0.3 + 0.17 * len(number)  # one line per detector
    fig = Figure(figsize=(max(5.4 * len(datasets), _label_inches(number) + 0.4), 4.2 + key_in), layout="constrained")
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    handles = {}
    for ax, dataset in zip(axes, datasets, strict=True):
        part = summary[summary.dataset == dataset]
        for row in part.itertuples():
            style = detector_style(str(row.model))
            xerr = row.speed_std if math.isfinite(row.speed_std) else None
            yerr = row.auroc_std if math.isfinite(row.auroc_std) else None
            h = ax.errorbar(row.speed, row.auroc, xerr=xerr, yerr=yerr, fmt=style["marker"], color=style["color"],
                            markersize=9, markeredgecolor="black", capsize=3)
            handles.setdefault(row.column, h)
            ax.annotate(str(number[row.column]), (row.speed, row.auroc), textcoords="offset points", xytext=(6, 4),
                        fontsize=8)
        speeds = part.speed.to_numpy(dtype=float)
        aurocs = part.auroc.to_numpy(dtype=float)
        if np.isfinite(speeds).any():
            ax.set_xlim(0, np.nanmax(speeds) * 1.2)
        lo = np.nanmin(aurocs) if np.isfinite(aurocs).any() else 50.0
        ax.set_ylim(max(0.0, min(50.0, lo - 5)), 100)
        ax.grid(alpha=0.3)
        ax.set_xlabel("test images per second (higher = faster)")
        ax.set_ylabel("Image AUROC (%)")
        ax.set_title(f"{dataset}: accuracy vs speed (better: up and right)", fontsize=10)
    keys = sorted(handles, key=number.get)
    fig.legend([handles[k] for k in keys], [f"{number[k]}  {k}" for k in keys], loc="outside lower left", ncols=1,
               fontsize=8, frameon=False)
    return _png(fig)


def category_heatmap(table: pd.DataFrame, label: str = "Image AUROC (%)") -> bytes:
    """Heatmap of a metric per detector row and (dataset, category) column, values printed in the cells.

    Args:
        table: index = ``dataset/category`` labels, columns = detector labels, values in % (NaN = not run).
        label: the metric and its unit (colour bar label).

    Detectors are the rows, so their long labels read across. The colour scale is fixed at 50 (chance) to 100 so
    heatmaps of different reports compare; viridis prints in grey.
    """
    values = table.to_numpy(dtype=float).T
    n_rows, n_cols = values.shape
    fig = Figure(figsize=(max(4.8, _label_inches(table.columns) + 2.2 + 0.75 * n_cols),
                          max(2.8, 1.8 + BAR_IN * n_rows)), layout="constrained")
    ax = fig.subplots()
    cmap = matplotlib.colormaps[MAP_CMAP].with_extremes(bad="0.85")
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=50, vmax=100, aspect="auto")
    for (r, c), v in np.ndenumerate(values):
        if math.isfinite(v):
            light = cmap((v - 50) / 50)[:3]
            dark_text = 0.299 * light[0] + 0.587 * light[1] + 0.114 * light[2] > 0.5
            ax.text(c, r, f"{v:.1f}", ha="center", va="center", fontsize=8, color="black" if dark_text else "white")
        else:
            ax.text(c, r, "–", ha="center", va="center", fontsize=8)
    tilted = n_cols > 3
    ax.set_xticks(np.arange(n_cols), list(table.index), rotation=30 if tilted else 0, ha="right" if tilted
                  else "center", fontsize=8)
    ax.set_yticks(np.arange(n_rows), list(table.columns), fontsize=8)
    ax.set_xlabel("dataset / category")
    fig.colorbar(im, ax=ax, extend="min", label=label)
    ax.set_title(f"{label.removesuffix(' (%)')} per category (mean over seeds)", fontsize=10)
    return _png(fig)
