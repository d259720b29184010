"""Copy the MTD report's tables into the files that quote them: its "Summary: mtd" table into the README (between the
``results:mtd`` markers) and its "Parts scored alone" table into results/ablations.md.

The README's copy keeps the current rows only: the detector settings that the README's own
``adbench sweep GRID --results-dir results/sweep_mtd`` commands run (each row's newest runs are cells of those grids);
the rows of older code or former defaults stay in results/sweep_mtd.md.

    python scripts/sync_tables.py            # writes both copies
    python scripts/sync_tables.py --check    # writes nothing; exit 1 if a copy differs from the report

Needs MTD under ADBENCH_DATA (to expand the grids). Run after
``adbench report --results-dir results/sweep_mtd --output results/sweep_mtd.md``;
tests/test_results_report.py checks that the copies match.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TABLE = re.compile(r"(?:^\|.*\|\n)+", flags=re.M)


def section_table(report: str, heading: str) -> str:
    """The first markdown table under ``## heading`` of the report."""
    return TABLE.search(report.split(f"## {heading}\n")[1].split("\n## ")[0]).group(0)


def replace_first_table(text: str, table: str, after: str = "") -> str:
    """``text`` with its first table after the marker ``after`` replaced by ``table``."""
    start = text.index(after) if after else 0
    match = TABLE.search(text, start)
    return text[: match.start()] + table + text[match.end():]


def current_detectors(readme: str, results_dir: Path) -> set[str]:
    """The report's detector columns of the runs the README's MTD grids stand on: per cell of those grids, its newest
    run (what ``adbench sweep`` counts as done)."""
    from adbench.results import load_results, results_frame
    from adbench.sweep import done_runs, expand, load_grid

    grids = re.findall(r"^adbench sweep (\S+) --results-dir results/sweep_mtd$", readme, flags=re.M)
    done = done_runs(results_dir)
    newest = {done[cell.key]["path"] for grid in grids for cell in expand(load_grid(REPO / grid), results_dir)
              if cell.key in done}
    frame = results_frame(load_results(results_dir))
    return set(frame.column[frame.path.isin(newest)])


def current_rows(table: str, detectors: set[str]) -> str:
    """A markdown table with its header and the rows whose first cell is one of ``detectors``."""
    lines = table.splitlines(keepends=True)
    return "".join(lines[:2] + [ln for ln in lines[2:] if ln.split("|")[1].strip() in detectors])


def missing_rows(table: str, detectors: set[str]) -> list[str]:
    """The ``detectors`` without a row in the markdown ``table``, sorted."""
    return sorted(detectors - {ln.split("|")[1].strip() for ln in table.splitlines()[2:]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a copy differs")
    args = parser.parse_args()
    report = (REPO / "results" / "sweep_mtd.md").read_text()
    readme, ablations = REPO / "README.md", REPO / "results" / "ablations.md"
    from adbench.errors import AdbenchError

    try:  # the README's grids name MTD, which must be under ADBENCH_DATA to expand them
        current = current_detectors(readme.read_text(), REPO / "results" / "sweep_mtd")
    except AdbenchError as err:
        sys.exit(f"error: {err}")
    summary = current_rows(section_table(report, "Summary: mtd"), current)
    missing = missing_rows(summary, current)
    if missing:  # the report was written before the runs or the detector code changed: its labels differ
        sys.exit(f"error: results/sweep_mtd.md has no row {missing[0]!r}; regenerate it first: adbench report "
                 "--results-dir results/sweep_mtd --output results/sweep_mtd.md --figures")
    updates = {readme: replace_first_table(readme.read_text(), summary, after="<!-- results:mtd:begin"),
               ablations: replace_first_table(ablations.read_text(), section_table(report, "Parts scored alone (%)"))}
    stale = [path.relative_to(REPO).as_posix() for path, text in updates.items() if path.read_text() != text]
    if args.check:
        print(f"differ from results/sweep_mtd.md: {', '.join(stale)}" if stale else "both copies match the report")
        sys.exit(1 if stale else 0)
    for path, text in updates.items():
        path.write_text(text)
    print(f"updated from results/sweep_mtd.md: {', '.join(stale) or 'nothing (both copies matched)'}")


if __name__ == "__main__":
    main()
