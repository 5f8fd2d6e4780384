"""Reading run folders written by training, probing and inference.

A run folder holds config.json (always), metrics.jsonl (one line per epoch),
test_metrics.json (after training with --eval_test), probe.json (code/probe.py), tb/
(TensorBoard), and eval_<split>[_zero_<modality>]/ {metrics.json, predictions.csv}
(code/inference.py). Everything but config.json is optional here.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import read_json_object

# The order methods are listed in (anything else follows alphabetically).
METHOD_ORDER = ("none", "OGM", "OGM_GE", "OPM", "OGM_OPM", "OGM_GE_OPM")


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file, the last of each epoch, in epoch order ([] when unreadable)."""
    rows = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut by a kill mid-write
                continue
    # A resumed run may repeat epochs; keep the last record of each.
    by_epoch = {r.get("epoch", i): r for i, r in enumerate(rows)}
    return [by_epoch[e] for e in sorted(by_epoch)]


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    epochs: list[dict] = field(default_factory=list)
    test: dict | None = None
    probe: dict | None = None
    evals: dict[str, dict] = field(default_factory=dict)  # folder name (eval_test, ...) -> metrics.json

    @property
    def dataset(self) -> str:
        return str(self.config.get("dataset", "?"))

    @property
    def modality(self) -> str:
        return str(self.config.get("modality", "both"))

    @property
    def is_unimodal(self) -> bool:
        return self.modality != "both"

    @property
    def seed(self) -> int | None:
        return self.config.get("seed")

    @property
    def group_key(self) -> tuple:
        """Runs that differ only in their seed share a key (unimodal runs ignore fusion/modulation)."""
        if self.is_unimodal:
            return (self.dataset, self.modality, "", "")
        return (
            self.dataset,
            "both",
            str(self.config.get("fusion", "concat")),
            str(self.config.get("modulation", "none")),
        )

    @property
    def modality_names(self) -> list[str]:
        """Modalities the model has, in model order, read from the per-modality metric keys."""
        for source, prefix in ((self.test, "acc_"), (self.epochs[-1] if self.epochs else None, "val_acc_")):
            if source:
                names = [k[len(prefix) :] for k in source if k.startswith(prefix)]
                if names:
                    return names
        return [self.modality] if self.is_unimodal else []


def load_run(path: str | Path) -> Run | None:
    path = Path(path)
    config = read_json_object(path / "config.json")
    if config is None:
        return None
    evals = {}
    for sub in sorted(path.glob("eval_*")):
        metrics = read_json_object(sub / "metrics.json")
        if metrics is not None:
            evals[sub.name] = metrics
    return Run(
        path=path,
        config=config,
        epochs=read_jsonl(path / "metrics.jsonl"),
        test=read_json_object(path / "test_metrics.json"),
        probe=read_json_object(path / "probe.json"),
        evals=evals,
    )


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Every run folder given, or found below a given folder (any depth), each once."""
    seen: dict[Path, Run] = {}
    for p in paths:
        p = Path(p)
        candidates = [p] if (p / "config.json").is_file() else sorted(c.parent for c in p.rglob("config.json"))
        for c in candidates:
            c = c.resolve()
            if c not in seen:
                run = load_run(c)
                if run is not None:
                    seen[c] = run
    return list(seen.values())


def method_sort_key(key: tuple) -> tuple:
    dataset, modality, fusion, modulation = key
    unimodal = modality != "both"
    rank = METHOD_ORDER.index(modulation) if modulation in METHOD_ORDER else len(METHOD_ORDER)
    return (dataset, unimodal, modality if unimodal else "", fusion, rank, modulation)


def group_runs(runs: list[Run]) -> dict[tuple, list[Run]]:
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group_key, []).append(run)
    ordered = {}
    for key in sorted(groups, key=method_sort_key):
        ordered[key] = sorted(groups[key], key=lambda r: (r.seed is None, r.seed, str(r.path)))
    return ordered


def group_label(key: tuple, with_dataset: bool = False) -> str:
    dataset, modality, fusion, modulation = key
    label = (
        f"{modality} alone"
        if modality != "both"
        else (f"{modulation} ({fusion})" if fusion != "concat" else modulation)
    )
    return f"{dataset}: {label}" if with_dataset else label


def read_predictions(path: str | Path) -> tuple[list[str], list[str]]:
    """(true labels, fused predictions) as class names, from an inference predictions.csv."""
    labels, preds = [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            labels.append(row["label"])
            preds.append(row["pred"])
    return labels, preds


def confusion_matrix(labels: list[str], preds: list[str], class_names: list[str]) -> np.ndarray:
    """Counts (K, K): rows = true class, columns = predicted class."""
    index = {c: i for i, c in enumerate(class_names)}
    m = np.zeros((len(class_names), len(class_names)), dtype=np.int64)
    for y, p in zip(labels, preds):
        m[index[y], index[p]] += 1
    return m
