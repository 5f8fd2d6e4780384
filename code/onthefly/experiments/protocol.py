"""The benchmark protocol: tune every method on validation, test the chosen setting on fresh seeds.

A grid file (grid.py) declares the train.py options common to every run, per method (a
--modulation value) a grid of options, the tuning seeds, the test seeds and the modalities
trained alone as references. The protocol, in four phases:

  1. tuning   every grid point x every tuning seed, trained with --no-eval_test: the test
              split is never evaluated, so nothing chosen below can have seen it.
  2. test     per method the selected point (below), and each reference (--modality m),
              trained once per test seed; each run evaluates its best.pt on test as usual.
  3. probes   a linear probe of every encoder of the test-phase runs (analysis/probe.py).
  4. report   report.md, results.csv and figures (analysis/benchmark_report.py).

Selection: a point's score is the mean over the tuning seeds of each run's best validation
accuracy (the epoch its best.pt comes from); the point with the highest score wins, and of
points with equal scores (rounded to 1e-9) the one written first in the grid. A point with a
diverged run (train.py stopped on non-finite values) is never selected.

Every run is an independent process of code/train.py, started by a launcher (launchers.py).
What counts as finished is spec.run_state's: an interrupted protocol, run again, redoes
nothing that was finished. One protocol at a time writes in an output folder (its .lock).
"""

from __future__ import annotations

import csv
import io
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..analysis.benchmark_report import write_benchmark_report
from ..errors import UserError
from ..fileio import atomic_write, atomic_write_text, read_json_object
from ..provenance import ENVIRONMENT_FILE, record_environment
from ..rundir import acquire_run_lock
from .grid import Grid
from .launchers import REPO_ROOT, Job, Progress, Settle, minutes
from .spec import (
    DIVERGED_EXIT,
    DONE_FILE,
    RunSpec,
    best_val_acc,
    check_run_options,
    point_name,
    run_seconds,
    run_state,
    test_runs,
    tuning_runs,
)
from .verify import verify

TIE_DECIMALS = 9  # scores equal to 9 decimals are ties (means of accuracies differ by rounding only)
SELECTION_RULE = "best mean over tuning seeds of each run's best validation accuracy; ties: the earlier grid point"
# Checkpoints no later phase reads, removed once a run is done: a joint AV-Digits run writes
# about 250 MB of them, which over the protocol's 75 runs would fill a small disk.
UNUSED_CHECKPOINTS = {"tune": ("last.pt", "best.pt"), "test": ("last.pt",)}  # the probes read test runs' best.pt


class Launcher(Protocol):
    width: int  # how many jobs run at once (for the ETA and the number of probe processes)

    def run(self, jobs: list[Job], progress: Progress, settle: Settle) -> list[Job]: ...


@dataclass(frozen=True)
class Programs:
    """The commands the protocol starts (tests substitute stand-ins)."""

    python: str = sys.executable
    train: Path = REPO_ROOT / "code" / "train.py"
    probe: Path = REPO_ROOT / "code" / "probe.py"


class RunsFailed(RuntimeError):
    """Some runs exited with an error (their logs are named); finished ones are kept."""


def select_points(grid: Grid, specs: list[RunSpec]) -> dict[str, dict]:
    """Per method the grid point with the best mean (over tuning seeds) of the best validation accuracy.

    Ties (equal to TIE_DECIMALS decimals) go to the point written first in the grid. Only
    metrics.jsonl (validation) is read: tuning runs never evaluate the test split. A point
    with a diverged run has no score.
    """
    selection = {}
    for method in grid.methods.values():
        points = []
        for index, point in enumerate(method.points()):
            runs = [s for s in specs if s.method == method.name and s.point_index == index]
            diverged = sorted(s.seed for s in runs if run_state(s) == "diverged")
            per_seed = {s.seed: best_val_acc(s.run_dir) for s in runs if s.seed not in diverged}
            missing = sorted(seed for seed, v in per_seed.items() if v is None)
            if missing:
                raise UserError(
                    f"{method.name} point {index} ({point_name(point)}): no validation metrics for "
                    f"tuning seed(s) {', '.join(map(str, missing))}; run the protocol again to finish them"
                )
            score = None if diverged else sum(per_seed.values()) / len(per_seed)
            points.append(
                {
                    "index": index,
                    "point": point,
                    "val_acc": score,
                    "per_seed": per_seed,
                    **({"diverged_seeds": diverged} if diverged else {}),
                }
            )
        scored = [p for p in points if p["val_acc"] is not None]
        if not scored:
            raise RunsFailed(
                f"{method.name}: every grid point diverged (train.py stopped on non-finite values); "
                "change its grid in the grid file"
            )
        best = max(scored, key=lambda p: (round(p["val_acc"], TIE_DECIMALS), -p["index"]))
        selection[method.name] = {
            "index": best["index"],
            "point": best["point"],
            "val_acc": best["val_acc"],
            "points": points,
        }
    return selection


def write_runs_csv(path: Path, specs: list[RunSpec], programs: Programs) -> None:
    """Every run's phase, method, point, seed, folder, state, duration and command."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["phase", "method", "point_index", "point", "seed", "run_dir", "state", "seconds", "command"])
    for s in specs:
        seconds = run_seconds(s)
        command = shlex.join([programs.python, str(programs.train.relative_to(REPO_ROOT)), *s.train_argv()])
        writer.writerow(
            [
                s.phase,
                s.method,
                "" if s.point_index is None else s.point_index,
                point_name(s.point),
                s.seed,
                str(s.run_dir),
                run_state(s),
                "" if seconds is None else seconds,
                command,
            ]
        )
    atomic_write_text(path, buf.getvalue())


def settle_training(job: Job, returncode: int, seconds: float) -> bool:
    """Record a finished (exit 0) or diverged (exit 3) run with the options that define it."""
    spec = job.spec
    if returncode not in (0, DIVERGED_EXIT):
        return False
    record = {"returncode": returncode, "seconds": round(seconds, 2), "options": spec.options}
    atomic_write_text(spec.run_dir / DONE_FILE, json.dumps(record, indent=2))
    if returncode == 0:
        for name in UNUSED_CHECKPOINTS[spec.phase]:
            (spec.run_dir / name).unlink(missing_ok=True)
    return True


def settle_probe(job: Job, returncode: int, seconds: float) -> bool:
    return returncode == 0


def training_jobs(specs: list[RunSpec], programs: Programs, out: Path) -> list[Job]:
    """A job per unfinished run: resumed from its last.pt when that matches, else started afresh."""
    jobs = []
    for spec in specs:
        state = run_state(spec)
        if state in ("done", "diverged"):
            continue
        (spec.run_dir / DONE_FILE).unlink(missing_ok=True)
        (spec.run_dir / "probe.json").unlink(missing_ok=True)  # a probe of an older model
        train = [programs.python, str(programs.train)]
        resume = [*train, "--resume", str(spec.run_dir / "last.pt")]
        argv = resume if state == "resume" else [*train, *spec.train_argv(), "--overwrite"]
        jobs.append(Job(spec.name, argv, out / "logs" / f"{spec.name}.log", spec, "train", resume_argv=resume))
    return jobs


def probe_jobs(specs: list[RunSpec], grid: Grid, programs: Programs, out: Path, processes: int) -> list[Job]:
    """Linear probes of the finished runs without a readable probe.json, over `processes` probe.py processes.

    One process probes several runs in turn, so the start-up of Python and torch is paid once
    per process rather than once per run; probe.py skips a run whose probe.json exists.
    """
    limit = grid.common.get("limit_samples")
    extra = ["--limit_samples", str(limit)] if limit else []
    todo = [s for s in specs if run_state(s) == "done" and read_json_object(s.run_dir / "probe.json") is None]
    for s in todo:
        (s.run_dir / "probe.json").unlink(missing_ok=True)  # unreadable: probe.py would skip it
    chunks = [todo[i::processes] for i in range(min(processes, len(todo)))]
    return [
        Job(
            f"probes{i}",
            [
                programs.python,
                str(programs.probe),
                "--skip_existing",
                *extra,
                "--checkpoint",
                *(str(s.run_dir) for s in chunk),
            ],
            out / "logs" / "probe" / f"probes{i}.log",
            kind="probe",
            targets=chunk,
        )
        for i, chunk in enumerate(chunks)
    ]


def _durations(specs: list[RunSpec]) -> list[float]:
    return [d for s in specs if (d := run_seconds(s)) is not None]


def _failure(name: str, failed: list[Job]) -> RunsFailed:
    logs = ", ".join(str(j.log) for j in failed[:5]) + (" ..." if len(failed) > 5 else "")
    return RunsFailed(
        f"{name}: {len(failed)} run(s) failed; their logs: {logs}. Run the same command again to retry them."
    )


def _run_phase(
    name: str,
    specs: list[RunSpec],
    known: list[RunSpec],
    programs: Programs,
    out: Path,
    launcher: Launcher,
    later: int = 0,
) -> None:
    """Run a phase's unfinished runs; `known` (every run so far) goes into runs.csv."""
    jobs = training_jobs(specs, programs, out)
    progress = Progress(name, len(specs), len(specs) - len(jobs), _durations(specs), launcher.width, later)
    failed = launcher.run(jobs, progress, settle_training)
    write_runs_csv(out / "runs.csv", known, programs)
    if failed:
        raise _failure(name, failed)
    unfinished = [s.name for s in specs if run_state(s) not in ("done", "diverged")]
    if unfinished:  # exit 0, yet not what a finished run leaves: never report it as one
        raise RunsFailed(
            f"{name}: {len(unfinished)} run(s) exited without their results ({', '.join(unfinished[:5])}); "
            f"their logs are in {out / 'logs'}"
        )


def run_protocol(
    grid: Grid,
    out: Path,
    launcher: Launcher,
    programs: Programs = Programs(),
    report: bool = True,
    publish: Path | None = None,
) -> dict:
    """All four phases, holding the output folder's lock; returns the selection and the report's summary.

    The environment (provenance: commit, library versions, CPU/GPU) goes to <out>/environment.json,
    once per invocation (a resumed protocol appends its own). `publish`: a folder the report's
    files are copied to as well.
    """
    check_run_options(grid)
    out.mkdir(parents=True, exist_ok=True)
    lock = acquire_run_lock(out, hint="choose another --out")
    try:
        record_environment(out / ENVIRONMENT_FILE, resumed=True)
        result = _phases(grid, out, launcher, programs, report)
        if report and publish is not None:
            publish_report(out, publish)
        return result
    finally:
        lock.release()


def run_verify(grid: Grid, out: Path, scratch: Path, launcher: Launcher, programs: Programs = Programs()) -> int:
    """sweep.py --verify (verify.py), holding the scratch folder's lock; returns the exit status."""
    check_run_options(grid)
    scratch.mkdir(parents=True, exist_ok=True)
    lock = acquire_run_lock(scratch, hint="choose another --verify_out")
    try:
        record_environment(scratch / ENVIRONMENT_FILE, resumed=True)
        return verify(grid, out, scratch, launcher, programs, _run_phase)
    finally:
        lock.release()


# What --publish copies next to the committed results: everything needed to recompute the report.
PUBLISHED = ("report.md", "results.csv", "per_seed.csv", "summary.json", "selection.json", ENVIRONMENT_FILE)


def publish_report(out: Path, dest: Path) -> list[Path]:
    """Copy the report's files and figures from `out` to `dest` (atomically, file by file)."""
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for source in [*(out / name for name in PUBLISHED), *sorted(out.glob("*.png"))]:
        if source.is_file():
            atomic_write(dest / source.name, lambda f, s=source: f.write(s.read_bytes()))
            copied.append(dest / source.name)
    print(f"published {len(copied)} files to {dest}", flush=True)
    return copied


def _phases(grid: Grid, out: Path, launcher: Launcher, programs: Programs, report: bool) -> dict:
    started = time.time()
    tune = tuning_runs(grid, out)
    print(
        f"phase 1: tuning, {len(grid.methods)} methods x {len(tune) // len(grid.methods) // len(grid.tuning_seeds)} "
        f"points x {len(grid.tuning_seeds)} seeds = {len(tune)} runs, {launcher.width} at a time",
        flush=True,
    )
    # Test runs are named by method and seed, so the ones still to train are known before the selection.
    names = [*grid.methods, *(f"{m}-alone" for m in grid.references)]
    later = sum(not (out / "test" / f"{n}_seed{s}" / DONE_FILE).is_file() for n in names for s in grid.test_seeds)
    _run_phase("tuning", tune, tune, programs, out, launcher, later)
    selection = select_points(grid, tune)
    atomic_write_text(
        out / "selection.json",
        json.dumps({"rule": SELECTION_RULE, "tuning_seeds": grid.tuning_seeds, "methods": selection}, indent=2),
    )
    for name, chosen in selection.items():
        print(
            f"  selected {name}: {point_name(chosen['point'])} (validation {100 * chosen['val_acc']:.2f}%)", flush=True
        )

    test = test_runs(grid, selection, out)
    print(f"phase 2: test, {len(test)} runs on seeds {', '.join(map(str, grid.test_seeds))}", flush=True)
    _run_phase("test", test, tune + test, programs, out, launcher)

    probes = probe_jobs(test, grid, programs, out, launcher.width)
    todo = sum(len(j.targets) for j in probes)
    print(f"phase 3: linear probes of {todo} runs in {len(probes)} processes", flush=True)
    failed = launcher.run(probes, Progress("probe processes", len(probes), 0, [], launcher.width), settle_probe)
    if failed:
        raise _failure("probes", failed)

    result = {"selection": selection, "seconds": time.time() - started}
    if report:
        print("phase 4: report", flush=True)
        result["report"] = write_benchmark_report(
            grid, selection, tune, test, out, time.time() - started, launcher.width
        )
    total = time.time() - started
    print(
        f"protocol finished in {minutes(total)} (this invocation; runs done earlier were skipped): {out / 'report.md'}",
        flush=True,
    )
    result["seconds"] = total
    return result
