"""The process pool that runs one job per clip (pebble.ProcessPool): a decoder that crashes its
worker, or runs past the per-clip time limit, fails only that clip's task; its worker is
replaced and the clip is reported as skipped. No worker outlives the run, even a SIGKILLed one."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, TimeoutError, wait
from typing import Any

from ...processes import pid_alive
from .common import ClipJob

# A clip's decoding normally takes a second or two; a hung decoder (a named pipe, a stalled
# network mount) is stopped after this many seconds (--clip_timeout).
DEFAULT_CLIP_TIMEOUT = 120.0


def _exit_with_parent(owner: int, parent: int) -> None:
    """Worker thread: end this process once the process that runs the pool (`owner`) or this
    worker's own parent (the fork server) is gone. A SIGKILL gives the pool no chance to stop its
    workers, and a live worker would also keep multiprocessing's resource tracker alive."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent or not pid_alive(owner):
            os._exit(1)


def _init_worker(owner: int | None = None) -> None:
    if owner is not None:
        threading.Thread(target=_exit_with_parent, args=(owner, os.getppid()), daemon=True).start()
    try:
        import cv2

        cv2.setNumThreads(1)
    except Exception:
        pass


def _mp_context():
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")  # workers fork from a clean, pre-warmed server
        ctx.set_forkserver_preload([f"{__package__}.warm"])
        return ctx
    return mp.get_context("spawn")


def _failure(job: ClipJob, error: BaseException, timeout: float | None) -> tuple[str, str, Any]:
    """The skip record of a task that did not return: a timeout or a worker that died."""
    if isinstance(error, TimeoutError):
        reason = f"decoding took longer than --clip_timeout {timeout:g} s (stopped)"
    else:
        code = getattr(error, "exitcode", None)
        how = (
            f"signal {signal.Signals(-code).name}"
            if isinstance(code, int) and code < 0 and -code in signal.valid_signals()
            else f"exit status {code}"
        )
        reason = f"decoder crashed the worker process ({how})"
    return job.clip_id, "skip", (reason, job.audio or job.video or "")


def run_jobs(
    fn: Callable[..., tuple[str, str, Any]],
    jobs: list[ClipJob],
    args: tuple,
    workers: int,
    progress: Callable[[], None] | None = None,
    timeout: float | None = DEFAULT_CLIP_TIMEOUT,
) -> Iterator[tuple[str, str, Any]]:
    """Run fn(job, *args) for every job and yield its result as it finishes.

    workers <= 0 runs in this process (no time limit: nothing can stop a hung call there).
    Otherwise a pebble pool of `workers` processes with at most 2 x workers tasks queued; a task
    whose worker dies or that runs past `timeout` seconds yields (clip_id, "skip", (reason, file)).
    """
    if workers <= 0:
        _init_worker()
        for job in jobs:
            yield fn(job, *args)
            if progress:
                progress()
        return
    from pebble import ProcessExpired, ProcessPool

    pool = ProcessPool(max_workers=workers, initializer=_init_worker, initargs=(os.getpid(),), context=_mp_context())
    todo = list(reversed(jobs))
    inflight: dict[Future, ClipJob] = {}
    try:
        while todo or inflight:
            while todo and len(inflight) < 2 * workers:
                job = todo.pop()
                inflight[pool.schedule(fn, args=(job, *args), timeout=timeout)] = job
            done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
            for fut in done:
                job = inflight.pop(fut)
                error = fut.exception()
                if error is not None and not isinstance(error, (TimeoutError, ProcessExpired)):
                    raise error  # a fault of fn itself (fn reports a bad file as a skip)
                yield _failure(job, error, timeout) if error is not None else fut.result()
                if progress:
                    progress()
        pool.close()
    finally:
        pool.stop()  # on an error or Ctrl-C: running workers are terminated, queued tasks dropped
        pool.join()
