"""Dataset families, one file each, registered by name (installed as ``adbench.datasets``)."""

from adbench.datasets import btad, mtd, mvtec, synthetic  # noqa: F401  (registers)
from adbench.datasets._base import (
    DATASETS,
    GEOMETRIES,
    AnomalyDataset,
    DatasetFamily,
    Sample,
    check_geometry,
    default_data_root,
    list_datasets,
    open_family,
    register_dataset,
    to_eval_view,
)

__all__ = [
    "DATASETS", "GEOMETRIES", "AnomalyDataset", "DatasetFamily", "Sample", "check_geometry", "default_data_root",
    "list_datasets", "open_family", "register_dataset", "to_eval_view",
]  # fmt: skip
