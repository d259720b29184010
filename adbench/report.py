"""Markdown tables from run folders: one table per metric, rows dataset/category, columns detectors, a mean row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from adbench.errors import AdbenchError
from adbench.results import load_results, results_frame

TITLES = {
    "image_auroc": "Image AUROC (%)",
    "pixel_auroc": "Pixel AUROC (%)",
    "image_aupr": "Image AUPR (average precision, %)",
    "pixel_aupr": "Pixel AUPR (average precision, %)",
    "aupro": "AUPRO (FPR ≤ 0.3, %)",
}
TIMINGS = {"timing_fit_s": "fit (s)", "timing_test_images_per_s": "test images/s"}


def _column(frame: pd.DataFrame) -> pd.Series:
    """Column label per run: the model name, plus its setting where a model was run in several settings.

    A setting is backbone@size plus a short hash of everything else that changes results (config, preset, weights),
    so runs that differ in anything but the seed never share a column.
    """
    setting = frame.backbone.astype(str) + "@" + frame.image_size.astype(str)
    with_full = frame.assign(s=setting + " " + frame.setting.astype(str))
    several = with_full.groupby("model").s.transform("nunique") > 1
    label = setting.where(with_full.groupby(["model", setting]).s.transform("nunique") == 1,
                          setting + " #" + frame.setting.astype(str))
    return frame.model.where(~several, frame.model + " (" + label + ")")


def _cell(values: pd.Series, scale: float, digits: int) -> str:
    vals = values.dropna().to_numpy(dtype=float) * scale
    if len(vals) == 0:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{vals.mean():.{digits}f} ± {vals.std(ddof=1):.{digits}f}"


def metric_table(frame: pd.DataFrame, metric: str, scale: float = 100.0, digits: int = 1) -> pd.DataFrame:
    """Rows (dataset, category) plus a mean row per dataset; columns = detectors; seeds shown as mean ± std.

    The mean row averages each seed's category values first, so its ± is the spread over seeds of the mean.
    """
    frame = frame.assign(column=_column(frame))
    columns = sorted(frame.column.unique())
    rows = []
    for dataset, dframe in frame.groupby("dataset", sort=True):
        for category, cframe in dframe.groupby("category", sort=True):
            rows.append({"dataset": dataset, "category": category,
                         **{c: _cell(cframe[cframe.column == c][metric], scale, digits) for c in columns}})
        if dframe.category.nunique() > 1:
            mean, n_categories = {}, dframe.category.nunique()
            for c in columns:
                runs = dframe[dframe.column == c]
                # a seed counts only if it covers every category of the dataset (else its mean is not comparable)
                per_seed = pd.Series({
                    seed: g[metric].mean() if g.category.nunique() == n_categories and g[metric].notna().all()
                    else np.nan for seed, g in runs.groupby("seed")}, dtype=float)
                complete = len(per_seed) > 0 and per_seed.notna().all()
                mean[c] = _cell(per_seed, scale, digits) + ("" if complete else " (incomplete)")
            rows.append({"dataset": dataset, "category": "**mean**", **mean})
    return pd.DataFrame(rows, columns=["dataset", "category", *columns])


def build_report(results_dir: Path) -> str:
    """The whole markdown report for the runs under ``results_dir``."""
    results = load_results(results_dir)
    if not results:
        raise AdbenchError(f"no runs found under {Path(results_dir) / 'runs'} (run `adbench run` first)")
    frame = results_frame(results)
    made_by = f"adbench report --results-dir {results_dir}"
    intro = f"{len(frame)} runs from `{results_dir}` (`{made_by}`); values in %, mean ± std over seeds."
    parts = [f"# adbench report\n\n{intro}\n"]
    for metric, title in TITLES.items():
        table = metric_table(frame, metric)
        parts.append(f"## {title}\n\n{table.to_markdown(index=False, disable_numparse=True)}\n")
    for key, title in TIMINGS.items():
        if key in frame:
            table = metric_table(frame, key, scale=1.0, digits=1)
            parts.append(f"## Speed: {title}\n\n{table.to_markdown(index=False, disable_numparse=True)}\n")
    return "\n".join(parts)
