"""Datasets, loaders and on-device input presets.

The built-in datasets (avdigits; cremad, kinetics_sounds, ucf101, ave, vggsound from the cache)
register themselves when first looked up: see registry.BUILTIN_MODULES.
"""

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
