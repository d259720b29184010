"""Shared fixtures: tiny dataset trees written on the fly, the real data root, fast run settings."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """``$ADBENCH_DATA`` (``.ci/run`` points it at ../shared/datasets), else adbench's default data root."""
    from adbench.datasets import default_data_root

    return default_data_root()


def code_now(model: str) -> dict:
    """The ``code`` entry of a result.json made by this checkout's code of ``model`` (a report marks other code)."""
    from adbench.runner import detector_code

    return {"code": {"adbench": "0.1.0", "detector": detector_code(model)[0]}}


def script_module(name: str):
    """The module ``scripts/<name>.py`` (the scripts folder is not a package)."""
    import importlib
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "scripts"))


def predict_both_paths(det, images):
    """``det.predict(images)`` on the detector's fused path and on FrEIA's forward (``fused = False``), in that order;
    the detector is left on its fused path."""
    assert det.fused
    fused = det.predict(images)
    det.fused = False
    try:
        return fused, det.predict(images)
    finally:
        det.fused = True


def write_image(path: Path, size: int = 32, seed: int = 0, mode: str = "RGB", value: int | None = None) -> Path:
    """A small random (or constant) image file; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    arr = np.full(shape, value, np.uint8) if value is not None else rng.integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(arr, mode).save(path)
    return path


def write_mask(path: Path, size: int = 32, box: tuple[int, int, int, int] = (8, 8, 16, 16), value: int = 255) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size, size), np.uint8)
    y0, x0, y1, x1 = box
    arr[y0:y1, x0:x1] = value
    Image.fromarray(arr, "L").save(path)
    return path


def make_mvtec(root: Path, categories=("bottle",), n_train: int = 6, n_good: int = 3, n_bad: int = 3) -> Path:
    """An MVTec-layout tree: <cat>/train/good, test/good, test/crack + ground_truth/crack/<stem>_mask.png."""
    for c in categories:
        for i in range(n_train):
            write_image(root / c / "train" / "good" / f"{i:03d}.png", seed=i)
        for i in range(n_good):
            write_image(root / c / "test" / "good" / f"{i:03d}.png", seed=100 + i)
        for i in range(n_bad):
            write_image(root / c / "test" / "crack" / f"{i:03d}.png", seed=200 + i)
            write_mask(root / c / "ground_truth" / "crack" / f"{i:03d}_mask.png")
    return root


def make_btad(root: Path, product: str = "03", n: int = 4) -> Path:
    """A BTAD-layout product; product 03 has .bmp masks, the others .png."""
    ext = ".bmp" if product == "03" else ".png"
    for i in range(n):
        write_image(root / product / "train" / "ok" / f"{i:04d}.bmp", seed=i)
        write_image(root / product / "test" / "ok" / f"{i:04d}.bmp", seed=50 + i)
        write_image(root / product / "test" / "ko" / f"{i:04d}.bmp", seed=90 + i)
        write_mask(root / product / "ground_truth" / "ko" / f"{i:04d}{ext}")
    return root


@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    return make_mvtec(tmp_path / "mvtec")


@pytest.fixture
def real_data_root() -> Path:
    root = data_root()
    if not (root / "mtd" / "MT_Free").is_dir():
        message = f"real MTD data missing at {root / 'mtd'}: run `adbench download mtd` or set ADBENCH_DATA"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI always has it (.ci/run points ADBENCH_DATA at ../shared/datasets)
        pytest.skip(message)
    return root
