"""Grids of runs: a TOML grid expands into cells (model x dataset x category x seed), each run at most once.

A grid file::

    models = ["fastflow", "cflow"]
    datasets = ["mtd"]
    seeds = [0, 1, 2]
    # categories = ["mtd"]            # optional: a list, or a table {mvtec = ["bottle"]}; default all
    [overrides]                       # every cell: image_size, geometry, backbone, weights, preset or any config field
    epochs = 1
    image_size = 64
    [model.cflow]                     # one model's settings (override [overrides])
    backbone = "wide_resnet50_2"
    [vary]                            # optional: every combination of these values, for every model (ablations)
    position_norm = ["none", "gaussian"]
    [[variant]]                       # optional: each [[variant]] table is one set of settings, every cell run
    [[variant]]                       # once per variant (one-factor ablations; an empty one = no change)
    geometry = "pad"
    [slurm]                           # resources per cell for --executor slurm / submitit-local
    gpus = 1
    cpus = 8
    mem_gb = 32
    time_min = 240

A cell whose result already exists with the same settings (``result.json`` field ``cell``) is skipped, so an
interrupted sweep resumes where it stopped. The code is not in a cell's key: a cell whose newest run records another
detector-code hash (``code.detector``, ``runner.detector_code``) is *stale*, listed and kept unless the sweep is told
``rerun_stale``; a run that records no code (made before adbench recorded it) is of unknown code and counts as done.
A failing cell leaves ``failures/<cell>.json`` with its error and the others go on. A lock file per cell
(``locks/``) keeps two sweeps on one results folder from running a cell twice; a lock taken inside a Slurm job
expires when that job ends (killed, cancelled, timed out), whichever node it ran on.
On Slurm, ``jobs/<cell>.json`` records each cell's array task and log, for ``--dry-run`` and failure records.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI (pyproject.toml installs it there)
    import tomli as tomllib

from adbench.errors import AdbenchError, ConfigError, DatasetError
from adbench.results import _rerun_number, cell_run, load_results, run_name

# RunSpec fields a grid may set (the rest is config)
SPEC_KEYS = ("backbone", "weights", "image_size", "geometry", "preset", "validation", "feature_precision")
GRID_KEYS = {"models", "datasets", "seeds", "categories", "overrides", "model", "slurm", "data_root", "vary", "variant"}
SLURM_KEYS = {"gpus": 1, "cpus": 8, "mem_gb": 32, "time_min": 240, "partition": None, "array_parallelism": 64}
EXECUTORS = ("local", "submitit-local", "slurm")
ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
         "REVOKED", "TIMEOUT"}  # Slurm job states after which a job's processes are gone (sacct)


@dataclass(frozen=True)
class Cell:
    """One run of a grid: its RunSpec (one category) and the key that identifies its settings."""

    spec: Any  # adbench.runner.RunSpec
    key: str
    code: str | None = None  # the detector-code hash its run records now (runner.detector_code); None: not compared
    replace: str | None = None  # the run folder of a stale run of this cell that is to be rerun (rerun_stale)

    @property
    def name(self) -> str:
        s = self.spec
        return run_name(s.model, s.backbone, s.dataset, s.category, s.seed)

    def settings(self) -> str:
        s = self.spec
        sets = " ".join(f"{k}={v}" for k, v in sorted(s.overrides.items()))
        size = f"{s.image_size}" + ("" if s.geometry == "squash" else f" geometry={s.geometry}")
        size += f" validation={s.validation}" if s.validation else ""
        size += "" if s.feature_precision == "fp32" else f" features={s.feature_precision}"
        return f"{s.backbone}@{size} weights={s.weights or 'imagenet'} preset={s.preset or '-'} {sets}".strip()


def load_grid(path: Path) -> dict[str, Any]:
    """Read and check a grid file (unknown keys are errors, so a typo never silently changes a sweep)."""
    try:
        grid = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"grid file not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"grid file {path} is not valid TOML: {err}") from None
    unknown = set(grid) - GRID_KEYS
    if unknown:
        valid = ", ".join(sorted(GRID_KEYS))
        raise ConfigError(f"unknown key(s) in {path}: {', '.join(sorted(unknown))}; valid: {valid}")
    for key in ("models", "datasets"):
        if not isinstance(grid.get(key), list) or not grid[key]:
            raise ConfigError(f"{path}: '{key}' must be a non-empty list")
    grid.setdefault("seeds", [0])
    for where, seeds in [("seeds", grid["seeds"])] + [(f"[model.{m}] seeds", t["seeds"])
                                                      for m, t in grid.get("model", {}).items() if "seeds" in t]:
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
            raise ConfigError(f"{path}: '{where}' must be a non-empty list of non-negative integers")
    if not isinstance(grid.get("variant", []), list):
        raise ConfigError(f"{path}: variants are written [[variant]] (an array of tables)")
    for key, values in grid.get("vary", {}).items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: [vary] {key} must be a non-empty list of values")
    bad = set(grid.get("slurm", {})) - set(SLURM_KEYS)
    if bad:
        raise ConfigError(f"unknown [slurm] key(s) in {path}: {', '.join(sorted(bad))}; valid: {', '.join(SLURM_KEYS)}")
    return grid


def expand(grid: dict[str, Any], results_dir: Path, data_root: Path | None = None,
           need_data: bool = True) -> list[Cell]:
    """All cells of a grid, in model, dataset, category, seed order. Checks every name, field and dataset first.

    With ``need_data=False`` (a dry run) a missing dataset of fixed categories (MVTec AD, BTAD, MTD) is listed anyway.
    """
    from adbench.datasets import DATASETS, open_family
    from adbench.models import list_models, resolve_config
    from adbench.runner import RunSpec, cell_key, detector_code

    misspelt = sorted(set(grid.get("model", {})) - set(list_models()))
    if misspelt:  # its settings would be silently unused (a registered model's section is kept while unlisted)
        raise ConfigError(f"[model.{misspelt[0]}] names no model; valid: {', '.join(list_models())}")
    data_root = data_root or (Path(grid["data_root"]) if "data_root" in grid else None)
    categories, missing = {}, []
    for dataset in grid["datasets"]:
        wanted = grid.get("categories")
        wanted = wanted.get(dataset) if isinstance(wanted, dict) else wanted
        try:
            family = open_family(dataset, data_root)
        except DatasetError as err:
            fixed = DATASETS.get(dataset).fixed_categories
            if need_data or not fixed:
                missing.append(str(err))
            else:
                categories[dataset] = list(wanted or fixed)
            continue
        for category in wanted or []:
            family.check_category(category)
        categories[dataset] = list(wanted or family.categories())
    if missing:
        raise DatasetError("; ".join(missing))
    cells = []
    vary = grid.get("vary", {})
    for model, variant, combo in itertools.product(grid["models"], grid.get("variant") or [{}],
                                                   itertools.product(*vary.values())):
        own = dict(grid.get("model", {}).get(model, {}))
        seeds = own.pop("seeds", grid["seeds"])  # a [model.NAME] table may give that detector its own seeds
        settings = {**grid.get("overrides", {}), **own, **variant, **dict(zip(vary, combo, strict=True))}
        spec_fields = {k: settings.pop(k) for k in SPEC_KEYS if k in settings}
        base = RunSpec(model=model, results_dir=Path(results_dir), data_root=data_root, overrides=settings,
                       **spec_fields)
        for dataset in grid["datasets"]:
            for category in categories[dataset]:
                # the run's own config (per-category defaults included), so the key matches the one it records
                config = resolve_config(model, base.backbone, settings, base.preset, dataset=dataset,
                                        category=category)
                for seed in seeds:
                    spec = dataclasses.replace(base, dataset=dataset, category=category, seed=seed)
                    cells.append(Cell(spec, cell_key(spec, config), detector_code(model)[0]))
    return cells


def done_runs(results_dir: Path) -> dict[str, dict[str, Any]]:
    """cell key -> the newest finished run of the cell under ``results_dir`` (its result.json, with ``path``)."""
    def age(r: dict[str, Any]) -> tuple:
        return r.get("started") or "", _rerun_number(Path(r["path"]).name)  # as the report's latest_runs

    return {r["cell"]: r for r in sorted(load_results(results_dir, keys=("cell",)), key=age)}


def code_state(cell: Cell, run: dict[str, Any]) -> str:
    """Whether a cell's finished ``run`` is ``done`` (same detector code), of ``unknown`` code (it records none:
    made before adbench recorded it; kept, as done) or ``stale`` (other detector code)."""
    made_by = (run.get("code") or {}).get("detector")
    if made_by is None:
        return "unknown"
    return "done" if cell.code is None or made_by == cell.code else "stale"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def slurm_job() -> dict[str, str]:
    """The Slurm job (or array task, ``1234_5``) this process runs in, and its submitit log; {} outside Slurm."""
    env = os.environ
    if "SLURM_JOB_ID" not in env:
        return {}
    array = "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env
    job = {"slurm_job": f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}" if array else env["SLURM_JOB_ID"]}
    if "SUBMITIT_FOLDER" in env:
        import submitit

        job["log"] = str(submitit.JobEnvironment().paths.stdout)
    return job


def slurm_states(jobs: list[str]) -> dict[str, str]:
    """Slurm state (``RUNNING``, ``PENDING``, ``CANCELLED``...) of each job or array task id: ``squeue``'s for the
    jobs the controller holds (live; accounting can lag seconds behind a submission), else ``sacct``'s.

    A job missing from both answers (or every job, when both fail or there is no accounting) has no known state.
    """
    ids = sorted({job.split("_")[0] for job in jobs})
    if not ids:
        return {}
    live = {}
    try:  # -r: one line per array task, pending ones too; ids the controller no longer holds print nothing
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(ids)], text=True,
                             capture_output=True, timeout=60, check=False).stdout
        live = dict(line.strip().split("|", 1) for line in out.splitlines() if line.count("|") == 1)
    except (OSError, subprocess.SubprocessError):
        pass
    return {**_sacct_states(ids), **live}


def _sacct_states(ids: list[str]) -> dict[str, str]:
    """``slurm_states``' accounting part: the state of each job and array task of the jobs ``ids``."""
    try:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(ids)], text=True,
                             capture_output=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    states, pending = {}, {}
    for line in out.splitlines():
        job, _, state = line.partition("|")
        states[job] = state.split(" ")[0]  # "CANCELLED by 0"
        tasks = re.fullmatch(r"(\d+)_\[([\d,-]+)(%\d+)?\]", job)  # the tasks not started yet: 12_[0-5,7%2]
        for part in tasks[2].split(",") if tasks else []:
            first, _, last = part.partition("-")
            pending.update({f"{tasks[1]}_{i}": states[job] for i in range(int(first), int(last or first) + 1)})
    return {**pending, **states}  # a started task has its own line


def _holder_gone(holder: dict[str, Any]) -> bool:
    """Whether a lock's holder has ended: its Slurm job by the scheduler's state (from any node), else its process
    on this host. A holder on another host without a job, or a job Slurm cannot tell about, counts as alive."""
    job = holder.get("slurm_job")
    if job:
        if job == slurm_job().get("slurm_job"):
            return True  # an earlier attempt of this very job (requeued after a node failure)
        return slurm_states([job]).get(job) in ENDED
    return holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", 0)))


def _lock(results_dir: Path, cell: Cell) -> Path | None:
    """Take the cell's lock file; None if a live sweep or job holds it (an ended holder's lock is taken over)."""
    folder = Path(results_dir) / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{cell.name}.{cell.key}.lock"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                return None  # being written right now
            if _holder_gone(holder):
                path.unlink(missing_ok=True)  # stale: its sweep or job died
                continue
            return None
        with os.fdopen(fd, "w") as fh:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), **slurm_job()}, fh)
        return path
    return None


def run_cell(cell: Cell) -> dict[str, Any]:
    """Run one cell unless it is done or locked; never raises for the cell's own failure (it is recorded)."""
    from adbench.runner import run_one

    results_dir = cell.spec.results_dir
    status = {"cell": cell.key, "name": cell.name}
    done = _finished(cell)  # the index, not a scan of every result (run_sweep scanned once)
    if done is not None:
        return {**status, "status": "done", "path": str(done)}
    lock = _lock(results_dir, cell)
    if lock is None:
        return {**status, "status": "busy"}
    failure = Path(results_dir) / "failures" / f"{cell.name}.{cell.key}.json"
    try:
        if _finished(cell) is not None:  # finished by another sweep between our check and the lock
            return {**status, "status": "done"}
        path = run_one(cell.spec)
        failure.unlink(missing_ok=True)
        return {**status, "status": "ran", "path": str(path)}
    except Exception as err:  # recorded; the other cells go on (Ctrl-C is not an Exception: it stops the sweep)
        message = str(err) if isinstance(err, AdbenchError) else f"{type(err).__name__}: {err}"
        return record_failure(cell, message, traceback.format_exc())
    finally:
        lock.unlink(missing_ok=True)


def _finished(cell: Cell) -> Path | None:
    """The cell's run from the index (``cells/<key>``), unless it is the stale run this cell is to replace."""
    done = cell_run(cell.spec.results_dir, cell.key)
    return done if done is not None and done.name != cell.replace else None


def record_failure(cell: Cell, error: str, trace: str = "", job: dict[str, str] | None = None) -> dict[str, Any]:
    """Write ``failures/<cell>.json`` atomically (removed when the cell later succeeds); returns the record.

    ``job``: the Slurm task that ran the cell and its log (default: the job this process runs in, if any).
    """
    failure = Path(cell.spec.results_dir) / "failures" / f"{cell.name}.{cell.key}.json"
    failure.parent.mkdir(parents=True, exist_ok=True)
    record = {"cell": cell.key, "name": cell.name, "status": "failed", "error": error, "traceback": trace[-4000:],
              "spec": _spec_dict(cell.spec), "host": socket.gethostname(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(slurm_job() if job is None else job)}
    tmp = failure.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, failure)
    return record


def _spec_dict(spec) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(spec).items()}


def load_failures(results_dir: Path) -> list[dict[str, Any]]:
    """The failure records of cells that have not succeeded since."""
    out = []
    for path in sorted((Path(results_dir) / "failures").glob("*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return out


def _local_gpu_worker(queue) -> None:  # process-pool initializer: pin this worker to one GPU
    os.environ["ADBENCH_SWEEP_DEVICE"] = f"cuda:{queue.get()}"


def _run_on_worker_device(cell: Cell) -> dict[str, Any]:
    device = os.environ.get("ADBENCH_SWEEP_DEVICE", cell.spec.device)
    return run_cell(dataclasses.replace(cell, spec=dataclasses.replace(cell.spec, device=device)))


def run_sweep(cells: list[Cell], executor: str = "local", slurm: dict[str, Any] | None = None,
              on_result=None, rerun_stale: bool = False) -> list[dict[str, Any]]:
    """Run the cells that are not done; returns one status dict per cell, in cell order (done, ran, failed, busy, or
    stale: kept, with ``code`` (the hash its run records) and ``now``; ``rerun_stale`` reruns those instead).

    ``local`` runs them one after another in this process (Ctrl-C stops cleanly: the current cell is not written,
    finished ones are kept), or one per GPU in worker processes when several GPUs are visible. ``submitit-local`` and
    ``slurm`` submit one array job through submitit (logs in ``RESULTS_DIR/logs/``) and wait for it.
    """
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}; valid: {', '.join(EXECUTORS)}")
    on_result = on_result or (lambda status: None)
    statuses, todo = [], []
    done = done_runs(cells[0].spec.results_dir) if cells else {}
    for cell in cells:
        run = done.get(cell.key)
        state = code_state(cell, run) if run else "todo"
        if state == "todo":
            todo.append(cell)
        elif state == "stale" and rerun_stale:
            todo.append(dataclasses.replace(cell, replace=Path(run["path"]).name))
        else:
            status = {"cell": cell.key, "name": cell.name, "status": "done", "path": run["path"]}
            if state == "stale":  # kept
                status.update(status="stale", code=run["code"]["detector"], now=cell.code)
            statuses.append(status)
            on_result(status)
    if executor == "local":
        statuses += _run_local(todo, on_result) if todo else []
    elif todo:
        statuses += _run_submitit(todo, executor, {**SLURM_KEYS, **(slurm or {})}, on_result)
    order = {cell.key: i for i, cell in enumerate(cells)}
    return sorted(statuses, key=lambda status: order[status["cell"]])  # in cell order


def _run_local(cells: list[Cell], on_result) -> list[dict[str, Any]]:
    import torch

    gpus = torch.cuda.device_count() if all(c.spec.device in ("auto", "cuda") for c in cells) else 0
    if gpus < 2:
        out = []
        for cell in cells:
            out.append(run_cell(cell))
            on_result(out[-1])
        return out
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    for i in range(gpus):
        queue.put(i)
    with ProcessPoolExecutor(gpus, mp_context=ctx, initializer=_local_gpu_worker, initargs=(queue,)) as pool:
        out = []
        for status in pool.map(_run_on_worker_device, cells):
            out.append(status)
            on_result(status)
        return out


def _run_submitit(cells: list[Cell], executor: str, slurm: dict[str, Any], on_result) -> list[dict[str, Any]]:
    try:
        import submitit
    except ImportError:
        raise ConfigError("the submitit executors need the package submitit (pip install submitit)") from None
    results_dir = Path(cells[0].spec.results_dir)
    if executor == "slurm" and shutil.which("srun") is None:  # submitit's own check, as one line
        raise AdbenchError(f"slurm: no Slurm here (srun is not on PATH); nothing was submitted: run the sweep on a "
                           f"Slurm login node, or with --executor local or submitit-local ({len(cells)} cells)")
    ex = submitit.AutoExecutor(folder=results_dir / "logs" / "%j", cluster="local" if executor == "submitit-local"
                               else "slurm")
    params = {"timeout_min": slurm["time_min"], "cpus_per_task": slurm["cpus"], "mem_gb": slurm["mem_gb"],
              "gpus_per_node": slurm["gpus"], "name": "adbench"}
    if executor == "slurm":
        params["slurm_array_parallelism"] = slurm["array_parallelism"]
        if slurm["partition"]:
            params["slurm_partition"] = slurm["partition"]
    else:
        params["gpus_per_node"] = min(slurm["gpus"], _visible_gpus())
    ex.update_parameters(**params)
    try:
        jobs = ex.map_array(run_cell, cells)
    except (OSError, subprocess.CalledProcessError, submitit.core.utils.FailedJobError) as err:  # no sbatch, or it
        # refused (no controller, a bad partition); FailedJobError carries its stderr
        why = ([line for line in str(err).splitlines() if line.strip()] or [repr(err)])[-1].strip().rstrip(".")
        raise AdbenchError(f"{executor}: submitting the {len(cells)} cells failed ({why}); nothing was submitted: "
                           "run the sweep again once the submitter works") from None
    print(f"submitted {len(jobs)} cells as job {jobs[0].job_id.split('_')[0]}; logs in {results_dir / 'logs'}",
          file=sys.stderr)
    if executor == "slurm":
        (results_dir / "jobs").mkdir(exist_ok=True)
        for cell, job in zip(cells, jobs, strict=True):  # for --dry-run: which task runs which cell
            info = {"slurm_job": job.job_id, "log": str(job.paths.stdout)}
            (results_dir / "jobs" / f"{cell.name}.{cell.key}.json").write_text(json.dumps(info) + "\n")
    out = []
    for cell, job in zip(cells, jobs, strict=True):
        try:
            status = job.result()
        except Exception as err:  # the job itself died (cancelled, out of memory, time limit)
            last = str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)
            info = {"slurm_job": job.job_id, "log": str(job.paths.stdout)} if executor == "slurm" else {}
            status = record_failure(cell, f"job {job.job_id} died: {last}", job=info)
        out.append(status)
        on_result(status)
    return out


def cell_states(cells: list[Cell]) -> dict[str, str]:
    """cell key -> ``done``, ``done (unknown code)``, ``stale (code <its run's>, now <current>)``, ``todo``, or where
    the cell is: ``queued (job 12_3)``, ``running (job 12_3)`` on Slurm, ``running (host:pid)`` in a sweep elsewhere."""
    if not cells:
        return {}
    results_dir = Path(cells[0].spec.results_dir)

    def read(path: Path) -> dict[str, Any]:
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    done = done_runs(results_dir)
    holders = {c.key: read(results_dir / "locks" / f"{c.name}.{c.key}.lock") for c in cells}  # running now
    jobs = {c.key: read(results_dir / "jobs" / f"{c.name}.{c.key}.json") for c in cells}  # submitted to Slurm
    states = slurm_states([r["slurm_job"] for r in [*holders.values(), *jobs.values()] if r.get("slurm_job")])
    out = {}
    for cell in cells:
        holder = holders[cell.key]
        if states.get(holder.get("slurm_job")) in ENDED:  # a killed task's lock, left behind: the cell's newest
            holder = {}  # submission tells where the cell is
        job = (holder or jobs[cell.key]).get("slurm_job")
        state = states.get(job)
        run = done.get(cell.key)
        made_by = code_state(cell, run) if run else "todo"
        if made_by in ("done", "unknown"):
            out[cell.key] = "done" if made_by == "done" else "done (unknown code)"
        elif state == "PENDING" and not holder:  # a task that took the lock has started; sacct can lag behind
            out[cell.key] = f"queued (job {job})"
        elif job and state not in ENDED and (state or holder):  # a lock whose job Slurm cannot tell about counts
            out[cell.key] = f"running (job {job})"
        elif holder and not job and not _holder_gone(holder):
            out[cell.key] = f"running ({holder.get('host')}:{holder.get('pid')})"
        else:
            out[cell.key] = f"stale (code {run['code']['detector']}, now {cell.code})" if made_by == "stale" else "todo"
    return out


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()
