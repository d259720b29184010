"""Tests for the embedded synthetic dataset generator (datasets/synthetic.py): determinism, masks, separability."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from adbench.datasets import synthetic as S  # noqa: N812

SEED = 0


def _digest(image: np.ndarray, mask: np.ndarray) -> str:
    return hashlib.sha256(image.tobytes() + mask.tobytes()).hexdigest()


@pytest.fixture(scope="module")
def test_split() -> dict[str, list[tuple[int, str, np.ndarray, np.ndarray]]]:
    """Every test sample of every category at SEED: (index, defect, image, mask)."""
    return {
        cat: [(i, d, *S.generate(cat, "test", i, d, SEED)) for i, d in S.sample_index(cat, "test")]
        for cat in S.CATEGORIES
    }


# ------------------------------------------------------------------------------------------------------- index/API


def test_sample_index_counts() -> None:
    assert S.N_TRAIN == 60 and S.N_TEST_GOOD == 20 and S.N_PER_DEFECT == 6
    for cat in S.CATEGORIES:
        train = S.sample_index(cat, "train")
        assert train == [(i, "good") for i in range(S.N_TRAIN)]
        test = S.sample_index(cat, "test")
        assert [i for i, _ in test] == list(range(S.N_TEST_GOOD + S.N_PER_DEFECT * len(S.DEFECTS)))
        labels = [d for _, d in test]
        assert labels.count("good") == S.N_TEST_GOOD
        assert all(labels.count(d) == S.N_PER_DEFECT for d in S.DEFECTS)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("carpet", "test", 0, "good", 0), "pattern"),
        (("pattern", "val", 0, "good", 0), "train"),
        (("pattern", "test", 0, "crack", 0), "scratch"),
        (("pattern", "test", 0, "good", -1), "seed"),
        (("pattern", "test", -3, "good", 0), "index"),
    ],
)
def test_unknown_names_raise_value_error(args: tuple, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        S.generate(*args)


def test_sample_index_unknown_names() -> None:
    with pytest.raises(ValueError, match="texture"):
        S.sample_index("bottle", "train")
    with pytest.raises(ValueError, match="test"):
        S.sample_index("object", "validation")


def test_shapes_and_dtypes() -> None:
    for cat in S.CATEGORIES:
        image, mask = S.generate(cat, "train", 0, "good", SEED)
        assert image.shape == (S.NATIVE_SIZE, S.NATIVE_SIZE, 3) and image.dtype == np.uint8
        assert mask.shape == (S.NATIVE_SIZE, S.NATIVE_SIZE) and mask.dtype == bool and not mask.any()
        image, mask = S.generate(cat, "test", 40, "deform", SEED, size=128)
        assert image.shape == (128, 128, 3) and image.dtype == np.uint8
        assert mask.shape == (128, 128) and mask.dtype == bool and mask.any()


def test_resize_matches_native() -> None:
    native_img, native_mask = S.generate("object", "test", 32, "missing", SEED)
    small_img, small_mask = S.generate("object", "test", 32, "missing", SEED, size=64)
    # nearest-neighbour mask: every small mask pixel is a native mask pixel
    ys, xs = np.nonzero(small_mask)
    scale = S.NATIVE_SIZE / 64
    assert native_mask[(ys * scale + scale / 2).astype(int), (xs * scale + scale / 2).astype(int)].all()
    assert abs(float(small_img.mean()) - float(native_img.mean())) < 2.0


# ------------------------------------------------------------------------------------------------------ determinism


def test_deterministic_in_process() -> None:
    for cat in S.CATEGORIES:
        for i, d in ((0, "good"), (25, "spot"), (38, "deform")):
            a, b = S.generate(cat, "test", i, d, 7), S.generate(cat, "test", i, d, 7)
            assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()


def test_deterministic_across_processes() -> None:
    cases = [("pattern", "train", 3, "good"), ("texture", "test", 21, "scratch"), ("object", "test", 46, "color")]
    code = (
        "import hashlib\n"
        "from adbench.datasets import synthetic as m\n"
        f"for c, s, i, d in {cases!r}:\n"
        "    img, mask = m.generate(c, s, i, d, 11)\n"
        "    print(hashlib.sha256(img.tobytes() + mask.tobytes()).hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    here = [_digest(*S.generate(c, s, i, d, 11)) for c, s, i, d in cases]
    assert out.stdout.split() == here


def test_seeds_indices_and_splits_differ() -> None:
    for cat in S.CATEGORIES:
        ref = S.generate(cat, "train", 0, "good", SEED)[0]
        assert not np.array_equal(ref, S.generate(cat, "train", 0, "good", SEED + 1)[0])
        assert not np.array_equal(ref, S.generate(cat, "train", 1, "good", SEED)[0])
        assert not np.array_equal(ref, S.generate(cat, "test", 0, "good", SEED)[0])


def test_normal_images_vary() -> None:
    for cat in S.CATEGORIES:
        imgs = np.stack([S.generate(cat, "train", i, "good", SEED)[0] for i in range(4)]).astype(np.float32)
        # not mere noise realisations of one image: phase/pose/illumination differ, so pairwise differences are large
        diffs = [np.abs(imgs[a] - imgs[b]).mean() for a in range(4) for b in range(a + 1, 4)]
        assert min(diffs) > 5.0


# ------------------------------------------------------------------------------------------------------------ masks


def test_good_masks_empty_and_defect_masks_large_enough(test_split) -> None:
    for cat, samples in test_split.items():
        for i, d, _, mask in samples:
            if d == "good":
                assert not mask.any(), (cat, i)
            else:
                assert mask.sum() >= S.MIN_DEFECT_AREA, (cat, i, d, int(mask.sum()))


def test_defect_changes_only_inside_mask(test_split) -> None:
    """Against the good image drawn from the same stream: identical outside the mask, changed inside it."""
    for cat, samples in test_split.items():
        for i, d, image, mask in samples:
            if d == "good":
                continue
            good, _ = S.generate(cat, "test", i, "good", SEED)
            changed = (image != good).any(axis=-1)
            assert not (changed & ~mask).any(), (cat, i, d)
            assert changed[mask].mean() > 0.8, (cat, i, d)  # the mask is (almost) all changed pixels
            diff = np.abs(image.astype(int) - good.astype(int)).max(axis=-1)
            assert np.median(diff[mask]) > S.CHANGE_THRESHOLD - 1, (cat, i, d)


def test_private_base_then_defect_reproduces_generate() -> None:
    for cid, cat in enumerate(S.CATEGORIES):
        for i, d in ((20, "scratch"), (44, "color")):
            rng = np.random.default_rng([SEED, cid, S.SPLITS.index("test"), i])
            base = S._base(cat, rng)
            image, mask = S._apply_defect(base, d, rng)
            ref_image, ref_mask = S.generate(cat, "test", i, d, SEED)
            assert np.array_equal(image, ref_image) and np.array_equal(mask, ref_mask)
            clean = S._render(base, base.albedo)
            assert np.array_equal(clean[~mask], image[~mask])
            assert np.array_equal(clean, S.generate(cat, "test", i, "good", SEED)[0])


def test_object_defects_land_on_object(test_split) -> None:
    cid = S.CATEGORIES.index("object")
    for i, d, _, mask in test_split["object"]:
        if d == "good":
            continue
        base = S._base("object", np.random.default_rng([SEED, cid, S.SPLITS.index("test"), i]))
        on_object = base.support[mask] > 0.0
        assert on_object.mean() > 0.9, (i, d, float(on_object.mean()))


def test_defect_sizes_vary(test_split) -> None:
    areas = [int(m.sum()) for samples in test_split.values() for _, d, _, m in samples if d != "good"]
    assert min(areas) < 150 and max(areas) > 1500


# ----------------------------------------------------------------------------------------------- not trivially easy


def _auroc_either_way(labels: np.ndarray, scores: np.ndarray) -> float:
    a = roc_auc_score(labels, scores)
    return max(a, 1.0 - a)


def test_global_statistics_do_not_separate(test_split) -> None:
    for cat, samples in test_split.items():
        labels = np.array([d != "good" for _, d, _, _ in samples])
        images = np.stack([img for _, _, img, _ in samples]).astype(np.float32)
        mean_auc = _auroc_either_way(labels, images.mean(axis=(1, 2, 3)))
        std_auc = _auroc_either_way(labels, images.std(axis=(1, 2, 3)))
        assert mean_auc < 0.8, (cat, mean_auc)
        assert std_auc < 0.8, (cat, std_auc)
