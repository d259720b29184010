"""One run = one detector trained and evaluated on one category; ``run`` does it and writes ``result.json``."""

from __future__ import annotations

import ast
import ctypes
import dataclasses
import functools
import hashlib
import inspect
import io
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from adbench import metrics as M
from adbench.datasets import AnomalyDataset, check_geometry, open_family, to_eval_view
from adbench.errors import ConfigError, TrainingError
from adbench.features import cache_key, check_precision, create_extractor, extract_features
from adbench.models import create_model, resolve_config
from adbench.progress import NULL_PROGRESS, Progress
from adbench.results import check_writable, finite_or_none, mark_cell, run_name, write_run
from adbench.train import STAGE_TASK


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines a run (or, with ``category="all"``, one run per category)."""

    model: str = "fastflow"
    dataset: str = "synthetic"
    category: str = "all"
    data_root: Path | None = None  # default: $ADBENCH_DATA or ~/.cache/adbench/datasets
    root: Path | None = None  # the folder of dataset "folder"
    backbone: str = "tf_efficientnet_lite0"
    weights: str | None = None  # None: offline package or timm download; "random"; or a file
    image_size: int = 256
    geometry: str = "squash"  # how images become image_size² (datasets.GEOMETRIES): squash, or pad (aspect kept)
    seed: int = 0
    device: str = "auto"
    results_dir: Path = Path("results")
    overrides: dict[str, Any] = field(default_factory=dict)  # config fields (``--set``, ``--epochs``, ...)
    preset: str | None = None
    cache_dir: Path | None = None  # persistent feature cache
    workers: int = 2  # image decoding threads
    save_maps: bool | None = None  # write maps.png, roc.png, pro.png; None: when the test split is small (below)
    validation: float = 0.0  # hold out this fraction of the training images as a synthetic-defect validation split
    feature_precision: str = "fp32"  # features.PRECISIONS: fp32 everywhere, or fp16 (CUDA autocast) for speed

    def __post_init__(self) -> None:  # a typo fails before any work (a sweep checks every cell up front)
        check_geometry(self.geometry)
        check_precision(self.feature_precision)


GEOMETRY_PROTOCOL = {  # result ``protocol.geometry``: what the detector saw, and how its maps were evaluated
    "squash": "images resized to the square whatever their aspect ratio",
    "pad": "detector input: aspect ratio kept (longer side = image size), reflect-padded to the square; each anomaly "
           "map cropped to its image's box and resized bilinearly to the square, so pixel metrics use the squashed "
           "masks and pixels, as squash does; image scores are the detector's own, over its whole padded input",
}
SAVE_MAPS_MAX_TEST = 300  # default of ``save_maps``: draw the figures when the test split has at most this many images


# A detector's code = its file plus the files of models/ it imports, followed transitively (clscnf -> cflow.py,
# padim and patchcore -> _maps.py). models/_registry.py is left out although every detector imports it: it holds the
# contract and the config resolution, whose effect on a run is the config the run records (part of the cell key);
# hashing it would make any edit there mark every cell of every detector stale.
UNHASHED = frozenset({"_registry.py", "__init__.py"})


@functools.cache
def detector_code(model: str) -> tuple[str, tuple[str, ...]]:
    """The sha256 (12 hex digits) of a detector's code, and the names of the files hashed (see ``UNHASHED``).

    Computed once per process: the code this process runs, not later edits of the files.
    """
    from adbench.models import MODELS

    first = Path(inspect.getfile(MODELS.get(model)))
    sources: dict[str, bytes] = {}
    todo = [first.name]
    while todo:
        name = todo.pop()
        if name in sources or name in UNHASHED or not (first.parent / name).is_file():
            continue
        sources[name] = (first.parent / name).read_bytes()
        for node in ast.walk(ast.parse(sources[name])):
            if not isinstance(node, ast.ImportFrom):
                continue
            module = node.module or ""
            if module.startswith("adbench.models."):  # from adbench.models._maps import upsample_blur
                todo.append(module.split(".")[2] + ".py")
            elif module == "adbench.models" or (node.level and not module):  # from adbench.models import cflow
                todo += [f"{alias.name}.py" for alias in node.names]  # (names that are no file are skipped)
            elif node.level:  # from ._maps import upsample_blur
                todo.append(module.split(".")[0] + ".py")
    digest = hashlib.sha256()
    for name in sorted(sources):
        digest.update(f"{name}\0{len(sources[name])}\0".encode() + sources[name])
    return digest.hexdigest()[:12], tuple(sorted(sources))


@functools.cache
def git_state(*folders: Path) -> dict[str, str | bool | None]:
    """The git commit of the checkout holding ``folders`` and whether their tracked files differ from it (``dirty``).

    Both None where that cannot be told: not a git checkout (an installed package, a copy inside an ignored virtualenv),
    no git, or git failing. Never raises. Computed once per process.
    """
    def git(*args: str) -> str:
        return subprocess.run(["git", "--no-optional-locks", "-C", str(folders[0]), *args], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()

    try:
        if not git("ls-files", "--", *map(str, folders)):  # untracked or ignored here: not this checkout's code
            return {"git": None, "dirty": None}
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", *map(str, folders)))
    except (OSError, subprocess.SubprocessError):
        return {"git": None, "dirty": None}
    return {"git": commit, "dirty": dirty}


def code_version(model: str) -> dict[str, Any]:
    """What code made a run, recorded in every result as ``code``: adbench's version, the detector's code hash and
    its files (``detector_code``), and the git commit of adbench's checkout with ``dirty`` (its code under adbench/,
    models/ and datasets/ differs from the commit; both None outside a git checkout)."""
    import adbench.datasets
    import adbench.models

    try:
        version = metadata.version("adbench")
    except metadata.PackageNotFoundError:
        version = None
    detector, files = detector_code(model)
    code_dirs = (Path(__file__).parent, Path(adbench.models.__file__).parent, Path(adbench.datasets.__file__).parent)
    return {"adbench": version, "detector": detector, "files": list(files), **git_state(*code_dirs)}


def cell_key(spec: RunSpec, config) -> str:
    """Hash of everything that determines a run's result, recorded as ``cell`` (sweeps skip cells already run).

    The code is not part of it: a cell whose run was made by other detector code (``detector_code``, recorded in the
    result's ``code``) is the same cell, *stale*; a sweep lists it and reruns it with ``--rerun-stale`` only.
    """
    parts = {"model": spec.model, "dataset": spec.dataset, "category": spec.category, "seed": spec.seed,
             "backbone": spec.backbone, "weights": spec.weights, "image_size": spec.image_size,
             "preset": spec.preset, "config": _config_part(config), **_geometry_part(spec),
             **({"validation": spec.validation} if spec.validation else {}), **_precision_part(spec)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _config_part(config) -> dict[str, Any]:
    """The config as a key part, less the fields its class lists in ``KEY_SKIP_AT_DEFAULT`` while they are at their
    default: options added after runs were made, so those runs' keys stay valid (a later change of a default edits
    the detector's file, which makes its cells stale)."""
    skip = {f.name for f in dataclasses.fields(config)
            if f.name in getattr(config, "KEY_SKIP_AT_DEFAULT", ()) and getattr(config, f.name) == f.default}
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in skip}


def _geometry_part(spec: RunSpec) -> dict[str, str]:
    """The geometry as a key part; squash, the only geometry before the option, is left out so keys made before it
    (cells, feature caches) stay valid."""
    return {} if spec.geometry == "squash" else {"geometry": spec.geometry}


def _precision_part(spec: RunSpec) -> dict[str, str]:
    """The feature precision as a key part; fp32, the CPU's only precision before the option, is left out so keys
    made before it stay valid (CUDA runs made before it used fp16 autocast: their results record no precision, and
    ``results.device_label`` says fp16 for them)."""
    return {} if spec.feature_precision == "fp32" else {"feature_precision": spec.feature_precision}


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (FrEIA draws permutations from numpy, initial weights from torch)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.benchmark = False  # same cuDNN kernels every run; on CUDA a run is still reproducible only
    torch.backends.cudnn.deterministic = True  # to float rounding, not bit for bit: backward passes that add with
    # atomics (index_select's, CFLOW-AD's gather) sum in any order (tests/test_gpu.py holds it to that)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; asking for cuda without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"unknown device {device!r}; valid: auto, cpu, cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but torch sees no CUDA device (use --device cpu or auto)")
    return torch.device(device)


def _command_line() -> str | None:
    """The adbench command that made this run (None when called from Python code)."""
    if sys.argv and Path(sys.argv[0]).name in ("adbench", "__main__.py"):
        return " ".join(["adbench", *sys.argv[1:]])
    return None


_MALLOC_TUNED: str | None = None


def keep_freed_memory() -> str:
    """Stop glibc from handing every large freed block back to the OS (and faulting it in again on the next batch).

    A batch's activations are freed and reallocated batch after batch; above glibc's mmap threshold (at most 32 MiB
    by default) each is a fresh mmap whose pages fault in on first touch. Raising the mmap and trim thresholds to
    1 GiB keeps them in the heap: the Lite0 backbone at 256 px, batch 32, ran 2.0x faster on 2 CPU cores (30 -> 62
    images/s, README). The process keeps its peak memory instead of returning it. Set ADBENCH_MALLOC=default to opt
    out. Returns what was done (recorded in every result); a no-op off glibc.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED is None:
        _MALLOC_TUNED = "default"
        if os.environ.get("ADBENCH_MALLOC", "") != "default" and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL(None)
                ok = libc.mallopt(-3, 2**30) == 1 and libc.mallopt(-1, 2**30) == 1  # M_MMAP_ / M_TRIM_THRESHOLD
            except (OSError, AttributeError):
                ok = False
            _MALLOC_TUNED = "glibc mmap and trim thresholds 1 GiB" if ok else "default"
    return _MALLOC_TUNED


def environment(device: torch.device, feature_precision: str = "fp32") -> dict[str, Any]:
    """Versions, hardware and the features' precision, recorded in every result."""
    versions = {"python": platform.python_version()}
    packages = ("adbench", "torch", "torchvision", "timm", "FrEIA", "torchmetrics", "submitit", "numpy", "scikit-learn",
                "scipy")
    for pkg in packages:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    dev = {"type": device.type, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "cpu_kernels": torch.backends.cpu.get_cpu_capability(),  # AVX512, AVX2, ...: the CPU kernels' rounding
           "feature_precision": feature_precision}
    if device.type == "cuda":
        dev["name"] = torch.cuda.get_device_name(device)
        dev["index"] = device.index if device.index is not None else torch.cuda.current_device()  # which GPU
    return {"versions": versions, "device": dev, "platform": platform.platform(), "malloc": keep_freed_memory()}


def categories_of(spec: RunSpec) -> list[str]:
    """The categories a spec covers (all of the dataset's for ``all``)."""
    family = open_family(spec.dataset, spec.data_root, spec.root)
    if spec.category == "all":
        return family.categories()
    family.check_category(spec.category)
    return [spec.category]


def run(spec: RunSpec, progress: Progress = NULL_PROGRESS) -> list[Path]:
    """Run every category of the spec; returns the run folders written."""
    check_writable(spec.results_dir)
    return [run_one(dataclasses.replace(spec, category=c), progress) for c in categories_of(spec)]


Measure = Callable[[Any, dict[str, Any], torch.device], dict[str, Any]]  # (detector, test samples, device) -> values


def run_one(spec: RunSpec, progress: Progress = NULL_PROGRESS, *, eval_epochs: Sequence[int] = (),
            measure: Measure | None = None) -> Path:
    """Train and evaluate one detector on one category; writes and returns the run folder.

    Scripts hook in here rather than copy the pipeline: ``eval_epochs`` also evaluates the five metrics after those
    epochs of each training stage (result ``epochs``: one row each, ``fit_s`` without the evaluations); ``measure``
    is called with the trained detector and the test samples after the evaluation (result ``measured``).
    """
    started = datetime.now(timezone.utc)
    keep_freed_memory()
    device = resolve_device(spec.device)
    config = resolve_config(spec.model, spec.backbone, spec.overrides, spec.preset, dataset=spec.dataset,
                            category=spec.category)
    family = open_family(spec.dataset, spec.data_root, spec.root)
    train = AnomalyDataset(family, spec.category, "train", spec.image_size, spec.geometry)
    test = AnomalyDataset(family, spec.category, "test", spec.image_size, spec.geometry)
    held = None
    if spec.validation:  # settings are chosen on this, never on the test split (adbench.validation)
        from adbench.validation import carve  # imported when used: it brings in the defect synthesis (torchvision)

        train, held = carve(train, spec.validation)
    seed_everything(spec.seed)
    extractor = create_extractor(spec.backbone, config.layers, spec.weights, spec.feature_precision).to(device)
    key = None
    if spec.cache_dir is not None:  # only a persistent cache needs a key (it stats every training file)
        key = cache_key(backbone=spec.backbone, weights=extractor.weights_source, layers=config.layers,
                        size=spec.image_size, dataset=spec.dataset, device=device.type, files=_fingerprint(train),
                        **_geometry_part(spec), **_precision_part(spec))
    t0 = time.perf_counter()
    store, backbone_s = extract_features(extractor, train, batch_size=config.batch_size, device=device,
                                         cache_dir=spec.cache_dir, key=key, progress=progress)
    extract_s = time.perf_counter() - t0
    samples = load_split(test, config.batch_size, spec.workers, progress)
    epoch_rows: list[dict[str, Any]] = []
    try:
        seed_everything(spec.seed)
        detector = create_model(spec.model, extractor, spec.image_size, config).to(device)
        images = None
        if detector.needs_images:  # e.g. a reconstruction target: the training images, in the store's order
            images = load_split(train, config.batch_size, spec.workers, progress)["image"]
        t0, paused = time.perf_counter(), 0.0

        def evaluate(epoch: int, fields: dict[str, Any]) -> None:  # mid-training (eval_epochs); not fit time
            nonlocal paused
            start = time.perf_counter()
            detector.calibrate(store)  # e.g. CFLOW's training-set maxima, which fit computes at its end
            fit_so_far, modes = time.perf_counter() - t0 - paused, {m: m.training for m in detector.modules()}
            got, got_maps, seconds, _ = predict_all(detector, samples["image"], config.batch_size, device, progress,
                                                    boxes=samples["box"])
            for module, mode in modes.items():
                module.train(mode)
            epoch_rows.append({"epoch": epoch, **M.compute_metrics(got, samples["label"], got_maps, samples["mask"]),
                               "fit_s": fit_so_far, "schedule_epochs": config.epochs, "loss": fields.get("loss"),
                               "test_images_per_s": len(got) / seconds})
            paused += time.perf_counter() - start

        fit_progress = EpochHook(progress, eval_epochs, evaluate) if eval_epochs else progress
        history = detector.fit(store, fit_progress, images=images)
        _sync(device)
        fit_s = time.perf_counter() - t0 - paused
    finally:
        store.close()
    warm_up(detector, samples["image"], config.batch_size, device)
    scores, maps, predict_s, parts = predict_all(detector, samples["image"], config.batch_size, device, progress,
                                                 boxes=samples["box"])
    if not (np.isfinite(scores).all() and np.isfinite(maps).all()):
        raise TrainingError(f"{spec.model} produced NaN/inf anomaly scores on {spec.dataset}/{spec.category}; "
                            "no result written")
    validation = None
    if held is not None:
        progress.log("validating on held-out training images with synthetic defects")
        from adbench.validation import validate

        validation = validate(detector, load_split(held, config.batch_size, spec.workers, progress), predict_all,
                              config.batch_size, device, progress)
        validation["fraction"] = spec.validation
    progress.log("computing metrics")
    metrics = M.compute_metrics(scores, samples["label"], maps, samples["mask"])
    part_metrics = {name: M.compute_metrics(s, samples["label"], m, samples["mask"] if m is not None else None)
                    for name, (s, m) in parts.items()}
    measured = measure(detector, samples, device) if measure is not None else None
    n_test = len(test)
    figures, figures_error = {}, None
    if spec.save_maps if spec.save_maps is not None else n_test <= SAVE_MAPS_MAX_TEST:
        progress.log("drawing figures")
        try:  # after the metrics (which it cannot change), before the folder is written (all files or none)
            from adbench.plots import run_figures

            shown = samples["image"] if spec.geometry == "squash" else to_eval_view(samples["image"].numpy(),
                                                                                    samples["box"])
            figures = run_figures(images=shown, masks=samples["mask"], labels=samples["label"],
                                  defects=samples["defect"], paths=samples["path"], scores=scores, maps=maps,
                                  model=spec.model, title=f"{spec.model} on {spec.dataset}/{spec.category}")
        except Exception as err:  # pictures never cost a finished run: it is written without them, and says why
            figures_error = f"{type(err).__name__}: {err}"
            progress.log(f"warning: figures not drawn ({figures_error}); writing the run without them")
    result = {
        "model": spec.model, "dataset": spec.dataset, "category": spec.category, "backbone": spec.backbone,
        "weights": extractor.weights_source, "image_size": spec.image_size, "geometry": spec.geometry,
        "seed": spec.seed, "preset": spec.preset,
        "config": dataclasses.asdict(config),
        "metrics": metrics,
        **({"parts": part_metrics} if part_metrics else {}),
        **({"validation": validation} if validation else {}),
        **({"selection": detector.selection} if getattr(detector, "selection", None) else {}),  # chosen in fit
        **({"epochs": epoch_rows} if eval_epochs else {}),
        **({"measured": measured} if measured is not None else {}),
        "timing": {
            "extract_train_s": extract_s, "fit_s": fit_s, "predict_s": predict_s,
            "test_images_per_s": n_test / predict_s if predict_s > 0 else None,
            "backbone_images_per_s": len(train) / backbone_s if backbone_s > 0 else None,
            **({"fit_stages_s": detector.stage_seconds} if getattr(detector, "stage_seconds", None) else {}),
        },
        "cell": cell_key(spec, config), "code": code_version(spec.model),
        "n_train": len(train), "n_test": n_test, "n_test_anomalous": int(samples["label"].sum()),
        "loss_history": history,
        "figures": sorted(figures), **({"figures_error": figures_error} if figures_error else {}),
        "protocol": {
            "checkpoint": "last epoch (no model selection on the test set)",
            "eval_resolution": f"{spec.image_size}x{spec.image_size} (images bilinear, masks nearest)",
            "geometry": GEOMETRY_PROTOCOL[spec.geometry],
            "mask_binarisation": test.mask_binarisation(),
            "aupr": "average precision (step-wise)", "aupro": "exact MVTec AD definition, FPR limit 0.3",
            **detector.protocol(),
        },
        **environment(device, spec.feature_precision),
        "command": _command_line(),
        "started": started.isoformat(timespec="seconds"),
        "data_root": str(family.base),
    }
    frame = pd.DataFrame({"path": samples["path"], "label": samples["label"], "defect": samples["defect"],
                          "score": scores})
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    name = run_name(spec.model, spec.backbone, spec.dataset, spec.category, spec.seed)
    text = json.dumps(finite_or_none(result), indent=2, allow_nan=False) + "\n"
    path = write_run(spec.results_dir, name, {"result.json": text, "scores.csv": buf.getvalue(), **figures})
    mark_cell(spec.results_dir, result["cell"], path)
    return path


class EpochHook(Progress):
    """The progress ``fit`` reports to, calling ``at_epoch(epoch, fields)`` after the chosen epochs of each stage."""

    def __init__(self, inner: Progress, epochs: Sequence[int], at_epoch: Callable[[int, dict], None]) -> None:
        self.inner, self.epochs, self.at_epoch = inner, set(epochs), at_epoch

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator:
        with self.inner.task(description, total) as advance:
            if not description.startswith(STAGE_TASK):  # train.run_stage: one step per epoch
                yield advance
                return
            done = 0

            def counted(n: int = 1, **fields) -> None:
                nonlocal done
                advance(n, **fields)
                done += n
                if done in self.epochs:
                    self.at_epoch(done, fields)

            yield counted

    def log(self, message: str) -> None:
        self.inner.log(message)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(detector, images: torch.Tensor, batch_size: int, device: torch.device) -> None:
    """On CUDA, predict the first full batch and the last partial one untimed: kernels load and algorithms are
    picked on a shape's first use, which would otherwise count as the detector's time."""
    if device.type != "cuda":
        return
    last = len(images) % batch_size
    detector.eval()
    with torch.no_grad():
        for batch in [images[:batch_size]] + ([images[-last:]] if last else []):
            detector.predict(batch.to(device))
    _sync(device)


def _fingerprint(dataset: AnomalyDataset) -> list:
    """Paths with size and modification time (synthetic samples have no file), for the feature-cache key."""
    out = []
    for path in dataset.index.image_path:
        p = Path(path)
        stat = p.stat() if p.is_file() else None
        out.append((str(p.resolve()) if stat else path, stat.st_size if stat else 0, stat.st_mtime_ns if stat else 0))
    return out


def load_split(dataset: AnomalyDataset, batch_size: int, workers: int, progress: Progress) -> dict[str, Any]:
    """Decode a whole split once (uint8 images, in index order), so timing the detector measures the detector."""
    images, masks, labels, defects, paths, boxes = [], [], [], [], [], []
    with progress.task(f"load {dataset.family.name}/{dataset.category} {dataset.split}", total=len(dataset)) as advance:
        for batch in dataset.batches(batch_size, workers):
            for s in batch:
                images.append(s.image)
                masks.append(s.mask)
                labels.append(s.label)
                defects.append(s.defect)
                paths.append(s.path)
                boxes.append(s.box)
            advance(len(batch))
    return {"image": torch.stack(images), "mask": torch.stack(masks).numpy(), "label": np.array(labels),
            "defect": defects, "path": paths, "box": np.array(boxes, dtype=np.int64)}


def predict_all(detector, images: torch.Tensor, batch_size: int, device: torch.device, progress: Progress,
                boxes: np.ndarray | None = None):
    """Scores [N], maps [N,S,S], the seconds the detector took (transfer + backbone + head) and the parts.

    Parts (``Prediction.parts``) come back as name -> (scores [N], maps [N,S,S] or None). With ``boxes`` [N, 4]
    (``load_split``'s, for a padded geometry) every map is brought to the evaluation view (``to_eval_view``), untimed.
    """
    scores, maps, seconds, parts = [], [], 0.0, {}
    detector.eval()
    with progress.task("predict", total=len(images)) as advance:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            t0 = time.perf_counter()
            pred = detector.predict(batch.to(device))
            score, amap = pred.score.float().cpu(), pred.anomaly_map.float().cpu()
            seconds += time.perf_counter() - t0
            scores.append(score.numpy())
            maps.append(amap.numpy())
            for name, (part_score, part_map) in pred.parts.items():
                got = parts.setdefault(name, ([], []))
                got[0].append(part_score.float().cpu().numpy())
                if part_map is not None:
                    got[1].append(part_map.float().cpu().numpy())
            advance(len(batch))
    t0 = time.perf_counter()
    scores, maps = detector.finalize(np.concatenate(scores), np.concatenate(maps))
    seconds += time.perf_counter() - t0
    parts = {name: (np.concatenate(s), np.concatenate(m) if m else None) for name, (s, m) in parts.items()}
    if boxes is not None:
        maps = to_eval_view(maps, boxes)
        parts = {name: (s, None if m is None else to_eval_view(m, boxes)) for name, (s, m) in parts.items()}
    return scores, maps, seconds, parts

