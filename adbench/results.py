"""Run folders: written atomically, never overwritten, read back by the report."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from adbench.errors import AdbenchError

METRICS = ("image_auroc", "pixel_auroc", "image_aupr", "pixel_aupr", "aupro")
RUNS = "runs"
CELLS = "cells"  # index: cell key -> run folder name (sweeps)


def run_name(model: str, backbone: str, dataset: str, category: str, seed: int) -> str:
    """``<model>_<backbone>_<dataset>_<category>_s<seed>`` (the folder name of a run, before any suffix)."""
    return f"{model}_{backbone}_{dataset}_{category}_s{seed}"


def setting_hash(result: dict) -> str:
    """Short hash of what changes results besides the seed, dataset and category (config, preset, weights, size,
    geometry; squash, the geometry of every run before the option, is left out so their hashes stay as they were)."""
    keys = ("model", "backbone", "image_size", "weights", "preset", "config")
    geometry = run_geometry(result)
    blob = json.dumps({k: result.get(k) for k in keys} | {"config": run_config(result)}
                      | ({} if geometry == "squash" else {"geometry": geometry}), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:6]


def run_geometry(result: dict) -> str:
    """A run's input geometry; ``squash`` for runs from before the option (they all squashed)."""
    return result.get("geometry") or "squash"


ABSENT = "(absent)"  # a settings field a run does not record (e.g. a config field added after it ran)


PRECISION_FIELD = "features"  # the settings key of the backbone features' precision (``run_settings``)


def run_settings(result: dict) -> dict:
    """What a run was set to besides its seed, dataset and category: backbone, image size, geometry, weights, preset,
    config, and the precision of the backbone's ``features`` (``feature_precision``: CUDA runs made before adbench
    recorded it used fp16)."""
    keys = ("backbone", "image_size", "weights", "preset")
    return {**{k: result.get(k) for k in keys}, "geometry": run_geometry(result),
            PRECISION_FIELD: feature_precision(result.get("device")),
            **({"validation": result["validation"]["fraction"]} if result.get("validation") else {}),
            **_later_defaults(result.get("model")), **run_config(result)}


def run_config(result: dict) -> dict:
    """A run's recorded config in its fields' types (``as_field_type``): a grid's ``map_blur = [0, 4]`` recorded 0
    where runs made before the field record its default 0.0, and both are one setting."""
    from adbench.models._registry import as_field_type

    fields = _config_fields(result.get("model"))
    return {k: as_field_type(v, fields[k]) if k in fields and not isinstance(v, str) else v
            for k, v in (result.get("config") or {}).items()}


def _config_fields(model) -> dict:
    """Each config field's default for a registered ``model`` ({} for others)."""
    import dataclasses

    from adbench.models import MODELS

    return {f.name: f.default for f in dataclasses.fields(MODELS.get(model).Config)} if model in MODELS else {}


def _later_defaults(model) -> dict:
    """What a run that does not record a config field added later ran with: the field's default if it is in the
    config's ``KEY_SKIP_AT_DEFAULT``, or the config's ``VALUE_BEFORE`` (a field whose default is not the old behaviour:
    its runs get new keys)."""
    from adbench.models import MODELS

    if model not in MODELS:
        return {}
    later = getattr(MODELS.get(model).Config, "KEY_SKIP_AT_DEFAULT", ())
    before = getattr(MODELS.get(model).Config, "VALUE_BEFORE", {})
    return {**{k: v for k, v in _config_fields(model).items() if k in later}, **before}


def _shown(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def run_code(result: dict) -> str:
    """The detector-code hash a run records (``code.detector``); ``(absent)`` for runs made before adbench kept it."""
    return (result.get("code") or {}).get("detector") or ABSENT


def column_labels(results: list[dict], named: list[dict] | None = None) -> list[str]:
    """Per run, its report column: the model name, plus the settings that set the model's runs apart.

    A field sets runs apart when it takes two values within one dataset/category (a field that only follows the
    category, such as a per-category default, does not), e.g. ``clscnf (cls_encoder_lr=0.001)``. ``named``: per run,
    more fields to name after those (``results_frame``: the detector code, where a column mixes code). Reference
    (non-flow) detectors get `` (reference)``.
    """
    settings = [run_settings(r) for r in results]
    values: dict[tuple, set[str]] = {}  # (model, dataset, category, field) -> values seen
    fields: dict[str, set[str]] = {}
    for r, flat in zip(results, settings, strict=True):
        fields.setdefault(r.get("model"), set()).update(flat)
    for r, flat in zip(results, settings, strict=True):
        for f in fields[r.get("model")]:
            key = (r.get("model"), r.get("dataset"), r.get("category"), f)
            values.setdefault(key, set()).add(_shown(flat.get(f, ABSENT)))
    differ = {m: _fewest_fields(m, sorted(f for f in fs if any(len(v) > 1 for k, v in values.items()
                                                              if k[0] == m and k[3] == f)), results, settings)
              for m, fs in fields.items()}
    labels = []
    for r, flat, more in zip(results, settings, named or [{}] * len(results), strict=True):
        model = str(r.get("model"))
        shown = ", ".join([f"{f}={_shown(flat.get(f, ABSENT))}" for f in differ[r.get("model")]]
                          + [f"{f}={_shown(v)}" for f, v in more.items()])
        labels.append(model + (f" ({shown})" if shown else "") + (" (reference)" if is_reference(model) else ""))
    return labels


def _fewest_fields(model, fields: list[str], results: list[dict], settings: list[dict]) -> list[str]:
    """Of the ``fields`` that set ``model``'s runs apart, a few that still tell every distinct setting apart, in their
    sorted order: picked greedily, each time the one splitting the runs into the most groups (ties: a field every run
    records, then a detector setting before the feature precision ``features``, which the ``ran on`` column shows
    anyway, then the name), so an option added later does not name every one of its siblings in the label, and a
    label names the setting that made the difference."""
    rows = [tuple(_shown(flat.get(f, ABSENT)) for f in fields)
            for r, flat in zip(results, settings, strict=True) if r.get("model") == model]
    chosen: list[int] = []
    while len({tuple(row[i] for i in chosen) for row in rows}) < len(set(rows)):
        def split(i: int) -> tuple:
            groups = len({tuple(row[j] for j in [*chosen, i]) for row in rows})
            return groups, all(row[i] != ABSENT for row in rows), fields[i] != PRECISION_FIELD, -i
        chosen.append(max((i for i in range(len(fields)) if i not in chosen), key=split))
    return [fields[i] for i in sorted(chosen)]


def is_reference(model: str) -> bool:
    """Whether a detector is a reference (non-flow) baseline: its class sets ``reference = True``."""
    from adbench.models import MODELS  # here: adbench.models imports the runner's dependencies

    return model in MODELS and bool(getattr(MODELS.get(model), "reference", False))


def finite_or_none(obj):
    """Replace NaN/inf floats by None, recursively, so result.json stays valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_none(v) for v in obj]
    return obj


def check_writable(results_dir: Path) -> Path:
    """Create ``results_dir/runs`` (before any work is done) and fail early with one line if impossible."""
    runs = Path(results_dir) / RUNS
    try:
        runs.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=runs).close()
    except OSError as err:
        raise AdbenchError(f"cannot write results into {runs}: {err.strerror or err}") from None
    return runs


def write_run(results_dir: Path, name: str, files: dict[str, str | bytes]) -> Path:
    """Write ``files`` into a new folder ``results_dir/runs/<name>[-N]`` atomically and return it.

    ``files`` maps a file name to its text (written as text) or bytes (written as is, e.g. a PNG). The files are
    written into a temporary folder first, which is then renamed; an existing run folder is never touched (a numeric
    suffix is appended instead), so an interrupted or concurrent write loses no earlier result.
    """
    for fname, content in files.items():  # before anything is created
        if not isinstance(content, str | bytes):
            raise TypeError(f"run file {fname!r} must be str or bytes, got {type(content).__name__}")
        if Path(fname).name != fname or fname in ("", "..") or fname.startswith(".tmp-"):
            raise ValueError(f"run file name must be a plain file name, got {fname!r}")
    runs = check_writable(results_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=runs))
    try:
        for fname, content in files.items():
            with open(tmp / fname, "wb" if isinstance(content, bytes) else "w") as fh:
                fh.write(content)
                fh.flush()
                os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; runs are meant to be shared
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AdbenchError(f"cannot write run {name} into {runs}: {err.strerror or err}") from None
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


def mark_cell(results_dir: Path, key: str, run: Path) -> None:
    """Index a finished run by its cell key (``results_dir/cells/<key>``), so a sweep's done-check reads one file
    instead of every result.json. Written atomically after the run folder; the run folder stays the record."""
    folder = Path(results_dir) / CELLS
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{key}.tmp{os.getpid()}"
    tmp.write_text(Path(run).name + "\n")
    os.replace(tmp, folder / key)


def cell_run(results_dir: Path, key: str) -> Path | None:
    """The run folder indexed under cell ``key`` (see ``mark_cell``), if it still holds a result.json."""
    try:
        run = Path(results_dir) / RUNS / (Path(results_dir) / CELLS / key).read_text().strip()
    except OSError:
        return None
    return run if (run / "result.json").is_file() else None


RESULT_KEYS = ("model", "dataset", "category", "seed", "metrics")  # what every result.json holds (``write_run``)


def load_results(results_dir: Path, skipped: list[str] | None = None,
                 keys: tuple[str, ...] = RESULT_KEYS) -> list[dict]:
    """Every ``result.json`` under ``results_dir/runs`` (unfinished temporary folders are ignored). A file that is not
    a run's result (unreadable, not JSON, not an object with ``keys``) is left out; with ``skipped``, it is listed
    there as "PATH (why)"."""
    out = []
    for path in sorted((Path(results_dir) / RUNS).glob("**/result.json")):
        if any(part.startswith(".tmp-") for part in path.parts):
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            why = f"not valid JSON: {err}" if isinstance(err, json.JSONDecodeError) else f"unreadable: {err}"
        else:
            missing = [k for k in keys if k not in data] if isinstance(data, dict) else None
            if missing == []:
                data["path"] = str(path.parent)
                out.append(data)
                continue
            why = f"no {', '.join(missing)}" if missing else f"a JSON {type(data).__name__}, not an object"
        if skipped is not None:
            skipped.append(f"{path} ({why})")
    return out


def feature_precision(device: dict | None) -> str:
    """The precision of a run's backbone features (``device.feature_precision``); CUDA runs made before adbench
    recorded it used fp16 autocast, CPU runs fp32."""
    device = device or {}
    return device.get("feature_precision", "fp16" if device.get("type") == "cuda" else "fp32")


def device_label(device: dict | None) -> str:
    """Where a run's timings were taken: the GPU's name, or "CPU (N threads)", with ", fp16 features" where the
    backbone ran in fp16 (``feature_precision``); "unknown" for old results."""
    if not device:
        return "unknown"
    cuda, half = device.get("type") == "cuda", feature_precision(device) == "fp16"
    threads = device.get("threads", "?")
    where = str(device.get("name", "CUDA")) if cuda else f"CPU ({threads} thread{'' if threads == 1 else 's'})"
    return where + (", fp16 features" if half else "")


def results_frame(results: list[dict]) -> pd.DataFrame:
    """One row per run: identifying columns, its report ``column`` (``column_labels``), the five metrics, timings.

    Runs of different detector code (``code``, ``run_code``) never share a column unnamed: a column whose newest runs
    (``latest_runs``) mix code is split by it, the code named like a setting (``fastflow (code=1a2b3c4d5e6f)``;
    ``code_named`` says so). Older runs do not split a column: a rerun by new code replaces a seed as any rerun does.
    A column whose newest runs were not made by this checkout's detector code is marked (``CODE_MARKS`` by
    ``run_code_state``, also a frame column ``code_state``): ``fastflow (layers=[1, 2, 3]) [stale]``.
    """
    rows = []
    for r, column in zip(results, column_labels(results), strict=True):
        row = {k: r.get(k) for k in ("model", "dataset", "category", "backbone", "image_size", "seed", "path")}
        row.update(column=column, setting=setting_hash(r), code=run_code(r), device=device_label(r.get("device")),
                   started=r.get("started") or "", run=Path(r.get("path") or "").name, parts=r.get("parts") or {},
                   validation=r.get("validation") or {}, selection=r.get("selection") or {})
        row.update({m: r.get("metrics", {}).get(m) for m in METRICS})
        row.update({f"timing_{k}": v for k, v in r.get("timing", {}).items()})
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame.assign(code_named=[], code_state=[])
    codes = latest_runs(frame)[0].groupby("column").code.nunique()
    mixed = frame.column.isin(codes[codes > 1].index)
    if mixed.any():
        named = column_labels(results, [{"code": code} for code in frame.code])
        frame["column"] = frame.column.where(~mixed, pd.Series(named, index=frame.index))
    frame = frame.assign(code_named=mixed, code_state=[run_code_state(r) for r in results])
    newest = latest_runs(frame)[0]
    states = newest.groupby("column").code_state.unique()  # one state each: a column's newest runs share their code
    marks = {column: CODE_MARKS[s[0]] for column, s in states.items() if s[0] in CODE_MARKS}
    frame["column"] = [_marked(c, marks[c]) if c in marks else c for c in frame.column]
    return frame


CODE_MARKS = {"stale": "[stale]", "unknown": "[code unknown]"}  # column marks by ``run_code_state``


def run_code_state(result: dict) -> str:
    """Whether a run's numbers are what this checkout's detector code gives: ``current`` (its recorded code is the
    code now, ``runner.detector_code``), ``stale`` (made by other code: ``adbench sweep --rerun-stale`` reruns it),
    ``unknown`` (made before adbench recorded the detector's code), or ``unregistered`` (no such detector here to
    compare with; not marked)."""
    from adbench.models import MODELS
    from adbench.runner import detector_code

    code = run_code(result)
    if result.get("model") not in MODELS:
        return "unregistered"
    return "unknown" if code == ABSENT else "current" if code == detector_code(result["model"])[0] else "stale"


def unmarked(column: str) -> str:
    """A report column's label without its ``CODE_MARKS`` (what the label is at any detector code)."""
    for mark in CODE_MARKS.values():
        column = column.replace(f" {mark}", "")
    return column


def _marked(column: str, mark: str) -> str:
    """``column`` with ``mark`` after its settings (before `` (reference)``, which ``column_order`` sorts by)."""
    base = column.removesuffix(" (reference)")
    return f"{base} {mark}{column[len(base):]}"


def _rerun_number(run: str) -> int:
    """The ``-N`` suffix ``write_run`` gives a rerun's folder (0 for the first run)."""
    match = re.search(r"_s\d+-(\d+)$", run)
    return int(match.group(1)) if match else 0


def latest_runs(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep the newest run of each (column, dataset, category, seed): a rerun replaces a seed, it is not another one.

    Newest = latest ``started`` time, then the highest rerun suffix. Returns ``(kept, replaced)``; ``replaced`` has a
    ``by`` column naming the run that replaced each.
    """
    if frame.empty:
        return frame, frame.assign(by=[])
    order = frame.assign(_n=frame.run.map(_rerun_number)).sort_values(["started", "_n"], kind="stable")
    keys = ["column", "dataset", "category", "seed"]
    newest = order.groupby(keys, dropna=False).tail(1)
    replaced = order.drop(newest.index)
    by = newest.set_index(keys).run
    replaced = replaced.assign(by=[by.loc[tuple(k)] for k in replaced[keys].itertuples(index=False)])
    return newest.drop(columns="_n").sort_index(), replaced.drop(columns="_n").sort_index()
