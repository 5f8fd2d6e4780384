"""From raw downloaded datasets to the training cache (see docs/datasets.md).

One module per raw layout (cremad, kinetics_sounds, ucf101, ave, vggsound), each with
NAME, MODALITIES, EXPECTED (the layout, in words), DEFAULTS (extraction parameters) and
scan(root, opts) -> Scan, built from common.py (job records, finding videos). The
shared work: media.py (decoding), work.py (per-clip work files, resume), pool.py (the
process pool), splits.py and pipeline.py (the phases from a scan to a cache). Layout
modules are imported on demand.
"""

from __future__ import annotations

import importlib
from types import ModuleType

LAYOUTS = ("cremad", "kinetics_sounds", "ucf101", "ave", "vggsound")


def get_layout(name: str) -> ModuleType:
    if name not in LAYOUTS:
        raise KeyError(name)
    return importlib.import_module(f"{__name__}.{name}")
