"""`make bench`: every detector on the same data, backbone, image size and machine, one table.

Usage: python scripts/bench.py [--models fastflow,cflow] [--dataset mtd] [--image-size 256] [--out results/bench.md]
Per detector (each in its own process, so peak memory is its own), one `adbench run` of one epoch through
``runner.run_one`` (the same pipeline, so a fix to the runner reaches these numbers): its fit time (the schedule's other
fields at their defaults) and end-to-end test images/s at the model's batch size; through run_one's ``measure`` hook,
latency per image at batch size 1 (median of single-image calls) and the backbone-only throughput over the test
images (the ceiling of test images/s); the optimiser steps of the fit (a global optimiser step hook counts every
stage's) and the seconds inside the training loops (``StageTimer``), so steps per second of training; then peak
memory (CPU: the process's max resident set; CUDA: torch's peak allocation). On CUDA the runner warms up every batch
shape and synchronises. Without the dataset under ADBENCH_DATA it falls back to the synthetic one and says so.
Writes results/bench.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from adbench.progress import Progress
from adbench.train import STAGE_TASK

# "One epoch" for detectors with several training stages: one pass of each (besides ``epochs=1``)
ONE_EPOCH = {"clscnf": {"cls_frozen_epochs": 1, "cls_finetune_epochs": 1, "refit": False}}  # refit: CNFs twice


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(detector, samples: dict, device: torch.device, n_latency: int) -> dict:
    """After the run's own evaluation: the backbone alone over the test images (the ceiling of test images/s) and
    the latency of single-image calls (median)."""
    from adbench.runner import warm_up

    images, batch = samples["image"], detector.config.batch_size
    warm_up(detector, images, batch, device)  # first use of each batch shape, on CUDA
    with torch.no_grad():
        _sync(device)
        t0 = time.perf_counter()
        for start in range(0, len(images), batch):
            detector.extractor(images[start : start + batch].to(device))
        _sync(device)
        backbone_s = time.perf_counter() - t0
        latencies = []
        for i in range(min(n_latency, len(images))):
            t0 = time.perf_counter()
            detector.predict(images[i : i + 1].to(device)).anomaly_map.cpu()
            latencies.append(time.perf_counter() - t0)
    return {"backbone_images_per_s": len(images) / backbone_s, "latency_ms": 1000 * statistics.median(latencies)}


class StageTimer(Progress):
    """Seconds spent inside the training loops: ``train.run_stage`` reports each stage as a ``train <name>`` task
    (so the fit's other work, e.g. CFLOW-AD's pass over the training set for the maps' maxima, is left out)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextmanager
    def task(self, description: str, total: int | None = None):
        t0 = time.perf_counter()
        try:
            yield lambda n=1, **fields: None
        finally:
            if description.startswith(STAGE_TASK):
                self.seconds += time.perf_counter() - t0


def bench_one(model: str, dataset: str, category: str, image_size: int, device_name: str, n_latency: int) -> dict:
    """Measure one detector in this process: one `adbench run` (``runner.run_one``) of one epoch, plus ``measure``."""
    from adbench.models import MODELS
    from adbench.runner import RunSpec, resolve_device, run_one

    device = resolve_device(device_name)
    fields = {f.name for f in dataclasses.fields(MODELS.get(model).Config)}  # reference baselines have no epochs
    overrides = {k: v for k, v in {"epochs": 1, **ONE_EPOCH.get(model, {})}.items() if k in fields}
    steps, timer = [0], StageTimer()
    hook = register_optimizer_step_post_hook(lambda opt, args, kwargs: steps.__setitem__(0, steps[0] + 1))
    # (every optimiser's steps; measure() and the evaluation take none: these are the fit's)
    spec = RunSpec(model=model, dataset=dataset, category=category, image_size=image_size, device=device_name,
                   overrides=overrides, save_maps=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = run_one(dataclasses.replace(spec, results_dir=Path(tmp)), timer,
                             measure=lambda det, samples, dev: measure(det, samples, dev, n_latency))
            r = json.loads((folder / "result.json").read_text())
    finally:
        hook.remove()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"model": model, "fit_epoch_s": r["timing"]["fit_s"], "loop_epoch_s": timer.seconds,
            "fit_steps": steps[0], "steps_per_s": steps[0] / timer.seconds if timer.seconds else 0.0,
            "test_images_per_s": r["timing"]["test_images_per_s"],
            **r["measured"], "peak_mib": peak, "n_train": r["n_train"], "n_test": r["n_test"],
            "device": r["device"].get("name") or r["device"]["cpu"] or "cpu",
            "memory_kind": "CUDA peak allocated" if device.type == "cuda" else "process max RSS",
            "malloc": r["malloc"]}


def table(rows: list[dict], command: str, setting: str) -> str:
    lines = [f"Measured with `{command}` ({setting}; {rows[0]['device']}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}; malloc: {rows[0]['malloc']}). Peak memory = {rows[0]['memory_kind']}. "
             "Fit = one pass over the "
             "training set (clscnf: one pass of each stage: classifier frozen, classifier fine-tuned, CNF; "
             "padim and patchcore, reference baselines without epochs: their whole fit, no optimiser steps). Training "
             "loop = the part of the fit inside the training loops (`train.run_stage`: batching, forward, backward, "
             "optimiser; not the passes before or after, e.g. CFLOW-AD's pass for the maps' maxima). Steps = "
             "optimiser steps in that fit (every stage); steps/s = steps / training-loop seconds.", "",
             "| detector | fit s / epoch | training loop s / epoch | steps | steps/s | test images/s | latency ms "
             "(batch 1) | peak MiB | backbone images/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rate = f"{r['steps_per_s']:.1f}" if r["fit_steps"] else "–"
        loop = f"{r['loop_epoch_s']:.1f}" if r["fit_steps"] else "–"
        lines.append(f"| {r['model']} | {r['fit_epoch_s']:.1f} | {loop} | {r['fit_steps']} | {rate} | "
                     f"{r['test_images_per_s']:.1f} | "
                     f"{r['latency_ms']:.0f} | {r['peak_mib']:.0f} | {r['backbone_images_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from adbench.errors import AdbenchError, DatasetError
    from adbench.models import list_models

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(list_models()))
    ap.add_argument("--dataset", default="mtd")
    ap.add_argument("--category", default=None)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--latency-images", type=int, default=20)
    ap.add_argument("--out", default="results/bench.md")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one model, print JSON
    args = ap.parse_args()
    dataset, category = args.dataset, args.category
    if args.one is None:
        from adbench.datasets import open_family

        try:
            family = open_family(dataset)
        except DatasetError as err:
            print(f"{err}; benchmarking on the synthetic dataset instead", file=sys.stderr)
            dataset, category, family = "synthetic", None, open_family("synthetic")
        category = category or family.categories()[0]
    if args.one is not None:
        try:
            row = bench_one(args.one, dataset, category, args.image_size, args.device, args.latency_images)
        except AdbenchError as err:  # one line for the table's "Failed" note, not a traceback
            sys.exit(f"error: {err}")
        print(json.dumps(row))
        return
    rows, failed = [], []
    for model in args.models.split(","):
        cmd = [sys.executable, __file__, "--one", model, "--dataset", dataset, "--category", category,
               "--image-size", str(args.image_size), "--device", args.device,
               "--latency-images", str(args.latency_images)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:  # the other detectors are still measured; the exit status says one failed
            failed.append(f"{model}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else '?'}")
            print(f"bench of {failed[-1]}", file=sys.stderr)
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{model}: {rows[-1]}", file=sys.stderr)
    if not rows:
        sys.exit("bench failed for every detector: " + "; ".join(failed))
    command = " ".join(["python scripts/bench.py", *sys.argv[1:]])
    setting = f"{dataset}/{category}, {rows[0]['n_train']} train / {rows[0]['n_test']} test images, " \
              f"{args.image_size} px, tf_efficientnet_lite0"
    text = table(rows, command, setting)
    if failed:
        text += "\nFailed: " + "; ".join(failed) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# adbench bench\n\n{text}")
    print(text)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
