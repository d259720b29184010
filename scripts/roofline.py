"""Roofline check of every detector's inference: 1 / (t_backbone + F_head / P) against measured throughput.

Usage: python scripts/roofline.py [--models cflow,fastflow] [--backbone tf_efficientnet_lite0] [--image-size 256]
    [--out results/roofline.md]
t_backbone = measured time per image of the shared extractor; F_head = FLOPs per image of ``predict`` minus those of
the extractor (torch's flop counter: whatever else predict runs, e.g. CLS+CNF's fine-tuned encoder copy, is head);
P = FLOP/s of a large fp32 matrix product on this machine. For CFLOW-AD both inference paths are measured in the same
run: FrEIA's forward (the paper's FLOPs) and the fused one (fewer FLOPs, same maps). Weights do not change FLOPs or
speed, so the heads are untrained; PatchCore's memory bank is random rows of the size a fit on ``--train-images``
images keeps (10 % of their patches: MTD's 761 by default), since its search cost is that size. Random images at
batch size ``--batch``. Each detector is measured in this one process, one after another.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from adbench.features import create_extractor
from adbench.models import create_model, list_models, resolve_config
from adbench.runner import keep_freed_memory


def best_of(fn, reps: int = 3) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def flops_of(fn) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def measure(model: str, args, images: torch.Tensor, peak: float) -> list[dict]:
    """Rows (one per inference path) for ``model``: head GFLOP/image, roofline and measured images/s."""
    cfg = resolve_config(model, args.backbone)
    ext = create_extractor(args.backbone, cfg.layers)
    det = create_model(model, ext, args.image_size, cfg).eval()
    if model == "patchcore":  # the bank's size, not its values, sets the search cost
        (_, h, w) = ext.feature_shapes(args.image_size)[0]
        det.memory = torch.randn(max(1, int(args.train_images * h * w * cfg.coreset_ratio)), det.dim)
    batch = len(images)
    with torch.no_grad():
        t_backbone = best_of(lambda: ext(images)) / batch
    f_backbone = flops_of(lambda: ext(images))
    rows = []
    for fused in [True, False] if hasattr(det, "fused") else [None]:  # CFLOW-AD: both paths, same maps
        if fused is not None:
            det.fused = fused
        flops = (flops_of(lambda: det.predict(images)) - f_backbone) / batch
        t_total = best_of(lambda: det.predict(images)) / batch
        roof = 1 / (t_backbone + flops / peak)
        name = {True: f"{model} (fused)", False: f"{model} (FrEIA)", None: model}[fused]
        r = {"name": name, "gflop": flops / 1e9, "backbone": 1 / t_backbone, "roof": roof, "measured": 1 / t_total,
             "share": 1 / (roof * t_total)}
        rows.append(r)
        print(f"{name}: backbone {r['backbone']:.1f} images/s; head {r['gflop']:.2f} GFLOP/image; roofline "
              f"{roof:.1f} images/s; measured {r['measured']:.1f} images/s = {100 * r['share']:.0f}% of it", flush=True)
    return rows


def main() -> None:
    keep_freed_memory()  # as every adbench run does
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", "--model", default=",".join(list_models()))
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--train-images", type=int, default=761)
    ap.add_argument("--out", default=None, help="write the table here (markdown)")
    args = ap.parse_args()
    torch.manual_seed(0)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    peak = 2 * 2048**3 / best_of(lambda: a @ b)
    print(f"matmul fp32: {peak / 1e9:.1f} GFLOP/s; {torch.get_num_threads()} threads", flush=True)
    images = torch.randint(0, 256, (args.batch, 3, args.image_size, args.image_size), dtype=torch.uint8)
    rows = [row for model in args.models.split(",") for row in measure(model, args, images, peak)]
    if args.out:
        command = " ".join(["python scripts/roofline.py", *sys.argv[1:]])
        lines = [f"Measured with `{command}` ({args.backbone}, {args.image_size} px, batch {args.batch}, "
                 f"{torch.get_num_threads()} threads, torch {torch.__version__}; fp32 matrix product "
                 f"{peak / 1e9:.1f} GFLOP/s). Roofline = 1 / (backbone time + head FLOPs / that rate), per image.",
                 "", "| detector | backbone images/s | head GFLOP/image | roofline images/s | measured images/s | "
                 "share of roofline |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['backbone']:.1f} | {r['gflop']:.2f} | {r['roof']:.1f} | {r['measured']:.1f} | "
                  f"{100 * r['share']:.0f}% |" for r in rows]
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
