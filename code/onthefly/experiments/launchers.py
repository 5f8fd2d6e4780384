"""Where the protocol's processes run: on this machine, or as cluster jobs through submitit.

A launcher runs a list of `Job`s (one command each: a train.py run, or a probe.py process)
and calls `settle(job, returncode, seconds)` as each ends; `settle` says whether the job's
outcome is final (a success or a recorded divergence) or a failure to report.

  LocalLauncher     child processes on this machine, at most one per slot; a slot is a device
                    ('cpu', 'cuda:0', ...), so the runs spread over the GPUs.
  SubmititLauncher  one submitit job per command (a SLURM array when submitted together); a
                    preempted or timed-out training job is requeued and continues from its
                    last.pt (`TrainCommand.checkpoint`).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from ..errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[3]


@dataclass
class Job:
    """One process to run: a training run (`spec`) or the probes of some runs (`targets`)."""

    name: str
    argv: list[str]  # the full command without --device
    log: Path
    spec: Any = None  # the RunSpec of a training job
    kind: str = "train"  # "train" or "probe"
    targets: list = field(default_factory=list)
    resume_argv: list[str] | None = None  # the command that continues the run from its last.pt

    def command(self, device: str) -> list[str]:
        return [*self.argv, "--device", device]


# settle(job, returncode, seconds) -> True when the outcome is final, False for a failure.
Settle = Callable[[Job, int, float], bool]


def thread_env() -> dict[str, str]:
    """What a child needs beyond its environment: one thread per child (several share the CPU
    cores; on GPU the work is on the device) and this repository's package importable."""
    code = str(REPO_ROOT / "code")
    path = os.environ.get("PYTHONPATH")
    return {
        "PYTHONPATH": code + (os.pathsep + path if path else ""),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
    }


def child_env() -> dict[str, str]:
    return {**os.environ, **thread_env()}


def check_device(device: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise UserError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
    return device


def device_slots(device: str, jobs: int | None, per_device: int) -> list[str]:
    """The device of each of the concurrent slots: 'cpu' x jobs, or cuda:i round robin."""
    check_device(device)
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


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


class Progress:
    """done/total, running, and an ETA from the durations of finished runs.

    `later`: runs of later phases still to train, included in a second ETA for the protocol.
    """

    def __init__(
        self, phase: str, total: int, done: int, durations: list[float], slots: int, later: int = 0, stream=None
    ) -> None:
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
            text += (
                f", ETA {minutes(self._seconds_for(left))} ({minutes(mean)} per run over "
                f"{len(self.durations)} finished)"
            )
            if self.later:
                text += (
                    f"; with the {self.later} runs of the test phase: {minutes(self._seconds_for(left + self.later))}"
                )
        return text

    def show(self) -> None:
        print(self.line(), file=self.stream, flush=True)

    def started(self) -> None:
        with self.lock:
            self.running += 1

    def ended(self, ok: bool, seconds: float) -> None:
        with self.lock:
            self.running -= 1
            if ok:
                self.done += 1
                self.durations.append(seconds)
            else:
                self.failed += 1


def run_logged(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start `argv` with its output appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n$ {shlex.join(argv)}\n")
        f.flush()
        return subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO_ROOT)


class SubprocessSpawn:
    """Runs a job's command as a child process and waits for it; `stop_all` ends every child."""

    def __init__(self) -> None:
        self._live: set[subprocess.Popen] = set()
        self._lock = threading.Lock()

    def __call__(self, job: Job, argv: list[str], env: dict[str, str]) -> int:
        proc = run_logged(argv, job.log, env)
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


class LocalLauncher:
    """Jobs as child processes, len(slots) at a time, each on its slot's device.

    `spawn(job, argv, env) -> exit status` runs one command (tests pass a fake)."""

    def __init__(
        self,
        slots: list[str],
        spawn: Callable[[Job, list[str], dict[str, str]], int] | None = None,
        report_every: float = 60.0,
    ) -> None:
        self.slots, self.spawn, self.report_every = list(slots), spawn or SubprocessSpawn(), report_every

    @property
    def width(self) -> int:
        return len(self.slots)

    def run(self, jobs: list[Job], progress: Progress, settle: Settle) -> list[Job]:
        """Run the jobs; return those whose outcome `settle` did not accept."""
        free = list(self.slots)
        lock = threading.Lock()
        failed: list[Job] = []

        def work(job: Job) -> None:
            with lock:
                device = free.pop()
            progress.started()
            started = time.time()
            try:
                rc = self.spawn(job, job.command(device), child_env())
            finally:
                with lock:
                    free.append(device)
            seconds = time.time() - started
            ok = settle(job, rc, seconds)
            progress.ended(ok, seconds)
            if not ok:
                failed.append(job)

        progress.show()
        if not jobs:
            return failed
        with ThreadPoolExecutor(max_workers=len(self.slots)) as pool:
            pending = {pool.submit(work, job) for job in jobs}
            try:
                while pending:
                    finished, pending = wait(pending, timeout=self.report_every, return_when=FIRST_COMPLETED)
                    for f in finished:
                        f.result()
                    progress.show()
            except BaseException:
                for f in pending:
                    f.cancel()
                stop = getattr(self.spawn, "stop_all", None)
                if stop is not None:
                    stop()
                raise
        return failed


def under_torchrun(argv: list[str], gpus: int) -> list[str]:
    """[python, script, ...] on more than one GPU: the script under torchrun, one process per GPU."""
    if gpus <= 1:
        return argv
    return [argv[0], "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", *argv[1:]]


def _stop(pid: int, grace: float = 120.0) -> None:
    """SIGTERM `pid` (train.py then ends cleanly, its last.pt intact), SIGKILL after `grace` seconds.

    Called from submitit's signal handler, which interrupts Popen.wait(): that call holds the
    Popen's wait lock, so the child is reaped here with os.waitpid directly."""
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.time() + grace
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.time() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return
            time.sleep(0.1)
    except (ProcessLookupError, ChildProcessError):  # already ended and reaped
        return


class TrainCommand(submitit.helpers.Checkpointable):
    """The body of one submitit job: run a command, return its exit status.

    On preemption or timeout submitit calls `checkpoint` (SLURM's signal, or
    `job._interrupt()` locally): the command is stopped (train.py keeps the end of its last
    epoch in last.pt) and the job is requeued with the command that resumes from last.pt,
    or the original command when no epoch was completed."""

    def __init__(
        self, argv: list[str], log: Path, resume_argv: list[str] | None = None, last: Path | None = None
    ) -> None:
        self.argv, self.log, self.resume_argv, self.last = argv, log, resume_argv, last
        self._proc: subprocess.Popen | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_proc": None}

    def __call__(self) -> int:
        # The job's own environment (SLURM sets the visible GPUs there), plus one thread per process.
        self._proc = run_logged(self.argv, self.log, child_env())
        return self._proc.wait()

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        if self._proc is not None:
            _stop(self._proc.pid)
        resumable = self.resume_argv is not None and self.last is not None and self.last.is_file()
        argv = self.resume_argv if resumable else self.argv
        if self.resume_argv is not None and not resumable and "--overwrite" not in argv:
            argv = [*argv, "--overwrite"]  # stopped in its first epoch: the folder holds only this run's files
        with open(self.log, "a") as f:
            f.write(f"\n# preempted or timed out: requeued{', resuming from ' + str(self.last) if resumable else ''}\n")
        return submitit.helpers.DelayedSubmission(TrainCommand(argv, self.log, self.resume_argv, self.last))


class SubmititLauncher:
    """Every job as a submitit job: SLURM (`cluster='slurm'`, submitted together as an array)
    or this machine (`cluster='local'`, for tests). `parameters` go to
    AutoExecutor.update_parameters (e.g. slurm_partition, gpus_per_node, timeout_min)."""

    def __init__(
        self,
        folder: Path,
        cluster: str,
        device: str,
        parameters: dict[str, Any],
        width: int,
        gpus_per_run: int = 1,
        poll_every: float = 5.0,
        report_every: float = 60.0,
    ) -> None:
        self.folder, self.cluster, self.device, self.parameters = Path(folder), cluster, device, parameters
        self.width, self.gpus_per_run, self.poll_every, self.report_every = (
            width,
            gpus_per_run,
            poll_every,
            report_every,
        )

    def _command(self, argv: list[str]) -> list[str]:
        return under_torchrun(argv, self.gpus_per_run)

    def _body(self, job: Job) -> TrainCommand:
        argv = self._command([*job.argv, "--device", self.device])
        if job.resume_argv is None or job.kind != "train":
            return TrainCommand(argv, job.log)
        resume = self._command([*job.resume_argv, "--device", self.device])
        return TrainCommand(argv, job.log, resume, job.spec.run_dir / "last.pt")

    def run(self, jobs: list[Job], progress: Progress, settle: Settle) -> list[Job]:
        progress.show()
        if not jobs:
            return []
        executor = submitit.AutoExecutor(folder=self.folder, cluster=self.cluster)
        executor.update_parameters(**self.parameters)
        with executor.batch():
            submitted = [executor.submit(self._body(job)) for job in jobs]
        started = time.time()
        pending = dict(zip(submitted, jobs))
        failed: list[Job] = []
        progress.running = len(jobs)
        shown = time.time()
        try:
            while pending:
                for handle in [h for h in pending if h.done()]:
                    job = pending.pop(handle)
                    rc = self._returncode(handle, job)
                    seconds = time.time() - started
                    ok = settle(job, rc, seconds)
                    progress.ended(ok, seconds)
                    if not ok:
                        failed.append(job)
                    progress.show()
                    shown = time.time()
                if pending:
                    time.sleep(self.poll_every)
                    if time.time() - shown >= self.report_every:
                        progress.show()
                        shown = time.time()
        except BaseException:
            for handle in pending:
                handle.cancel(check=False)
            raise
        return failed

    @staticmethod
    def _returncode(handle: Any, job: Job) -> int:
        """The command's exit status, or 1 when the job itself failed (killed, out of time)."""
        try:
            return int(handle.result())
        except Exception as e:  # submitit's report of a job that did not return: write it to the run's log
            job.log.parent.mkdir(parents=True, exist_ok=True)
            with open(job.log, "a") as f:
                f.write(f"\n# submitit job {handle.job_id} failed: {str(e).splitlines()[0] if str(e) else e!r}\n")
            return 1
