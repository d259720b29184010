"""Roofline check of every detector's inference: 1 / (n t_backbone + F_head / P) against measured throughput.

Usage: python scripts/roofline.py [--models cflow,fastflow] [--backbone tf_efficientnet_lite0] [--image-size 256]
    [--out results/roofline.md]
t_backbone = measured time per image of the shared extractor; n = how many extractor passes ``predict`` makes (2 for
CLS+CNF, whose fine-tuned copy of the extractor runs too: forward hooks count them); F_head = FLOPs per image of
``predict`` minus those of its n extractor passes (torch's flop counter; the resizing that runs as dense matrix
products, ``models._resize``, counted as torch's kernel, no FLOPs; AE-FLOW's SSIM window, banded products in
``models._ssim``, counted as two 1D convolutions: ``reference_kernels``);
P = FLOP/s of a large fp32 matrix product on this machine. For CFLOW-AD, FastFlow and AE-FLOW both inference paths
are measured in the same run: FrEIA's forward (the paper's FLOPs) and the fused one (fewer FLOPs, same maps). Weights
do not change FLOPs or speed, so the heads are untrained; PatchCore's memory bank is random rows of the size a fit on
``--train-images`` images keeps (10 % of their patches: MTD's 761 by default), since its search cost is that size.
Random images at batch size ``--batch``. Per detector, the product, the extractor and predict are timed in turn,
``--reps`` rounds, and the fastest of each counts: the CPU's speed drifts (shared machines), and so it moves all three
alike.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from adbench.features import FeatureExtractor, create_extractor
from adbench.models import _coupling, _resize, _ssim, create_model, list_models, resolve_config
from adbench.runner import keep_freed_memory


def fastest(fns: list, reps: int) -> list[float]:
    """The fastest of ``reps`` timed calls of each of ``fns``, called in turn (round robin), so that the machine's
    speed drifting (a shared CPU) moves every time alike and their ratios hold."""
    for fn in fns:
        fn()
    times = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i] = min(times[i], time.perf_counter() - t0)
    return times


def flops_of(fn) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def backbone_passes(det: torch.nn.Module, fn) -> int:
    """How many times ``fn`` runs a feature extractor of ``det`` (CLS+CNF's predict runs its fine-tuned copy)."""
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in det.modules()
             if isinstance(m, FeatureExtractor)]
    try:
        with torch.no_grad():
            fn()
    finally:
        for hook in hooks:
            hook.remove()
    return len(calls)


def torch_resize(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """``models._resize.resize`` by torch's kernel (no FLOPs to the counter)."""
    flat = F.interpolate(x.reshape(-1, 1, *x.shape[-2:]), size=size, mode=mode, align_corners=True)
    return flat.reshape(*x.shape[:-2], *size)


def separable_window(padded: torch.Tensor, planes: int, rows: torch.Tensor, cols: torch.Tensor,
                     r: int) -> torch.Tensor:
    """``models._ssim._window`` (SSIM's Gaussian window along H and W, reflect padding, in its output layout) as two 1D
    convolutions of 2r + 1 taps: the counter counts the window's own multiply-adds, not the zeros of the banded
    blocks that ``_window`` multiplies. The taps are a row of a block that no reflection touches."""
    (_, size_h, _), (n_w, size_w, _) = rows.shape, cols.shape
    h, w = len(rows) // planes * size_h, n_w * size_w
    taps = rows[0, r, r : 3 * r + 1]  # output row r of the first block: input rows 0 ... 2r
    x = F.pad(padded[r : r + planes * h, r : r + w].reshape(planes, 1, h, w), (r, r, r, r), mode="reflect")
    y = F.conv2d(F.conv2d(x, taps.view(1, 1, -1, 1)), taps.view(1, 1, 1, -1))
    return y.reshape(planes * h, n_w, size_w).transpose(0, 1)


@contextmanager
def reference_kernels():
    """FLOPs counted on reference kernels where adbench's faster form multiplies mostly zeros: the maps resized as two
    matrix products (``models._resize``: CFLOW-AD's anomaly maps, so CLS+CNF's CNFs too, and CLS+CNF's decoder, whose
    ``resize_bicubic`` calls ``_resize.resize``) counted on torch's kernel, which the counter counts as none (``resize``
    is swapped in every module that holds it, ``models._resize`` included); AE-FLOW's SSIM window counted as two 1D
    convolutions (``separable_window``); FastFlow's and AE-FLOW's permutations, products with a one-hot matrix
    (``_coupling.permute_affine``), counted as the gather they compute, which the counter counts as none."""
    original = _resize.resize
    users = [m for m in list(sys.modules.values()) if vars(m).get("resize") is original]  # no module __getattr__
    for module in users:
        module.resize = torch_resize
    window, _ssim._window = _ssim._window, separable_window
    permute = _coupling.permute_affine
    _coupling.permute_affine = lambda y, scale, offset, perm, k: (y * scale + offset)[:, perm]
    try:
        yield
    finally:
        for module in users:
            module.resize = original
        _ssim._window = window
        _coupling.permute_affine = permute


def measure(model: str, args, images: torch.Tensor) -> list[dict]:
    """Rows (one per inference path) for ``model``: head GFLOP/image, roofline and measured images/s."""
    cfg = resolve_config(model, args.backbone)
    ext = create_extractor(args.backbone, cfg.layers)
    det = create_model(model, ext, args.image_size, cfg).eval()
    if model == "patchcore":  # the bank's size, not its values, sets the search cost
        (_, h, w) = ext.feature_shapes(args.image_size)[0]
        det.memory = torch.randn(max(1, int(args.train_images * h * w * cfg.coreset_ratio)), det.dim)
    batch = len(images)
    paths = [True, False] if hasattr(det, "fused") else [None]  # both paths where there are two, same maps

    def predict(fused):  # a call of predict on the path ``fused`` (None: the detector has one path)
        def call():
            if fused is not None:
                det.fused = fused
            return det.predict(images)
        return call

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    with torch.no_grad():
        t_peak, t_backbone, *t_paths = fastest([lambda: a @ b, lambda: ext(images), *map(predict, paths)], args.reps)
    peak, t_backbone = 2 * 2048**3 / t_peak, t_backbone / batch
    f_backbone = flops_of(lambda: ext(images))
    rows = []
    for fused, t_total in zip(paths, t_paths, strict=True):
        passes = backbone_passes(det, predict(fused))  # each at the backbone's measured rate, not the product's
        with reference_kernels():
            flops = (flops_of(predict(fused)) - passes * f_backbone) / batch
        t_total /= batch
        roof = 1 / (passes * t_backbone + flops / peak)
        name = {True: f"{model} (fused)", False: f"{model} (FrEIA)", None: model}[fused]
        r = {"name": name, "passes": passes, "gflop": flops / 1e9, "peak": peak / 1e9, "backbone": 1 / t_backbone,
             "roof": roof, "measured": 1 / t_total, "share": 1 / (roof * t_total)}
        rows.append(r)
        print(f"{name}: matmul {r['peak']:.0f} GFLOP/s; backbone {r['backbone']:.1f} images/s x {passes}; head "
              f"{r['gflop']:.2f} GFLOP/image; roofline {roof:.1f} images/s; measured {r['measured']:.1f} images/s = "
              f"{100 * r['share']:.0f}% of it", flush=True)
    return rows


def main() -> None:
    keep_freed_memory()  # as every adbench run does
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", "--model", default=",".join(list_models()))
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--train-images", type=int, default=761)
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions; the fastest counts (CPU speed drifts)")
    ap.add_argument("--out", default=None, help="write the table here (markdown)")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads", flush=True)
    images = torch.randint(0, 256, (args.batch, 3, args.image_size, args.image_size), dtype=torch.uint8)
    rows = [row for model in args.models.split(",") for row in measure(model, args, images)]
    if args.out:
        command = " ".join(["python scripts/roofline.py", *sys.argv[1:]])
        lines = [f"Measured with `{command}` ({args.backbone}, {args.image_size} px, batch {args.batch}, "
                 f"{torch.get_num_threads()} threads, torch {torch.__version__}). Roofline = 1 / (passes × backbone "
                 "time + head FLOPs / the rate of a 2048² fp32 matrix product), per image, where passes counts the "
                 "backbone runs of predict (CLS+CNF: 2, its fine-tuned copy too); for each detector the product, the "
                 f"backbone and its predict were timed in turn, the fastest of {args.reps} rounds each.",
                 "", "| detector | backbone images/s | head GFLOP/image | roofline images/s | measured images/s | "
                 "share of roofline | matrix product GFLOP/s | backbone passes |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['backbone']:.1f} | {r['gflop']:.2f} | {r['roof']:.1f} | {r['measured']:.1f} | "
                  f"{100 * r['share']:.0f}% | {r['peak']:.0f} | {r['passes']} |" for r in rows]
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
