"""The papers' own numbers (``results/published/*.csv``) beside ours in the report's tables.

Each CSV row is one published number: ``model, dataset, category, metric, value`` (value in %, category ``mean`` for a
paper's average) plus ``backbone, image_size, protocol, source`` saying where it comes from and how it was made
(best epoch on the test set or last epoch, single run or a multi-run mean). The report adds a ``<model> (paper)``
column for every model with published numbers on a dataset it shows, and ``Δ <column>`` = ours − paper in points.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from adbench.errors import ConfigError

COLUMNS = ("model", "dataset", "category", "metric", "value", "backbone", "image_size", "protocol", "source")
DEFAULT_DIR = Path(__file__).resolve().parents[1] / "results" / "published"  # the repository's copy
_NUMBER = re.compile(r"^\s*(-?\d+(?:\.\d+)?)")


def load_published(folder: Path | None = None) -> pd.DataFrame:
    """All published numbers under ``folder`` (default: the repository's ``results/published``); empty if none. A
    folder that was named but does not exist is an error (a typo would silently drop the papers' columns)."""
    if folder is not None and not Path(folder).is_dir():
        raise ConfigError(f"published numbers folder not found: {folder}" + (" (a file)" if Path(folder).exists()
                                                                             else ""))
    folder = Path(folder) if folder is not None else DEFAULT_DIR
    frames = []
    for path in sorted(folder.glob("*.csv")) if folder.is_dir() else []:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        missing = set(COLUMNS) - set(frame.columns)
        if missing:
            raise ConfigError(f"published numbers {path} lack column(s) {', '.join(sorted(missing))}")
        try:
            frame["value"] = frame["value"].astype(float)
        except ValueError:
            raise ConfigError(f"published numbers {path}: a value is not a number") from None
        frames.append(frame[list(COLUMNS)])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(COLUMNS))


def _number(cell: str) -> float | None:
    match = _NUMBER.match(str(cell))
    return float(match.group(1)) if match else None


def add_published(table: pd.DataFrame, metric: str, published: pd.DataFrame) -> pd.DataFrame:
    """``table`` (rows dataset/category incl. ``**mean**``, one column per detector, cells in %) with the papers'
    numbers and the differences added after each detector's columns."""
    pub = published[published.metric == metric]
    if pub.empty or table.empty:
        return table
    datasets = set(table.dataset)
    pub = pub[pub.dataset.isin(datasets)]
    ours = [c for c in table.columns if c not in ("dataset", "category")]
    out = table.copy()
    lookup = {(r.model, r.dataset, "**mean**" if r.category == "mean" else r.category): r.value
              for r in pub.itertuples()}
    for model in sorted(set(pub.model)):
        paper = [lookup.get((model, d, c)) for d, c in zip(out.dataset, out.category, strict=True)]
        out[f"{model} (paper)"] = ["–" if v is None else f"{v:.1f}" for v in paper]
        for column in (c for c in ours if c.split(" ")[0] == model):  # "cflow", "cflow [stale]", "cflow (x=1)"
            deltas = []
            for cell, ref in zip(out[column], paper, strict=True):
                value = _number(cell)
                deltas.append("–" if value is None or ref is None else f"{value - ref:+.1f}")
            out[f"Δ {column}"] = deltas
    return out


def sources(published: pd.DataFrame, datasets: set[str]) -> str:
    """A markdown list of where the shown published numbers come from."""
    pub = published[published.dataset.isin(datasets)]
    lines = [f"- **{r.model}** on {r.dataset} ({r.backbone}, {r.image_size} px): {r.source}; {r.protocol}."
             for r in pub.drop_duplicates(["model", "dataset", "source"]).itertuples()]
    return "\n".join(lines)
