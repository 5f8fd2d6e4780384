"""Datasets, loaders and on-device input presets.

Importing this package registers every dataset module listed below.
"""

from . import (
    avdigits,  # noqa: F401  (registers "avdigits")
    cache,  # noqa: F401  (registers cremad, kinetics_sounds, ucf101, ave, vggsound)
)
from .registry import DatasetEntry, dataset_names, get_dataset_entry, register_dataset
from .spec import DatasetInfo, ModalitySpec

__all__ = [
    "DatasetEntry",
    "DatasetInfo",
    "ModalitySpec",
    "dataset_names",
    "get_dataset_entry",
    "register_dataset",
]
