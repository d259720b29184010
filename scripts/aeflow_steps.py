"""AE-FLOW's training, step by step: which batches make the loss jump, which image in them, and the gradient norm.

Usage: python scripts/aeflow_steps.py [--dataset mtd --category mtd] [--epochs 5] [--seed 0] [--set grad_clip=0]
       [--feature-precision fp16] [--warmup-steps 48] [--jump 3.0]

Trains exactly as ``adbench run --model aeflow`` does (same features, standardisation, seed, batches and Adam
settings, the shared loop's gradient clipping), in its own loop so that each step can be looked at. Prints every step
whose loss exceeds ``--jump`` with the batch's worst image (its path and per-dimension NLL) and the gradient norm
before clipping, then each epoch's mean loss, the number ``result.json`` records as ``loss_history``. ``--warmup-steps
N`` ramps the learning rate linearly over the first N steps (a stabiliser tried in results/aeflow_mtd.md; not a
config option). Chooses nothing: it is how the clipping stabiliser was found on MTD's training images.
"""

from __future__ import annotations

import argparse
import json

import torch

from adbench.cli import _parse_sets
from adbench.datasets import AnomalyDataset, open_family
from adbench.features import create_extractor, extract_features
from adbench.models import create_model, resolve_config
from adbench.models.aeflow import as_unit, flow_nll_per_dim
from adbench.models.aeflow import loss as batch_loss
from adbench.progress import NULL_PROGRESS
from adbench.runner import load_split, seed_everything
from adbench.train import adam


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="mtd")
    ap.add_argument("--category", default="mtd")
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--feature-precision", default="fp32")
    ap.add_argument("--warmup-steps", type=int, default=0)
    ap.add_argument("--jump", type=float, default=3.0, help="print the steps whose loss exceeds this")
    args = ap.parse_args()

    train = AnomalyDataset(open_family(args.dataset), args.category, "train", args.image_size)
    cfg = resolve_config("aeflow", args.backbone, {**_parse_sets(args.sets), "epochs": args.epochs},
                         dataset=args.dataset, category=args.category)
    seed_everything(args.seed)  # as the runner: before the extractor, then again before the detector
    extractor = create_extractor(args.backbone, cfg.layers, None, args.feature_precision)
    store, _ = extract_features(extractor, train, batch_size=cfg.batch_size)
    images = load_split(train, cfg.batch_size, 2, NULL_PROGRESS)["image"]
    seed_everything(args.seed)
    model = create_model("aeflow", extractor, args.image_size, cfg)
    feats = store.tensors[0]
    if cfg.standardize:  # fit's statistics (float64 over every position of every training image)
        f = feats.double()
        model.feat_mean.copy_(f.mean((0, 2, 3)).view(-1, 1, 1))
        model.feat_std.copy_(f.var((0, 2, 3), correction=0).clamp_min(1e-12).sqrt().view(-1, 1, 1))
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))  # fit's batch order
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adam([{"params": params}], lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    step = 0
    for epoch in range(cfg.epochs):
        losses = []
        for idx in store.index_batches(cfg.batch_size, gen):
            step += 1
            if args.warmup_steps:
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * min(1.0, step / args.warmup_steps)
            z, log_jac, recon = model(feats[idx])
            loss = batch_loss(z, log_jac, recon, as_unit(images[idx]) * 2 - 1, cfg.alpha)  # fit's loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
            opt.step()
            losses.append(float(loss.detach()))
            if losses[-1] > args.jump:
                nll = flow_nll_per_dim(z.detach(), log_jac.detach())
                worst = int(nll.argmax())
                print(json.dumps({"epoch": epoch + 1, "step": step, "loss": round(losses[-1], 3),
                                  "grad_norm": round(float(norm), 2), "worst_image": train.index.iloc[int(idx[worst])]
                                  ["image_path"], "worst_nll_per_dim": round(float(nll[worst]), 1),
                                  "median_nll_per_dim": round(float(nll.median()), 2)}))
        print(json.dumps({"epoch": epoch + 1, "mean_loss": sum(losses) / len(losses)}))


if __name__ == "__main__":
    main()
