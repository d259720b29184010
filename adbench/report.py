"""Markdown tables from run folders: a summary per dataset, one table per metric (rows dataset/category, columns
detectors, a mean row), Image AUROC per defect type, speed per device.

Every value is over seeds, never over runs: of several runs of one seed and setting only the newest counts.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd

from adbench.errors import AdbenchError
from adbench.metrics import auroc
from adbench.published import add_published, load_published, sources
from adbench.results import CODE_MARKS, latest_runs, load_results, results_frame
from adbench.sweep import load_failures

TITLES = {
    "image_auroc": "Image AUROC (%)",
    "pixel_auroc": "Pixel AUROC (%)",
    "image_aupr": "Image AUPR (average precision, %)",
    "pixel_aupr": "Pixel AUPR (average precision, %)",
    "aupro": "AUPRO (FPR ≤ 0.3, %)",
}
TIMINGS = {"timing_fit_s": "fit (s)", "timing_test_images_per_s": "test images/s"}
SHORT = {"image_auroc": "Img AUROC", "pixel_auroc": "Pix AUROC", "image_aupr": "Img AUPR", "pixel_aupr": "Pix AUPR",
         "aupro": "AUPRO"}


def _cell(values: pd.Series, scale: float, digits: int) -> str:
    """Mean ± std of one value per seed; a seed whose value is null is said, not dropped silently."""
    vals = values.dropna().to_numpy(dtype=float) * scale
    missing = len(values) - len(vals)
    if len(vals) == 0:
        return "–"
    text = f"{vals[0]:.{digits}f}" if len(vals) == 1 else f"{vals.mean():.{digits}f} ± {vals.std(ddof=1):.{digits}f}"
    return text + (f" (null in {missing} of {len(values)} seeds)" if missing else "")


def seed_means(runs: pd.DataFrame, metric: str, n_categories: int) -> pd.Series:
    """Per seed, the mean of ``metric`` over one dataset's categories; NaN for a seed missing a category or a value.

    A seed counts only if it covers every category of the dataset (else its mean is not comparable).
    """
    return pd.Series({
        seed: g[metric].mean() if g.category.nunique() == n_categories and g[metric].notna().all()
        else np.nan for seed, g in runs.groupby("seed")}, dtype=float)


def _mean_cell(runs: pd.DataFrame, metric: str, n_categories: int, scale: float = 100.0, digits: int = 1) -> str:
    """The dataset mean of ``metric``, mean ± std over the seeds that cover every category ("(incomplete)" if any
    seed does not)."""
    per_seed = seed_means(runs, metric, n_categories)
    complete = len(per_seed) > 0 and per_seed.notna().all()
    return _cell(per_seed.dropna(), scale, digits) + ("" if complete else " (incomplete)")


def metric_table(frame: pd.DataFrame, metric: str, scale: float = 100.0, digits: int = 1) -> pd.DataFrame:
    """Rows (dataset, category) plus a mean row per dataset; columns = detectors; seeds shown as mean ± std.

    Only the newest run of each seed counts (``latest_runs``). The mean row averages each seed's category values
    first, so its ± is the spread over seeds of the mean.
    """
    frame = latest_runs(frame)[0]
    columns = column_order(frame)
    rows = []
    for dataset, dframe in frame.groupby("dataset", sort=True):
        for category, cframe in dframe.groupby("category", sort=True):
            rows.append({"dataset": dataset, "category": category,
                         **{c: _cell(cframe[cframe.column == c][metric], scale, digits) for c in columns}})
        if dframe.category.nunique() > 1:
            n_categories = dframe.category.nunique()
            mean = {c: _mean_cell(dframe[dframe.column == c], metric, n_categories, scale, digits) for c in columns}
            rows.append({"dataset": dataset, "category": "**mean**", **mean})
    return pd.DataFrame(rows, columns=["dataset", "category", *columns])


def column_order(frame: pd.DataFrame) -> list[str]:
    """Detector columns: the flows by name, then the reference (non-flow) baselines."""
    return sorted(frame.column.unique(), key=lambda c: (c.endswith("(reference)"), c))


def summary_table(frame: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """One row per detector column on ``dataset``: each metric's dataset mean (mean ± std over seeds), the number of
    seeds and the machines the runs ran on."""
    frame = latest_runs(frame)[0]
    dframe = frame[frame.dataset == dataset]
    n_categories = dframe.category.nunique()
    rows = []
    for column in column_order(dframe):
        runs = dframe[dframe.column == column]
        row = {"detector": column, **{short: _mean_cell(runs, m, n_categories) for m, short in SHORT.items()}}
        row["seeds"] = str(runs.seed.nunique())
        row["ran on"] = ", ".join(sorted(runs.device.unique()))
        rows.append(row)
    return pd.DataFrame(rows, columns=["detector", *SHORT.values(), "seeds", "ran on"])


def defect_table(frame: pd.DataFrame, scale: float = 100.0, digits: int = 1) -> pd.DataFrame:
    """Image AUROC per defect type: each defect type's test images against all good images of the category.

    Read from each run's ``scores.csv``; rows (dataset, category, defect, images), columns detectors, mean ± std over
    seeds; "–" where a run has no scores.csv.
    """
    frame = latest_runs(frame)[0]
    found = []
    for run in frame.itertuples():
        path = Path(str(run.path)) / "scores.csv"
        if not path.is_file():
            continue
        scores = pd.read_csv(path)
        good = scores[scores.label == 0]
        for defect, bad in scores[scores.label == 1].groupby("defect", sort=True):
            both = pd.concat([good, bad])
            value = auroc(both.score.to_numpy(), both.label.to_numpy()) if len(good) else np.nan
            found.append({"dataset": run.dataset, "category": run.category, "defect": defect, "images": len(bad),
                          "column": run.column, "seed": run.seed, "auroc": value})
    columns = column_order(frame)
    found = pd.DataFrame(found, columns=["dataset", "category", "defect", "images", "column", "seed", "auroc"])
    rows = []
    for (dataset, category, defect), g in found.groupby(["dataset", "category", "defect"], sort=True):
        rows.append({"dataset": dataset, "category": category, "defect": defect, "images": str(g.images.max()),
                     **{c: _cell(g[g.column == c].auroc, scale, digits) for c in columns}})
    return pd.DataFrame(rows, columns=["dataset", "category", "defect", "images", *columns])


def parts_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The parts a detector fuses (``parts`` in result.json, e.g. flow-only and SSIM-only scores), each scored alone,
    beside the detector's own score: rows (dataset, detector, part), the dataset mean of each metric over seeds."""
    frame = latest_runs(frame)[0]
    rows = []
    for (dataset, column), runs in frame[frame.parts.map(bool)].groupby(["dataset", "column"], sort=True):
        n_categories = frame[frame.dataset == dataset].category.nunique()
        names = ["(detector)", *sorted({name for parts in runs.parts for name in parts})]
        for name in names:
            scored = runs if name == "(detector)" else runs.assign(
                **{m: [p.get(name, {}).get(m) for p in runs.parts] for m in SHORT}).astype(dict.fromkeys(SHORT, float))
            rows.append({"dataset": dataset, "detector": column, "part": name,
                         **{short: _mean_cell(scored, m, n_categories) for m, short in SHORT.items()}})
    return pd.DataFrame(rows, columns=["dataset", "detector", "part", *SHORT.values()])


def validation_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Runs made with ``--validation``: the metrics on their validation split (held-out training images, as they are
    and with synthetic defects) and the held-out NLL per dimension, dataset means over seeds, per detector column."""
    frame = latest_runs(frame)[0]
    rows = []
    for (dataset, column), runs in frame[frame.validation.map(bool)].groupby(["dataset", "column"], sort=True):
        n_categories = frame[frame.dataset == dataset].category.nunique()
        scored = runs.assign(nll=[v.get("heldout_nll_per_dim") for v in runs.validation],
                             **{m: [v["metrics"].get(m) for v in runs.validation] for m in SHORT})
        scored = scored.astype(dict.fromkeys([*SHORT, "nll"], float))
        rows.append({"dataset": dataset, "detector": column,
                     **{short: _mean_cell(scored, m, n_categories) for m, short in SHORT.items()},
                     "held-out NLL / dim": _mean_cell(scored, "nll", n_categories, scale=1.0, digits=3),
                     "seed agreement": seed_agreement(runs)})
    return pd.DataFrame(rows, columns=["dataset", "detector", *SHORT.values(), "held-out NLL / dim", "seed agreement"])


def seed_agreement(runs: pd.DataFrame) -> str:
    """How alike the seeds rank the validation images: the Spearman correlation of two seeds' per-image scores
    (validation ``scores``), averaged over the pairs of seeds and then the categories; "–" below two seeds."""
    per_category = []
    for _, group in runs.groupby("category"):
        scores = [v["scores"] for v in group.validation if v.get("scores")]
        if len(scores) < 2 or len({len(s) for s in scores}) > 1:
            continue
        corr = pd.DataFrame(scores).T.corr("spearman").to_numpy()
        per_category.append(corr[np.triu_indices(len(scores), 1)].mean())
    return f"{np.mean(per_category):.3f}" if per_category else "–"


def selection_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Settings a detector chose itself in ``fit`` on held-out training images (result ``selection``, e.g. CLS+CNF's
    fusion weight): one row per run and setting, with the held-out Image AUROC of the choice and of each part alone."""
    frame = latest_runs(frame)[0]
    rows = []
    for r in frame[frame.selection.map(bool)].sort_values(["dataset", "column", "category", "seed"]).itertuples():
        for name, sel in sorted(r.selection.items()):
            alone = ", ".join(f"{k} {100 * v:.1f}" for k, v in (sel.get("alone") or {}).items())
            auroc = sel.get("image_auroc")
            rows.append({"dataset": r.dataset, "detector": r.column, "category": r.category, "seed": r.seed,
                         "setting": name, "chosen": f"w = {sel.get('weight'):g}, {sel.get('scaling')}"
                         + (f", {sel['cnf']} CNF{'s' * (sel['cnf'] == 'both')}" if sel.get("cnf") else ""),
                         "held-out Img AUROC": "–" if auroc is None else f"{100 * auroc:.1f}",
                         "parts alone (held-out)": alone or "–", "how": sel.get("how", "").split(":")[0]})
    return pd.DataFrame(rows, columns=["dataset", "detector", "category", "seed", "setting", "chosen",
                                       "held-out Img AUROC", "parts alone (held-out)", "how"])


def _markdown(table: pd.DataFrame) -> str:
    return table.to_markdown(index=False, disable_numparse=True)


def _seeds(frame: pd.DataFrame) -> str:
    seeds = sorted(frame.seed.dropna().unique())
    return f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(str(int(s)) for s in seeds)})"


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
    skipped: list[str] = []
    results = load_results(results_dir, skipped)
    if skipped:  # a report without them would be silently incomplete
        more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
        raise AdbenchError(f"not a run's result: {skipped[0]}{more}; move or delete it (a sweep reruns a cell "
                           "that has no readable result)")
    if not results:
        raise AdbenchError(f"no runs found under {Path(results_dir) / 'runs'} (run `adbench run` first)")
    frame, replaced = latest_runs(results_frame(results))
    made_by = f"adbench report --results-dir {results_dir}"
    runs = f"{len(frame)} run{'s' if len(frame) != 1 else ''}"
    left_out = f": {len(replaced)} older run(s) of a seed are left out (see Reruns)." if len(replaced) else "."
    intro = (f"{runs} from `{results_dir}` (`{made_by}`) over {_seeds(frame)}; values in %, mean ± std over seeds. "
             f"Only the newest run of each seed counts{left_out}")
    if frame.code_named.any():
        split = ", ".join(f"`{c}`" for c in column_order(frame[frame.code_named]))
        intro += ("\n\nRuns of one setting made by different detector code are not averaged: their columns are "
                  "split by `code` (the hash of the detector's source in result.json; `(absent)`: a run from before "
                  f"adbench recorded it): {split}.")
    intro += _code_marks(frame)
    parts = [f"# adbench report\n\n{intro}\n"]
    figures: dict[str, bytes] = {}

    def embed(what: str, alt: str, png) -> None:  # png: a callable, so nothing is drawn without a stem
        if stem is not None:
            name = f"{stem}_{what}.png"
            figures[name] = png()
            parts.append(f"![{alt}]({quote(name)})\n")

    for dataset in sorted(frame.dataset.unique()):
        parts.append(f"## Summary: {dataset}\n\nEach detector's mean over the dataset's categories, mean ± std over "
                     f"seeds.\n\n{_markdown(summary_table(frame, dataset))}\n")
    published = load_published(published_dir)
    for metric, title in TITLES.items():
        table = add_published(metric_table(frame, metric), metric, published)
        parts.append(f"## {title}\n\n{_markdown(table)}\n")
        embed(metric, f"{title}: mean over seeds per dataset and detector",
              lambda m=metric, t=title: plots().metric_bars(dataset_summary(frame, m), t))
        if metric == "image_auroc":
            embed("heatmap", "Image AUROC per category and detector",
                  lambda: plots().category_heatmap(category_means(frame, "image_auroc")))
    defects = defect_table(frame)
    parts.append("## Image AUROC per defect type (%)\n\nEach defect type's test images against all good test images "
                 "of the category (from each run's `scores.csv`).\n\n"
                 + (_markdown(defects) if len(defects) else "No run has a scores.csv.") + "\n")
    parts_found = parts_table(frame)
    if len(parts_found):
        parts.append("## Parts scored alone (%)\n\nDetectors that fuse several scores also record each part's "
                     "metrics (`parts` in result.json); `(detector)` is the fused score, as in the tables above.\n\n"
                     f"{_markdown(parts_found)}\n")
    validated = validation_table(frame) if "validation" in frame else []
    if len(validated):
        parts.append("## Validation split (%)\n\nRuns made with `--validation F` hold out a fraction F of the training "
                     "images and score them as they are and with one synthetic defect each (`adbench.validation`): "
                     "what a setting is chosen on, never the test split. Held-out NLL: mean negative log-likelihood "
                     "per dimension of the held-out normal features (lower = a better density). Seed agreement: the "
                     "Spearman correlation of two seeds' scores of the same validation images, averaged over pairs "
                     "(1 = every seed ranks them alike).\n\n"
                     f"{_markdown(validated)}\n")
    chosen = selection_table(frame) if "selection" in frame else []
    if len(chosen):
        parts.append("## Settings chosen on held-out training images\n\nChosen by the detector inside `fit` on a fixed "
                     "held-out part of the training images with synthetic defects, never on the test split "
                     "(`selection` in result.json); Image AUROC in % on that held-out set.\n\n"
                     f"{_markdown(chosen)}\n")
    # timings are only compared on one machine: a table per device, the device most runs used first
    devices = frame.device.value_counts().sort_index().sort_values(ascending=False, kind="stable")
    for key, title in TIMINGS.items():
        for device in devices.index if key in frame else []:
            table = metric_table(frame[frame.device == device], key, scale=1.0, digits=1)
            parts.append(f"## Speed: {title}, {device}\n\n{_markdown(table)}\n")
    if "timing_test_images_per_s" in frame:
        main = frame[frame.device == devices.index[0]]  # the device most runs used
        embed("speed", f"Test images per second ({devices.index[0]}) against Image AUROC, one point per detector",
              lambda: plots().speed_scatter(speed_summary(main)))
    if len(replaced):
        lines = "\n".join(f"- `{r.run}` (seed {r.seed}), replaced by `{r.by}`" for r in replaced.itertuples())
        parts.append(f"## Reruns\n\nA rerun of a seed replaces it (the newest run counts); left out:\n\n{lines}\n")
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


def _code_marks(frame: pd.DataFrame) -> str:
    """The report's paragraph on the columns marked by ``CODE_MARKS`` (newest runs ``frame``), or ""."""
    from adbench.runner import detector_code

    states = frame.code_state.value_counts()
    if not (states.get("stale") or states.get("unknown")):
        return ""
    models = sorted(frame[frame.code_state.isin(["stale", "unknown"])].model.unique())
    lines = [f"- `{CODE_MARKS['stale']}`: {states['stale']} run(s) made by other detector code (`code.detector` in "
             "result.json), so not necessarily what the code gives now; `adbench sweep GRID --rerun-stale`, with the "
             "grid that made them, reruns them."] if states.get("stale") else []
    lines += [f"- `{CODE_MARKS['unknown']}`: {states['unknown']} run(s) made before adbench recorded the detector's "
              "code."] if states.get("unknown") else []
    now = ", ".join(f"{m} `{detector_code(m)[0]}`" for m in models)
    return ("\n\nMarked columns hold runs that the detector code of the checkout writing this report did not make "
            f"(its code: {now}):\n\n" + "\n".join(lines))


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
    frame = latest_runs(frame)[0]
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
    frame = latest_runs(frame)[0]
    frame = frame.assign(row=frame.dataset.astype(str) + "/" + frame.category.astype(str))
    table = frame.groupby(["row", "column"])[metric].mean().unstack("column") * scale
    return table.sort_index().reindex(columns=column_order(frame))
