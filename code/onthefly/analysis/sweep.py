"""The benchmark protocol: tune every method on validation, test the chosen setting on fresh seeds.

A grid file (YAML, e.g. configs/benchmark_avdigits.yaml) declares the train.py options common
to every run, per method (a --modulation value) a grid of options, the tuning seeds, the test
seeds and the modalities trained alone as references. The protocol, in four phases:

  1. tuning   every grid point x every tuning seed, trained with --no-eval_test: the test
              split is never evaluated, so nothing chosen below can have seen it.
  2. test     per method the selected point (below), and each reference (--modality m),
              trained once per test seed; each run evaluates its best.pt on test as usual.
  3. probes   a linear probe of every encoder of the test-phase runs (analysis/probe.py).
  4. report   report.md, results.csv and figures (analysis/benchmark_report.py).

Selection: a point's score is the mean over the tuning seeds of each run's best validation
accuracy (the epoch its best.pt comes from); the point with the highest score wins, and of
points with equal scores (rounded to 1e-9) the one written first in the grid.

Every run is an independent process of code/train.py; several run at once (--jobs). A run is
finished when its folder holds `sweep_run.json` (written after train.py exited with 0) and its
config.json agrees with the options the sweep would give it now; a finished run is skipped, an
unfinished one with a matching last.pt is resumed from it, anything else is started afresh.
So an interrupted protocol, run again, redoes nothing that was finished.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from ..checkpoint import atomic_write_text
from ..errors import UserError
from .runs import _read_json, _read_jsonl

REPO_ROOT = Path(__file__).resolve().parents[3]
TRAIN_SCRIPT = REPO_ROOT / "code" / "train.py"
PROBE_SCRIPT = REPO_ROOT / "code" / "probe.py"
DONE_FILE = "sweep_run.json"  # written by the sweep once train.py has exited with status 0
TIE_DECIMALS = 9  # scores equal to 9 decimals are ties (means of accuracies differ by rounding only)
# Options the sweep sets itself for every run: a grid file may not set them.
RESERVED_OPTIONS = ("seed", "modulation", "modality", "output_dir", "run_name", "resume", "overwrite", "device", "eval_test")


# --------------------------------------------------------------------------- the grid file


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


def _check(ok: bool, path: Path, message: str) -> None:
    if not ok:
        raise UserError(f"{path}: {message}")


def _seed_list(raw: dict, key: str, path: Path) -> list[int]:
    seeds = raw.get(key)
    _check(isinstance(seeds, list) and len(seeds) > 0 and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds),
           path, f"'{key}' must be a non-empty list of integers")
    _check(len(set(seeds)) == len(seeds), path, f"'{key}' lists a seed twice")
    return list(seeds)


def _check_options(options: dict, path: Path, where: str) -> None:
    reserved = sorted(set(options) & set(RESERVED_OPTIONS))
    _check(not reserved, path, f"{where}: {', '.join(reserved)} are set by the sweep itself; remove them")
    bad = [k for k in options if not re.fullmatch(r"[a-z][a-z0-9_]*", str(k))]
    _check(not bad, path, f"{where}: not option names: {', '.join(map(str, bad))}")


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file; every problem is a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--grid: no such file: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"--grid {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    _check(isinstance(raw, dict), path, "expected a mapping with common, tuning_seeds, test_seeds, references, methods")
    unknown = sorted(set(raw) - {"common", "tuning_seeds", "test_seeds", "references", "methods"})
    _check(not unknown, path, f"unknown key(s): {', '.join(unknown)}")
    common = raw.get("common") or {}
    _check(isinstance(common, dict), path, "'common' must be a mapping of train.py option: value")
    _check_options(common, path, "common")
    tuning, test = _seed_list(raw, "tuning_seeds", path), _seed_list(raw, "test_seeds", path)
    shared = sorted(set(tuning) & set(test))
    _check(not shared, path, f"test seeds must be fresh: {', '.join(map(str, shared))} also tune")
    references = raw.get("references") or []
    _check(isinstance(references, list) and all(isinstance(m, str) for m in references), path,
           "'references' must be a list of modality names")
    methods_raw = raw.get("methods")
    _check(isinstance(methods_raw, dict) and len(methods_raw) > 0, path, "'methods' must map --modulation values to grids")
    methods = {}
    for name, spec in methods_raw.items():
        _check(isinstance(spec, dict) and isinstance(spec.get("grid"), dict) and spec["grid"], path,
               f"methods.{name}: needs a non-empty 'grid' mapping of option: [values]")
        extra = sorted(set(spec) - {"grid", "sensitivity"})
        _check(not extra, path, f"methods.{name}: unknown key(s): {', '.join(extra)}")
        grid = spec["grid"]
        _check_options(grid, path, f"methods.{name}.grid")
        for key, values in grid.items():
            _check(isinstance(values, list) and values and len(values) == len({json.dumps(v) for v in values}), path,
                   f"methods.{name}.grid.{key}: must be a non-empty list of distinct values")
        clash = sorted(set(grid) & set(common))
        _check(not clash, path, f"methods.{name}.grid: {', '.join(clash)} also in common; set each option in one place")
        sens = spec.get("sensitivity")
        if sens is not None:
            _check(isinstance(sens, dict) and "x" in sens and set(sens) <= {"x", "lines"} and set(sens.values()) <= set(grid),
                   path, f"methods.{name}.sensitivity: must be {{x: <grid option>}} or {{x: <grid option>, lines: <grid option>}}")
        methods[str(name)] = MethodGrid(str(name), {k: list(v) for k, v in grid.items()}, sens)
    sizes = {m.name: len(m.points()) for m in methods.values()}
    _check(len(set(sizes.values())) == 1, path,
           "every method needs the same budget (number of grid points); got " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    return Grid(path, dict(common), tuning, test, list(references), methods)


# --------------------------------------------------------------------------- runs


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

    def train_argv(self) -> list[str]:
        """train.py's options that start this run from scratch (the device is added at launch)."""
        return ["--output_dir", str(self.run_dir.parent), "--run_name", self.run_dir.name, *option_args(self.options)]


def option_args(options: dict[str, Any]) -> list[str]:
    """{'lr': 0.01, 'eval_test': False} -> ['--lr', '0.01', '--no-eval_test'] (train.py's syntax)."""
    args: list[str] = []
    for key, value in options.items():
        if isinstance(value, bool):
            args.append(f"--{key}" if value else f"--no-{key}")
        elif isinstance(value, list):
            args += [f"--{key}", *map(str, value)]
        elif value is not None:
            args += [f"--{key}", str(value)]
    return args


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(value)).strip("-")


def point_name(point: dict[str, Any]) -> str:
    return "_".join(f"{k}{_slug(v)}" for k, v in point.items())


def tuning_runs(grid: Grid, out: Path) -> list[RunSpec]:
    specs = []
    for method in grid.methods.values():
        for index, point in enumerate(method.points()):
            for seed in grid.tuning_seeds:
                options = {**grid.common, "modulation": method.name, **point, "seed": seed, "eval_test": False}
                run_dir = out / "tune" / method.name / f"p{index}_{point_name(point)}_seed{seed}"
                specs.append(RunSpec("tune", method.name, seed, run_dir, options, point, index))
    return specs


def test_runs(grid: Grid, selection: dict[str, dict], out: Path) -> list[RunSpec]:
    """The selected point of every method, and every reference, once per test seed."""
    specs = []
    for method in grid.methods.values():
        chosen = selection[method.name]
        for seed in grid.test_seeds:
            options = {**grid.common, "modulation": method.name, **chosen["point"], "seed": seed, "eval_test": True}
            specs.append(RunSpec("test", method.name, seed, out / "test" / f"{method.name}_seed{seed}", options,
                                 chosen["point"], chosen["index"]))
    for modality in grid.references:
        for seed in grid.test_seeds:
            options = {**grid.common, "modality": modality, "seed": seed, "eval_test": True}
            specs.append(RunSpec("test", f"{modality} alone", seed, out / "test" / f"{modality}-alone_seed{seed}", options))
    return specs


def same_value(a: Any, b: Any) -> bool:
    """Equal as train.py would read them: 1e-4 == '0.0001', 5 == 5.0, 'official' == 'official'."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or str(a) == str(b)
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    except (TypeError, ValueError):
        return str(a) == str(b)


def config_matches(run_dir: Path, options: dict[str, Any]) -> bool:
    """Whether the run's config.json has every option the sweep gives it."""
    config = _read_json(run_dir / "config.json")
    return config is not None and all(k in config and same_value(config[k], v) for k, v in options.items())


def run_state(spec: RunSpec) -> str:
    """'done', 'resume' (a matching last.pt) or 'start'."""
    done = _read_json(spec.run_dir / DONE_FILE)
    matches = config_matches(spec.run_dir, spec.options)
    if matches and done is not None and done.get("returncode") == 0:
        return "done"
    if matches and (spec.run_dir / "last.pt").is_file():
        return "resume"
    return "start"


# --------------------------------------------------------------------------- running processes


@dataclass
class Job:
    """One process to run: a training run (`spec`) or the probes of some runs (`targets`)."""

    name: str
    argv: list[str]  # the full command without --device
    log: Path
    spec: RunSpec | None = None
    kind: str = "train"  # "train" or "probe"
    targets: list[RunSpec] = field(default_factory=list)

    def command(self, device: str) -> list[str]:
        return [*self.argv, "--device", device]


# launcher(job, argv, env) -> exit status. The default runs a subprocess; tests pass a fake.
Launcher = Callable[[Job, list[str], dict[str, str]], int]


class SubprocessLauncher:
    """Runs each job as a child process, its output appended to the job's log file."""

    def __init__(self) -> None:
        self._live: set[subprocess.Popen] = set()
        self._lock = threading.Lock()

    def __call__(self, job: Job, argv: list[str], env: dict[str, str]) -> int:
        job.log.parent.mkdir(parents=True, exist_ok=True)
        with open(job.log, "a") as log:
            log.write(f"\n$ {shlex.join(argv)}\n")
            log.flush()
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
            with self._lock:
                self._live.add(proc)
            try:
                return proc.wait()
            finally:
                with self._lock:
                    self._live.discard(proc)

    def stop_all(self) -> None:
        """Terminate every child still running (on an interruption of the sweep)."""
        with self._lock:
            procs = list(self._live)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def child_env() -> dict[str, str]:
    """One thread per child (several share the CPU cores; on GPU the work is on the device); the package importable."""
    env = dict(os.environ)
    code = str(REPO_ROOT / "code")
    env["PYTHONPATH"] = code + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    return env


def device_slots(device: str, jobs: int | None, per_device: int) -> list[str]:
    """The device of each of the concurrent slots: 'cpu' x jobs, or cuda:i round robin."""
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return ["cpu"] * (jobs or cpus)
    if device == "cuda":
        import torch

        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise UserError("--device cuda: CUDA is not available on this machine")
        devices = [f"cuda:{i}" for i in range(gpus)]
    else:
        devices = [device]
    n = jobs or len(devices) * per_device
    return [devices[i % len(devices)] for i in range(n)]


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


class Progress:
    """done/total, running, and an ETA from the durations of finished runs.

    `later`: runs of later phases still to train, included in a second ETA for the protocol.
    """

    def __init__(self, phase: str, total: int, done: int, durations: list[float], slots: int, later: int = 0,
                 stream=None) -> None:
        self.phase, self.total, self.done, self.failed, self.running = phase, total, done, 0, 0
        self.durations, self.slots, self.later, self.stream = list(durations), slots, later, stream or sys.stdout
        self.lock = threading.Lock()

    def _seconds_for(self, runs: float) -> float:
        mean = sum(self.durations) / len(self.durations)
        return mean * max(0.0, runs) / self.slots

    def line(self) -> str:
        text = f"[{self.phase}] {self.done}/{self.total} done, {self.running} running"
        if self.failed:
            text += f", {self.failed} failed"
        if self.durations:
            left = self.total - self.done - self.failed - self.running / 2  # a running run is half done, on average
            mean = sum(self.durations) / len(self.durations)
            text += f", ETA {_minutes(self._seconds_for(left))} ({_minutes(mean)} per run over {len(self.durations)} finished)"
            if self.later:
                text += f"; with the {self.later} runs of the test phase: {_minutes(self._seconds_for(left + self.later))}"
        return text

    def show(self) -> None:
        print(self.line(), file=self.stream, flush=True)


def run_jobs(jobs: list[Job], slots: list[str], launcher: Launcher, progress: Progress,
             on_success: Callable[[Job, float], None] | None = None, report_every: float = 60.0) -> list[Job]:
    """Run the jobs, len(slots) at a time, each on its slot's device; return the failed ones."""
    free = list(slots)
    lock = threading.Lock()
    failed: list[Job] = []

    def work(job: Job) -> None:
        with lock:
            device = free.pop()
        with progress.lock:
            progress.running += 1
        started = time.time()
        try:
            rc = launcher(job, job.command(device), child_env())
        finally:
            with lock:
                free.append(device)
        seconds = time.time() - started
        if rc == 0 and on_success is not None:
            on_success(job, seconds)
        with progress.lock:
            progress.running -= 1
            if rc == 0:
                progress.done += 1
                progress.durations.append(seconds)
            else:
                progress.failed += 1
                failed.append(job)

    progress.show()
    if not jobs:
        return failed
    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        pending = {pool.submit(work, job) for job in jobs}
        try:
            while pending:
                finished, pending = wait(pending, timeout=report_every, return_when=FIRST_COMPLETED)
                for f in finished:
                    f.result()
                progress.show()
        except BaseException:
            for f in pending:
                f.cancel()
            stop = getattr(launcher, "stop_all", None)
            if stop is not None:
                stop()
            raise
    return failed


# --------------------------------------------------------------------------- the protocol


def best_val_acc(run_dir: Path) -> float | None:
    """The best validation accuracy of a run (its best.pt's epoch), from metrics.jsonl."""
    values = [e["val_acc"] for e in _read_jsonl(run_dir / "metrics.jsonl") if e.get("val_acc") is not None]
    return max(values) if values else None


def select_points(grid: Grid, specs: list[RunSpec]) -> dict[str, dict]:
    """Per method the grid point with the best mean (over tuning seeds) of the best validation accuracy.

    Ties (equal to TIE_DECIMALS decimals) go to the point written first in the grid. Only
    metrics.jsonl (validation) is read: tuning runs never evaluate the test split.
    """
    selection = {}
    for method in grid.methods.values():
        points = []
        for index, point in enumerate(method.points()):
            runs = [s for s in specs if s.method == method.name and s.point_index == index]
            per_seed = {s.seed: best_val_acc(s.run_dir) for s in runs}
            missing = sorted(seed for seed, v in per_seed.items() if v is None)
            if missing:
                raise UserError(f"{method.name} point {index} ({point_name(point)}): no validation metrics for "
                                f"tuning seed(s) {', '.join(map(str, missing))}; run the protocol again to finish them")
            score = sum(per_seed.values()) / len(per_seed)
            points.append({"index": index, "point": point, "val_acc": score, "per_seed": per_seed})
        best = max(points, key=lambda p: (round(p["val_acc"], TIE_DECIMALS), -p["index"]))
        selection[method.name] = {"index": best["index"], "point": best["point"], "val_acc": best["val_acc"], "points": points}
    return selection


def write_runs_csv(path: Path, specs: list[RunSpec], python: str) -> None:
    """Every run's phase, method, point, seed, folder, state, duration and command."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["phase", "method", "point_index", "point", "seed", "run_dir", "state", "seconds", "command"])
    for s in specs:
        done = _read_json(s.run_dir / DONE_FILE) or {}
        command = shlex.join([python, str(TRAIN_SCRIPT.relative_to(REPO_ROOT)), *s.train_argv()])
        writer.writerow([s.phase, s.method, "" if s.point_index is None else s.point_index, point_name(s.point), s.seed,
                         str(s.run_dir), run_state(s), done.get("seconds", ""), command])
    atomic_write_text(path, buf.getvalue())


# Checkpoints no later phase reads, removed once a run is done: a joint AV-Digits run writes
# about 250 MB of them, which over the protocol's 75 runs would fill a small disk.
UNUSED_CHECKPOINTS = {"tune": ("last.pt", "best.pt"), "test": ("last.pt",)}  # the probes read test runs' best.pt


def _mark_done(job: Job, seconds: float) -> None:
    assert job.spec is not None
    record = {"returncode": 0, "seconds": round(seconds, 2), "options": job.spec.options}
    atomic_write_text(job.spec.run_dir / DONE_FILE, json.dumps(record, indent=2))
    for name in UNUSED_CHECKPOINTS[job.spec.phase]:
        (job.spec.run_dir / name).unlink(missing_ok=True)


def training_jobs(specs: list[RunSpec], python: str, out: Path) -> list[Job]:
    """A job per unfinished run: resumed from its last.pt when that matches, else started afresh."""
    jobs = []
    for spec in specs:
        state = run_state(spec)
        if state == "done":
            continue
        (spec.run_dir / DONE_FILE).unlink(missing_ok=True)
        (spec.run_dir / "probe.json").unlink(missing_ok=True)  # a probe of an older model
        if state == "resume":
            args = ["--resume", str(spec.run_dir / "last.pt")]
        else:
            args = [*spec.train_argv(), "--overwrite"]
        log = out / "logs" / spec.phase / f"{spec.run_dir.name}.log"
        jobs.append(Job(spec.run_dir.name, [python, str(TRAIN_SCRIPT), *args], log, spec, "train"))
    return jobs


def probe_jobs(specs: list[RunSpec], grid: Grid, python: str, out: Path, processes: int) -> list[Job]:
    """Linear probes of the runs without probe.json, spread over `processes` probe.py processes.

    One process probes several runs in turn, so the start-up of Python and torch is paid once
    per process rather than once per run; probe.py skips a run whose probe.json exists.
    """
    limit = grid.common.get("limit_samples")
    extra = ["--limit_samples", str(limit)] if limit else []
    todo = [s for s in specs if not (s.run_dir / "probe.json").is_file()]
    chunks = [todo[i::processes] for i in range(min(processes, len(todo)))]
    return [
        Job(f"probes{i}", [python, str(PROBE_SCRIPT), "--skip_existing", *extra, "--checkpoint", *(str(s.run_dir) for s in chunk)],
            out / "logs" / "probe" / f"probes{i}.log", kind="probe", targets=chunk)
        for i, chunk in enumerate(chunks)
    ]


def _durations(specs: list[RunSpec]) -> list[float]:
    return [d["seconds"] for s in specs if (d := _read_json(s.run_dir / DONE_FILE)) and "seconds" in d]


def _run_phase(name: str, specs: list[RunSpec], known: list[RunSpec], python: str, out: Path, slots: list[str],
               launcher: Launcher, report_every: float, later: int = 0) -> None:
    """Run a phase's unfinished runs; `known` (every run so far) goes into runs.csv."""
    jobs = training_jobs(specs, python, out)
    progress = Progress(name, len(specs), len(specs) - len(jobs), _durations(specs), len(slots), later)
    failed = run_jobs(jobs, slots, launcher, progress, _mark_done, report_every)
    write_runs_csv(out / "runs.csv", known, python)
    if failed:
        logs = ", ".join(str(j.log) for j in failed[:5]) + (" ..." if len(failed) > 5 else "")
        raise RunsFailed(f"{name}: {len(failed)} run(s) failed; their logs: {logs}. Run the same command again to retry them.")


class RunsFailed(RuntimeError):
    """Some runs exited with an error (their logs are named); finished ones are kept."""


def run_protocol(grid: Grid, out: Path, slots: list[str], launcher: Launcher | None = None, python: str | None = None,
                 report: bool = True, report_every: float = 60.0) -> dict:
    """All four phases; returns the selection and the report's summary."""
    launcher = launcher or SubprocessLauncher()
    python = python or sys.executable
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)

    tune = tuning_runs(grid, out)
    print(f"phase 1: tuning, {len(grid.methods)} methods x {len(tune) // len(grid.methods) // len(grid.tuning_seeds)} "
          f"points x {len(grid.tuning_seeds)} seeds = {len(tune)} runs, {len(slots)} at a time", flush=True)
    # Test runs are named by method and seed, so the ones still to train are known before the selection.
    names = [*grid.methods, *(f"{m}-alone" for m in grid.references)]
    later = sum(not (out / "test" / f"{n}_seed{s}" / DONE_FILE).is_file() for n in names for s in grid.test_seeds)
    _run_phase("tuning", tune, tune, python, out, slots, launcher, report_every, later)
    selection = select_points(grid, tune)
    atomic_write_text(out / "selection.json", json.dumps(
        {"rule": "best mean over tuning seeds of each run's best validation accuracy; ties: the earlier grid point",
         "tuning_seeds": grid.tuning_seeds, "methods": selection}, indent=2))
    for name, chosen in selection.items():
        print(f"  selected {name}: {point_name(chosen['point'])} (validation {100 * chosen['val_acc']:.2f}%)", flush=True)

    test = test_runs(grid, selection, out)
    print(f"phase 2: test, {len(test)} runs on seeds {', '.join(map(str, grid.test_seeds))}", flush=True)
    _run_phase("test", test, tune + test, python, out, slots, launcher, report_every)

    probes = probe_jobs(test, grid, python, out, len(slots))
    todo = sum(len(j.targets) for j in probes)
    print(f"phase 3: linear probes of {todo} runs in {len(probes)} processes", flush=True)
    failed = run_jobs(probes, slots, launcher, Progress("probe processes", len(probes), 0, [], len(slots)),
                      report_every=report_every)
    if failed:
        raise RunsFailed(f"probes: {len(failed)} failed; their logs: {', '.join(str(j.log) for j in failed[:5])}")

    elapsed = time.time() - started
    result = {"selection": selection, "seconds": elapsed}
    if report:
        from .benchmark_report import write_benchmark_report

        print("phase 4: report", flush=True)
        result["report"] = write_benchmark_report(grid, selection, tune, test, out, elapsed, len(slots))
    total = time.time() - started
    print(f"protocol finished in {_minutes(total)} (this invocation; runs done earlier were skipped): {out / 'report.md'}",
          flush=True)
    result["seconds"] = total
    return result


# --------------------------------------------------------------------------- command line


def get_args_parser():
    from ..config import ArgumentParser

    p = ArgumentParser(prog="sweep.py", description="The benchmark protocol: tune on validation, test fresh seeds, "
                                                    "probe, report. Resumable: run it again after an interruption.")
    p.add_argument("--grid", default=str(REPO_ROOT / "configs" / "benchmark_avdigits.yaml"), help="the grid file (YAML)")
    p.add_argument("--out", default=str(REPO_ROOT / "checkpoints" / "benchmark_avdigits"), help="output folder")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at once (default: the number of CPUs on CPU; --per_device per GPU on CUDA)")
    p.add_argument("--per_device", type=int, default=1, help="concurrent runs per GPU when --jobs is not given")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (every GPU) or cuda:N")
    p.add_argument("--set", nargs="+", default=[], metavar="OPTION=VALUE",
                   help="override or add a common option of every run, e.g. --set epochs=1 limit_samples=128")
    p.add_argument("--methods", nargs="+", default=None, help="only these methods of the grid file (smoke tests)")
    return p


def _override(grid: Grid, sets: list[str], methods: list[str] | None) -> Grid:
    common = dict(grid.common)
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item}: expected OPTION=VALUE")
        if key in RESERVED_OPTIONS:
            raise UserError(f"--set {key}: set by the sweep itself")
        common[key] = yaml.safe_load(value)
    chosen = grid.methods
    if methods:
        unknown = sorted(set(methods) - set(grid.methods))
        if unknown:
            raise UserError(f"--methods: not in {grid.path}: {', '.join(unknown)}")
        chosen = {m: grid.methods[m] for m in grid.methods if m in methods}
    clash = sorted(k for m in chosen.values() for k in m.grid if k in common)
    if clash:
        raise UserError(f"--set: {', '.join(sorted(set(clash)))} is a grid option of a method; it cannot be fixed")
    return Grid(grid.path, common, grid.tuning_seeds, grid.test_seeds, grid.references, chosen)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # a SIGTERM stops the children as Ctrl-C does


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.jobs is not None and args.jobs < 1:
            raise UserError(f"--jobs must be >= 1 (got {args.jobs})")
        if args.per_device < 1:
            raise UserError(f"--per_device must be >= 1 (got {args.per_device})")
        grid = _override(load_grid(args.grid), args.set, args.methods)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out: not a directory: {out}")
        slots = device_slots(args.device, args.jobs, args.per_device)
        run_protocol(grid, out, slots)
        return 0
    except UserError as e:
        print(f"sweep.py: error: {e}", file=sys.stderr)
        return 2
    except RunsFailed as e:
        print(f"sweep.py: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sweep.py: interrupted; finished runs are kept, run the same command again to continue", file=sys.stderr)
        return 130
