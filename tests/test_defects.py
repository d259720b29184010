"""DRAEM-style synthetic defects: Perlin noise, masks, source augmentation, object masks, blending and labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adbench.defects import (
    AUGMENTERS,
    DefectSynthesizer,
    augment,
    object_masks,
    otsu_threshold,
    perlin_masks,
    perlin_noise,
    procedural_textures,
    rotate,
)
from adbench.errors import ConfigError
from conftest import write_image


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def smooth_images(n: int, size: int = 48, seed: int = 0) -> torch.Tensor:
    """uint8 [n, 3, size, size] colour ramps with a little noise (every pixel value distinct from a texture's)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(40, 200, size)[None, :] + np.zeros((size, 1))
    imgs = [np.stack([ramp * rng.uniform(0.6, 1.0) + rng.normal(0, 2, (size, size)) for _ in range(3)])
            for _ in range(n)]
    return torch.from_numpy(np.clip(np.stack(imgs), 0, 255).astype(np.uint8))


def test_perlin_noise_statistics():
    res = torch.tensor([[4, 4]] * 64)
    noise = perlin_noise(res, (64, 64), gen())
    assert noise.shape == (64, 64, 64) and noise.abs().max() <= 1 + 1e-5
    assert noise[:, ::16, ::16].abs().max() < 1e-5  # zero on every lattice point (64 / 4 = 16 pixels per cell)
    assert abs(noise.mean().item()) < 0.05 and 0.15 < noise.std().item() < 0.5
    # coarse lattices vary slowly, fine ones fast; each sample keeps its own resolution inside a batch
    mixed = perlin_noise(torch.tensor([[2, 2], [16, 16]] * 16), (64, 64), gen(1))
    step = (mixed[:, 1:] - mixed[:, :-1]).abs().mean(dim=(1, 2))
    assert step[1::2].mean() > 4 * step[0::2].mean()
    # rows and columns have their own resolution
    aniso = perlin_noise(torch.tensor([[1, 32]] * 8), (64, 64), gen(2))
    assert (aniso[:, :, 1:] - aniso[:, :, :-1]).abs().mean() > 4 * (aniso[:, 1:] - aniso[:, :-1]).abs().mean()


def test_perlin_is_deterministic_by_seed():
    res = torch.tensor([[2, 8], [4, 4], [32, 1]])
    assert torch.equal(perlin_noise(res, (40, 56), gen(3)), perlin_noise(res, (40, 56), gen(3)))
    assert not torch.equal(perlin_noise(res, (40, 56), gen(3)), perlin_noise(res, (40, 56), gen(4)))
    assert torch.equal(perlin_masks(6, 32, gen(5)), perlin_masks(6, 32, gen(5)))
    assert not torch.equal(perlin_masks(6, 32, gen(5)), perlin_masks(6, 32, gen(6)))


def test_perlin_masks_are_binary_and_partial():
    masks = perlin_masks(200, 64, gen())
    assert masks.shape == (200, 64, 64) and set(masks.unique().tolist()) <= {0.0, 1.0}
    cover = masks.mean(dim=(1, 2))
    assert 0.0 < cover.mean() < 0.3 and (cover > 0).float().mean() > 0.5  # most masks hold a defect, all partial
    assert cover.max() < 0.9


def test_rotate_identity_and_quarter_turn():
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(rotate(x, torch.zeros(2)), x, atol=1e-6)
    quarter = rotate(x, torch.full((2,), 90.0))
    assert torch.allclose(quarter, torch.rot90(x, 1, dims=(2, 3)), atol=1e-5) or torch.allclose(
        quarter, torch.rot90(x, -1, dims=(2, 3)), atol=1e-5)


def test_augmentation_keeps_shape_dtype_range_and_is_seeded():
    images = smooth_images(4, 32)
    for op in AUGMENTERS:
        out = op(images[0], gen())
        assert out.shape == images[0].shape and out.dtype == torch.uint8
    bright = torch.full((3, 8, 8), 250, dtype=torch.uint8)
    tops = [AUGMENTERS[1](bright, gen(seed)) for seed in range(20)]  # 250 * (0.8 to 1.2) + (-30 to 30)
    assert min(t.min() for t in tops) >= 169 and max(t.max() for t in tops) == 255  # saturates, never wraps
    out = augment(images, gen(7))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out, augment(images, gen(7))) and not torch.equal(out, images)


def test_procedural_textures():
    tex = procedural_textures(9, 48, gen())
    assert tex.shape == (9, 3, 48, 48) and tex.dtype == torch.uint8
    assert (tex.float().flatten(1).std(dim=1) > 5).all()  # textured, not flat
    assert torch.equal(tex, procedural_textures(9, 48, gen()))


def test_otsu_and_object_masks():
    assert 50 <= otsu_threshold(np.array([50] * 100 + [200] * 50, np.uint8)) < 200
    assert otsu_threshold(np.full(10, 7, np.uint8)) == 7
    yy, xx = np.mgrid[:48, :48]
    r = np.hypot(yy - 24, xx - 24)
    disc = np.where(r < 14, 210, 30).astype(np.uint8)
    ring = np.where((r > 8) & (r < 16), 210, 30).astype(np.uint8)
    images = torch.from_numpy(np.stack([np.stack([a] * 3) for a in (disc, ring)]))
    bright = object_masks(images, "bright").numpy()
    truth = r < 14
    assert (bright[0] & truth).sum() / (bright[0] | truth).sum() > 0.9
    dark = object_masks(images, "dark", fill_holes=False).numpy()
    assert (dark[0] == ~bright[0]).mean() > 0.97 and dark[0][0].all()  # the border stays in the mask
    assert object_masks(images, "dark").numpy()[0].all()  # the disc is a hole in the dark background: filled
    assert bright[1][24, 24] and not object_masks(images, "bright", fill_holes=False).numpy()[1][24, 24]
    with pytest.raises(ConfigError, match="dark or bright"):
        object_masks(images, "none")


def test_defects_change_only_masked_pixels_and_label_them():
    images = smooth_images(8)
    synth = DefectSynthesizer(images)
    seen = 0
    for seed in range(4):
        idx = torch.arange(8)
        d = synth(idx, gen(seed))
        x = images.float() / 255
        assert d.images.shape == x.shape and d.labels.shape == (8, 1, 48, 48) and d.masks.shape == (8, 48, 48)
        assert d.images.min() >= 0 and d.images.max() <= 1
        changed = (d.images - x).abs().amax(1) > 0
        assert not (changed & ~d.masks).any()  # nothing outside the mask moves
        assert torch.equal(d.labels[:, 0] > 0, d.masks)  # the label is non-zero exactly on the mask
        for i in range(8):
            if not d.masks[i].any():
                assert d.sources[i] == "none" and torch.equal(d.images[i], x[i])
                continue
            seen += 1
            values = d.labels[i, 0][d.masks[i]]
            assert torch.allclose(values, values[0]) and 0 < values[0] < 1  # one soft value per defect
            diff = (d.images[i] - x[i]).mean(0)
            counted = d.masks[i] & (diff != 0)
            assert values[0] == pytest.approx(torch.sigmoid(5 * diff[counted]).mean().item(), abs=1e-5)
    assert seen >= 16
    hard = DefectSynthesizer(images, soft_labels=False)(torch.arange(8), gen(0))
    assert set(hard.labels.unique().tolist()) <= {0.0, 1.0} and torch.equal(hard.labels[:, 0] > 0, hard.masks)
    again = DefectSynthesizer(images)(torch.arange(8), gen(0))
    first = DefectSynthesizer(images)(torch.arange(8), gen(0))
    assert torch.equal(again.images, first.images) and again.sources == first.sources


def test_sources_are_recorded(tmp_path):
    images = smooth_images(6, 32)
    procedural = DefectSynthesizer(images, in_domain_prob=0.0)
    d = procedural(torch.arange(6), gen())
    assert set(d.sources) <= {"procedural", "none"} and "procedural" in d.sources
    mixed = DefectSynthesizer(images)
    for seed in range(3):
        mixed(torch.arange(6), gen(seed))
    assert set(mixed.source_counts) <= {"procedural", "in_domain", "none"} and mixed.source_counts["in_domain"] > 0
    for i in range(3):
        write_image(tmp_path / "dtd" / "banded" / f"b{i}.jpg", size=40, seed=i)
    dtd = DefectSynthesizer(images, dtd_root=tmp_path / "dtd", in_domain_prob=0.0)
    assert "dtd" in dtd(torch.arange(6), gen()).sources
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no images"):
        DefectSynthesizer(images, dtd_root=tmp_path / "empty")
    with pytest.raises(ConfigError, match="is not a folder"):
        DefectSynthesizer(images, dtd_root=tmp_path / "missing")
    with pytest.raises(ConfigError, match="object_mask must be one of"):
        DefectSynthesizer(images, object_mask="middle")


def test_object_mask_keeps_defects_on_the_object():
    yy, xx = np.mgrid[:48, :48]
    disc = np.where(np.hypot(yy - 24, xx - 24) < 12, 200, 20).astype(np.uint8)
    images = torch.from_numpy(np.stack([np.stack([disc] * 3)] * 4))
    synth = DefectSynthesizer(images, object_mask="bright")
    obj = object_masks(images, "bright")
    for seed in range(5):
        d = synth(torch.arange(4), gen(seed))
        assert not (d.masks & ~obj).any()
