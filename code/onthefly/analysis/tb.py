"""TensorBoard scalars of a run, read with tensorboard's EventAccumulator."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def read_scalars(tb_dir: str | Path, prefix: str = "") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{tag: (steps, values)} for every scalar tag starting with `prefix`, sorted by step.

    All event files of the folder are read (a resumed run adds one); when a step was
    logged twice (a run resumed before its last checkpointed step), the last value wins.
    """
    tb_dir = Path(tb_dir)
    if not tb_dir.is_dir() or not any(tb_dir.glob("events.out.tfevents.*")):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={SCALARS: 0})  # 0 = keep every event
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        if not tag.startswith(prefix):
            continue
        last: dict[int, float] = {}
        for event in acc.Scalars(tag):
            last[int(event.step)] = float(event.value)
        steps = np.array(sorted(last), dtype=np.int64)
        out[tag] = (steps, np.array([last[s] for s in steps], dtype=np.float64))
    return out
