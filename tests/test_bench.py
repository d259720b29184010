"""`make bench` and the epoch sweep: scripts that measure through runner.run_one, and what they write."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_bench_writes_table(tmp_path):
    env = {**os.environ, "ADBENCH_DATA": str(tmp_path / "no-data"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "scripts/bench.py", "--models", "fastflow,cflow", "--dataset", "mtd", "--image-size", "64",
           "--latency-images", "2", "--out", str(tmp_path / "bench.md")]
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
        assert values[1] <= values[0]  # the training loops are part of the fit
        assert values[4] <= values[7] * 1.5  # end-to-end throughput cannot beat the backbone alone by much
        assert values[3] >= 0.95 * values[2] / (values[0] + 0.05)  # over the loop's seconds, not the fit's (fit s
        # rounded to 0.1 in the table)
    # one epoch of the synthetic 60 training images: FastFlow's batches of 32 -> 2 steps; CFLOW-AD: its fiber steps
    steps = {r[0].strip(): int(r[3]) for r in rows}
    assert steps["fastflow"] == 2 and steps["cflow"] > 2, steps
    assert text.startswith("# adbench bench\n\nMeasured with `python scripts/bench.py --models fastflow,cflow")


def test_bench_measures_the_others_when_one_detector_fails(tmp_path):
    env = {**os.environ, "ADBENCH_DATA": str(tmp_path / "no-data"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "scripts/bench.py", "--models", "nosuch,fastflow", "--image-size", "64",
           "--latency-images", "1", "--out", str(tmp_path / "bench.md")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1  # the failure is not hidden
    text = (tmp_path / "bench.md").read_text()
    assert "| fastflow |" in text and "Failed: nosuch: " in text and "unknown" in text.split("Failed:")[1].lower()


def test_epoch_sweep_is_one_adbench_run_evaluated_along_the_way(tmp_path):
    """Rows from runner.run_one: the last row is the run it writes, and epoch 1 equals a 1-epoch run."""
    import json

    from adbench.runner import RunSpec, run_one

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "scripts/epoch_sweep.py", "--model", "fastflow", "--dataset", "synthetic", "--category",
           "pattern", "--image-size", "64", "--epochs", "2,1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| epochs | Img AUROC | Pix AUROC | Img AUPR | Pix AUPR | AUPRO | fit (s) |" in proc.stdout
    (csv,) = tmp_path.glob("*.csv")
    lines = csv.read_text().splitlines()
    assert lines[0].startswith("epoch,image_auroc") and [ln.split(",")[0] for ln in lines[1:]] == ["1", "2"]
    (run,) = (tmp_path / "runs").glob("*/result.json")
    result = json.loads(run.read_text())
    assert result["config"]["epochs"] == 2 and [row["epoch"] for row in result["epochs"]] == [1, 2]
    assert result["epochs"][-1]["image_auroc"] == result["metrics"]["image_auroc"]
    one = run_one(RunSpec(category="pattern", image_size=64, overrides={"epochs": 1}, results_dir=tmp_path / "one",
                          save_maps=False))
    # to float rounding: this process runs torch on every core, the script's on one (OMP_NUM_THREADS=1), and the
    # thread count changes the order of the maps' float sums (pixel metrics agreed to 2e-8 in CI)
    assert json.loads((one / "result.json").read_text())["metrics"] == pytest.approx(
        {k: v for k, v in result["epochs"][0].items() if k in result["metrics"]}, abs=1e-6)


def test_scripts_hold_no_copy_of_the_run_pipeline():
    """bench.py and epoch_sweep.py go through runner.run_one; they never build extractors or detectors themselves."""
    for script in ("bench.py", "epoch_sweep.py"):
        text = (REPO / "scripts" / script).read_text()
        assert "run_one(" in text
        assert not any(name in text for name in ("create_model", "create_extractor", "extract_features", ".fit("))
