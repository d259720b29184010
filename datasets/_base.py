"""What every dataset family shares: the registry, the index table, image/mask reading and resizing.

A family (MVTec AD, BTAD, MTD, a folder, the synthetic set) only has to say where its data lives, which categories it
has and how to list one split as an index table with the columns of ``INDEX_COLUMNS``. Reading, resizing (the input
geometry, ``GEOMETRIES``) and validation live here, once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from adbench.errors import ConfigError, DatasetError
from adbench.registry import Registry

INDEX_COLUMNS = ("image_path", "mask_path", "label", "defect")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LOSSY_SUFFIXES = (".jpg", ".jpeg")  # JPEG rings around a mask's edges (6 % more pixels > 0 on a 0/255 box): > 127
SPLITS = ("train", "test")
GEOMETRIES = ("squash", "pad")  # how an image becomes image_size x image_size; see AnomalyDataset

DATASETS: Registry[type[DatasetFamily]] = Registry("dataset")
register_dataset = DATASETS.register


def default_data_root() -> Path:
    """``$ADBENCH_DATA`` if set, else ``~/.cache/adbench/datasets``."""
    env = os.environ.get("ADBENCH_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "adbench" / "datasets"


def list_images(folder: Path) -> list[Path]:
    """Image files of a folder (not recursive), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def find_by_stem(folder: Path, stem: str, what: str) -> Path:
    """The one image file in ``folder`` whose stem is ``stem``; DatasetError naming what is missing otherwise."""
    hits = [p for p in list_images(folder) if p.stem == stem] if folder.is_dir() else []  # no glob: stems may hold [*?
    if len(hits) != 1:
        found = "none" if not hits else ", ".join(p.name for p in hits)
        raise DatasetError(f"{what}: expected one file {folder / stem}.<png|bmp|...>, found {found}")
    return hits[0]


def paired_rows(images: list[Path], gt_dir: Path, defect: str, mask_suffix: str = "") -> list[tuple]:
    """Index rows of defective images, each paired by stem with ``gt_dir/<stem><mask_suffix>.*``.

    Raises:
        DatasetError: an image has no mask, or a mask in ``gt_dir`` has no image (both named).
    """
    rows = [(str(p), str(find_by_stem(gt_dir, p.stem + mask_suffix, f"mask of {p}")), 1, defect) for p in images]
    stems = {p.stem + mask_suffix for p in images}
    orphans = sorted(m.name for m in list_images(gt_dir) if m.stem not in stems) if gt_dir.is_dir() else []
    if orphans:
        raise DatasetError(f"masks without an image in {gt_dir}: {', '.join(orphans[:3])}")
    return rows


def make_index(rows: list[tuple[str | None, str | None, int, str]]) -> pd.DataFrame:
    """An index table from (image_path, mask_path, label, defect) rows."""
    return pd.DataFrame(rows, columns=list(INDEX_COLUMNS)).astype({"label": "int64"})


Box = tuple[int, int, int, int]  # (top, left, height, width) in pixels


@dataclass(frozen=True)
class Sample:
    """One resized sample: image uint8 [3,S,S], mask bool [S,S], label 0/1, defect type, source path, and ``box``:
    where the source image lies inside ``image`` (all of it, ``(0, 0, S, S)``, unless the geometry pads).

    The mask is always the squashed one (the evaluation view); ``image`` is what the detector sees.
    """

    image: torch.Tensor
    mask: torch.Tensor
    label: int
    defect: str
    path: str
    box: Box


def check_geometry(geometry: str) -> str:
    """``geometry`` if it is one of ``GEOMETRIES``; ConfigError listing them otherwise."""
    if geometry not in GEOMETRIES:
        raise ConfigError(f"unknown geometry {geometry!r}; valid: {', '.join(GEOMETRIES)}")
    return geometry


def pad_resize(image: Image.Image, size: int) -> tuple[np.ndarray, Box]:
    """``image`` resized (bilinear, aspect ratio kept) so its longer side is ``size``, centred and reflect-padded to
    ``size`` x ``size``; returns the uint8 array [size, size, C] and the box the image occupies.

    Reflection (``abc|ba``), not a constant or edge replication: a constant band adds a hard straight edge at a
    position that moves with each image's aspect ratio, and replicated edge pixels make straight streaks; either is
    a structure no training tile has inside it, and a detector can learn or flag it. A mirrored band continues the
    tile's own texture at the same scale with no step in intensity (only a mirror seam), so the padded image still
    looks like a tile. A band wider than the tile mirrors it again (numpy repeats the reflection).
    """
    w, h = image.size
    scale = size / max(w, h)
    nw, nh = max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale)))
    arr = np.array(image.resize((nw, nh), Image.BILINEAR), dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    pad = ((top, size - nh - top), (left, size - nw - left)) + ((0, 0),) * (arr.ndim - 2)
    return np.pad(arr, pad, mode="reflect"), (top, left, nh, nw)


def to_eval_view(x: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Per image, crop ``x`` [N, S, S] or [N, C, S, S] to its box [N, 4] and resize it bilinearly back to S x S.

    This maps a padded view (anomaly maps, or the images themselves for pictures) onto the squashed one, the view
    the masks are in, so metrics count the same pixels whatever the geometry. An image whose box is the whole frame
    is returned as it is (bit for bit); integer input is rounded back to its dtype.
    """
    size = x.shape[-1]
    out = x.copy()
    for i, (top, left, h, w) in enumerate(np.asarray(boxes, dtype=np.int64).tolist()):
        if (top, left, h, w) == (0, 0, size, size):
            continue
        crop = torch.from_numpy(np.ascontiguousarray(x[i, ..., top : top + h, left : left + w])).float()
        crop = crop.reshape(1, -1, h, w)  # [1, C or 1, h, w]
        back = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)
        back = back.reshape(x.shape[1:]).numpy()
        if np.issubdtype(x.dtype, np.integer):
            info = np.iinfo(x.dtype)
            back = np.clip(np.rint(back), info.min, info.max)
        out[i] = back.astype(x.dtype)
    return out


class DatasetFamily:
    """A dataset family: where it lives, its categories, how to index a split and how to read one row.

    Subclasses set ``name``, ``subdir`` (folder under the data root) and ``mask_threshold`` and implement
    ``categories`` and ``index``; the synthetic family also overrides ``locate`` and ``read``.
    """

    name: str = ""
    subdir: str = ""
    mask_threshold: int = 0  # mask pixel > threshold (after nearest resizing) is defective
    fixed_categories: tuple[str, ...] = ()

    @property
    def how_to_get(self) -> str:
        """What to tell a user whose data is missing."""
        return f"run `adbench download {self.name} --data-root DIR`, then pass that --data-root (or set ADBENCH_DATA)"

    def __init__(self, data_root: Path | None = None, root: Path | None = None) -> None:
        self.base = self.locate(Path(data_root) if data_root else default_data_root(), Path(root) if root else None)

    def locate(self, data_root: Path, root: Path | None) -> Path:
        """The folder holding this family's categories; DatasetError saying how to get the data if missing."""
        base = root if root is not None else data_root / self.subdir
        if not base.is_dir():
            raise DatasetError(f"{self.name} not found at {base}: {self.how_to_get}")
        return base

    def categories(self) -> list[str]:
        """Category names of this family (``fixed_categories`` unless the family finds them on disk)."""
        return list(self.fixed_categories)

    def index(self, category: str, split: str) -> pd.DataFrame:
        """The index table of one split (columns ``INDEX_COLUMNS``)."""
        raise NotImplementedError

    def read(self, row: pd.Series) -> tuple[Image.Image, Image.Image | None]:
        """The image of one index row and its mask (None for a defect-free image)."""
        image = _open_image(row.image_path, "RGB")
        mask = None
        if isinstance(row.mask_path, str):
            mask = _open_image(row.mask_path, "L")
            if mask.size != image.size:
                raise DatasetError(
                    f"mask {row.mask_path} is {mask.size[0]}x{mask.size[1]} but its image is "
                    f"{image.size[0]}x{image.size[1]}"
                )
        return image, mask

    def check_category(self, category: str) -> None:
        """Raise DatasetError listing the valid categories if ``category`` is not one."""
        valid = self.categories()
        if category not in valid:
            raise DatasetError(f"unknown {self.name} category {category!r}; valid: {', '.join(valid)}")


WIDE_MODES = {"I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit", "I;16N": "16-bit",
              "I": "more than 8-bit (integer)", "F": "floating point"}  # PIL clips these to 0-255 on the way to RGB


def _open_image(path: str, mode: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            if mode == "RGB" and im.mode in WIDE_MODES:  # masks are only thresholded: clipping keeps them
                raise DatasetError(f"image {path} is {WIDE_MODES[im.mode]} (PIL mode {im.mode}); adbench reads 8-bit "
                                   "images: convert it to 8 bits first, with the scaling that suits the data")
            return im.convert(mode)
    except FileNotFoundError:
        raise DatasetError(f"image file missing: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DatasetError(f"cannot read image {path}: {err}") from None


class AnomalyDataset:
    """One split of one category at one image size: an index table plus resizing of each row to a ``Sample``.

    Images become ``image_size``² by their ``geometry``: ``squash`` resizes them bilinearly (with antialiasing) to
    ``image_size``², whatever their aspect ratio; ``pad`` keeps the aspect ratio (``pad_resize``) and records the box
    the image occupies. Grayscale is repeated to 3 channels. Masks are always squashed: resized nearest-neighbour to
    ``image_size``² and binarised afterwards (``> family.mask_threshold``; JPEG masks at > 127 at least);
    ``to_eval_view`` maps a padded view onto them.
    """

    def __init__(self, family: DatasetFamily, category: str, split: str, image_size: int,
                 geometry: str = "squash") -> None:
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        family.check_category(category)
        self.family, self.category, self.split, self.image_size = family, category, split, image_size
        self.geometry = check_geometry(geometry)
        self.index = family.index(category, split)
        if len(self.index) == 0:
            raise DatasetError(f"{family.name}/{category} has no {split} images under {family.base}")
        if split == "train" and self.index.label.any():
            raise DatasetError(f"{family.name}/{category} train split contains anomalous images")

    def __len__(self) -> int:
        return len(self.index)

    def mask_threshold(self, mask_path: str) -> int:
        """A mask pixel above this (after resizing) is defective: the family's, and at least 127 for JPEG masks."""
        lossy = str(mask_path).lower().endswith(LOSSY_SUFFIXES)
        return max(self.family.mask_threshold, 127) if lossy else self.family.mask_threshold

    def mask_binarisation(self) -> str:
        """What ``mask_threshold`` does on this split, for result.json."""
        masks = [m for m in self.index.mask_path if isinstance(m, str)]
        used = sorted({self.mask_threshold(m) for m in masks}) or [self.family.mask_threshold]
        if len(used) == 1:
            return f"> {used[0]} after resizing"
        return f"> {self.family.mask_threshold} after resizing (JPEG masks > {used[-1]})"

    @property
    def labels(self) -> np.ndarray:
        return self.index.label.to_numpy()

    def __getitem__(self, i: int) -> Sample:
        row = self.index.iloc[i]
        image, mask = self.family.read(row)
        size = (self.image_size, self.image_size)
        if self.geometry == "pad":
            arr, box = pad_resize(image, self.image_size)
        else:
            arr, box = np.array(image.resize(size, Image.BILINEAR), dtype=np.uint8), (0, 0, *size)
        img = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
        if mask is None:
            m = torch.zeros(size, dtype=torch.bool)
        else:
            m = torch.from_numpy(np.array(mask.resize(size, Image.NEAREST)) > self.mask_threshold(row.mask_path))
        return Sample(img, m, int(row.label), str(row.defect), str(row.image_path), box)

    def batches(self, batch_size: int, workers: int = 2) -> Iterator[list[Sample]]:
        """Samples in index order, ``batch_size`` at a time, decoded by a small thread pool."""
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for start in range(0, len(self), batch_size):
                yield list(pool.map(self.__getitem__, range(start, min(start + batch_size, len(self)))))


def open_family(name: str, data_root: Path | None = None, root: Path | None = None) -> DatasetFamily:
    """The dataset family registered as ``name``, located under ``data_root`` (or at ``root``)."""
    return DATASETS.get(name)(data_root=data_root, root=root)


def list_datasets() -> list[str]:
    """Registered dataset names."""
    return DATASETS.names()
