"""The run folder: who may write in it, what a new run may replace, what --resume continues.

  * One process at a time: a run holds `<run>/.lock` (an flock, and the holder's pid in the
    file) for its whole life. A lock left behind by a process that no longer runs is taken
    over, with a message; one held by a live process refuses the second run.
  * A new run starts only in a folder that holds none of a run's files (RUN_FILES).
    `--overwrite` replaces exactly those files and nothing else.
  * `--resume` continues a run's own `last.pt` inside its own folder: the folder's
    `config.json` must name the same run. Only that folder is written.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from .errors import UserError

# Everything a training run writes into its folder (tb/ is a directory).
RUN_FILES = ("config.json", "metrics.jsonl", "last.pt", "best.pt", "test_metrics.json", "tb")
LOCK_NAME = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _read_holder(fd: int) -> tuple[int | None, str]:
    """(pid, host) written in a lock file, or (None, '') when it is empty or unreadable."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 256).decode(errors="replace").split()
    try:
        return int(text[0]), (text[1] if len(text) > 1 else "")
    except (IndexError, ValueError):
        return None, ""


class RunLock:
    """The exclusive right to write in one run folder; `release()` when the run ends.

    A copy sent to another process (torchrun ranks) holds nothing and releases nothing."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self.fd = path, fd

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "fd": None}

    def release(self) -> None:
        if self.fd is None:
            return
        # Unlink while still holding the lock: a process waiting on the old file notices that
        # it is gone (acquire_run_lock compares inodes) instead of sharing it.
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


def acquire_run_lock(run_dir: Path, hint: str = "choose another --run_name") -> RunLock:
    """Lock `run_dir` for this process, taking over a lock whose holder has died. `hint` ends the
    refusal (what the user may do instead)."""
    path = run_dir / LOCK_NAME
    host = socket.gethostname()
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        pid, holder_host = _read_holder(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{run_dir} is in use by process {pid} on {holder_host or 'this machine'} "
                            f"(lock {path}); wait for it to end, or {hint}") from None
        if not path.exists() or os.stat(path).st_ino != os.fstat(fd).st_ino:
            os.close(fd)  # its holder removed it between our open and our lock: try the new one
            continue
        pid, holder_host = _read_holder(fd)
        if pid is not None and holder_host == host and pid != os.getpid() and _pid_alive(pid):
            # Free to lock, yet its process lives: a file system without flock, or a reused pid.
            os.close(fd)
            raise UserError(f"{run_dir} is in use by process {pid} (lock {path}); if that process is "
                            f"not a training run, remove {path}")
        if pid is not None:
            print(f"note: {run_dir}: taking over the lock of process {pid}, which is no longer running", flush=True)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()} {host}\n".encode())
        return RunLock(path, fd)


def earlier_run_files(run_dir: Path) -> list[str]:
    """The RUN_FILES present in `run_dir`."""
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def remove_run_files(run_dir: Path) -> None:
    """--overwrite: delete what an earlier run wrote here (RUN_FILES), nothing else."""
    for name in RUN_FILES:
        target = run_dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)


def check_new_run_folder(run_dir: Path, overwrite: bool) -> None:
    """Refuse to start a new run over an earlier run's files unless --overwrite is given."""
    found = earlier_run_files(run_dir)
    if not found or overwrite:
        return
    how = (f"continue it with --resume {run_dir / 'last.pt'}, or" if "last.pt" in found
           else "it has no last.pt to resume from;")
    raise UserError(f"{run_dir} holds an earlier run's {', '.join(found)}; {how} pass --overwrite to replace "
                    "them, or choose another --run_name")


def check_resume_source(path: Path, saved_config: dict[str, Any]) -> Path:
    """The run folder of a checkpoint given to --resume: it must be the run's own last.pt in
    its own folder. Returns the folder."""
    if path.name != "last.pt":
        raise UserError(f"--resume {path}: resume only from a run's last.pt (the end of its latest epoch); "
                        f"continuing from {path.name} would drop the epochs logged after it")
    run_dir = path.parent
    try:
        folder_config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        folder_config = None
    # Runs record a random run_id; checkpoints written before it existed are matched by name.
    key = "run_id" if "run_id" in saved_config else "run_name"
    if not isinstance(folder_config, dict) or folder_config.get(key) != saved_config.get(key):
        raise UserError(f"--resume {path}: {run_dir} is not this checkpoint's own run folder (its config.json "
                        "is missing or belongs to another run); resume inside the run's folder, or copy the whole folder")
    return run_dir
