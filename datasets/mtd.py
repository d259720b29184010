"""Magnetic Tile Defects (Huang, Qiu, Yuan, The Visual Computer 2020), in its published layout.

``MT_Free/Imgs/*.jpg`` (defect-free) and ``MT_{Blowhole,Break,Crack,Fray,Uneven}/Imgs/*.jpg`` (defective), each image
beside its same-stem ``.png`` mask. Split: the 761 defect-free files DifferNet (Rudolph et al., WACV 2021) trained on
(``mtd_train_split.txt``, shipped with adbench) form the train set; the other 191 defect-free and all 392 defective
images form the test set. Masks have soft edges: a pixel is defective if > 127. Four MT_Uneven masks are empty; those
images keep label 1 (they count for image metrics, add no region to AUPRO).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from adbench.datasets._base import DatasetFamily, list_images, make_index, register_dataset
from adbench.errors import DatasetError

CATEGORIES = ("mtd",)
DEFECTS = ("Blowhole", "Break", "Crack", "Fray", "Uneven")
TRAIN_SPLIT_FILE = Path(__file__).with_name("mtd_train_split.txt")


def published_train_names() -> list[str]:
    """The 761 file names of the published (DifferNet) training split."""
    return [ln.strip() for ln in TRAIN_SPLIT_FILE.read_text().splitlines() if ln.strip()]


def index_mtd(root: Path, split: str, train_names: list[str] | None = None) -> pd.DataFrame:
    """Index one split of MTD; ``train_names`` defaults to the published split."""
    free = root / "MT_Free" / "Imgs"
    if not free.is_dir():
        raise DatasetError(f"missing folder {free} (expected the published MTD layout MT_*/Imgs)")
    names = set(published_train_names() if train_names is None else train_names)
    free_images = [p for p in list_images(free) if p.suffix.lower() == ".jpg"]
    missing = names - {p.name for p in free_images}
    if missing:
        raise DatasetError(f"{len(missing)} training files of the split are not in {free}, e.g. {sorted(missing)[0]}")
    if split == "train":
        return make_index([(str(p), None, 0, "good") for p in free_images if p.name in names])
    rows = [(str(p), None, 0, "good") for p in free_images if p.name not in names]
    for defect in DEFECTS:
        folder = root / f"MT_{defect}" / "Imgs"
        if not folder.is_dir():
            raise DatasetError(f"missing folder {folder}")
        for p in (q for q in list_images(folder) if q.suffix.lower() == ".jpg"):
            mask = folder / f"{p.stem}.png"
            if not mask.is_file():
                raise DatasetError(f"mask of {p} is missing: expected {mask}")
            rows.append((str(p), str(mask), 1, defect))
    return make_index(rows)


@register_dataset("mtd")
class MTD(DatasetFamily):
    """Magnetic Tile Defects under ``DATA_ROOT/mtd``; one category, ``mtd``."""

    name = "mtd"
    subdir = "mtd"
    mask_threshold = 127  # soft-edged masks, see module docstring
    fixed_categories = CATEGORIES

    def index(self, category: str, split: str) -> pd.DataFrame:
        return index_mtd(self.base, split)
