"""The protocol's runs: what defines each one, the train.py options that make it, and its state.

A run is defined by the train.py options the sweep gives it (`RunSpec.options`). When train.py
exits, the sweep writes `sweep_run.json` in the run folder with the exit status, the duration
and those options. A run is

  done      its record says exit 0, records exactly the options it would get now, its
            config.json agrees, and the files later phases read are there and readable
            (metrics.jsonl with a validation accuracy; for a test run also best.pt and
            test_metrics.json);
  diverged  its record says train.py stopped on a non-finite loss or weights (exit 3) with
            the options it would get now: a result of that grid point, not retried;
  resume    not finished, but its config.json agrees and it has a last.pt;
  start     anything else: started afresh (--overwrite).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..analysis.runs import read_jsonl
from ..errors import UserError
from ..fileio import read_json_object
from .grid import Grid

DONE_FILE = "sweep_run.json"  # written by the sweep once train.py has exited
DIVERGED_EXIT = 3  # train.py's exit status for a stop on a non-finite loss, gradient or weights
MAX_NAME = 120  # longer run folder names are cut and end in a hash (a file name may not exceed 255 bytes)


@dataclass(frozen=True)
class RunSpec:
    """One training run of the protocol."""

    phase: str  # "tune" or "test"
    method: str  # the --modulation value, or "<modality> alone"
    seed: int
    run_dir: Path
    options: dict[str, Any]  # every train.py option the sweep gives (without output_dir, run_name, device)
    point: dict[str, Any] = field(default_factory=dict)  # the grid values (empty for references)
    point_index: int | None = None

    @property
    def is_reference(self) -> bool:
        return self.options.get("modality", "both") != "both"

    @property
    def name(self) -> str:
        """Unique within the protocol: methods share point names, phases share nothing."""
        return str(self.run_dir.relative_to(self.run_dir.parents[1 if self.phase == "test" else 2]))

    def train_argv(self) -> list[str]:
        """train.py's options that start this run from scratch (the device is added at launch)."""
        return ["--output_dir", str(self.run_dir.parent), "--run_name", self.run_dir.name, *option_args(self.options)]


@functools.lru_cache(maxsize=1)
def _train_parser() -> argparse.ArgumentParser:
    from ..config import get_args_parser  # imports torch: only when a command line is written

    return get_args_parser()


def option_args(options: dict[str, Any]) -> list[str]:
    """{'lr': 0.01, 'eval_test': False} -> ['--lr', '0.01', '--no-eval_test'], in train.py's syntax.

    A boolean becomes what train.py's flag accepts: `--x` / `--no-x` for a flag with both
    forms, `--x` or nothing for a flag that can only be switched on (deterministic: false)."""
    actions = {a.dest: a for a in _train_parser()._actions if a.option_strings}
    args: list[str] = []
    for key, value in options.items():
        action = actions.get(key)
        if isinstance(value, bool) and isinstance(action, argparse.BooleanOptionalAction):
            args.append(f"--{key}" if value else f"--no-{key}")
        elif isinstance(value, bool) and isinstance(action, argparse._StoreTrueAction):
            args += [f"--{key}"] if value else []
        elif isinstance(value, list):
            args += [f"--{key}", *map(str, value)]
        elif value is not None:
            args += [f"--{key}", str(value)]
    return args


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(value)).strip("-")


def point_name(point: dict[str, Any]) -> str:
    return "_".join(f"{k}{_slug(v)}" for k, v in point.items())


def folder_name(name: str) -> str:
    """`name`, or its first characters and a hash of the whole when it is too long for a file name."""
    if len(name) <= MAX_NAME:
        return name
    return f"{name[: MAX_NAME - 13]}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"


def tuning_runs(grid: Grid, out: Path) -> list[RunSpec]:
    specs = []
    for method in grid.methods.values():
        for index, point in enumerate(method.points()):
            for seed in grid.tuning_seeds:
                options = {**grid.common, "modulation": method.name, **point, "seed": seed, "eval_test": False}
                run_dir = out / "tune" / method.name / folder_name(f"p{index}_{point_name(point)}_seed{seed}")
                specs.append(RunSpec("tune", method.name, seed, run_dir, options, point, index))
    return specs


def test_runs(grid: Grid, selection: dict[str, dict], out: Path) -> list[RunSpec]:
    """The selected point of every method, and every reference, once per test seed."""
    specs = []
    for method in grid.methods.values():
        chosen = selection[method.name]
        for seed in grid.test_seeds:
            options = {**grid.common, "modulation": method.name, **chosen["point"], "seed": seed, "eval_test": True}
            specs.append(
                RunSpec(
                    "test",
                    method.name,
                    seed,
                    out / "test" / f"{method.name}_seed{seed}",
                    options,
                    chosen["point"],
                    chosen["index"],
                )
            )
    for modality in grid.references:
        for seed in grid.test_seeds:
            options = {**grid.common, "modality": modality, "seed": seed, "eval_test": True}
            specs.append(
                RunSpec("test", f"{modality} alone", seed, out / "test" / f"{modality}-alone_seed{seed}", options)
            )
    return specs


def check_run_options(grid: Grid) -> None:
    """Parse and validate every distinct run's options with train.py's own parser and checks,
    so a bad value (unknown option, lr -1, a method train.py lacks) stops the protocol before
    its first run rather than when that run starts."""
    from ..config import resolve_config

    known = {a.dest for a in _train_parser()._actions if a.option_strings}
    given = {*grid.common, *(k for m in grid.methods.values() for k in m.grid)}
    unknown = sorted(given - known)  # exact names: argparse would take '--epoch' for '--epochs'
    if unknown:
        raise UserError(f"{grid.path}: not train.py options: {', '.join(unknown)}")
    first = grid.tuning_seeds[0]
    candidates = [
        {**grid.common, "modulation": m.name, **p, "seed": first} for m in grid.methods.values() for p in m.points()
    ]
    candidates += [{**grid.common, "modality": m, "seed": first} for m in grid.references]
    for options in candidates:
        try:
            cfg = resolve_config(option_args(options))
        except UserError as e:
            what = ", ".join(f"{k} {v}" for k, v in options.items() if k not in grid.common and k != "seed")
            raise UserError(f"{grid.path} ({what}): {e}") from None
        if cfg.modality != "both":
            from ..data import get_dataset_entry

            names = get_dataset_entry(cfg.dataset).info(cfg).modality_names
            if cfg.modality not in names:
                raise UserError(
                    f"{grid.path}: references: {cfg.modality} is not a modality of {cfg.dataset} ({', '.join(names)})"
                )


def same_value(a: Any, b: Any) -> bool:
    """Equal as train.py would read them: 1e-4 == '0.0001', 5 == 5.0, 'official' == 'official'."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or str(a) == str(b)
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    except (TypeError, ValueError):
        return str(a) == str(b)


def same_options(a: Any, b: dict[str, Any]) -> bool:
    """The same options, each with the same value: no option more, none less."""
    return isinstance(a, dict) and set(a) == set(b) and all(same_value(a[k], b[k]) for k in b)


def config_matches(run_dir: Path, options: dict[str, Any]) -> bool:
    """Whether the run's config.json has every option the sweep gives it."""
    config = read_json_object(run_dir / "config.json")
    return config is not None and all(k in config and same_value(config[k], v) for k, v in options.items())


def best_val_acc(run_dir: Path) -> float | None:
    """The best validation accuracy of a run (its best.pt's epoch), from metrics.jsonl."""
    values = [e["val_acc"] for e in read_jsonl(run_dir / "metrics.jsonl") if e.get("val_acc") is not None]
    return max(values) if values else None


def missing_outputs(spec: RunSpec) -> list[str]:
    """What a later phase reads from this finished run and cannot find."""
    missing = [] if best_val_acc(spec.run_dir) is not None else ["metrics.jsonl (no validation accuracy)"]
    if spec.phase == "test":
        missing += [] if (spec.run_dir / "best.pt").is_file() else ["best.pt"]
        missing += [] if read_json_object(spec.run_dir / "test_metrics.json") else ["test_metrics.json"]
    return missing


def run_state(spec: RunSpec) -> str:
    """'done', 'diverged', 'resume' or 'start' (see the module's docstring)."""
    record = read_json_object(spec.run_dir / DONE_FILE)
    matches = config_matches(spec.run_dir, spec.options)
    defined = record is not None and matches and same_options(record.get("options"), spec.options)
    if defined and record.get("returncode") == DIVERGED_EXIT:
        return "diverged"
    if defined and record.get("returncode") == 0 and not missing_outputs(spec):
        return "done"
    if record is None and matches and (spec.run_dir / "last.pt").is_file():
        return "resume"
    return "start"


def run_seconds(spec: RunSpec) -> float | None:
    """How long the run took to train, as recorded when it finished (None while unfinished)."""
    record = read_json_object(spec.run_dir / DONE_FILE)
    return record.get("seconds") if record else None
