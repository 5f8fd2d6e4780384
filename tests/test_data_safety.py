"""Files and processes on the data side: the atomic-write helper (content, mode, clean-up),
the AV-Digits cache's file mode, one meaning of the batch field "index", the loader's worker
count, and the preprocessing pool leaving nothing alive after a SIGKILL."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from onthefly.data import avdigits, loaders
from onthefly.fileio import atomic_write, atomic_write_text

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_write_replaces_whole_file_with_the_umask_mode(tmp_path, umask_022):
    target = tmp_path / "a.json"
    target.write_text("old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert (target.stat().st_mode & 0o777) == 0o644  # mkstemp alone would leave 0600
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_write_failure_keeps_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")

    def fail(f):
        f.write(b"half of it")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def _tiny_avdigits(params: dict) -> dict[str, np.ndarray]:
    """AV-Digits-shaped arrays: 4 train, 3 val, 2 test clips (labels = row numbers)."""
    n = 9
    return {
        "audio": np.arange(n * 13 * 32, dtype=np.float32).reshape(n, 1, 13, 32),
        "image": np.zeros((n, 28, 28), np.uint8),
        "label": np.arange(n, dtype=np.int64) % 10,
        "split": np.array([0, 0, 1, 0, 2, 1, 0, 2, 1]),
        "image_index": np.arange(n),
    }


def test_avdigits_cache_is_readable_by_others(tmp_path, monkeypatch, umask_022):
    monkeypatch.setattr(avdigits, "build_arrays", _tiny_avdigits)
    cfg = argparse.Namespace(data=str(tmp_path))
    avdigits.load_arrays(cfg)
    (path,) = tmp_path.glob("avdigits_*.npz")
    assert (path.stat().st_mode & 0o777) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left


def test_avdigits_index_is_the_position_within_the_split(tmp_path, monkeypatch):
    monkeypatch.setattr(avdigits, "build_arrays", _tiny_avdigits)
    val = avdigits.AVDigits(argparse.Namespace(data=str(tmp_path)), "val")
    # val rows are 2, 5, 8 of the arrays: index counts within the split, labels follow the rows
    assert [val[i]["index"] for i in range(len(val))] == [0, 1, 2]
    assert [val[i]["label"] for i in range(len(val))] == [2, 5, 8]
    limited = avdigits.AVDigits(argparse.Namespace(data=str(tmp_path), limit_samples=2), "train")
    assert len(limited) == 2 and [limited[i]["label"] for i in range(2)] == [0, 1]


def test_loader_workers_capped_by_the_cpus_this_process_may_use(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    data = [{"x": torch.zeros(2), "label": 0, "index": i} for i in range(8)]
    train = loaders.train_loader(data, 2, num_workers=4, seed=0, rank=0, world_size=1, pin_memory=False)
    val = loaders.eval_loader(data, 2, num_workers=4, rank=0, world_size=1, pin_memory=False)
    assert train.num_workers == 1 and val.num_workers == 1
    assert loaders.eval_loader(data, 2, num_workers=0, rank=0, world_size=1, pin_memory=False).num_workers == 0


def test_drop_last_says_what_it_drops_and_off_keeps_every_clip(capsys):
    data = [{"x": torch.zeros(2), "label": 0, "index": i} for i in range(60)]
    on = loaders.train_loader(data, 32, num_workers=0, seed=0, rank=0, world_size=1, pin_memory=False)
    assert capsys.readouterr().out == "drop_last on: batch 32 on 60 training clips: 28 dropped each epoch\n"
    on.sampler.set_epoch(0)
    assert [len(b["index"]) for b in on] == [32]
    off = loaders.train_loader(data, 32, num_workers=0, seed=0, rank=0, world_size=1, pin_memory=False, drop_last=False)
    assert "every training clip is used" in capsys.readouterr().out
    off.sampler.set_epoch(0)
    seen = [i for b in off for i in b["index"].tolist()]
    assert sorted(seen) == list(range(60))  # the official loaders' behaviour: nothing dropped
    with pytest.raises(ValueError, match="1 of 33 samples"):  # a batch of one: BatchNorm cannot train on it
        loaders.train_loader(
            data[:33], 32, num_workers=0, seed=0, rank=0, world_size=1, pin_memory=False, drop_last=False
        )


# --------------------------------------------------------------------------- SIGKILL of the pool's owner


_POOL_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from onthefly.data.raw.common import ClipJob
    from onthefly.data.raw.pool import run_jobs

    def slow(job, folder):
        # tell the test this worker runs, and what it has imported (written whole, then renamed)
        partial = os.path.join(os.path.dirname(folder), f"{os.getpid()}.partial")
        with open(partial, "w") as f:
            f.write(" ".join(m for m in ("torch", "torchvision") if m in sys.modules))
        os.rename(partial, os.path.join(folder, str(os.getpid())))
        time.sleep(120)
        return job.clip_id, "ok", None

    if __name__ == "__main__":
        jobs = [ClipJob(clip_id=c, label=0) for c in "abcd"]
        for _ in run_jobs(slow, jobs, (sys.argv[1],), workers=2):
            pass
    """
)


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
def test_sigkill_of_the_pool_owner_leaves_no_process_alive(tmp_path):
    script = tmp_path / "pool_owner.py"
    script.write_text(_POOL_SCRIPT)
    started = tmp_path / "started"
    started.mkdir()
    proc = subprocess.Popen([sys.executable, str(script), str(started)], env=os.environ.copy())
    try:
        deadline = time.time() + 120
        while len(list(started.iterdir())) < 2:
            assert proc.poll() is None and time.time() < deadline, "the pool did not start two workers"
            time.sleep(0.2)
        family = _descendants(proc.pid)  # workers, the fork server, the resource tracker
        assert {int(p.name) for p in started.iterdir()} <= family
        # Forked from a server that preloads the decoders (data/raw/warm.py) and nothing of torch:
        # torch would cost each worker seconds of start-up and decoding never uses it.
        assert [p.read_text() for p in started.iterdir()] == ["", ""]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.time() + 60  # generous: on a loaded machine the workers may wait for a core
    while any(_running(p) for p in family) and time.time() < deadline:
        time.sleep(0.2)
    alive = [p for p in family if _running(p)]
    for p in alive:  # never leave them behind, even when the check fails
        os.kill(p, signal.SIGKILL)
    assert not alive, f"{len(alive)} of {len(family)} pool processes outlived their owner"
