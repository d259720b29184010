"""Run folders: written atomically, never overwritten, read back by the report."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pandas as pd

from adbench.errors import AdbenchError

METRICS = ("image_auroc", "pixel_auroc", "image_aupr", "pixel_aupr", "aupro")
RUNS = "runs"


def run_name(model: str, backbone: str, dataset: str, category: str, seed: int) -> str:
    """``<model>_<backbone>_<dataset>_<category>_s<seed>`` (the folder name of a run, before any suffix)."""
    return f"{model}_{backbone}_{dataset}_{category}_s{seed}"


def write_run(results_dir: Path, name: str, files: dict[str, str]) -> Path:
    """Write ``files`` into a new folder ``results_dir/runs/<name>[-N]`` atomically and return it.

    The files are written into a temporary folder first, which is then renamed; an existing run folder is never
    touched (a numeric suffix is appended instead), so an interrupted or concurrent write loses no earlier result.
    """
    runs = Path(results_dir) / RUNS
    runs.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=runs))
    for fname, text in files.items():
        (tmp / fname).write_text(text)
    for n in range(10_000):
        target = runs / (name if n == 0 else f"{name}-{n}")
        if target.exists():
            continue
        try:
            os.rename(tmp, target)  # atomic; fails if a concurrent writer created a non-empty target meanwhile
            return target
        except OSError:
            if not target.exists():
                raise
    raise AdbenchError(f"too many runs named {name} in {runs}")


def load_results(results_dir: Path) -> list[dict]:
    """Every ``result.json`` under ``results_dir/runs`` (unreadable ones are skipped with a note in the dict list)."""
    out = []
    for path in sorted((Path(results_dir) / RUNS).glob("**/result.json")):
        if any(part.startswith(".tmp-") for part in path.parts):
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        data["path"] = str(path.parent)
        out.append(data)
    return out


def results_frame(results: list[dict]) -> pd.DataFrame:
    """One row per run: identifying columns, the five metrics and timings."""
    rows = []
    for r in results:
        row = {k: r.get(k) for k in ("model", "dataset", "category", "backbone", "image_size", "seed", "path")}
        row.update({m: r.get("metrics", {}).get(m) for m in METRICS})
        row.update({f"timing_{k}": v for k, v in r.get("timing", {}).items()})
        rows.append(row)
    return pd.DataFrame(rows)
