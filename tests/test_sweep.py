"""Grids: expansion, skip-if-done, resume after an interruption, failures, concurrent sweeps, submitit executor."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adbench import runner as runner_module
from adbench import sweep as sweep_module
from adbench.cli import app
from adbench.errors import AdbenchError, ConfigError, DatasetError, TrainingError
from adbench.results import load_results
from adbench.sweep import expand, load_failures, load_grid, run_cell, run_sweep, slurm_states

TINY = """
models = ["fastflow"]
datasets = ["synthetic"]
categories = ["texture", "pattern"]
seeds = [0]
[overrides]
image_size = 64
epochs = 1
flow_steps = 1
backbone = "resnet18"
weights = "random"
"""


def grid_file(tmp_path: Path, text: str = TINY) -> Path:
    path = tmp_path / "grid.toml"
    path.write_text(text)
    return path


def test_expansion_order_settings_and_keys(tmp_path):
    grid = load_grid(grid_file(tmp_path, TINY.replace('models = ["fastflow"]', 'models = ["fastflow", "cflow"]')
                               .replace("seeds = [0]", "seeds = [0, 1]")
                               .replace("flow_steps = 1\n", "") + "[model.cflow]\ncoupling_blocks = 2\n"))
    cells = expand(grid, tmp_path / "res")
    assert [c.name for c in cells][:4] == [
        "fastflow_resnet18_synthetic_texture_s0", "fastflow_resnet18_synthetic_texture_s1",
        "fastflow_resnet18_synthetic_pattern_s0", "fastflow_resnet18_synthetic_pattern_s1"]
    assert len(cells) == 8 and len({c.key for c in cells}) == 8
    cflow = [c for c in cells if c.spec.model == "cflow"]
    assert all(c.spec.overrides == {"epochs": 1, "coupling_blocks": 2} for c in cflow)
    assert all(c.spec.image_size == 64 and c.spec.weights == "random" for c in cells)
    # the key changes with anything that changes the result, and only then
    again = expand(grid, tmp_path / "other")
    assert [c.key for c in again] == [c.key for c in cells]
    grid["overrides"]["epochs"] = 2
    assert not {c.key for c in expand(grid, tmp_path / "res")} & {c.key for c in cells}


def test_vary_expands_every_combination_and_validation_is_part_of_the_key(tmp_path):
    grid = load_grid(grid_file(tmp_path, TINY.replace('["texture", "pattern"]', '["texture"]')
                               + "validation = 0.2\n[vary]\nposition_norm = [\"none\", \"gaussian\"]\n"
                               + "hidden_ratio = [1.0, 0.5]\n"))
    cells = expand(grid, tmp_path / "res")
    assert [(c.spec.overrides["position_norm"], c.spec.overrides["hidden_ratio"]) for c in cells] == [
        ("none", 1.0), ("none", 0.5), ("gaussian", 1.0), ("gaussian", 0.5)]
    assert len({c.key for c in cells}) == 4 and all(c.spec.validation == 0.2 for c in cells)
    del grid["overrides"]["validation"]
    assert not {c.key for c in expand(grid, tmp_path / "res")} & {c.key for c in cells}
    variants = expand(load_grid(grid_file(tmp_path, TINY.replace('["texture", "pattern"]', '["texture"]')
                                          + '[[variant]]\n[[variant]]\ngeometry = "pad"\n[[variant]]\nepochs = 2\n')),
                      tmp_path / "res")
    assert [(c.spec.geometry, c.spec.overrides["epochs"]) for c in variants] == [
        ("squash", 1), ("pad", 1), ("squash", 2)]
    with pytest.raises(ConfigError, match=r"\[vary\] epochs must be a non-empty list"):
        load_grid(grid_file(tmp_path, TINY + "[vary]\nepochs = 3\n"))
    own = expand(load_grid(grid_file(tmp_path, TINY.replace('["texture", "pattern"]', '["texture"]')
                                     + '[model.fastflow]\nseeds = [0, 1, 2]\n')), tmp_path / "res")
    assert [c.spec.seed for c in own] == [0, 1, 2] and "seeds" not in own[0].spec.overrides
    with pytest.raises(ConfigError, match=r"'\[model.fastflow\] seeds' must be a non-empty list"):
        load_grid(grid_file(tmp_path, TINY + "[model.fastflow]\nseeds = 2\n"))


def test_a_section_of_a_model_the_grid_does_not_list_is_kept_unused(tmp_path):
    """Cutting ``models`` down leaves the other models' sections: allowed (a misspelt name is not, below)."""
    cells = expand(load_grid(grid_file(tmp_path, TINY + "[model.cflow]\ncoupling_blocks = 2\n")), tmp_path / "res")
    assert {c.spec.model for c in cells} == {"fastflow"} and "coupling_blocks" not in cells[0].spec.overrides


@pytest.mark.parametrize("text, error, match", [
    ("foo = 1\n" + TINY, ConfigError, "unknown key.*foo"),
    (TINY + "foo = 1\n", ConfigError, "fastflow has no config field .foo."),
    (TINY.replace('["fastflow"]', '["nope"]'), ConfigError, "unknown model 'nope'.*fastflow"),
    (TINY.replace("epochs = 1", "epoch = 1"), ConfigError, "no config field 'epoch'"),
    (TINY.replace('["texture", "pattern"]', '["wood"]'), DatasetError, "unknown synthetic category 'wood'"),
    (TINY.replace('["synthetic"]', '["mvtec"]').replace('categories = ["texture", "pattern"]', ""),
     DatasetError, "mvtec not found.*adbench download mvtec"),
    ("models = [", ConfigError, "not valid TOML"),
    (TINY + "[model.fastflw]\nflow_steps = 2\n", ConfigError, r"\[model.fastflw\] names no model; valid: aeflow, "),
])
def test_bad_grids_fail_before_any_work(tmp_path, text, error, match):
    with pytest.raises(error, match=match):
        expand(load_grid(grid_file(tmp_path, text)), tmp_path / "res", data_root=tmp_path / "empty")
    assert not (tmp_path / "res").exists()


def test_resume_after_interruption_and_skip_if_done(tmp_path, monkeypatch):
    cells = expand(load_grid(grid_file(tmp_path)), tmp_path / "res")
    real = runner_module.run_one
    calls = []

    def interrupted(spec, progress=None):
        calls.append(spec.category)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second cell
        return real(spec)

    monkeypatch.setattr(runner_module, "run_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cells)
    assert [r["category"] for r in load_results(tmp_path / "res")] == ["texture"]
    assert not list((tmp_path / "res" / "locks").iterdir())  # the interrupted cell's lock is released
    monkeypatch.setattr(runner_module, "run_one", real)
    statuses = run_sweep(cells)
    assert [s["status"] for s in statuses] == ["done", "ran"]
    assert [s["status"] for s in run_sweep(cells)] == ["done", "done"]
    results = load_results(tmp_path / "res")
    assert sorted(r["category"] for r in results) == ["pattern", "texture"]
    assert {r["cell"] for r in results} == {c.key for c in cells}
    # a cell's done-check reads the index cells/<key> -> run folder, not every result.json
    assert {p.name for p in (tmp_path / "res" / "cells").iterdir()} == {c.key for c in cells}
    assert run_cell(cells[0])["status"] == "done"
    monkeypatch.setattr(sweep_module, "load_results", lambda _: pytest.fail("scanned every result"))
    assert run_cell(cells[1])["status"] == "done"
    (Path(run_cell(cells[0])["path"]) / "result.json").unlink()  # an index entry without its result is not done
    calls.clear()
    monkeypatch.setattr(runner_module, "run_one", lambda spec, progress=None: calls.append(spec.category) or "x")
    assert run_cell(cells[0])["status"] == "ran" and calls == ["texture"]


def test_a_failing_cell_is_recorded_and_the_others_go_on(tmp_path, monkeypatch):
    cells = expand(load_grid(grid_file(tmp_path)), tmp_path / "res")
    real = runner_module.run_one

    def flaky(spec, progress=None):
        if spec.category == "texture":
            raise TrainingError("fastflow: loss became nan at epoch 1, step 3; no result written")
        return real(spec)

    monkeypatch.setattr(runner_module, "run_one", flaky)
    statuses = run_sweep(cells)
    assert [s["status"] for s in statuses] == ["failed", "ran"]
    (failure,) = load_failures(tmp_path / "res")
    assert failure["name"] == "fastflow_resnet18_synthetic_texture_s0" and "loss became nan" in failure["error"]
    monkeypatch.setattr(runner_module, "run_one", real)
    assert [s["status"] for s in run_sweep(cells)] == ["ran", "done"]
    assert load_failures(tmp_path / "res") == []  # cleared once the cell succeeds


def test_cli_sweep_dry_run_and_failure_exit_code(tmp_path, monkeypatch):
    path = grid_file(tmp_path)
    res = tmp_path / "res"
    result = CliRunner().invoke(app, ["sweep", str(path), "--results-dir", str(res), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "todo  fastflow_resnet18_synthetic_texture_s0  resnet18@64 weights=random" in result.output
    assert "2 cells, 2 to run" in result.output and not (res / "runs").exists()

    def broken(spec, progress=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(runner_module, "run_one", broken)
    result = CliRunner().invoke(app, ["sweep", str(path), "--results-dir", str(res)])
    assert result.exit_code == 1 and "2 cell(s) failed" in result.output and "Traceback" not in result.output


def test_two_concurrent_sweeps_run_each_cell_once(tmp_path):
    path = grid_file(tmp_path, TINY.replace("seeds = [0]", "seeds = [0, 1]"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "adbench", "sweep", str(path), "--results-dir", str(tmp_path / "res")]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    # a sweep that found a cell running in the other one says so and exits 1 (it is not done)
    assert all(p.returncode == 0 or "held by another sweep" in out[1] for p, out in zip(procs, outs, strict=True)), outs
    runs = sorted(p.name for p in (tmp_path / "res" / "runs").iterdir())
    assert len(runs) == 4 and not any("-" in name.rsplit("_s", 1)[1] for name in runs), runs  # no duplicate run
    # whatever one sweep found running elsewhere, the other finished: a third pass has nothing to do
    assert [s["status"] for s in run_sweep(expand(load_grid(path), tmp_path / "res"))] == ["done"] * 4


@pytest.mark.parametrize("raised, why", [
    ("failed", "sbatch: fatal: Could not establish a configuration source"),  # submitit's error, with sbatch's stderr
    ("missing", r"\[Errno 2\] No such file or directory: 'sbatch'"),
])
def test_a_refused_submission_is_one_error_and_submits_nothing(tmp_path, monkeypatch, raised, why):
    """sbatch missing or refusing (no controller, a bad partition): one error naming why, nothing run."""
    import submitit

    def refuse(self, fn, *iterables):
        if raised == "missing":
            raise FileNotFoundError(2, "No such file or directory", "sbatch")
        raise submitit.core.utils.FailedJobError("sbatch: error: fetch_config: DNS SRV lookup failed\n"
                                                 "sbatch: fatal: Could not establish a configuration source\n")

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", refuse)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")  # a login node: srun is there
    cells = expand(load_grid(grid_file(tmp_path)), tmp_path / "res")
    with pytest.raises(AdbenchError, match=rf"^slurm: submitting the 2 cells failed \({why}\); nothing was submitted"):
        run_sweep(cells, executor="slurm", slurm={"cpus": 1, "mem_gb": 4, "time_min": 10})
    assert not list((tmp_path / "res").glob("runs/*/result.json"))


def test_slurm_without_slurm_is_one_error_and_submits_nothing(tmp_path, monkeypatch):
    """A laptop: no srun on PATH (submitit would raise its own RuntimeError): one line saying what to do instead."""
    monkeypatch.setattr(shutil, "which", lambda name: None)
    cells = expand(load_grid(grid_file(tmp_path)), tmp_path / "res")
    with pytest.raises(AdbenchError, match=r"^slurm: no Slurm here \(srun is not on PATH\); nothing was submitted"):
        run_sweep(cells, executor="slurm", slurm={"cpus": 1, "mem_gb": 4, "time_min": 10})
    assert not (tmp_path / "res" / "logs").exists() and not list((tmp_path / "res").glob("runs/*/result.json"))


def test_submitit_local_executor_runs_cells_as_jobs(tmp_path):
    cells = expand(load_grid(grid_file(tmp_path)), tmp_path / "res")
    statuses = run_sweep(cells, executor="submitit-local", slurm={"cpus": 1, "mem_gb": 4, "time_min": 10})
    assert [s["status"] for s in statuses] == ["ran", "ran"], statuses
    assert len(load_results(tmp_path / "res")) == 2
    logs = list((tmp_path / "res" / "logs").rglob("*.out"))
    assert logs  # submitit's job logs next to the results
    result = json.loads(next((tmp_path / "res" / "runs").glob("*/result.json")).read_text())
    assert result["cell"] in {c.key for c in cells}


def test_cell_keys_use_the_per_category_config_the_run_records(tmp_path):
    from adbench.models import resolve_config
    from adbench.runner import cell_key

    grid = load_grid(grid_file(tmp_path, TINY.replace('["fastflow"]', '["clscnf"]').replace("flow_steps = 1\n", "")
                               .replace('["texture", "pattern"]', '["object", "texture"]')))
    cells = expand(grid, tmp_path / "res")
    for cell in cells:  # clscnf's object category has its own default (object mask): the key must include it
        s = cell.spec
        config = resolve_config(s.model, s.backbone, s.overrides, s.preset, dataset=s.dataset, category=s.category)
        assert cell.key == cell_key(s, config)
    assert resolve_config("clscnf", "resnet18", {}, dataset="synthetic", category="object").object_mask == "bright"


def test_a_sweep_that_ends_with_busy_cells_exits_non_zero_and_lists_them(tmp_path, monkeypatch):
    path = grid_file(tmp_path)
    held, free = expand(load_grid(path), tmp_path / "res")
    lock = tmp_path / "res" / "locks" / f"{held.name}.{held.key}.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))  # a live sweep holds it
    monkeypatch.setattr(runner_module, "run_one", lambda spec, progress=None: tmp_path / "run")
    result = CliRunner().invoke(app, ["sweep", str(path), "--results-dir", str(tmp_path / "res")])
    assert result.exit_code == 1, result.output
    assert f"busy   {held.name}" in result.output and f"ran    {free.name}" in result.output
    assert f"1 cell(s) not run, held by another sweep or Slurm job: {held.name}" in result.output
    dry = CliRunner().invoke(app, ["sweep", str(path), "--results-dir", str(tmp_path / "res"), "--dry-run"])
    assert f"running ({socket.gethostname()}:{os.getpid()})  {held.name}" in dry.output


def test_dry_run_shows_a_slurm_task_that_took_its_lock_as_running_even_while_sacct_still_says_pending(tmp_path,
                                                                                                   monkeypatch):
    path, res = grid_file(tmp_path), tmp_path / "res"
    started, waiting = expand(load_grid(path), res)
    for folder in ("locks", "jobs"):
        (res / folder).mkdir(parents=True)
    for cell, job in ((started, "12_0"), (waiting, "12_1")):
        (res / "jobs" / f"{cell.name}.{cell.key}.json").write_text(json.dumps({"slurm_job": job}))
    (res / "locks" / f"{started.name}.{started.key}.lock").write_text(json.dumps({"host": "n1", "slurm_job": "12_0"}))
    monkeypatch.setattr(sweep_module, "slurm_states", lambda jobs: dict.fromkeys(jobs, "PENDING"))  # sacct lags
    dry = sweep_cli(path, res, "--dry-run")
    assert f"running (job 12_0)  {started.name}" in dry and f"queued (job 12_1)  {waiting.name}" in dry
    # 12_0 was cancelled (its lock stays behind) and the cell resubmitted as 13_0: the new job says where it is
    (res / "jobs" / f"{started.name}.{started.key}.json").write_text(json.dumps({"slurm_job": "13_0"}))
    monkeypatch.setattr(sweep_module, "slurm_states", lambda jobs: {"12_0": "CANCELLED", "13_0": "PENDING"})
    assert f"queued (job 13_0)  {started.name}" in sweep_cli(path, res, "--dry-run")
    monkeypatch.setattr(sweep_module, "slurm_states", lambda jobs: {"12_0": "CANCELLED", "13_0": "CANCELLED"})
    assert f"todo  {started.name}" in sweep_cli(path, res, "--dry-run")  # both ended: nothing holds it


def test_a_lock_taken_in_a_slurm_job_expires_with_the_job_on_any_host(tmp_path, monkeypatch):
    (cell, _) = expand(load_grid(grid_file(tmp_path)), tmp_path / "res")
    lock = tmp_path / "res" / "locks" / f"{cell.name}.{cell.key}.lock"
    lock.parent.mkdir(parents=True)
    states = {}
    monkeypatch.setattr(sweep_module, "slurm_states", lambda jobs: {j: states[j] for j in jobs if j in states})
    for holder, state, taken in [
        ({"host": "node7", "pid": 1}, None, False),  # another host, no job: cannot tell, so it holds
        ({"host": "node7", "pid": 1, "slurm_job": "12_3"}, "RUNNING", False),
        ({"host": "node7", "pid": 1, "slurm_job": "12_3"}, None, False),  # Slurm cannot say: it holds
        ({"host": "node7", "pid": 1, "slurm_job": "12_3"}, "TIMEOUT", True),  # killed at its time limit
        ({"host": "node7", "pid": 1, "slurm_job": "12_3"}, "OUT_OF_MEMORY", True),
    ]:
        states["12_3"] = state
        lock.write_text(json.dumps(holder))
        assert (sweep_module._lock(tmp_path / "res", cell) == lock) is taken, (holder, state)
    # the same array task, requeued after a node failure, takes over its own earlier attempt's lock
    lock.write_text(json.dumps({"host": "node7", "pid": 1, "slurm_job": "12_3"}))
    states["12_3"] = "RUNNING"
    monkeypatch.setenv("SLURM_JOB_ID", "40")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "12")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert sweep_module._lock(tmp_path / "res", cell) == lock
    assert json.loads(lock.read_text())["slurm_job"] == "12_3"


def test_slurm_states_reads_squeue_then_sacct_including_pending_array_tasks(tmp_path, monkeypatch):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, text in [("sacct", "12_0|RUNNING\\n12_[0-3,5%%2]|PENDING\\n11|CANCELLED by 0\\n"),
                       ("squeue", "")]:
        (bin_ / name).write_text(f"#!/bin/sh\necho \"$*\" > {tmp_path / name}.args\nprintf '{text}'\n")
        (bin_ / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    states = slurm_states(["12_0", "12_5", "11"])
    assert (tmp_path / "sacct.args").read_text().split()[-2:] == ["-j", "11,12"]
    assert (tmp_path / "squeue.args").read_text().split() == ["-h", "-r", "-o", "%i|%T", "-j", "11,12"]
    assert states["12_0"] == "RUNNING" and states["12_3"] == states["12_5"] == "PENDING"
    assert states["11"] == "CANCELLED" and "12_4" not in states
    # just submitted: accounting does not know job 13 yet, the controller does (make test-slurm once saw "todo")
    (bin_ / "squeue").write_text("#!/bin/sh\nprintf '13_0|RUNNING\\n13_1|PENDING\\n'\n")
    states = slurm_states(["13_0", "13_1"])  # (the fake sacct answers jobs 11 and 12 whatever it is asked)
    assert states["13_0"] == "RUNNING" and states["13_1"] == "PENDING"
    (bin_ / "sacct").unlink()
    (bin_ / "squeue").write_text("#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller' >&2\n"
                                 "exit 1\n")
    assert slurm_states(["12_0"]) == {}  # neither answers: no state known


REPO = Path(__file__).resolve().parents[1]
EDITED = "0123456789ab"  # the detector-code hash of an edit of fastflow.py


def test_code_hashes_the_detector_and_the_model_files_it_imports_and_stays_out_of_keys(tmp_path, monkeypatch):
    from adbench.runner import code_version, detector_code, git_state

    code = code_version("fastflow")
    expected = hashlib.sha256()
    for name in code["files"]:  # sorted; the detector's file and the models/ files it imports
        source = (REPO / "models" / name).read_bytes()
        expected.update(f"{name}\0{len(source)}\0".encode() + source)
    assert code["detector"] == expected.hexdigest()[:12] and "fastflow.py" in code["files"] and code["adbench"]
    assert {"cflow.py", "clscnf.py"} <= set(detector_code("clscnf")[1])  # clscnf builds on cflow's flows
    padim = detector_code("padim")[1]
    assert {"_maps.py", "padim.py"} <= set(padim) and "_registry.py" not in padim  # imported by all: left out
    if (REPO / ".git").exists():
        assert len(code["git"]) == 40 and isinstance(code["dirty"], bool)
    assert git_state(tmp_path) == {"git": None, "dirty": None}  # not a checkout: no commit, and no error
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    assert git_state.__wrapped__(REPO / "adbench") == {"git": None, "dirty": None}
    grid = load_grid(grid_file(tmp_path))
    cells = expand(grid, tmp_path / "res")
    assert {c.code for c in cells} == {code["detector"]}
    monkeypatch.setattr(runner_module, "detector_code", lambda model: (EDITED, ("fastflow.py",)))
    edited = expand(grid, tmp_path / "res")
    assert [c.key for c in edited] == [c.key for c in cells] and {c.code for c in edited} == {EDITED}


def sweep_cli(path: Path, res: Path, *args: str) -> str:
    result = CliRunner().invoke(app, ["sweep", str(path), "--results-dir", str(res), *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_a_stale_cell_is_listed_and_rerun_only_with_rerun_stale(tmp_path, monkeypatch):
    path, res = grid_file(tmp_path), tmp_path / "res"
    cells = expand(load_grid(path), res)
    sweep_cli(path, res)
    before = load_results(res)
    made_by = cells[0].code
    assert [r["code"]["detector"] for r in before] == [made_by] * 2 and "fastflow.py" in before[0]["code"]["files"]
    monkeypatch.setattr(runner_module, "detector_code", lambda model: (EDITED, ("fastflow.py",)))  # fastflow.py edited
    texture = "fastflow_resnet18_synthetic_texture_s0"
    dry = sweep_cli(path, res, "--dry-run")
    assert f"stale (code {made_by}, now {EDITED})  {texture}  resnet18@64" in dry
    assert "2 cells, 0 to run; 2 stale (run by other detector code), kept: --rerun-stale reruns them" in dry
    assert "2 cells, 2 to run; 2 stale" in sweep_cli(path, res, "--dry-run", "--rerun-stale")
    out = sweep_cli(path, res)  # kept, and said so
    assert f"stale  {texture}" in out and f"(code {made_by}, now {EDITED})" in out and "2 cells: 2 stale" in out
    assert f"2 stale cell(s) kept (run by other detector code): {texture}, " in " ".join(out.split())
    assert len(load_results(res)) == 2
    out = sweep_cli(path, res, "--rerun-stale")
    assert "2 cells: 2 ran" in out
    reruns = {r["path"]: r for r in load_results(res) if r["path"].endswith("-1")}
    assert sorted(r["code"]["detector"] for r in reruns.values()) == [EDITED] * 2 and len(load_results(res)) == 4
    assert {str(res / "runs" / (res / "cells" / c.key).read_text().strip()) for c in cells} == set(reruns)
    assert "2 cells: 2 done" in sweep_cli(path, res, "--rerun-stale")  # the newest run of each cell is current
    assert f"done  {texture}" in sweep_cli(path, res, "--dry-run")


def test_a_run_without_code_is_done_of_unknown_code_and_kept(tmp_path, monkeypatch):
    from adbench.results import write_run

    path, res = grid_file(tmp_path), tmp_path / "res"
    for cell in expand(load_grid(path), res):  # runs from before results recorded their code
        write_run(res, cell.name, {"result.json": json.dumps({"cell": cell.key, "model": "fastflow"})})
    monkeypatch.setattr(runner_module, "run_one", lambda spec, progress=None: pytest.fail("reran a kept cell"))
    dry = sweep_cli(path, res, "--dry-run", "--rerun-stale")
    assert "done (unknown code)  fastflow_resnet18_synthetic_texture_s0" in dry
    assert "2 cells, 0 to run; 2 done by runs of unknown code (they record none), kept" in dry
    assert "2 cells: 2 done" in sweep_cli(path, res, "--rerun-stale")


def test_the_committed_mtd_runs_are_not_stale(monkeypatch):
    """results/sweep_mtd was run before results recorded their code: a sweep keeps those cells (of unknown code).

    (A cell whose settings changed since, e.g. a config field added, is todo: its key differs, code or not.)
    """
    monkeypatch.chdir(REPO)
    dry = sweep_cli(Path("grids/mtd.toml"), Path("results/sweep_mtd"), "--dry-run")
    states = [line.split("  ")[0] for line in dry.splitlines() if "_mtd_mtd_s" in line]
    flows = [line.split("  ")[0] for line in dry.splitlines() if "_mtd_mtd_s" in line and "padim" not in line
             and "patchcore" not in line]  # the reference rows came later: they record their code
    assert len(flows) == 12 and set(flows) <= {"done (unknown code)", "done"}, dry  # 4 flows, 3 seeds
    assert len(states) == 18 and set(states) <= {"done", "done (unknown code)"}, dry  # nothing to run, none stale
    cell = expand(load_grid(Path("grids/mtd.toml")), Path("results/sweep_mtd"), need_data=False)[0]
    runs = [run for run in sweep_module.done_runs(Path("results/sweep_mtd")).values() if "code" not in run]
    assert runs and {sweep_module.code_state(cell, run) for run in runs} == {"unknown"}  # kept, whatever cell.code
