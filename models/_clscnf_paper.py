"""Oh & Kim's per-category settings from their run scripts (seungmi-oh/AD-CLSCNFs ``run_scripts/*/*.sh``,
``synthetic_data_loader.py``): the classifier map's weight, where synthetic defects may land, and the paper
schedule's exceptions, for ``models.clscnf``'s category defaults and ``--preset paper``."""

from __future__ import annotations

# Their run scripts (``--w_fe``, ``infer_type joint``): the classifier map's weight per category; 1.0 elsewhere.
_MVTEC = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw", "tile",
          "toothbrush", "transistor", "wood", "zipper")
W_FE = {**{("mvtec", c): 1.0 for c in _MVTEC}, ("mvtec", "bottle"): 0.3, ("mvtec", "cable"): 0.05,
        ("mvtec", "capsule"): 0.3, ("mvtec", "metal_nut"): 0.5, ("mvtec", "transistor"): 0.6,
        ("mvtec", "zipper"): 0.15, ("btad", "01"): 0.1, ("btad", "02"): 0.05, ("btad", "03"): 0.3}
# Their ``synthetic_data_loader.py`` class lists: object = bright side of Otsu (``reverse_mask_cls``), no object mask
# (``no_bg_use_cls``), otherwise the dark side; no hole filling for ``no_fill_hole_cls``.
_BRIGHT = {("mvtec", c) for c in ("cable", "hazelnut", "metal_nut", "pill", "toothbrush")} | {("btad", "01"),
                                                                                              ("btad", "03")}
_NONE = {("mvtec", c) for c in ("transistor", "tile", "wood", "carpet", "leather")} | {("btad", "02")}
NO_FILL = {("mvtec", "grid"), ("mvtec", "metal_nut"), ("btad", "01")}
OBJECT_MASK = {k: "bright" if k in _BRIGHT else "none" if k in _NONE else "dark" for k in W_FE}
OBJECT_MASK[("synthetic", "object")] = "bright"  # adbench: a bright part on a dark background (datasets/synthetic.py)


def _stage1(frozen: int, finetune: int, sub: int, **more) -> dict:
    """Classifier passes of a schedule in their units: meta-epochs x ``sub_epochs`` x ``repeat_num`` = 5 (their
    loader repeats the training set 5 times per epoch, with fresh defects)."""
    return {"cls_frozen_epochs": frozen * sub * 5, "cls_finetune_epochs": finetune * sub * 5, **more}


# Their per-class exceptions to the paper schedule (``run_scripts/*/train_eval_total.sh``; reference notes 4.6; the
# MVTec default is 85 + 15 meta-epochs x 2 sub at bs 32, lr 1e-4), applied with ``--preset paper``. Their bs 16 is
# stage 1's; adbench's ``batch_size`` is shared by both stages (the CNFs' optimiser batch is ``fiber_batch``).
PAPER_CLASSES = {
    ("mvtec", "cable"): _stage1(85, 15, 1, batch_size=16, cls_lr=5e-5, cls_encoder_lr=5e-5),
    ("mvtec", "capsule"): {"cls_lr": 5e-4, "cls_encoder_lr": 5e-4},
    ("mvtec", "metal_nut"): _stage1(80, 20, 2, batch_size=16),
    ("mvtec", "pill"): _stage1(85, 15, 1, batch_size=16),
    ("mvtec", "screw"): _stage1(35, 5, 1, batch_size=16, cls_lr=5e-4, cls_encoder_lr=5e-4),
    ("mvtec", "toothbrush"): {"batch_size": 16},
    ("mvtec", "transistor"): _stage1(70, 30, 2, batch_size=16),
    ("mvtec", "zipper"): _stage1(80, 20, 2, batch_size=16),
    # BTAD: stage 1 at bs 16 (weight decay 5e-4 for 01, 03); CNFs 8 meta x 6 sub passes, 2 x 6 warm-up, lr per product
    ("btad", "01"): _stage1(7, 1, 4, batch_size=16, cls_weight_decay=5e-4, epochs=48, warmup_epochs=12, lr=5e-5),
    ("btad", "02"): _stage1(7, 1, 5, batch_size=16, epochs=48, warmup_epochs=12, lr=2e-5),
    ("btad", "03"): _stage1(8, 2, 6, batch_size=16, cls_weight_decay=5e-4, epochs=48, warmup_epochs=12, lr=1e-4),
}
