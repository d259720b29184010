"""MVTec AD (Bergmann et al., CVPR 2019 / IJCV 2021) and any folder laid out like it (``folder``).

Layout: ``<cat>/train/good/*.png``, ``<cat>/test/<defect>/*.png`` (``good`` = defect-free) and
``<cat>/ground_truth/<defect>/<stem>_mask.png``. grid, screw and zipper are grayscale (repeated to 3 channels).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from adbench.datasets._base import DatasetFamily, list_images, make_index, paired_rows, register_dataset
from adbench.errors import DatasetError

CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip


def index_mvtec(root: Path, category: str, split: str, good: str = "good", mask_suffix: str = "_mask") -> pd.DataFrame:
    """Index one split of an MVTec-layout category; masks are paired to images by stem, never by position.

    Raises:
        DatasetError: a folder is missing, a defective image has no mask, or a mask has no image.
    """
    cat = root / category
    split_dir = cat / split
    if not split_dir.is_dir():
        raise DatasetError(f"missing folder {split_dir} (expected the MVTec layout <category>/{split}/{good}/...)")
    if split == "train":
        if not (split_dir / good).is_dir():
            raise DatasetError(f"missing folder {split_dir / good}")
        return make_index([(str(p), None, 0, good) for p in list_images(split_dir / good)])
    rows = []
    for defect_dir in sorted(d for d in split_dir.iterdir() if d.is_dir()):
        defect = defect_dir.name
        images = list_images(defect_dir)
        if defect == good:
            rows += [(str(p), None, 0, good) for p in images]
            continue
        rows += paired_rows(images, cat / "ground_truth" / defect, defect, mask_suffix)
    return make_index(rows)


@register_dataset("mvtec")
class MVTecAD(DatasetFamily):
    """MVTec AD: 15 categories under ``DATA_ROOT/mvtec``."""

    name = "mvtec"
    subdir = "mvtec"
    fixed_categories = CATEGORIES

    def index(self, category: str, split: str) -> pd.DataFrame:
        return index_mvtec(self.base, category, split)


@register_dataset("folder")
class Folder(DatasetFamily):
    """Your own images in the MVTec layout under ``--root DIR``: every subfolder with ``train/good`` is a category."""

    name = "folder"
    how_to_get = "pass --root DIR with DIR/<category>/{train/good, test/<defect>, ground_truth/<defect>}"

    def locate(self, data_root: Path, root: Path | None) -> Path:
        if root is None:
            raise DatasetError("dataset 'folder' needs --root DIR (a folder in the MVTec layout)")
        return super().locate(data_root, root)

    def categories(self) -> list[str]:
        cats = sorted(d.name for d in self.base.iterdir() if (d / "train" / "good").is_dir())
        if not cats:
            raise DatasetError(f"no category under {self.base}: {self.how_to_get}")
        return cats

    def index(self, category: str, split: str) -> pd.DataFrame:
        return index_mvtec(self.base, category, split)
