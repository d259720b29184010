"""BTAD, the beanTech Anomaly Detection dataset (Mishra et al., ISIE 2021): products 01, 02, 03.

Layout: ``<product>/train/ok``, ``<product>/test/ok``, ``<product>/test/ko``, ``<product>/ground_truth/ko``. A mask has
its image's stem; masks are .png for 01/02 and .bmp for 03, images .bmp or .png, so both are looked up by stem.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from adbench.datasets._base import DatasetFamily, find_by_stem, list_images, make_index, register_dataset
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
        images = list_images(ko)
        gt = prod / "ground_truth" / "ko"
        rows += [(str(p), str(find_by_stem(gt, p.stem, f"mask of {p}")), 1, "ko") for p in images]
        stems = {p.stem for p in images}
        orphans = sorted(m.name for m in list_images(gt) if m.stem not in stems)
        if orphans:
            raise DatasetError(f"masks without an image in {gt}: {', '.join(orphans[:3])}")
    return make_index(rows)


@register_dataset("btad")
class BTAD(DatasetFamily):
    """BTAD: 3 products under ``DATA_ROOT/btad``."""

    name = "btad"
    subdir = "btad"
    how_to_get = "run `adbench download btad --root DATA_ROOT` or pass --data-root (env ADBENCH_DATA)"

    def categories(self) -> list[str]:
        return list(CATEGORIES)

    def index(self, category: str, split: str) -> pd.DataFrame:
        return index_btad(self.base, category, split)
