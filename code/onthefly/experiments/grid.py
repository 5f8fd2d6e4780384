"""The grid file (YAML): the train.py options every run shares, per method a grid of options,
the tuning and test seeds, the modalities trained alone as references, and the contrasts: pairs
of methods compared with each other as every method is compared with the baseline.

`load_grid` reads and checks the file's structure; `with_overrides` applies sweep.py's `--set`
and `--methods`. Whether every run's options are valid train.py options is checked by
`spec.check_run_options`, before the first run starts.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from ..yamlio import load_yaml

GRID_KEYS = ("common", "tuning_seeds", "test_seeds", "references", "methods", "contrasts")
# Options the sweep sets itself for every run: a grid file may not set them. print_config would
# make every run print its options and exit 0 without training.
RESERVED_OPTIONS = (
    "seed",
    "modulation",
    "modality",
    "output_dir",
    "run_name",
    "resume",
    "overwrite",
    "device",
    "eval_test",
    "print_config",
)
OPTION_NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class MethodGrid:
    name: str  # the --modulation value
    grid: dict[str, list]
    sensitivity: dict[str, str] | None = None  # {"x": option, "lines": option}

    def points(self) -> list[dict[str, Any]]:
        """The grid's points in the written order (the first option varies slowest)."""
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]


@dataclass(frozen=True)
class Grid:
    path: Path
    common: dict[str, Any]
    tuning_seeds: list[int]
    test_seeds: list[int]
    references: list[str]
    methods: dict[str, MethodGrid]
    contrasts: tuple[tuple[str, str], ...] = ()  # (method, than): method - than, paired by test seed


def _check(ok: bool, path: Path, message: str) -> None:
    if not ok:
        raise UserError(f"{path}: {message}")


def _seed_list(raw: dict, key: str, path: Path) -> list[int]:
    seeds = raw.get(key)
    _check(
        isinstance(seeds, list)
        and len(seeds) > 0
        and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds),
        path,
        f"'{key}' must be a non-empty list of integers",
    )
    _check(len(set(seeds)) == len(seeds), path, f"'{key}' lists a seed twice")
    return list(seeds)


def check_option_names(options: dict, where: str) -> None:
    """Refuse options the sweep sets itself and keys that are not option names (e.g. 'Epochs')."""
    reserved = sorted(set(options) & set(RESERVED_OPTIONS))
    if reserved:
        raise UserError(f"{where}: {', '.join(reserved)} are set by the sweep itself; remove them")
    bad = [str(k) for k in options if not OPTION_NAME.fullmatch(str(k))]
    if bad:
        raise UserError(f"{where}: not option names (lower case, as train.py spells them): {', '.join(bad)}")


def _method(name: str, spec: Any, common: dict, path: Path) -> MethodGrid:
    _check(
        isinstance(spec, dict) and isinstance(spec.get("grid"), dict) and spec["grid"],
        path,
        f"methods.{name}: needs a non-empty 'grid' mapping of option: [values]",
    )
    extra = sorted(set(spec) - {"grid", "sensitivity"})
    _check(not extra, path, f"methods.{name}: unknown key(s): {', '.join(extra)}")
    grid = spec["grid"]
    check_option_names(grid, f"{path}: methods.{name}.grid")
    for key, values in grid.items():
        _check(
            isinstance(values, list) and values and len(values) == len({json.dumps(v) for v in values}),
            path,
            f"methods.{name}.grid.{key}: must be a non-empty list of distinct values",
        )
    clash = sorted(set(grid) & set(common))
    _check(not clash, path, f"methods.{name}.grid: {', '.join(clash)} also in common; set each option in one place")
    sens = spec.get("sensitivity")
    if sens is not None:
        _check(
            isinstance(sens, dict) and "x" in sens and set(sens) <= {"x", "lines"} and set(sens.values()) <= set(grid),
            path,
            f"methods.{name}.sensitivity: must be {{x: <grid option>}} or {{x: <grid option>, lines: <grid option>}}",
        )
    return MethodGrid(str(name), {k: list(v) for k, v in grid.items()}, sens)


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file; every problem is a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--grid: no such file: {path}")
    try:
        raw = load_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"--grid {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    _check(isinstance(raw, dict), path, f"expected a mapping with {', '.join(GRID_KEYS)}")
    unknown = sorted(set(raw) - set(GRID_KEYS))
    _check(not unknown, path, f"unknown key(s): {', '.join(map(str, unknown))}")
    common = raw.get("common") or {}
    _check(isinstance(common, dict), path, "'common' must be a mapping of train.py option: value")
    check_option_names(common, f"{path}: common")
    tuning, test = _seed_list(raw, "tuning_seeds", path), _seed_list(raw, "test_seeds", path)
    shared = sorted(set(tuning) & set(test))
    _check(not shared, path, f"test seeds must be fresh: {', '.join(map(str, shared))} also tune")
    references = raw.get("references") or []
    _check(
        isinstance(references, list) and all(isinstance(m, str) for m in references),
        path,
        "'references' must be a list of modality names",
    )
    twice = sorted({m for m in references if references.count(m) > 1})
    _check(not twice, path, f"'references' lists {', '.join(twice)} twice")
    methods_raw = raw.get("methods")
    _check(
        isinstance(methods_raw, dict) and len(methods_raw) > 0, path, "'methods' must map --modulation values to grids"
    )
    methods = {str(name): _method(name, spec, common, path) for name, spec in methods_raw.items()}
    sizes = {m.name: len(m.points()) for m in methods.values()}
    _check(
        len(set(sizes.values())) == 1,
        path,
        "every method needs the same budget (number of grid points); got "
        + ", ".join(f"{k} {v}" for k, v in sizes.items()),
    )
    return Grid(path, dict(common), tuning, test, list(references), methods, _contrasts(raw, methods, path))


def _contrasts(raw: dict, methods: dict[str, MethodGrid], path: Path) -> tuple[tuple[str, str], ...]:
    """`contrasts: [[OPM, DROPOUT_UNIFORM], ...]`: each a pair of distinct methods of the file, once."""
    pairs = raw.get("contrasts") or []
    _check(isinstance(pairs, list), path, "'contrasts' must be a list of [method, method] pairs")
    out: list[tuple[str, str]] = []
    for pair in pairs:
        _check(
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(m, str) for m in pair) and pair[0] != pair[1],
            path,
            f"contrasts: {pair!r} is not a pair of two different method names",
        )
        unknown = [m for m in pair if m not in methods]
        _check(not unknown, path, f"contrasts: {', '.join(unknown)} not under 'methods'")
        _check(tuple(pair) not in out and tuple(pair[::-1]) not in out, path, f"contrasts: {pair} listed twice")
        out.append((pair[0], pair[1]))
    return tuple(out)


def parse_set(item: str) -> tuple[str, Any]:
    """'epochs=1' -> ('epochs', 1): the value read as YAML, as in a grid file."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise UserError(f"--set {item}: expected OPTION=VALUE")
    try:
        value = load_yaml(text)
    except yaml.YAMLError as e:
        raise UserError(f"--set {item}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
    check_option_names({key: value}, "--set")
    return key, value


def with_overrides(grid: Grid, sets: list[str], methods: list[str] | None) -> Grid:
    """The grid with sweep.py's `--set OPTION=VALUE` in its common options and only `--methods`."""
    common = dict(grid.common)
    common.update(parse_set(item) for item in sets)
    chosen = grid.methods
    if methods:
        unknown = sorted(set(methods) - set(grid.methods))
        if unknown:
            raise UserError(f"--methods: not in {grid.path}: {', '.join(unknown)}")
        chosen = {m: grid.methods[m] for m in grid.methods if m in methods}
    clash = sorted({k for m in chosen.values() for k in m.grid if k in common})
    if clash:
        raise UserError(f"--set: {', '.join(clash)} is a grid option of a method; it cannot be fixed")
    contrasts = tuple(pair for pair in grid.contrasts if set(pair) <= set(chosen))  # of the methods run
    return Grid(grid.path, common, grid.tuning_seeds, grid.test_seeds, grid.references, chosen, contrasts)
