"""`make bench`'s script: one process per detector, the table it writes, the README block it replaces."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_writes_table_and_readme_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:begin -->\nold table\n<!-- bench:end -->\nafter\n")
    env = {**os.environ, "ADBENCH_DATA": str(tmp_path / "no-data"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "scripts/bench.py", "--models", "fastflow,cflow", "--dataset", "mtd", "--image-size", "64",
           "--latency-images", "2", "--out", str(tmp_path / "bench.md"), "--readme", str(readme)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mtd not found" in proc.stderr and "synthetic dataset instead" in proc.stderr  # says it fell back
    text = (tmp_path / "bench.md").read_text()
    assert "synthetic/pattern, 60 train / 50 test images, 64 px" in text
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| fastflow") or
            line.startswith("| cflow")]
    assert [r[0].strip() for r in rows] == ["fastflow", "cflow"]
    for row in rows:
        values = [float(v) for v in row[1:]]
        assert all(v > 0 for v in values), row
        assert values[1] <= values[4] * 1.5  # end-to-end throughput cannot beat the backbone alone by much
    body = readme.read_text()
    assert body.startswith("intro\n<!-- bench:begin -->\nMeasured with `python scripts/bench.py")
    assert "old table" not in body and body.endswith("<!-- bench:end -->\nafter\n")


def test_bench_measures_the_others_when_one_detector_fails(tmp_path):
    env = {**os.environ, "ADBENCH_DATA": str(tmp_path / "no-data"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "scripts/bench.py", "--models", "nosuch,fastflow", "--image-size", "64",
           "--latency-images", "1", "--out", str(tmp_path / "bench.md")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1  # the failure is not hidden
    text = (tmp_path / "bench.md").read_text()
    assert "| fastflow |" in text and "Failed: nosuch: " in text and "unknown" in text.split("Failed:")[1].lower()
