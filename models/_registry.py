"""The model registry and the small contract every detector follows."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from adbench.errors import ConfigError
from adbench.features import FeatureExtractor, FeatureStore
from adbench.models._maps import gaussian_kernel
from adbench.progress import NULL_PROGRESS, Progress
from adbench.registry import Registry


@dataclass(frozen=True)
class Prediction:
    """What a detector says about a batch: image scores [B] and anomaly maps [B, H, W] at input resolution.

    ``parts`` optionally names the components a detector fuses (e.g. flow-only and reconstruction-only scores): name
    -> (scores [B], maps [B, H, W] or None); the runner evaluates each and records it under the result's ``parts``.
    """

    score: torch.Tensor
    anomaly_map: torch.Tensor
    parts: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)


BLUR_FIELDS = ("map_blur", "sigma")  # config fields that are the sigma (px) of a Gaussian blur of the final map


class Detector(nn.Module):
    """Base of the detectors: a frozen ``extractor`` plus trainable parts, configured by one frozen dataclass.

    Subclasses set ``Config`` (defaults = the paper's, one comment per field citing the source; every config has
    ``layers``, ``epochs``, ``batch_size``, ``lr``), optionally ``PRESETS`` (named sets of overrides, e.g. the paper's
    full schedule), ``BACKBONE_DEFAULTS`` (per-backbone overrides from the reference configs) and
    ``CATEGORY_DEFAULTS`` ((dataset, category) -> overrides from the reference run scripts), ``PRESET_CATEGORIES``
    (preset -> (dataset, category) -> the reference's per-category exceptions to that preset's schedule), and
    implement ``fit`` and ``predict``.
    """

    Config: ClassVar[type]
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    BACKBONE_DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {}
    CATEGORY_DEFAULTS: ClassVar[dict[tuple[str, str], dict[str, Any]]] = {}
    PRESET_CATEGORIES: ClassVar[dict[str, dict[tuple[str, str], dict[str, Any]]]] = {}
    needs_images: ClassVar[bool] = False  # True: ``fit`` also gets the training images (uint8, the store's order)

    def __init__(self, extractor: FeatureExtractor, image_size: int, config: Any) -> None:
        super().__init__()
        self.extractor, self.image_size, self.config = extractor, image_size, config
        for name in BLUR_FIELDS:  # checked before any training: the blur runs only when maps are made
            sigma = getattr(config, name, 0.0)
            if sigma > 0 and len(gaussian_kernel(sigma)) // 2 >= image_size:  # the radius ``_maps.blur`` pads by
                raise ConfigError(f"{name}={sigma:g} is too wide for {image_size}-pixel maps: the blur's radius "
                                  f"(4 sigma) must stay below the image size")

    @property
    def device(self) -> torch.device:
        return self.extractor.mean.device

    def fit(self, features: FeatureStore, progress: Progress = NULL_PROGRESS,
            images: torch.Tensor | None = None) -> dict[str, list[float]]:
        """Train on the cached features of the normal training images; returns loss histories by stage.

        ``images`` ([N, 3, S, S] uint8, row i = features row i) is passed when the class sets ``needs_images``;
        ``features.index_batches`` gives the shuffled row indices to take matching slices of both.
        """
        raise NotImplementedError

    def predict(self, images: torch.Tensor) -> Prediction:
        """Score a batch of images (uint8 or [0, 1] float, [B, 3, S, S]); maps are [B, S, S], higher = anomalous."""
        raise NotImplementedError

    def calibrate(self, features: FeatureStore) -> None:
        """Training-set statistics the maps need (called at the end of ``fit``; scripts that evaluate mid-training
        call it before predicting). Nothing by default."""

    def finalize(self, scores: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Post-process the predictions of the whole test split (identity unless a protocol needs the whole split)."""
        return scores, maps

    def protocol(self) -> dict[str, str]:
        """How scores and maps are made, recorded in the result's ``protocol``."""
        return {}


MODELS: Registry[type[Detector]] = Registry("model")
register_model = MODELS.register


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names."""
    return MODELS.names(pattern)


def as_field_type(value: Any, default: Any) -> Any:
    """A typed (non-string) value in the type of the field's default: a sequence becomes a tuple, and an integer where
    the default holds floats a float, so a grid's ``4``, ``--set ...=4`` and a recorded ``4.0`` are one setting."""
    if isinstance(default, tuple):
        floats = bool(default) and isinstance(default[0], float)
        return tuple(float(v) if floats and type(v) is int else v for v in value)
    return float(value) if isinstance(default, float) and type(value) is int else value


def _coerce(field: str, value: Any, default: Any) -> Any:
    """Turn a ``--set`` string, or a grid's typed value (``as_field_type``), into the type of the field's default."""
    if not isinstance(value, str):
        return as_field_type(value, default)
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if isinstance(default, tuple):
            kind = type(default[0]) if default else str
            return tuple(kind(v) for v in value.replace("(", "").replace(")", "").split(",") if v.strip())
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise ConfigError(f"bad value {value!r} for {field} (expected {type(default).__name__})") from None
    return value


def resolve_config(model: str, backbone: str, overrides: dict[str, Any] | None = None, preset: str | None = None,
                   dataset: str | None = None, category: str | None = None):
    """The model's config: paper defaults, then the backbone's and the (dataset, category)'s defaults, then a preset
    and its per-category exceptions, then ``overrides``."""
    cls = MODELS.get(model)
    base = cls.Config()
    changes: dict[str, Any] = dict(cls.BACKBONE_DEFAULTS.get(backbone, {}))
    changes.update(cls.CATEGORY_DEFAULTS.get((dataset, category), {}))
    if preset is not None:
        if preset not in cls.PRESETS:
            valid = ", ".join(sorted(cls.PRESETS)) or "none"
            raise ConfigError(f"unknown preset {preset!r} for {model}; valid: {valid}")
        changes.update(cls.PRESETS[preset])
        changes.update(cls.PRESET_CATEGORIES.get(preset, {}).get((dataset, category), {}))
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    for key, value in (overrides or {}).items():
        if key not in fields:
            raise ConfigError(f"{model} has no config field {key!r}; valid: {', '.join(sorted(fields))}")
        changes[key] = _coerce(key, value, fields[key])
    config = dataclasses.replace(base, **changes)
    check_config(model, config)
    return config


# Fields whose valid range is the same in every detector's config: name -> (test, what it must be).
_COUNT = (lambda v: v >= 0, ">= 0")
_AT_LEAST_ONE = (lambda v: v >= 1, ">= 1")
_POSITIVE = (lambda v: math.isfinite(v) and v > 0, "a positive number")
_NON_NEGATIVE = (lambda v: math.isfinite(v) and v >= 0, ">= 0")
_FRACTION = (lambda v: 0 <= v <= 1, "in [0, 1]")
_RANGES = {
    "epochs": _COUNT, "warmup_epochs": _COUNT, "cls_frozen_epochs": _COUNT, "cls_finetune_epochs": _COUNT,
    "batch_size": _AT_LEAST_ONE, "flow_steps": _AT_LEAST_ONE, "coupling_blocks": _AT_LEAST_ONE,
    "fiber_batch": _AT_LEAST_ONE, "decoder_width": _AT_LEAST_ONE, "decoder_stride": _AT_LEAST_ONE,
    "lr": _POSITIVE, "cls_lr": _POSITIVE, "cls_encoder_lr": _POSITIVE, "hidden_ratio": _POSITIVE, "clamp": _POSITIVE,
    "weight_decay": _NON_NEGATIVE, "cls_weight_decay": _NON_NEGATIVE, "classifier_weight": _NON_NEGATIVE,
    "in_domain_prob": _FRACTION, "beta_max": _FRACTION,
    "condition_dims": (lambda v: v >= 4 and v % 4 == 0, "a positive multiple of 4"),
}


def check_config(model: str, config: Any) -> None:
    """ConfigError naming the first field outside its valid range."""
    for f in dataclasses.fields(config):
        test = _RANGES.get(f.name)
        value = getattr(config, f.name)
        if test is not None and not test[0](value):
            raise ConfigError(f"{model}: {f.name}={value} is invalid; it must be {test[1]}")


def create_model(model: str, extractor: FeatureExtractor, image_size: int, config: Any) -> Detector:
    """Instantiate a registered detector around a frozen extractor."""
    return MODELS.get(model)(extractor, image_size, config)
