"""``adbench sweep --executor slurm`` against a real Slurm: job arrays, scancel, failures, a job the scheduler kills.

Marked ``slurm`` and left out of ``make test``: ``make test-slurm`` starts a one-node cluster with accounting on
localhost (scripts/slurm_local.sh) and runs these. Without a Slurm that answers they fail; they never skip.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adbench import sweep as sweep_module
from adbench.cli import app
from adbench.report import metric_table
from adbench.results import METRICS, load_results, results_frame
from adbench.sweep import expand, load_grid

pytestmark = pytest.mark.slurm

GRID = (Path(__file__).resolve().parents[1] / "grids" / "slurm_local.toml").read_text()  # the README's grid
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the jobs inherit it: local and Slurm runs compute alike


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    """A Slurm must answer with an idle node; otherwise fail (CI must not pass without running these)."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %t"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.fail(f"no Slurm to test against ({err}); as root, run make test-slurm")
    if out.returncode or "idle" not in out.stdout:
        pytest.fail(f"Slurm has no idle node (sinfo: {out.stdout.strip() or out.stderr.strip()}); "
                    "as root, run make test-slurm")


def grid_file(tmp_path: Path, *edits: tuple[str, str], cflow: str = "") -> Path:
    """GRID with text replaced (each ``old`` must be there) and lines added to its last table, ``[model.cflow]``."""
    text = GRID
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / "grid.toml"
    path.write_text(text + cflow)
    return path


def sweep(grid: Path, results: Path, *args: str, wait: bool = True):
    """``adbench sweep GRID --results-dir RESULTS ARGS`` as a user runs it: a CompletedProcess (or a Popen) whose
    ``stdout`` holds everything it printed."""
    cmd = [sys.executable, "-m", "adbench", "sweep", str(grid), "--results-dir", str(results), *args]
    if wait:
        return subprocess.run(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def array_job(stderr: str) -> str:
    return re.search(r"submitted (\d+) cells as job (\d+)", stderr)[2]


def sacct(job: str, fields: str = "JobID,JobName,Partition,AllocCPUS,ReqMem,Timelimit,State,ExitCode,Elapsed"):
    """The scheduler's record of a job's tasks, one dict per task."""
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", fields, "-j", job], capture_output=True, text=True,
                         check=True).stdout
    print(f"sacct -X -o {fields} -j {job}\n{out}")
    return [dict(zip(fields.split(","), line.split("|"), strict=True)) for line in out.splitlines()]


def wait_until(condition, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def run_folders(results: Path) -> list[str]:
    return sorted(p.name for p in (results / "runs").iterdir())


def test_grid_runs_as_one_job_array_and_reports_like_a_local_sweep(tmp_path):
    grid = grid_file(tmp_path)
    cells = expand(load_grid(grid), tmp_path / "slurm")
    assert len(cells) == 4
    done = sweep(grid, tmp_path / "slurm", "--executor", "slurm")
    assert done.returncode == 0, done.stdout
    assert "submitted 4 cells" in done.stdout and "4 cells: 4 ran" in done.stdout
    job = array_job(done.stdout)  # the sweep ends on the tasks' results, maybe before a task's process has exited:
    wait_until(lambda: {t["State"] for t in sacct(job, "JobID,State")} == {"COMPLETED"}, 30, "the tasks to end")
    tasks = sacct(job)
    assert [t["JobID"] for t in tasks] == [f"{job}_{i}" for i in range(4)]
    for task in tasks:  # the [slurm] table's resources, per cell
        assert (task["State"], task["Partition"], task["AllocCPUS"], task["ReqMem"], task["Timelimit"]) == (
            "COMPLETED", "debug", "1", "2G", "00:05:00")
    assert run_folders(tmp_path / "slurm") == sorted(c.name for c in cells)  # each result written once

    local = sweep(grid, tmp_path / "local")
    assert local.returncode == 0, local.stdout
    slurm_runs, local_runs = load_results(tmp_path / "slurm"), load_results(tmp_path / "local")
    assert {r["cell"]: r["metrics"] for r in slurm_runs} == {r["cell"]: r["metrics"] for r in local_runs}
    for metric in METRICS:  # the report's tables, cell for cell
        assert metric_table(results_frame(slurm_runs), metric).equals(metric_table(results_frame(local_runs), metric))
    assert {r["code"]["adbench"] for r in slurm_runs} == {r["code"]["adbench"] for r in local_runs} != {None}


def test_a_cancelled_task_fails_without_a_result_and_costs_one_rerun(tmp_path, request):
    grid = grid_file(tmp_path, ('["fastflow", "cflow"]', '["cflow", "fastflow"]'), (', "pattern"', ""),
                     ("parallelism = 2", "parallelism = 1"), cflow="epochs = 400\n")  # one runs ~1 min, one waits
    # (50 epochs, 8 s on 2 cores, once ended before the scancel below reached it; the rerun pays the minute again)
    results = tmp_path / "res"
    victim, other = expand(load_grid(grid), results)
    assert victim.spec.overrides["epochs"] == 400
    lock = results / "locks" / f"{victim.name}.{victim.key}.lock"
    first = sweep(grid, results, "--executor", "slurm", wait=False)
    request.addfinalizer(first.kill)  # on a failed assertion; make test-slurm's stop cancels the jobs
    wait_until(lock.exists, what="the first task to start its cell")
    job = json.loads(lock.read_text())["slurm_job"]
    array = job.split("_")[0]
    dry = CliRunner().invoke(app, ["sweep", str(grid), "--results-dir", str(results), "--dry-run"])
    assert f"running (job {array}_0)  {victim.name}" in dry.output, dry.output
    assert f"queued (job {array}_1)  {other.name}" in dry.output, dry.output
    assert sweep_module._lock(results, victim) is None  # a running job's lock holds

    subprocess.run(["scancel", job], check=True)
    out = first.communicate(timeout=300)[0]
    assert first.returncode == 1, out
    assert re.search(rf"failed +{victim.name} +job {job} died", out), out
    assert f"1 cell(s) failed: {victim.name}" in out
    (task,) = sacct(job)
    assert task["State"].startswith("CANCELLED")
    assert run_folders(results) == [other.name]  # no partial result, no temporary folder
    (failure,) = sweep_module.load_failures(results)
    assert failure["name"] == victim.name and failure["slurm_job"] == job and failure["log"].endswith("_log.out")
    assert json.loads(lock.read_text())["slurm_job"] == job  # killed: its lock stays behind, for the next sweep

    again = sweep(grid, results, "--executor", "slurm")
    assert again.returncode == 0, again.stdout
    assert "submitted 1 cells" in again.stdout and "2 cells: 1 done, 1 ran" in again.stdout
    assert run_folders(results) == sorted([victim.name, other.name])
    assert sweep_module.load_failures(results) == [] and not lock.exists()


def test_a_cell_that_raises_is_recorded_with_its_job_and_log(tmp_path):
    grid = grid_file(tmp_path, (', "pattern"', ""), cflow='weights = "/nonexistent/cflow.pth"\n')  # fails in its job
    results = tmp_path / "res"
    done = sweep(grid, results, "--executor", "slurm")
    assert done.returncode == 1, done.stdout
    assert "1 cell(s) failed: cflow_resnet18_synthetic_texture_s0" in done.stdout
    assert run_folders(results) == ["fastflow_resnet18_synthetic_texture_s0"]  # the other cell finished
    (failure,) = sweep_module.load_failures(results)
    assert failure["slurm_job"] == f"{array_job(done.stdout)}_1" and "nonexistent" in failure["error"]
    assert Path(failure["log"]).is_file(), failure


def test_a_job_the_scheduler_kills_leaves_a_lock_that_expires_with_the_job(tmp_path):
    grid = grid_file(tmp_path, ('["fastflow", "cflow"]', '["fastflow"]'), (', "pattern"', ""),
                     ("image_size = 64", "image_size = 1536"))  # a job takes its lock within
    # its 2 GB (python, torch and adbench alone hold about 1.1 GB), then its first 1536 px batch needs several GB
    results = tmp_path / "res"
    done = sweep(grid, results, "--executor", "slurm")
    assert done.returncode == 1 and "died" in done.stdout, done.stdout
    assert not (results / "runs").exists() or run_folders(results) == []
    (cell,) = expand(load_grid(grid), results)
    lock = results / "locks" / f"{cell.name}.{cell.key}.lock"
    holder = json.loads(lock.read_text())  # written by the job, which never got to remove it
    (task,) = sacct(holder["slurm_job"], "JobID,State,ReqMem")
    assert task["State"] in ("OUT_OF_MEMORY", "FAILED"), task
    # as if the job had run on another node: a dead process there cannot be seen; the job's state can
    lock.write_text(json.dumps({**holder, "host": "node042", "pid": 1}))
    assert sweep_module._lock(results, cell) == lock  # taken over
