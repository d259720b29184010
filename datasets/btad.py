"""BTAD, the beanTech Anomaly Detection dataset (Mishra et al., ISIE 2021): products 01, 02, 03.

Layout: ``<product>/train/ok``, ``<product>/test/ok``, ``<product>/test/ko``, ``<product>/ground_truth/ko``. A mask has
its image's stem; masks are .png for 01/02 and .bmp for 03, images .bmp or .png, so both are looked up by stem.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from adbench.datasets._base import DatasetFamily, list_images, make_index, paired_rows, register_dataset
from adbench.errors import DatasetError

CATEGORIES = ("01", "02", "03")


def index_btad(root: Path, category: str, split: str) -> pd.DataFrame:
    """Index one split of a BTAD product; masks paired by stem."""
    prod = root / category
    ok = prod / split / "ok"
    if not ok.is_dir():
        raise DatasetError(f"missing folder {ok} (expected the BTAD layout <product>/{split}/ok)")
    rows = [(str(p), None, 0, "ok") for p in list_images(ok)]
    if split == "test":
        ko = prod / "test" / "ko"
        if not ko.is_dir():
            raise DatasetError(f"missing folder {ko}")
        rows += paired_rows(list_images(ko), prod / "ground_truth" / "ko", "ko")
    return make_index(rows)


@register_dataset("btad")
class BTAD(DatasetFamily):
    """BTAD: 3 products under ``DATA_ROOT/btad``."""

    name = "btad"
    subdir = "btad"
    fixed_categories = CATEGORIES

    def index(self, category: str, split: str) -> pd.DataFrame:
        return index_btad(self.base, category, split)
