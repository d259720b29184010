"""Markdown tables from run folders: one table per metric, rows dataset/category, columns detectors, a mean row."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd

from adbench.errors import AdbenchError
from adbench.published import add_published, load_published, sources
from adbench.results import load_results, results_frame, setting_hash
from adbench.sweep import load_failures

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


def seed_means(runs: pd.DataFrame, metric: str, n_categories: int) -> pd.Series:
    """Per seed, the mean of ``metric`` over one dataset's categories; NaN for a seed missing a category or a value.

    A seed counts only if it covers every category of the dataset (else its mean is not comparable).
    """
    return pd.Series({
        seed: g[metric].mean() if g.category.nunique() == n_categories and g[metric].notna().all()
        else np.nan for seed, g in runs.groupby("seed")}, dtype=float)


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
                per_seed = seed_means(dframe[dframe.column == c], metric, n_categories)
                complete = len(per_seed) > 0 and per_seed.notna().all()
                mean[c] = _cell(per_seed, scale, digits) + ("" if complete else " (incomplete)")
            rows.append({"dataset": dataset, "category": "**mean**", **mean})
    return pd.DataFrame(rows, columns=["dataset", "category", *columns])


def build_report(results_dir: Path, published_dir: Path | None = None) -> str:
    """The whole markdown report for the runs under ``results_dir``."""
    return report_with_figures(results_dir, None, published_dir)[0]


def report_with_figures(results_dir: Path, stem: str | None,
                        published_dir: Path | None = None) -> tuple[str, dict[str, bytes]]:
    """The markdown report and, with a ``stem``, the figures it embeds.

    Args:
        results_dir: where the runs are (``results_dir/runs``).
        stem: None for tables only; else figures are named ``<stem>_<what>.png`` and linked relatively, so they must
            be written next to the markdown file: a bar chart per metric (after its table), the Image AUROC
            heatmap per category and the speed-versus-accuracy scatter (after the speed tables).
        published_dir: the papers' numbers to show beside ours (default: the repository's ``results/published``).

    Returns:
        ``(markdown, {file name: PNG bytes})``; the dict is empty without a stem.
    """
    results = load_results(results_dir)
    if not results:
        raise AdbenchError(f"no runs found under {Path(results_dir) / 'runs'} (run `adbench run` first)")
    frame = results_frame(results)
    made_by = f"adbench report --results-dir {results_dir}"
    intro = f"{len(frame)} runs from `{results_dir}` (`{made_by}`); values in %, mean ± std over seeds."
    parts = [f"# adbench report\n\n{intro}\n"]
    figures: dict[str, bytes] = {}

    def embed(what: str, alt: str, png) -> None:  # png: a callable, so nothing is drawn without a stem
        if stem is not None:
            name = f"{stem}_{what}.png"
            figures[name] = png()
            parts.append(f"![{alt}]({quote(name)})\n")

    published = load_published(published_dir)
    for metric, title in TITLES.items():
        table = add_published(metric_table(frame, metric), metric, published)
        parts.append(f"## {title}\n\n{table.to_markdown(index=False, disable_numparse=True)}\n")
        embed(metric, f"{title}: mean over seeds per dataset and detector",
              lambda m=metric, t=title: plots().metric_bars(dataset_summary(frame, m), t))
        if metric == "image_auroc":
            embed("heatmap", "Image AUROC per category and detector",
                  lambda: plots().category_heatmap(category_means(frame, "image_auroc")))
    # timings are only compared on one machine: a table per device, the device most runs used first
    devices = frame.device.value_counts().sort_index().sort_values(ascending=False, kind="stable")
    for key, title in TIMINGS.items():
        for device in devices.index if key in frame else []:
            table = metric_table(frame[frame.device == device], key, scale=1.0, digits=1)
            parts.append(f"## Speed: {title}, {device}\n\n{table.to_markdown(index=False, disable_numparse=True)}\n")
    if "timing_test_images_per_s" in frame:
        main = frame[frame.device == devices.index[0]]  # the device most runs used
        embed("speed", f"Test images per second ({devices.index[0]}) against Image AUROC, one point per detector",
              lambda: plots().speed_scatter(speed_summary(main)))
    settings = settings_section(results)
    if settings:
        parts.append(settings)
    shown = sources(published, set(frame.dataset))
    if shown:
        parts.append("## Published numbers\n\n`(paper)` columns are the papers' own numbers, `Δ` = ours − paper in "
                     "points (different backbones, image sizes and epoch selection: read before comparing).\n\n"
                     f"{shown}\n")
    failures = load_failures(results_dir)
    if failures:
        lines = "\n".join(f"- `{f['name']}`: {f['error']}" for f in failures)
        parts.append(f"## Failed cells\n\n{len(failures)} cell(s) failed and have no result "
                     f"(records in `{Path(results_dir) / 'failures'}`):\n\n{lines}\n")
    return "\n".join(parts), figures


def settings_section(results: list[dict]) -> str:
    """For each detector run in several settings: what each setting's column (``#hash``) sets differently."""
    keys = ("backbone", "image_size", "weights", "preset")
    by_model: dict[str, dict[str, dict]] = {}
    for r in results:
        flat = {**{k: r.get(k) for k in keys}, **(r.get("config") or {})}
        by_model.setdefault(r.get("model"), {})[setting_hash(r)] = flat
    lines = []
    for model, settings in sorted(by_model.items()):
        if len(settings) < 2:
            continue
        fields = sorted({f for flat in settings.values() for f in flat})
        differ = [f for f in fields if len({json.dumps(flat.get(f, "(absent)"), default=str)
                                            for flat in settings.values()}) > 1]
        for h, flat in sorted(settings.items()):
            shown = ", ".join(f"{f}={flat.get(f, '(absent)')}" for f in differ)
            lines.append(f"- **{model}** `#{h}`: {shown}")
    if not lines:
        return ""
    return "## Settings\n\nDetectors run in several settings: what each column's setting sets differently.\n\n" + \
        "\n".join(lines) + "\n"


def plots():
    """``adbench.plots``, imported when a figure is drawn (matplotlib is slow to import)."""
    from adbench import plots as module

    return module


def dataset_summary(frame: pd.DataFrame, metric: str, scale: float = 100.0) -> pd.DataFrame:
    """Per dataset and detector column: mean, std and number of the seeds' category means (complete seeds only).

    Returns:
        Columns ``dataset, column, model, mean, std, n``; ``std`` is NaN below two seeds, ``mean`` NaN without a
        complete seed (the table's mean row says "(incomplete)" then).
    """
    frame = frame.assign(column=_column(frame))
    rows = []
    for dataset, dframe in frame.groupby("dataset", sort=True):
        n_categories = dframe.category.nunique()
        for column, runs in dframe.groupby("column", sort=True):
            per_seed = seed_means(runs, metric, n_categories).dropna().to_numpy(dtype=float) * scale
            rows.append({"dataset": dataset, "column": column, "model": runs.model.iloc[0],
                         "mean": per_seed.mean() if len(per_seed) else np.nan,
                         "std": per_seed.std(ddof=1) if len(per_seed) > 1 else np.nan, "n": len(per_seed)})
    return pd.DataFrame(rows, columns=["dataset", "column", "model", "mean", "std", "n"])


def speed_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per dataset and detector column: test images/s and Image AUROC (%), each as mean and std over seeds."""
    speed = dataset_summary(frame, "timing_test_images_per_s", scale=1.0)
    auroc = dataset_summary(frame, "image_auroc")
    out = speed.rename(columns={"mean": "speed", "std": "speed_std"}).drop(columns="n")
    out[["auroc", "auroc_std"]] = auroc[["mean", "std"]].to_numpy()
    return out


def category_means(frame: pd.DataFrame, metric: str, scale: float = 100.0) -> pd.DataFrame:
    """Rows ``dataset/category``, columns detectors, values: the mean over seeds (NaN where not run)."""
    frame = frame.assign(column=_column(frame), row=frame.dataset.astype(str) + "/" + frame.category.astype(str))
    table = frame.groupby(["row", "column"])[metric].mean().unstack("column") * scale
    return table.sort_index().reindex(columns=sorted(frame.column.unique()))
