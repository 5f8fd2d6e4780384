"""The process pool that runs one job per clip, survives a decoder crashing its worker, and
leaves no process behind when it is killed."""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import threading
import time
from typing import Any, Callable, Iterator

from ...errors import UserError
from .common import ClipJob


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    return True


def _exit_with_parent(owner: int, parent: int) -> None:
    """Worker thread: end this process once the process that runs the pool (`owner`) or this
    worker's own parent (the fork server) is gone. A SIGKILL gives the pool no chance to stop its
    workers, and a live worker would also keep multiprocessing's resource tracker alive."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent or not _alive(owner):
            os._exit(1)


def _init_worker(owner: int | None = None) -> None:
    if owner is not None:
        threading.Thread(target=_exit_with_parent, args=(owner, os.getppid()), daemon=True).start()
    try:
        import cv2

        cv2.setNumThreads(1)
    except Exception:
        pass


def _ping() -> int:
    return os.getpid()


def run_jobs(
    fn: Callable[..., tuple[str, str, Any]],
    jobs: list[ClipJob],
    args: tuple,
    workers: int,
    progress: Callable[[], None] | None = None,
) -> Iterator[tuple[str, str, Any]]:
    """Run fn(job, *args) for every job and yield its result as it finishes.

    workers <= 0 runs in this process. Otherwise a pool of `workers` processes
    with at most 2 x workers jobs in flight. If a worker process dies (a decoder crash on
    a broken file), the jobs that were in flight are retried one at a time in a fresh
    single-process pool; the one that kills it again is reported as skipped.
    """
    if workers <= 0:
        _init_worker()
        for job in jobs:
            yield fn(job, *args)
            if progress:
                progress()
        return
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")  # workers fork from a clean, pre-warmed server
        ctx.set_forkserver_preload([f"{__package__}.warm"])
    else:
        ctx = mp.get_context("spawn")
    todo = list(reversed(jobs))
    suspects: list[ClipJob] = []
    while todo or suspects:
        if suspects:  # isolate: one job per pool
            job = suspects.pop()
            with cf.ProcessPoolExecutor(1, mp_context=ctx, initializer=_init_worker, initargs=(os.getpid(),)) as ex:
                try:
                    ex.submit(_ping).result()
                except cf.process.BrokenProcessPool:
                    raise UserError("--workers: worker processes fail to start; rerun with --workers 0") from None
                try:
                    result = ex.submit(fn, job, *args).result()
                except cf.process.BrokenProcessPool:
                    result = (job.clip_id, "skip", ("decoder crashed the worker process", job.video or ""))
            yield result
            if progress:
                progress()
            continue
        ex = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(os.getpid(),))
        inflight: dict[cf.Future, ClipJob] = {}
        broken = False
        try:
            while todo or inflight:
                while todo and len(inflight) < 2 * workers:
                    job = todo.pop()
                    inflight[ex.submit(fn, job, *args)] = job
                done, _ = cf.wait(list(inflight), return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    job = inflight.pop(fut)
                    try:
                        result = fut.result()
                    except cf.process.BrokenProcessPool:
                        broken = True
                        suspects.append(job)
                        continue
                    yield result
                    if progress:
                        progress()
                if broken:
                    suspects.extend(inflight.values())
                    inflight.clear()
                    break
        finally:
            ex.shutdown(wait=not broken, cancel_futures=True)
