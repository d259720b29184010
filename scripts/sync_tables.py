"""Copy the MTD report's tables into the files that quote them: its "Summary: mtd" table into the README (between the
``results:mtd`` markers) and its "Parts scored alone" table into results/ablations.md.

    python scripts/sync_tables.py            # writes both copies
    python scripts/sync_tables.py --check    # writes nothing; exit 1 if a copy differs from the report

Run after ``adbench report --results-dir results/sweep_mtd --output results/sweep_mtd.md``;
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a copy differs")
    args = parser.parse_args()
    report = (REPO / "results" / "sweep_mtd.md").read_text()
    readme, ablations = REPO / "README.md", REPO / "results" / "ablations.md"
    updates = {readme: replace_first_table(readme.read_text(), section_table(report, "Summary: mtd"),
                                           after="<!-- results:mtd:begin"),
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
