"""Roofline check for a detector's inference: 1 / (t_backbone + F_head / P) against measured throughput.

Usage: python scripts/roofline.py --model cflow [--backbone tf_efficientnet_lite0] [--image-size 256]
t_backbone = measured backbone time per image, F_head = FLOPs of the detector head per image (torch flop counter),
P = FLOP/s of a large fp32 matrix product on this machine. For CFLOW both inference paths are measured in the same
run: FrEIA's forward (the paper's FLOPs) and the fused one (fewer FLOPs, same maps). Weights do not change FLOPs or
speed, so the head is untrained; random images at batch size 32.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from adbench.features import create_extractor
from adbench.models import create_model, resolve_config
from adbench.runner import keep_freed_memory


def best_of(fn, reps: int = 3) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    keep_freed_memory()  # as every adbench run does
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="cflow")
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    peak = 2 * 2048**3 / best_of(lambda: a @ b)
    cfg = resolve_config(args.model, args.backbone)
    ext = create_extractor(args.backbone, cfg.layers)
    det = create_model(args.model, ext, args.image_size, cfg).eval()
    images = torch.randint(0, 256, (args.batch, 3, args.image_size, args.image_size), dtype=torch.uint8)
    t_backbone = best_of(lambda: ext(images)) / args.batch
    with torch.no_grad():
        feats = ext(images)  # FLOPs counted on the whole batch, per image: CFLOW's position terms are per batch
    print(f"matmul fp32: {peak / 1e9:.1f} GFLOP/s; backbone: {1 / t_backbone:.1f} images/s")
    # CFLOW has two inference paths computing the same maps: FrEIA's forward (the paper's FLOPs) and the fused one
    paths = [True, False] if hasattr(det, "fused") else [None]
    for fused in paths:
        if fused is not None:
            det.fused = fused
        head = (lambda f, fused=fused: det.log_prob_maps(f, fused=fused)) if fused is not None else det
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            head(feats)
        flops = counter.get_total_flops() / args.batch
        t_total = best_of(lambda: det.predict(images)) / args.batch
        roof = 1 / (t_backbone + flops / peak)
        name = {True: "fused", False: "FrEIA", None: args.model}[fused]
        print(f"{name}: head {flops / 1e9:.2f} GFLOP/image; roofline {roof:.1f} images/s; "
              f"measured {1 / t_total:.1f} images/s = {100 / (roof * t_total):.0f}% of it")

if __name__ == "__main__":
    main()
