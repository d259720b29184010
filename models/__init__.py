"""Detectors, one file each, registered by name (installed as ``adbench.models``)."""

from adbench.models import aeflow, cflow, clscnf, fastflow, padim, patchcore  # noqa: F401  (registers)
from adbench.models._registry import (
    MODELS,
    Detector,
    Prediction,
    create_model,
    list_models,
    register_model,
    resolve_config,
)

__all__ = ["MODELS", "Detector", "Prediction", "create_model", "list_models", "register_model", "resolve_config"]
