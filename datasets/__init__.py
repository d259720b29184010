"""Dataset families, one file each, registered by name (installed as ``adbench.datasets``)."""

from adbench.datasets import btad, mtd, mvtec, synthetic  # noqa: F401  (registers)
from adbench.datasets._base import (
    DATASETS,
    AnomalyDataset,
    DatasetFamily,
    Sample,
    default_data_root,
    list_datasets,
    open_family,
    register_dataset,
)

__all__ = [
    "DATASETS", "AnomalyDataset", "DatasetFamily", "Sample", "default_data_root", "list_datasets", "open_family",
    "register_dataset",
]  # fmt: skip
