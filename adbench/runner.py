"""One run = one detector trained and evaluated on one category; ``run`` does it and writes ``result.json``."""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import io
import json
import os
import platform
import random
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
from adbench.datasets import AnomalyDataset, open_family
from adbench.errors import ConfigError, TrainingError
from adbench.features import cache_key, create_extractor, extract_features
from adbench.models import create_model, resolve_config
from adbench.progress import NULL_PROGRESS, Progress
from adbench.results import check_writable, finite_or_none, mark_cell, run_name, write_run


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
    seed: int = 0
    device: str = "auto"
    results_dir: Path = Path("results")
    overrides: dict[str, Any] = field(default_factory=dict)  # config fields (``--set``, ``--epochs``, ...)
    preset: str | None = None
    cache_dir: Path | None = None  # persistent feature cache
    workers: int = 2  # image decoding threads
    save_maps: bool | None = None  # write maps.png, roc.png, pro.png; None: when the test split is small (below)


SAVE_MAPS_MAX_TEST = 300  # default of ``save_maps``: draw the figures when the test split has at most this many images


def code_version(model: str) -> dict[str, str | None]:
    """adbench's version and the sha256 (16 hex digits) of the detector's file, recorded in every result as ``code``."""
    import inspect

    from adbench.models import MODELS

    source = Path(inspect.getfile(MODELS.get(model))).read_bytes()
    try:
        version = metadata.version("adbench")
    except metadata.PackageNotFoundError:
        version = None
    return {"adbench": version, "detector": hashlib.sha256(source).hexdigest()[:16]}


def cell_key(spec: RunSpec, config) -> str:
    """Hash of everything that determines a run's result, recorded as ``cell`` (sweeps skip cells already run).

    The code is part of it (``code_version``): after a release or an edit of the detector's file, cells run again.
    """
    parts = {"model": spec.model, "dataset": spec.dataset, "category": spec.category, "seed": spec.seed,
             "backbone": spec.backbone, "weights": spec.weights, "image_size": spec.image_size,
             "preset": spec.preset, "config": dataclasses.asdict(config), "code": code_version(spec.model)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (FrEIA draws permutations from numpy, initial weights from torch)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.benchmark = False  # same kernels every run: reproducible on GPU too
    torch.backends.cudnn.deterministic = True


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


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and hardware, recorded in every result."""
    versions = {"python": platform.python_version()}
    packages = ("adbench", "torch", "torchvision", "timm", "FrEIA", "torchmetrics", "submitit", "numpy", "scikit-learn",
                "scipy")
    for pkg in packages:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    dev = {"type": device.type, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        dev["name"] = torch.cuda.get_device_name(device)
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
    train = AnomalyDataset(family, spec.category, "train", spec.image_size)
    test = AnomalyDataset(family, spec.category, "test", spec.image_size)
    seed_everything(spec.seed)
    extractor = create_extractor(spec.backbone, config.layers, spec.weights).to(device)
    key = None
    if spec.cache_dir is not None:  # only a persistent cache needs a key (it stats every training file)
        key = cache_key(backbone=spec.backbone, weights=extractor.weights_source, layers=config.layers,
                        size=spec.image_size, dataset=spec.dataset, device=device.type, files=_fingerprint(train))
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
            got, got_maps, seconds, _ = predict_all(detector, samples["image"], config.batch_size, device, progress)
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
    scores, maps, predict_s, parts = predict_all(detector, samples["image"], config.batch_size, device, progress)
    if not (np.isfinite(scores).all() and np.isfinite(maps).all()):
        raise TrainingError(f"{spec.model} produced NaN/inf anomaly scores on {spec.dataset}/{spec.category}; "
                            "no result written")
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

            figures = run_figures(images=samples["image"], masks=samples["mask"], labels=samples["label"],
                                  defects=samples["defect"], paths=samples["path"], scores=scores, maps=maps,
                                  model=spec.model, title=f"{spec.model} on {spec.dataset}/{spec.category}")
        except Exception as err:  # pictures never cost a finished run: it is written without them, and says why
            figures_error = f"{type(err).__name__}: {err}"
            progress.log(f"warning: figures not drawn ({figures_error}); writing the run without them")
    result = {
        "model": spec.model, "dataset": spec.dataset, "category": spec.category, "backbone": spec.backbone,
        "weights": extractor.weights_source, "image_size": spec.image_size, "seed": spec.seed, "preset": spec.preset,
        "config": dataclasses.asdict(config),
        "metrics": metrics,
        **({"parts": part_metrics} if part_metrics else {}),
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
            "mask_binarisation": f"> {family.mask_threshold} after resizing",
            "aupr": "average precision (step-wise)", "aupro": "exact MVTec AD definition, FPR limit 0.3",
            **detector.protocol(),
        },
        **environment(device),
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
            if not description.startswith("train "):  # train.run_stage: one step per epoch
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
    images, masks, labels, defects, paths = [], [], [], [], []
    with progress.task(f"load {dataset.family.name}/{dataset.category} {dataset.split}", total=len(dataset)) as advance:
        for batch in dataset.batches(batch_size, workers):
            for s in batch:
                images.append(s.image)
                masks.append(s.mask)
                labels.append(s.label)
                defects.append(s.defect)
                paths.append(s.path)
            advance(len(batch))
    return {"image": torch.stack(images), "mask": torch.stack(masks).numpy(), "label": np.array(labels),
            "defect": defects, "path": paths}


def predict_all(detector, images: torch.Tensor, batch_size: int, device: torch.device, progress: Progress):
    """Scores [N], maps [N,S,S], the seconds the detector took (transfer + backbone + head) and the parts.

    Parts (``Prediction.parts``) come back as name -> (scores [N], maps [N,S,S] or None).
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
    return scores, maps, seconds, parts

