"""`make bench`: every detector on the same data, backbone, image size and machine, one table.

Usage: python scripts/bench.py [--models fastflow,cflow] [--dataset mtd] [--image-size 256] [--readme README.md]
Per detector (each in its own process, so peak memory is its own): fit time of one epoch on cached features (the
schedule's other fields at their defaults), end-to-end test images/s at the model's batch size, latency per image at
batch size 1 (median of single-image calls), peak memory (CPU: the process's max resident set; CUDA: torch's peak
allocation) and the backbone-only throughput (the ceiling of test images/s). On CUDA: warm-up, synchronisation and
fp16 autocast for the backbone. Without the dataset under ADBENCH_DATA it falls back to the synthetic one and says so.
Writes results/bench.md (and the README's bench table between its markers with --readme).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

MARK_BEGIN, MARK_END = "<!-- bench:begin -->", "<!-- bench:end -->"
# "One epoch" for detectors with several training stages: one pass of each (besides ``epochs=1``)
ONE_EPOCH = {"clscnf": {"cls_frozen_epochs": 1, "cls_finetune_epochs": 1}}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm_up_batches(images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The first full batch and the last partial one, run once untimed: CUDA loads kernels and picks algorithms on
    a shape's first use. Warmed with the first batch only, the backbone-only pass on an H200 measured 418 images/s,
    below the 1526 end to end that includes it (FastFlow, MTD, 256 px); the partial batch's first use, timed only in
    the backbone pass, is the likely cause (not re-measured)."""
    last = len(images) % batch_size
    return [images[:batch_size]] + ([images[-last:]] if last else [])


def bench_one(model: str, dataset: str, category: str, image_size: int, device_name: str, n_latency: int) -> dict:
    """Measure one detector in this process."""
    from adbench.datasets import AnomalyDataset, open_family
    from adbench.features import create_extractor, extract_features
    from adbench.models import create_model, resolve_config
    from adbench.progress import NULL_PROGRESS
    from adbench.runner import keep_freed_memory, load_split, predict_all, resolve_device, seed_everything

    malloc = keep_freed_memory()  # as every adbench run does
    device = resolve_device(device_name)
    config = resolve_config(model, "tf_efficientnet_lite0", {"epochs": 1, **ONE_EPOCH.get(model, {})})
    family = open_family(dataset)
    train = AnomalyDataset(family, category, "train", image_size)
    test = AnomalyDataset(family, category, "test", image_size)
    seed_everything(0)
    extractor = create_extractor("tf_efficientnet_lite0", config.layers).to(device)
    store, _ = extract_features(extractor, train, batch_size=config.batch_size, device=device)
    samples = load_split(test, config.batch_size, 2, NULL_PROGRESS)
    images = samples["image"]
    with torch.no_grad():  # backbone alone over the test images (after warm-up)
        for warm in _warm_up_batches(images, config.batch_size):
            extractor(warm.to(device))
        _sync(device)
        t0 = time.perf_counter()
        for start in range(0, len(images), config.batch_size):
            extractor(images[start : start + config.batch_size].to(device))
        _sync(device)
        backbone_s = time.perf_counter() - t0
    detector = create_model(model, extractor, image_size, config).to(device)
    train_images = load_split(train, config.batch_size, 2, NULL_PROGRESS)["image"] if detector.needs_images else None
    _sync(device)
    t0 = time.perf_counter()
    detector.fit(store, NULL_PROGRESS, images=train_images)
    _sync(device)
    fit_s = time.perf_counter() - t0
    detector.eval()
    for warm in _warm_up_batches(images, config.batch_size):
        predict_all(detector, warm, config.batch_size, device, NULL_PROGRESS)
    _, _, predict_s, _ = predict_all(detector, images, config.batch_size, device, NULL_PROGRESS)
    latencies = []
    with torch.no_grad():
        for i in range(min(n_latency, len(images))):
            t0 = time.perf_counter()
            pred = detector.predict(images[i : i + 1].to(device))
            pred.anomaly_map.cpu()
            latencies.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"model": model, "fit_epoch_s": fit_s, "test_images_per_s": len(images) / predict_s,
            "latency_ms": 1000 * statistics.median(latencies), "peak_mib": peak,
            "backbone_images_per_s": len(images) / backbone_s, "n_train": len(train), "n_test": len(images),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "memory_kind": "CUDA peak allocated" if device.type == "cuda" else "process max RSS", "malloc": malloc}


def table(rows: list[dict], command: str, setting: str) -> str:
    lines = [f"Measured with `{command}` ({setting}; {rows[0]['device']}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}; malloc: {rows[0]['malloc']}). Peak memory = {rows[0]['memory_kind']}. "
             "Fit = one pass over the "
             "training set (clscnf: one pass of each stage: classifier frozen, classifier fine-tuned, CNF).", "",
             "| detector | fit s / epoch | test images/s | latency ms (batch 1) | peak MiB | backbone images/s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['fit_epoch_s']:.1f} | {r['test_images_per_s']:.1f} | "
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
    ap.add_argument("--readme", default=None, help="also replace the README's bench table between its markers")
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
    if args.readme:
        readme = Path(args.readme)
        body = readme.read_text()
        if MARK_BEGIN not in body or MARK_END not in body:
            sys.exit(f"{readme} has no {MARK_BEGIN} ... {MARK_END} markers")
        head, rest = body.split(MARK_BEGIN, 1)
        readme.write_text(f"{head}{MARK_BEGIN}\n{text}{MARK_END}{rest.split(MARK_END, 1)[1]}")
        print(f"updated {readme}", file=sys.stderr)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
