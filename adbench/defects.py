"""DRAEM-style synthetic defects: Perlin-noise masks blended with an augmented texture into normal images.

What Oh & Kim (IEEE Access 2024; seungmi-oh/AD-CLSCNFs ``custom_datasets/synthetic_data_loader.py``, itself from
DRAEM, Zavrtanik et al. ICCV 2021) train their pixelwise classifier on:

- mask: Perlin noise at scales 2^k, k uniform in [0, 6) independently per axis, rotated by U(-90, 90) degrees (zero
  fill), thresholded at 0.5; optionally restricted to the object (Otsu foreground, ``object_masks``);
- source: a Describable Textures Dataset image, or (``in_domain_prob`` = 0.5 in their default) another normal image of
  the same category; three of nine random colour operations applied to it (``augment``);
- blend inside the mask: x' = x (1 - M) + (1 - beta) src M + beta x M, beta ~ U(0, 0.8);
- soft label: every defect pixel gets the same value, the mean over the region of sigmoid(5 mean_c(x' - x)) (their
  ``smooth_cls``); a sample whose mask ends up empty is a normal sample (label 0).

DTD cannot be downloaded by adbench: with ``dtd_root`` (any folder of images, searched recursively) it is used as in
the paper; without it the non-in-domain sources are procedural textures (``procedural_textures``: coloured fractal
noise, warped stripes, blotches), a documented deviation. Everything random is drawn from one ``torch.Generator``, so a
seed fixes every defect.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

from adbench.errors import ConfigError, DatasetError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
OBJECT_MASK_MODES = ("none", "dark", "bright")


def perlin_noise(res: torch.Tensor, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Gradient (Perlin) noise [B, H, W] in [-1, 1], ``res`` [B, 2] lattice cells per axis (rows, columns).

    DRAEM's ``rand_perlin_2d_np`` for a whole batch at once (each sample its own resolution, any image size): random
    unit gradients on the lattice, quintic fade, scaled by sqrt(2); zero on lattice points.
    """
    b, (h, w) = len(res), size
    y = torch.arange(h, dtype=torch.float32)[None] * res[:, :1].float() / h  # [B, H] lattice coordinates
    x = torch.arange(w, dtype=torch.float32)[None] * res[:, 1:].float() / w  # [B, W]
    iy, ix = y.long(), x.long()
    fy, fx = (y - iy)[:, :, None], (x - ix)[:, None, :]
    angles = 2 * math.pi * torch.rand(b, int(res.max()) + 1, int(res.max()) + 1, generator=generator)
    grads = torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1)  # [B, R+1, R+1, 2]
    rows = torch.arange(b)[:, None, None]

    def ramp(dy: int, dx: int) -> torch.Tensor:
        g = grads[rows, (iy + dy)[:, :, None], (ix + dx)[:, None, :]]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    def fade(t: torch.Tensor) -> torch.Tensor:
        return t * t * t * (t * (t * 6 - 15) + 10)

    ty, tx = fade(fy), fade(fx)
    left, right = torch.lerp(ramp(0, 0), ramp(1, 0), ty), torch.lerp(ramp(0, 1), ramp(1, 1), ty)
    return math.sqrt(2) * torch.lerp(left, right, tx)


def rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each [C, H, W] of ``x`` about its centre by its angle (bilinear, zeros outside, like imgaug Affine)."""
    rad = degrees.float() * math.pi / 180
    cos, sin, zero = torch.cos(rad), torch.sin(rad), torch.zeros_like(rad)
    theta = torch.stack((torch.stack((cos, -sin, zero), 1), torch.stack((sin, cos, zero), 1)), 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def perlin_masks(n: int, size: int, generator: torch.Generator, scales: int = 6,
                 threshold: float = 0.5) -> torch.Tensor:
    """DRAEM defect masks [n, size, size] (0/1): Perlin noise at 2^k cells per axis, k in [0, scales), rotated by
    U(-90, 90) degrees, above ``threshold``."""
    res = 2 ** torch.randint(0, scales, (n, 2), generator=generator)
    noise = perlin_noise(res, (size, size), generator)
    degrees = (torch.rand(n, generator=generator) * 2 - 1) * 90
    return (rotate(noise[:, None], degrees)[:, 0] > threshold).float()


def fractal_noise(n: int, size: int, generator: torch.Generator, octaves: int = 4) -> torch.Tensor:
    """[n, size, size] sums of Perlin octaves (base 2^k cells, k in [0, 4)), each min-max scaled to [0, 1]."""
    base = 2 ** torch.randint(0, 4, (n, 1), generator=generator).expand(n, 2)
    total = sum(0.5**o * perlin_noise(base * 2**o, (size, size), generator) for o in range(octaves))
    low = total.flatten(1).min(1).values[:, None, None]
    high = total.flatten(1).max(1).values[:, None, None]
    return (total - low) / (high - low).clamp_min(1e-6)


def procedural_textures(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Source textures when no DTD folder is given: uint8 [n, 3, size, size], each one of three kinds drawn at random.

    0: coloured fractal noise (an independent field per channel); 1: stripes of random period and angle warped by
    fractal noise, between two random colours; 2: blotches (thresholded fractal noise) between two random colours with
    fine shading. All constants here are adbench's (DTD has no such parameters): periods 4-32 px, thresholds 0.3-0.7,
    shading 0.8-1.0 and a warp of 6 radians per unit noise give textures of DTD-like scale at 256 px.
    """
    if n == 0:
        return torch.empty(0, 3, size, size, dtype=torch.uint8)
    low = min(size, 64)  # the noise fields are smooth: drawn at <= 64 px and upsampled (16x cheaper at 256 px)
    fields = fractal_noise(3 * n, low, generator).view(n, 3, low, low)
    if low < size:
        fields = F.interpolate(fields, size=(size, size), mode="bilinear", align_corners=False)
    kind = torch.randint(0, 3, (n,), generator=generator)
    c0, c1 = torch.rand(n, 3, 1, 1, generator=generator), torch.rand(n, 3, 1, 1, generator=generator)
    angle = torch.rand(n, 1, 1, generator=generator) * math.pi
    period = 4 + 28 * torch.rand(n, 1, 1, generator=generator)  # pixels
    level = 0.3 + 0.4 * torch.rand(n, 1, 1, generator=generator)
    pos = torch.arange(size, dtype=torch.float32)
    along = pos[None, None, :] * torch.cos(angle) + pos[None, :, None] * torch.sin(angle)
    stripes = 0.5 + 0.5 * torch.sin(2 * math.pi * along / period + 6 * fields[:, 0])
    blotches = (fields[:, 0] > level).float() * (0.8 + 0.2 * fields[:, 1])
    mix = torch.where((kind == 1)[:, None, None], stripes, blotches)[:, None]
    tex = torch.where((kind == 0)[:, None, None, None], fields, c0 + (c1 - c0) * mix)
    return (tex.clamp(0, 1) * 255).round().to(torch.uint8)


def _gamma(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:  # GammaContrast((0.5, 2.0), per_channel=True)
    gamma = 0.5 + 1.5 * torch.rand(3, 1, 1, generator=g)
    return ((img.float() / 255) ** gamma * 255).round().to(torch.uint8)


def _brightness(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:  # MultiplyAndAddToBrightness(0.8-1.2, +-30)
    mul, add = 0.8 + 0.4 * torch.rand(1, generator=g), 60 * torch.rand(1, generator=g) - 30
    return (img.float() * mul + add).clamp(0, 255).round().to(torch.uint8)


def _sharpness(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:  # pillike.EnhanceSharpness(factor 0-2)
    return TF.adjust_sharpness(img, float(2 * torch.rand(1, generator=g)))


def _hue_saturation(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:  # AddToHueAndSaturation((-50, 50))
    hue, sat = (100 * torch.rand(2, generator=g) - 50).tolist()  # imgaug units: +-255 = a full hue turn
    # imgaug adds to the HSV channels; the saturation shift becomes the factor that adds ``sat`` at mid saturation
    return TF.adjust_saturation(TF.adjust_hue(img, hue / 255), max(0.0, 1 + sat / 128))


def _solarize(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:  # Solarize(p=0.5, threshold 32-128)
    apply, threshold = torch.rand(1, generator=g) < 0.5, int(torch.randint(32, 129, (1,), generator=g))
    return TF.solarize(img, threshold) if apply else img


def _posterize(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:  # Posterize(nb_bits 1-8)
    return TF.posterize(img, int(torch.randint(1, 9, (1,), generator=g)))


AUGMENTERS = (_gamma, _brightness, _sharpness, _hue_saturation, _solarize, _posterize,
              lambda img, g: TF.invert(img), lambda img, g: TF.autocontrast(img), lambda img, g: TF.equalize(img))


def augment(images: torch.Tensor, generator: torch.Generator, n_ops: int = 3) -> torch.Tensor:
    """Each uint8 [3, H, W] image of the batch through ``n_ops`` distinct random ops of ``AUGMENTERS``, in random order
    (the paper's iaa.Sequential of three ops chosen without replacement)."""
    out = []
    for img in images:
        for k in torch.randperm(len(AUGMENTERS), generator=generator)[:n_ops].tolist():
            img = AUGMENTERS[k](img, generator)
        out.append(img)
    return torch.stack(out)


def otsu_threshold(grey: np.ndarray) -> int:
    """Otsu's threshold of a uint8 array: the level t maximising the between-class variance of (<= t, > t)."""
    hist = np.bincount(grey.ravel(), minlength=256).astype(np.float64)
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * np.arange(256))
    w1 = w0[-1] - w0
    valid = (w0 > 0) & (w1 > 0)
    if not valid.any():  # a single grey level: nothing to separate
        return int(grey.max())
    w0, w1, m0 = w0[valid], w1[valid], m0[valid]
    between = w0 * w1 * (m0 / w0 - (hist @ np.arange(256) - m0) / w1) ** 2
    return int(np.flatnonzero(valid)[np.argmax(between)])


def object_masks(images: torch.Tensor, mode: str, fill_holes: bool = True) -> torch.Tensor:
    """Foreground masks bool [N, H, W] of uint8 images [N, 3, H, W], as their ``detect_object_area``.

    Grey levels blurred (3x3 Gaussian), Otsu-thresholded; the object is the dark side (``dark``, their default) or the
    bright side (``bright``, their ``reverse_mask_cls``); 3x3 opening then closing; Gaussian blur sigma 2 kept where
    above half; enclosed holes filled unless ``fill_holes`` is False (their ``no_fill_hole_cls``).
    """
    if mode not in ("dark", "bright"):
        raise ConfigError(f"object mask must be dark or bright, got {mode!r}")
    grey = (images.detach().cpu().float() * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1).numpy()
    out = []
    for g in grey:  # sigma 0.8 truncated at 1 pixel: the 3x3 kernel of OpenCV's GaussianBlur((3, 3), 0) in theirs
        blurred = ndimage.gaussian_filter(g, 0.8, truncate=1.25).round().clip(0, 255).astype(np.uint8)
        fg = blurred > otsu_threshold(blurred)
        fg = ~fg if mode == "dark" else fg
        square = np.ones((3, 3), bool)
        fg = np.pad(fg, 2, mode="edge")  # the image border does not erode the mask (as OpenCV's default border)
        fg = ndimage.binary_closing(ndimage.binary_opening(fg, square), square)[2:-2, 2:-2]
        fg = ndimage.gaussian_filter(fg.astype(np.float32), 2.0) > 0.5
        out.append(ndimage.binary_fill_holes(fg) if fill_holes else fg)
    return torch.from_numpy(np.stack(out))


def image_files(root: Path) -> list[Path]:
    """The image files under ``root`` (recursive, sorted): a DTD copy or any folder of textures."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"dtd_root {root} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"dtd_root {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def load_texture(path: Path, size: int) -> torch.Tensor:
    """uint8 [3, size, size] of one texture file (bilinear resize)."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
    except (OSError, UnidentifiedImageError) as err:
        raise DatasetError(f"cannot read texture {path}: {err}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


@dataclass(frozen=True)
class Defects:
    """A batch of synthetic defects: images float [B, 3, S, S] in [0, 1], labels [B, 1, S, S] (0 = normal), the binary
    defect masks bool [B, S, S] and the source of each sample (``in_domain``, ``dtd``, ``procedural``)."""

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    sources: tuple[str, ...]


class DefectSynthesizer:
    """Makes DRAEM-style defects on rows of a fixed set of normal images (uint8 [N, 3, S, S]).

    Args:
        images: the normal training images (also the in-domain sources).
        dtd_root: a folder of texture images (the paper: DTD); None = procedural textures.
        in_domain_prob: chance that the source is another normal image (their ``use_in_domain_data``: 0.5).
        object_mask: ``none``, ``dark`` or ``bright`` foreground (see ``object_masks``).
        fill_holes: fill holes of the object mask.
        beta_max: beta ~ U(0, beta_max) (their 0.8).
        soft_labels: their ``smooth_cls`` label value; False = hard labels 1.
        defect_prob: chance of trying a defect at all (their ``aug_ratio_train`` = 1).
    """

    def __init__(self, images: torch.Tensor, *, dtd_root: str | Path | None = None, in_domain_prob: float = 0.5,
                 object_mask: str = "none", fill_holes: bool = True, beta_max: float = 0.8,
                 soft_labels: bool = True, defect_prob: float = 1.0) -> None:
        if object_mask not in OBJECT_MASK_MODES:
            raise ConfigError(f"object_mask must be one of {', '.join(OBJECT_MASK_MODES)}, got {object_mask!r}")
        self.images, self.size = images, images.shape[-1]
        self.textures = image_files(Path(dtd_root)) if dtd_root else []
        self.in_domain_prob = in_domain_prob if len(images) > 1 else 0.0  # another image needs two
        self.objects = None if object_mask == "none" else object_masks(images, object_mask, fill_holes)
        self.beta_max, self.soft_labels, self.defect_prob = beta_max, soft_labels, defect_prob
        self.source_counts: Counter[str] = Counter()

    def _sources(self, idx: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        n, b = len(self.images), len(idx)
        in_domain = torch.rand(b, generator=g) < self.in_domain_prob
        other = (idx + torch.randint(1, max(n, 2), (b,), generator=g)) % n  # another image, never the same one
        pick = torch.randint(0, max(len(self.textures), 1), (b,), generator=g)
        procedural = None if self.textures else iter(procedural_textures(int((~in_domain).sum()), self.size, g))
        src, names = [], []
        for i in range(b):
            if in_domain[i]:
                name, img = "in_domain", self.images[other[i]]
            elif self.textures:
                name, img = "dtd", load_texture(self.textures[pick[i]], self.size)
            else:
                name, img = "procedural", next(procedural)
            src.append(img)
            names.append(name)
        return augment(torch.stack(src), g), names

    def __call__(self, idx: torch.Tensor, generator: torch.Generator) -> Defects:
        """Defects on ``images[idx]``; deterministic given the generator's state."""
        x = self.images[idx].float() / 255
        b = len(idx)
        mask = perlin_masks(b, self.size, generator)
        if self.objects is not None:
            mask = mask * self.objects[idx]
        src, names = self._sources(idx, generator)
        beta = (torch.rand(b, generator=generator) * self.beta_max).view(b, 1, 1, 1)
        mask = mask * (torch.rand(b, generator=generator) < self.defect_prob).view(b, 1, 1)
        m = mask[:, None]
        out = x * (1 - m) + (1 - beta) * (src.float() / 255) * m + beta * x * m
        diff = (out - x).mean(1)  # signed colour difference [B, S, S]
        counted = (m[:, 0] > 0) & (diff != 0)  # their code leaves unchanged pixels out of the label's mean
        value = (torch.sigmoid(5 * diff) * counted).flatten(1).sum(1) / counted.flatten(1).sum(1).clamp_min(1)
        empty = counted.flatten(1).sum(1) == 0  # nothing changed: a normal sample
        mask[empty] = 0
        out[empty] = x[empty]
        label = mask * (value.view(b, 1, 1) if self.soft_labels else 1.0)
        names = [("none" if e else s) for s, e in zip(names, empty.tolist(), strict=True)]
        self.source_counts.update(names)
        return Defects(out, label[:, None], mask > 0, tuple(names))
