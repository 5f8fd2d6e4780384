"""Decoders that misbehave, for the preprocessing pool's tests.

The pool pickles a task's function by module and name, so each new worker imports this module:
it imports nothing heavy, as a worker forked from the pool's fork server has no torch (importing
a test module from a worker would cost seconds per worker)."""

import os
import signal
import time


def crash_on_b(job, marker):
    if job.clip_id == "b":
        os._exit(1)  # a decoder taking its process down
    return job.clip_id, "ok", marker


def hang_on_b_segfault_on_c(job, folder):
    open(os.path.join(folder, str(os.getpid())), "w").close()  # every worker that ran a clip
    if job.clip_id == "b":
        time.sleep(3600)  # a decoder that never returns (a named pipe, a stalled mount)
    if job.clip_id == "c":
        os.kill(os.getpid(), signal.SIGSEGV)  # a decoder that segfaults
    return job.clip_id, "ok", None


def hang_or_crash_then_process(job, *args):
    """CREMA-D speaker 1001 hangs, 1002 segfaults, every other clip is processed for real."""
    from onthefly.data.raw.work import process_clip

    if job.clip_id.startswith("1001_"):
        time.sleep(3600)
    if job.clip_id.startswith("1002_"):
        os.kill(os.getpid(), signal.SIGSEGV)
    return process_clip(job, *args)
