"""How many epochs does a detector need? Train once and evaluate the five metrics at several epochs.

Usage: python scripts/epoch_sweep.py --model fastflow --dataset mtd --epochs 5,10,20,40 [--image-size 256]
Writes a CSV (epoch, metrics, cumulative fit seconds) to results/sweeps/. Same seed and batches as `adbench run`.
For a model without a schedule over the total (FastFlow) the row for epoch E equals a run with --epochs E; for one
with a cosine schedule (CFLOW) every row is the model part-way through ONE schedule over the largest epoch count
(column ``schedule_epochs``), so only the last row equals `adbench run --epochs` with that count.
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch

from adbench import metrics as M
from adbench.datasets import AnomalyDataset, open_family
from adbench.features import create_extractor, extract_features
from adbench.models import create_model, resolve_config
from adbench.progress import Progress
from adbench.runner import keep_freed_memory, load_split, predict_all, seed_everything


def main() -> None:
    keep_freed_memory()  # as every adbench run does
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="fastflow")
    ap.add_argument("--dataset", default="mtd")
    ap.add_argument("--category", default="mtd")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--epochs", default="5,10,20,40")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/sweeps")
    args = ap.parse_args()
    checkpoints = sorted(int(e) for e in args.epochs.split(","))
    cfg = resolve_config(args.model, args.backbone, {"epochs": checkpoints[-1]})
    family = open_family(args.dataset, args.data_root)
    train = AnomalyDataset(family, args.category, "train", args.image_size)
    test = AnomalyDataset(family, args.category, "test", args.image_size)
    seed_everything(args.seed)
    ext = create_extractor(args.backbone, cfg.layers)
    store, _ = extract_features(ext, train, batch_size=cfg.batch_size)
    samples = load_split(test, cfg.batch_size, 2, Progress())
    seed_everything(args.seed)
    det = create_model(args.model, ext, args.image_size, cfg)
    rows, clock = [], {"fit": 0.0, "t0": time.perf_counter()}

    class Checkpoints(Progress):
        @contextmanager
        def task(self, description, total=None):
            epoch = {"n": 0}

            def advance(n=1, **fields):
                epoch["n"] += n
                if epoch["n"] in checkpoints:
                    det.calibrate(store)  # e.g. CFLOW's training-set maxima, part of the fit time
                    clock["fit"] += time.perf_counter() - clock["t0"]
                    det.eval()
                    scores, maps, predict_s, _ = predict_all(det, samples["image"], cfg.batch_size, torch.device("cpu"),
                                                       Progress())
                    det.train()
                    m = M.compute_metrics(scores, samples["label"], maps, samples["mask"])
                    rows.append({"epoch": epoch["n"], **m, "fit_s": clock["fit"], "schedule_epochs": cfg.epochs,
                                 "loss": fields.get("loss"),
                                 "test_images_per_s": len(scores) / predict_s})
                    print(rows[-1], flush=True)
                    clock["t0"] = time.perf_counter()

            yield advance

    images = load_split(train, cfg.batch_size, 2, Progress())["image"] if det.needs_images else None
    det.fit(store, Checkpoints(), images=images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.model}_{args.backbone}_{args.dataset}_{args.image_size}_s{args.seed}.csv"
    pd.DataFrame(rows).to_csv(path, index=False, float_format="%.4f")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
