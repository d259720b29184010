"""How many epochs does a detector need? One `adbench run`, its five metrics also evaluated after several epochs.

Usage: python scripts/epoch_sweep.py --model fastflow --dataset mtd --epochs 5,10,20,40 [--image-size 256]
The run is ``runner.run_one`` with ``--epochs`` set to the largest count and ``eval_epochs`` set to the others, so it
is the same pipeline as `adbench run`; its folder goes to OUT/runs/ and the rows (epoch, metrics, fit seconds without
the evaluations) to OUT/<model>_<backbone>_<dataset>_<size>_s<seed>.csv, printed as a markdown table. For a model
without a schedule over the total (FastFlow) the row for epoch E equals `adbench run --epochs E`; for one with a
cosine schedule (CFLOW) every row is the model part-way through ONE schedule over the largest count (column
``schedule_epochs``), so only the last row equals `adbench run --epochs` with that count.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from adbench.errors import AdbenchError
from adbench.results import METRICS
from adbench.runner import RunSpec, run_one

HEADER = {"image_auroc": "Img AUROC", "pixel_auroc": "Pix AUROC", "image_aupr": "Img AUPR", "pixel_aupr": "Pix AUPR",
          "aupro": "AUPRO"}


def markdown(rows: pd.DataFrame) -> str:
    """The sweep as a markdown table: epochs, the five metrics in %, cumulative fit seconds."""
    lines = ["| epochs | " + " | ".join(HEADER[m] for m in METRICS) + " | fit (s) |", "|---" * 7 + "|"]
    for row in rows.itertuples():
        lines.append(f"| {row.epoch} | " + " | ".join(f"{100 * getattr(row, m):.1f}" for m in METRICS)
                     + f" | {row.fit_s:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="fastflow")
    ap.add_argument("--dataset", default="mtd")
    ap.add_argument("--category", default="mtd")
    ap.add_argument("--data-root", type=Path, default=None)
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--epochs", default="5,10,20,40")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=Path("results/sweeps"))
    args = ap.parse_args()
    checkpoints = sorted(int(e) for e in args.epochs.split(","))
    spec = RunSpec(model=args.model, dataset=args.dataset, category=args.category, data_root=args.data_root,
                   backbone=args.backbone, image_size=args.image_size, seed=args.seed, device=args.device,
                   results_dir=args.out, overrides={"epochs": checkpoints[-1]}, save_maps=False)
    try:
        folder = run_one(spec, eval_epochs=checkpoints)
    except AdbenchError as err:
        sys.exit(f"error: {err}")
    rows = pd.DataFrame(json.loads((folder / "result.json").read_text())["epochs"])
    path = args.out / f"{args.model}_{args.backbone}_{args.dataset}_{args.image_size}_s{args.seed}.csv"
    rows.to_csv(path, index=False, float_format="%.4f")
    print(markdown(rows))
    print(f"wrote {path} (run: {folder})")


if __name__ == "__main__":
    main()
