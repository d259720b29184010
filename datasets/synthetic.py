"""The embedded synthetic inspection dataset: generated on the fly from a seed, nothing downloaded or written.

Three categories imitate industrial inspection data (MVTec-AD style):

* ``pattern`` -- a plain-weave fabric / mesh: a regular grid of threads with period, orientation (a few degrees),
  phase and a smooth irregularity field jittered per image.
* ``texture`` -- a stochastic wood-grain texture: growth rings bent by smooth power-law noise, fibres along the
  grain and slow blotches; grain angle, ring period / sharpness and colours jittered per image.
* ``object`` -- a round machined part (a cap / nut seen from above) on a plain dark background: bevelled rim, groove,
  tick-mark print and a printed arc (which shows the small rotation); position, size and rotation jittered.

Every image also gets a random illumination (gain, linear gradient, slow unevenness) and sensor noise.

Test images carry one of five defect kinds, with size (small to medium) and contrast (subtle to obvious) drawn per
sample: ``scratch`` (thin curved lines), ``spot`` (soft blobs: darker, brighter or a stain colour), ``missing``
(material removed: a hole showing the backing / background, or a flat fill), ``deform`` (a local warp: push, bulge,
pinch or swirl) and ``color`` (a hue / saturation shift at preserved luma). On ``object`` defects land on the part.

A sample is a pure function of ``(seed, category, split, index, defect)``: its generator is
``np.random.default_rng([seed, category_id, split_id, index])``. The defect-free image is drawn first (``_base``) and
the defect after it from the same stream (``_apply_defect``), so a defective sample and ``defect="good"`` with the same
other arguments share their defect-free base, and the mask is exactly where the defect changed the rendered image
(changes below ``CHANGE_THRESHOLD`` grey levels are dropped; holes enclosed by the changed region are part of the mask).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from adbench.datasets._base import DatasetFamily, make_index, register_dataset

CATEGORIES: tuple[str, ...] = ("pattern", "texture", "object")
DEFECTS: tuple[str, ...] = ("scratch", "spot", "missing", "deform", "color")
SPLITS: tuple[str, ...] = ("train", "test")
NATIVE_SIZE = 256

N_TRAIN = 60
N_TEST_GOOD = 20
N_PER_DEFECT = 6

MIN_DEFECT_AREA = 20  # pixels at native size
CHANGE_THRESHOLD = 4.0  # grey levels (max over channels) a pixel must change by to count as defective
_MAX_TRIES = 8

_N = NATIVE_SIZE
_RGB2YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], dtype=np.float32)
_YCC2RGB = np.linalg.inv(_RGB2YCC).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------- API


def sample_index(category: str, split: str) -> list[tuple[int, str]]:
    """The (index, defect) list of a split: train = N_TRAIN 'good'; test = N_TEST_GOOD 'good' + N_PER_DEFECT of each
    defect, indices 0..49 in that order."""
    _category_id(category)
    if _split_id(split) == 0:
        return [(i, "good") for i in range(N_TRAIN)]
    labels = ["good"] * N_TEST_GOOD + [d for d in DEFECTS for _ in range(N_PER_DEFECT)]
    return list(enumerate(labels))


def generate(
    category: str, split: str, index: int, defect: str, seed: int, size: int = NATIVE_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """One sample: image uint8 [size,size,3], mask bool [size,size] (all False for 'good').

    Deterministic in (seed, category, split, index, defect). Generated at NATIVE_SIZE; other sizes are resized with
    PIL (bilinear image, nearest mask).
    """
    cid, sid = _category_id(category), _split_id(split)
    if defect != "good" and defect not in DEFECTS:
        raise ValueError(f"unknown defect {defect!r}; valid: good, {', '.join(DEFECTS)}")
    seed, index, size = _nonneg_int(seed, "seed"), _nonneg_int(index, "index"), _nonneg_int(size, "size")
    if size == 0:
        raise ValueError("size must be positive")
    rng = np.random.default_rng([seed, cid, sid, index])
    base = _base(category, rng)
    if defect == "good":
        image, mask = _render(base, base.albedo), np.zeros((_N, _N), dtype=bool)
    else:
        image, mask = _apply_defect(base, defect, rng)
    if size != _N:
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST))
        mask = mask > 127
    return image, mask


# ------------------------------------------------------------------------------------------------------- helpers


def _category_id(category: str) -> int:
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; valid: {', '.join(CATEGORIES)}")
    return CATEGORIES.index(category)


def _split_id(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    return SPLITS.index(split)


def _nonneg_int(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return int(value)


@lru_cache(maxsize=1)
def _coords() -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (yy, xx), float32 [N, N]."""
    yy, xx = np.mgrid[0:_N, 0:_N].astype(np.float32)
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


@lru_cache(maxsize=1)
def _freq() -> tuple[np.ndarray, np.ndarray]:
    """(fy, fx) in cycles/pixel on the rfft2 grid, float32 [N, N//2+1] each."""
    fy, fx = np.meshgrid(np.fft.fftfreq(_N), np.fft.rfftfreq(_N), indexing="ij")
    fy, fx = fy.astype(np.float32), fx.astype(np.float32)
    fy.flags.writeable = fx.flags.writeable = False
    return fy, fx


def _noise_field(
    rng: np.random.Generator,
    *,
    sigma: float | tuple[float, float] | None = None,
    beta: float | None = None,
    angle: float = 0.0,
) -> np.ndarray:
    """Zero-mean unit-std periodic noise [N, N], from white noise filtered in the Fourier domain.

    ``beta``: power spectrum 1/f^beta. ``sigma``: Gaussian smoothing of ``sigma`` px, or (across, along) px for
    streaks whose across-direction is ``angle`` (radians, in image x/y). Both: power law, then smoothed.
    """
    spec = np.fft.rfft2(rng.standard_normal((_N, _N), dtype=np.float32))
    fy, fx = _freq()
    filt = np.ones_like(fy)
    if beta is not None:
        f2 = np.maximum(fy**2 + fx**2, 1e-12)
        filt = np.where(f2 > 1e-11, f2 ** (-beta / 4), 0.0)
    if sigma is not None:
        s_a, s_b = (sigma, sigma) if np.isscalar(sigma) else sigma
        fa = fx * math.cos(angle) + fy * math.sin(angle)
        fb = -fx * math.sin(angle) + fy * math.cos(angle)
        filt = filt * np.exp(-2.0 * np.pi**2 * ((s_a * fa) ** 2 + (s_b * fb) ** 2))
    field = np.fft.irfft2(spec * filt, s=(_N, _N)).astype(np.float32)
    field -= field.mean()
    field /= field.std() + 1e-12
    return field


def _inside(signed_dist: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage from a signed distance (positive inside, pixels)."""
    return np.clip(signed_dist + 0.5, 0.0, 1.0)


def _jitter_colour(rng: np.random.Generator, rgb: tuple[float, float, float], gain: float, hue: float) -> np.ndarray:
    """``rgb`` times a common factor (relative std ``gain``) and per-channel factors (relative std ``hue``)."""
    factor = (1.0 + gain * rng.standard_normal()) * (1.0 + hue * rng.standard_normal(3))
    return (np.asarray(rgb, dtype=np.float32) * factor).astype(np.float32)


# ------------------------------------------------------------------------------------------------- defect-free base


@dataclass
class _Base:
    """A defect-free sample before rendering. Rendered image = clip(albedo * illum + noise)."""

    albedo: np.ndarray  # [N,N,3] float32, 0..255 reflectance
    illum: np.ndarray  # [N,N,1] float32
    noise: np.ndarray  # [N,N,3] float32, sensor noise in grey levels
    backing: np.ndarray  # [N,N,3] float32: what shows where material is missing
    support: np.ndarray  # [N,N] float32 in [0,1]: where defects may land
    centre: tuple[float, float]  # object centre (y, x); image centre for textures
    radius: float  # object radius (unused for textures)
    category: str


def _base(category: str, rng: np.random.Generator) -> _Base:
    """The defect-free sample of ``category``; consumes the same draws from ``rng`` whatever the defect."""
    albedo, backing, support, centre, radius = _BASES[category](rng)
    illum = _illumination(rng)
    sigma = rng.uniform(1.5, 3.5)
    noise = sigma * (0.8 * rng.standard_normal((_N, _N, 1), dtype=np.float32))
    noise = noise + sigma * 0.6 * rng.standard_normal((_N, _N, 3), dtype=np.float32)
    return _Base(albedo, illum, noise.astype(np.float32), backing, support, centre, radius, category)


def _illumination(rng: np.random.Generator) -> np.ndarray:
    yy, xx = _coords()
    gain = rng.uniform(0.9, 1.1)
    angle, amp = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.15)
    ramp = ((xx - _N / 2) * math.cos(angle) + (yy - _N / 2) * math.sin(angle)) / _N
    uneven = 0.025 * _noise_field(rng, sigma=40.0)
    return (gain * (1.0 + amp * ramp + uneven))[..., None].astype(np.float32)


def _base_pattern(rng: np.random.Generator):
    """Plain-weave fabric: warp and weft threads alternating over/under, with smooth irregularity."""
    yy, xx = _coords()
    theta = math.radians(rng.uniform(-4.0, 4.0))
    period = 16.0 * rng.uniform(0.9, 1.1)
    aspect = rng.uniform(0.94, 1.06)
    pu, pv = rng.uniform(0.0, 1.0, 2).tolist()
    wobble = rng.uniform(0.05, 0.12)
    du, dv = _noise_field(rng, sigma=20.0), _noise_field(rng, sigma=20.0)
    fibre = _noise_field(rng, sigma=0.8)
    c, s = math.cos(theta), math.sin(theta)
    u = (xx * c + yy * s) / period + pu + wobble * du
    v = (-xx * s + yy * c) / (period * aspect) + pv + wobble * dv
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    warp_on_top = (iu + iv) % 2 == 0
    sharp = rng.uniform(0.4, 0.8)
    prof_u, prof_v = np.sin(np.pi * fu) ** sharp, np.sin(np.pi * fv) ** sharp
    value = np.where(warp_on_top, prof_u * (0.78 + 0.22 * prof_v), prof_v * (0.78 + 0.22 * prof_u))
    value = value * (1.0 + 0.07 * fibre)
    warp_col = _jitter_colour(rng, (170, 150, 118), 0.04, 0.015)
    weft_col = _jitter_colour(rng, (150, 136, 112), 0.04, 0.015)
    gap_col = _jitter_colour(rng, (48, 42, 36), 0.08, 0.02)
    thread = np.where(warp_on_top[..., None], warp_col, weft_col)
    albedo = gap_col + (thread - gap_col) * value[..., None]
    albedo = ndimage.gaussian_filter(albedo, sigma=(0.7, 0.7, 0), mode="wrap")
    backing = np.broadcast_to(gap_col * 0.7, albedo.shape).astype(np.float32)
    support = np.ones((_N, _N), dtype=np.float32)
    return albedo.astype(np.float32), backing, support, (_N / 2, _N / 2), _N / 2


def _base_texture(rng: np.random.Generator):
    """Wood grain: growth rings bent by smooth power-law noise, with fibres along the grain and blotches."""
    yy, xx = _coords()
    angle = math.radians(90.0 + rng.uniform(-12.0, 12.0))  # direction across the rings
    turb = _noise_field(rng, beta=rng.uniform(3.3, 3.7), sigma=2.5)
    blotch = _noise_field(rng, sigma=14.0)
    fibres = _noise_field(rng, sigma=(0.8, 12.0), angle=angle)
    period = rng.uniform(30.0, 42.0)
    bend = rng.uniform(1.2, 1.8)
    gamma = rng.uniform(1.6, 2.4)
    phase = rng.uniform(0, 2 * np.pi)
    across = (xx * math.cos(angle) + yy * math.sin(angle)) / period
    rings = (0.5 + 0.5 * np.sin(2 * np.pi * across + bend * turb + phase)) ** gamma
    light = _jitter_colour(rng, (200, 162, 118), 0.05, 0.02)
    dark = _jitter_colour(rng, (128, 86, 52), 0.06, 0.02)
    albedo = light + (dark - light) * rings[..., None]
    albedo = albedo * (1.0 + 0.05 * blotch[..., None] + 0.06 * fibres[..., None])
    backing = np.broadcast_to(dark * 0.45, albedo.shape).astype(np.float32)
    support = np.ones((_N, _N), dtype=np.float32)
    return albedo.astype(np.float32), backing, support, (_N / 2, _N / 2), _N / 2


def _base_object(rng: np.random.Generator):
    """A round machined part with bevelled rim, groove, tick-mark print and a printed arc on a dark background."""
    yy, xx = _coords()
    cy, cx = (_N / 2 + rng.uniform(-6.0, 6.0, 2)).tolist()
    radius = 84.0 * rng.uniform(0.96, 1.04)
    rot = math.radians(rng.uniform(-8.0, 8.0))
    light = rng.uniform(0, 2 * np.pi)
    bg_col = _jitter_colour(rng, (44, 46, 50), 0.06, 0.02)
    body_col = _jitter_colour(rng, (178, 170, 156), 0.03, 0.01)
    print_col = _jitter_colour(rng, (48, 62, 120), 0.05, 0.02)
    bg_var = _noise_field(rng, sigma=30.0)
    surface = _noise_field(rng, sigma=1.2)

    dy, dx = yy - cy, xx - cx
    r = np.hypot(dy, dx)
    phi = np.arctan2(dy, dx)
    lit = np.cos(phi - light)
    bevel = _inside(r - 0.86 * radius)  # outer bevelled ring
    shade = 1.0 + 0.06 * np.sin(2 * np.pi * r / 3.1) + 0.04 * surface  # machining rings + surface grain
    shade = shade * (1.0 + bevel * (0.28 * lit - 0.05))
    groove = np.exp(-(((r - 0.58 * radius) / 1.6) ** 2))
    shade = shade * (1.0 - 0.45 * groove)
    cap = _inside(0.24 * radius - r)
    shade = shade * (1.0 + cap * (0.18 * (dx * math.cos(light) + dy * math.sin(light)) / (0.24 * radius) + 0.06))
    cap_edge = np.exp(-(((r - 0.24 * radius) / 1.2) ** 2))
    shade = shade * (1.0 - 0.35 * cap_edge)
    obj = body_col * shade[..., None]

    sector = 2 * np.pi / 8
    dphi = np.mod(phi - rot + sector / 2, sector) - sector / 2
    ticks = _inside(2.0 - np.abs(dphi) * r) * _inside(r - 0.66 * radius) * _inside(0.78 * radius - r)
    arc_mid = rot + math.pi / 2
    arc_dphi = np.abs(np.mod(phi - arc_mid + np.pi, 2 * np.pi) - np.pi)
    arc = _inside(1.6 - np.abs(r - 0.42 * radius)) * _inside((math.radians(55.0) - arc_dphi) * r)
    ink = np.maximum(ticks, 0.85 * arc)
    obj = obj + (print_col - obj) * ink[..., None]

    background = bg_col * (1.0 + 0.05 * bg_var[..., None])
    cover = _inside(radius - r)
    albedo = background + (obj - background) * cover[..., None]
    return albedo.astype(np.float32), background.astype(np.float32), cover.astype(np.float32), (cy, cx), radius


_BASES: dict[str, Callable] = {"pattern": _base_pattern, "texture": _base_texture, "object": _base_object}


# --------------------------------------------------------------------------------------------------------- render


def _render_float(base: _Base, albedo: np.ndarray) -> np.ndarray:
    return np.clip(albedo * base.illum + base.noise, 0.0, 255.0)


def _quantise(img: np.ndarray) -> np.ndarray:
    return np.rint(img).astype(np.uint8)


def _render(base: _Base, albedo: np.ndarray) -> np.ndarray:
    return _quantise(_render_float(base, albedo))


# -------------------------------------------------------------------------------------------------------- defects


def _apply_defect(base: _Base, defect: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``defect`` on ``base``: (image uint8 [N,N,3], mask bool [N,N]); pixels outside the mask equal the base.

    Size and contrast are drawn per sample; a draw whose mask is under MIN_DEFECT_AREA is redrawn, bigger and
    stronger each time (deterministically, from the same stream).
    """
    draw = _DEFECTS[defect]
    good = _render(base, base.albedo)
    for attempt in range(_MAX_TRIES):
        floor = attempt / (_MAX_TRIES - 1)  # lower bound on severity, rising with each retry
        albedo, allowed = draw(base, rng, floor)
        rows, cols = np.flatnonzero(allowed.any(axis=1)), np.flatnonzero(allowed.any(axis=0))
        if len(rows) == 0:
            continue
        box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]  # only this window can change
        illum, noise = base.illum[box], base.noise[box]
        bad = np.clip(albedo[box] * illum + noise, 0.0, 255.0)
        clean = np.clip(base.albedo[box] * illum + noise, 0.0, 255.0)
        changed = (np.abs(bad - clean).max(axis=-1) > CHANGE_THRESHOLD) & allowed[box]
        mask_box = ndimage.binary_fill_holes(changed)
        if mask_box.sum() >= MIN_DEFECT_AREA:
            image, mask = good.copy(), np.zeros((_N, _N), dtype=bool)
            mask[box] = mask_box
            image[box] = np.where(mask_box[..., None], _quantise(bad), image[box])
            return image, mask
    raise RuntimeError(f"could not draw a {defect} defect of at least {MIN_DEFECT_AREA} px")  # pragma: no cover


def _severity(rng: np.random.Generator, floor: float) -> tuple[float, float]:
    """(size, contrast) in [0, 1], independent, each at least ``floor``."""
    size, contrast = rng.uniform(0.0, 1.0, 2).tolist()
    return floor + (1.0 - floor) * size, floor + (1.0 - floor) * contrast


def _log_lerp(lo: float, hi: float, t: float) -> float:
    return float(np.exp(np.log(lo) + (np.log(hi) - np.log(lo)) * t))


def _pick_centre(base: _Base, rng: np.random.Generator, frac: float = 0.8) -> tuple[float, float]:
    """A point on the object (uniform within ``frac`` of its radius); on textures, uniform away from the border."""
    if base.category != "object":
        margin = _N * (1.0 - frac) / 4
        y, x = rng.uniform(margin, _N - margin, 2).tolist()
        return y, x
    rr = base.radius * frac * math.sqrt(rng.uniform())
    ang = rng.uniform(0, 2 * np.pi)
    return base.centre[0] + rr * math.sin(ang), base.centre[1] + rr * math.cos(ang)


def _blob(
    rng: np.random.Generator, centre: tuple[float, float], radius: float, soft: float, lobes: float
) -> np.ndarray:
    """Soft irregular blob [N,N] in [0,1]: a circle with random low harmonics on its boundary.

    Computed in a window around the centre; outside it the weight is below 1e-6 and left at 0.
    """
    harmonics = [(k, lobes * rng.uniform(0.0, 1.0) / k, rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4, 5)]
    reach = radius * (1.0 + sum(a for _, a, _ in harmonics)) + 30.0 * soft + 2.0
    y0, y1 = max(int(centre[0] - reach), 0), min(int(centre[0] + reach) + 2, _N)
    x0, x1 = max(int(centre[1] - reach), 0), min(int(centre[1] + reach) + 2, _N)
    out = np.zeros((_N, _N), dtype=np.float32)
    if y1 <= y0 or x1 <= x0:
        return out
    yy, xx = _coords()
    dy, dx = yy[y0:y1, x0:x1] - centre[0], xx[y0:y1, x0:x1] - centre[1]
    phi = np.arctan2(dy, dx)
    edge = np.ones_like(phi)
    for k, a, ph in harmonics:
        edge += a * np.cos(k * phi + ph)
    out[y0:y1, x0:x1] = 0.5 + 0.5 * np.tanh(0.5 * (radius * edge - np.hypot(dy, dx)) / soft)
    return out


def _scratch(base: _Base, rng: np.random.Generator, floor: float):
    yy, xx = _coords()
    size, contrast = _severity(rng, floor)
    n = 1 if rng.uniform() < 0.75 else 2
    cover = np.zeros((_N, _N), dtype=np.float32)
    for _ in range(n):
        length = _log_lerp(22.0, 120.0, size) * rng.uniform(0.8, 1.0)
        half_width = rng.uniform(0.45, 1.3)
        cy, cx = _pick_centre(base, rng, 0.7)
        ang = rng.uniform(0, np.pi)
        direction = np.array([np.sin(ang), np.cos(ang)])
        normal = np.array([direction[1], -direction[0]])
        p0 = np.array([cy, cx]) - direction * length / 2
        p2 = np.array([cy, cx]) + direction * length / 2
        p1 = np.array([cy, cx]) + normal * length * rng.uniform(-0.35, 0.35)
        t = np.linspace(0.0, 1.0, 25)[:, None]
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        pad = int(half_width) + 3
        y0, x0 = (np.clip(np.floor(pts.min(0)) - pad, 0, _N)).astype(int)
        y1, x1 = (np.clip(np.ceil(pts.max(0)) + pad + 1, 0, _N)).astype(int)
        if y1 <= y0 or x1 <= x0:
            continue
        py, px = yy[y0:y1, x0:x1, None], xx[y0:y1, x0:x1, None]
        a, b = pts[:-1], pts[1:]
        ab = b - a
        denom = np.maximum((ab**2).sum(1), 1e-9)
        s = np.clip(((py - a[:, 0]) * ab[:, 0] + (px - a[:, 1]) * ab[:, 1]) / denom, 0.0, 1.0)
        dist = np.hypot(py - (a[:, 0] + s * ab[:, 0]), px - (a[:, 1] + s * ab[:, 1])).min(axis=-1)
        cover[y0:y1, x0:x1] = np.maximum(cover[y0:y1, x0:x1], _inside(half_width - dist))
    cover = cover * base.support
    strength = 0.18 + 0.5 * contrast
    target = 255.0 if rng.uniform() < 0.65 else 0.0
    albedo = base.albedo + (target - base.albedo) * (strength * cover)[..., None]
    return albedo, cover > 0.05


def _spot(base: _Base, rng: np.random.Generator, floor: float):
    size, contrast = _severity(rng, floor)
    n = 1 if rng.uniform() < 0.7 else int(rng.integers(2, 4))
    weight = np.zeros((_N, _N), dtype=np.float32)
    for i in range(n):
        radius = _log_lerp(5.0, 24.0, size) * (1.0 if i == 0 else rng.uniform(0.4, 0.8))
        weight = np.maximum(weight, _blob(rng, _pick_centre(base, rng, 0.75), radius, rng.uniform(0.6, 2.5), 0.5))
    weight = weight * base.support
    kind = rng.uniform()
    strength = 0.25 + 0.55 * contrast
    if kind < 0.45:  # darker material (dirt, oil)
        target = base.albedo * 0.25
    elif kind < 0.7:  # brighter (residue, glare)
        target = base.albedo + (255.0 - base.albedo) * 0.7
    else:  # a stain of another colour (rust or green)
        stain = (
            _jitter_colour(rng, (150, 95, 50), 0.15, 0.08)
            if rng.uniform() < 0.5
            else _jitter_colour(rng, (90, 130, 85), 0.15, 0.08)
        )
        target = np.broadcast_to(stain, base.albedo.shape)
    albedo = base.albedo + (target - base.albedo) * (strength * weight)[..., None]
    return albedo, weight > 0.01


def _missing(base: _Base, rng: np.random.Generator, floor: float):
    size, contrast = _severity(rng, floor)
    radius = _log_lerp(4.0, 22.0, size)
    on_object = base.category == "object"
    if on_object and rng.uniform() < 0.7:  # a chip broken off the rim
        ang = rng.uniform(0, 2 * np.pi)
        rr = base.radius * rng.uniform(0.92, 1.0) + radius * 0.3
        centre = (base.centre[0] + rr * math.sin(ang), base.centre[1] + rr * math.cos(ang))
    else:
        centre = _pick_centre(base, rng, 0.75)
    region = _blob(rng, centre, radius, rng.uniform(0.3, 0.8), 0.6)
    if on_object or rng.uniform() < 0.7:
        fill = base.backing  # a hole: the background / backing shows through
    else:  # a flat patch: the mean colour of what was there, a little lighter or darker
        inside = region > 0.5
        mean = base.albedo[inside].mean(axis=0) if inside.any() else base.albedo.mean(axis=(0, 1))
        fill = np.broadcast_to(mean * (1.0 + rng.uniform(-0.25, 0.25) * contrast), base.albedo.shape)
    albedo = base.albedo + (fill - base.albedo) * region[..., None]
    return albedo, region > 0.01


def _deform(base: _Base, rng: np.random.Generator, floor: float):
    yy, xx = _coords()
    size, contrast = _severity(rng, floor)
    sigma = _log_lerp(6.0, 18.0, size)
    amp = min(1.8 + 5.0 * contrast, 0.5 * sigma)
    cy, cx = _pick_centre(base, rng, 0.8)
    kind = int(rng.integers(0, 4))
    ang = rng.uniform(0, 2 * np.pi)
    reach = int(np.ceil(sigma * np.sqrt(2 * np.log(max(2.0 * amp, 1.01))) + 3))
    y0, y1 = max(int(cy) - reach, 0), min(int(cy) + reach + 1, _N)
    x0, x1 = max(int(cx) - reach, 0), min(int(cx) + reach + 1, _N)
    allowed = np.zeros((_N, _N), dtype=bool)
    albedo = base.albedo.copy()
    if y1 <= y0 or x1 <= x0:
        return albedo, allowed
    py, px = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
    g = np.exp(-(py**2 + px**2) / (2 * sigma**2))
    if kind == 0:  # push sideways
        uy, ux = amp * math.sin(ang) * g, amp * math.cos(ang) * g
    elif kind in (1, 2):  # bulge / pinch
        sign = 1.0 if kind == 1 else -1.0
        uy, ux = sign * amp * g * py / sigma * 1.65, sign * amp * g * px / sigma * 1.65
    else:  # swirl
        uy, ux = amp * g * px / sigma * 1.65, -amp * g * py / sigma * 1.65
    coords = np.stack([yy[y0:y1, x0:x1] - uy, xx[y0:y1, x0:x1] - ux])
    for ch in range(3):
        albedo[y0:y1, x0:x1, ch] = ndimage.map_coordinates(base.albedo[..., ch], coords, order=1, mode="nearest")
    allowed[y0:y1, x0:x1] = np.hypot(uy, ux) > 0.5
    return albedo, allowed


def _color(base: _Base, rng: np.random.Generator, floor: float):
    size, contrast = _severity(rng, floor)
    radius = _log_lerp(7.0, 30.0, size)
    weight = _blob(rng, _pick_centre(base, rng, 0.7), radius, rng.uniform(1.0, 3.5), 0.6) * base.support
    ycc = base.albedo @ _RGB2YCC.T
    turn = math.radians((15.0 + 75.0 * contrast) * rng.uniform(0.7, 1.0) * (1.0 if rng.uniform() < 0.5 else -1.0))
    sat = 1.0 + rng.uniform(-0.25, 0.6) * contrast
    tint_ang = rng.uniform(0, 2 * np.pi)
    tint = (5.0 + 20.0 * contrast) * math.cos(tint_ang), (5.0 + 20.0 * contrast) * math.sin(tint_ang)
    cb, cr = ycc[..., 1], ycc[..., 2]
    new = ycc.copy()
    c, s = sat * math.cos(turn), sat * math.sin(turn)
    new[..., 1] = c * cb - s * cr + tint[0]
    new[..., 2] = s * cb + c * cr + tint[1]
    shifted = new @ _YCC2RGB.T
    albedo = base.albedo + (shifted - base.albedo) * weight[..., None]
    return albedo, weight > 0.01


_DEFECTS: dict[str, Callable] = {
    "scratch": _scratch,
    "spot": _spot,
    "missing": _missing,
    "deform": _deform,
    "color": _color,
}


# --- the registered dataset family -------------------------------------------------------------------------------
DATA_SEED = 0  # the data is the same for every run seed, so runs with different seeds compare like with like


@register_dataset("synthetic")
class Synthetic(DatasetFamily):
    """The embedded default: three categories generated in memory (see the module docstring); needs no data root."""

    name = "synthetic"
    fixed_categories = CATEGORIES

    def locate(self, data_root: Path, root: Path | None) -> Path:
        return Path("synthetic:")

    def index(self, category: str, split: str) -> pd.DataFrame:
        rows = [(f"synthetic://{category}/{split}/{defect}/{i:03d}", None, int(defect != "good"), defect)
                for i, defect in sample_index(category, split)]
        return make_index(rows)

    def read(self, row: pd.Series) -> tuple[Image.Image, Image.Image | None]:
        category, split, defect, index = row.image_path.removeprefix("synthetic://").split("/")
        image, mask = generate(category, split, int(index), defect, DATA_SEED)
        return Image.fromarray(image), (Image.fromarray(mask.astype(np.uint8) * 255) if defect != "good" else None)
