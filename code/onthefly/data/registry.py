"""A small registry so datasets are looked up by name instead of an if/elif chain.

A dataset module registers a `DatasetEntry`:
  * `info(cfg)`      -> DatasetInfo (classes, modalities, shapes), cheap to call;
  * `build(cfg, split)` -> a torch Dataset whose items are dicts
        {<modality name>: tensor, "label": int, "index": int};
    `split` is "train", "val" or "test"; training-time augmentation happens when split == "train".
    "index" is the sample's position within its split (dataset[i]["index"] == i), for every
    dataset: inference writes it to predictions.csv. `cfg.limit_samples`, when set, keeps the
    first N samples of each split.
  * `defaults`       -> per-dataset training defaults (optimizer, lr, epochs, ...), applied
    under anything the user gives on the command line or in a YAML file.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .spec import DatasetInfo

if TYPE_CHECKING:
    from torch.utils.data import Dataset

# The modules that register the built-in datasets, imported on the first lookup rather than with
# the package: the preprocessing pool's fork server imports `onthefly.data.raw`, and these pull in
# torch, seconds of start-up that every decoding worker would inherit for nothing.
BUILTIN_MODULES = (f"{__package__}.avdigits", f"{__package__}.cache.registration")


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    info: Callable[[Any], DatasetInfo]
    build: Callable[[Any, str], Dataset]
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""


_DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(entry: DatasetEntry) -> DatasetEntry:
    if entry.name in _DATASETS:
        raise ValueError(f"dataset {entry.name!r} registered twice")
    _DATASETS[entry.name] = entry
    return entry


def _import_builtins() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)  # a no-op after the first time


def get_dataset_entry(name: str) -> DatasetEntry:
    _import_builtins()
    if name not in _DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(sorted(_DATASETS))}")
    return _DATASETS[name]


def dataset_names() -> list[str]:
    _import_builtins()
    return sorted(_DATASETS)
