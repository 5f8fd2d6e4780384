"""The run folder: who may write in it, what a new run may replace, what --resume continues.

* One process at a time: a run holds `<run>/.lock` (an flock, and the holder's pid in the
  file) for its whole life. A lock left behind by a process that no longer runs is taken
  over, with a message; one held by a live process refuses the second run.
* A new run starts only in a folder that holds none of a run's files (RUN_FILES).
  `--overwrite` replaces exactly those files and nothing else.
* `--resume` continues a run's own `last.pt` inside its own folder: the folder's
  `config.json` must name the same run. Only that folder is written. The run's saved
  settings apply, overridden by the options given now (command line or --config file);
  a change to what defines the run (config.RUN_IDENTITY_KEYS) is refused.
* Before any data or model is built, the folder must be writable, and before training it
  must have room for the first epoch's checkpoints.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt_io
from .config import RUN_IDENTITY_KEYS, validate_config
from .errors import UserError
from .processes import pid_alive

# Everything a training run writes into its folder (tb/ is a directory).
RUN_FILES = ("config.json", "environment.json", "metrics.jsonl", "last.pt", "best.pt", "test_metrics.json", "tb")
LOCK_NAME = ".lock"


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
            raise UserError(
                f"{run_dir} is in use by process {pid} on {holder_host or 'this machine'} "
                f"(lock {path}); wait for it to end, or {hint}"
            ) from None
        if not path.exists() or os.stat(path).st_ino != os.fstat(fd).st_ino:
            os.close(fd)  # its holder removed it between our open and our lock: try the new one
            continue
        pid, holder_host = _read_holder(fd)
        if pid is not None and holder_host == host and pid != os.getpid() and pid_alive(pid):
            # Free to lock, yet its process lives: a file system without flock, or a reused pid.
            os.close(fd)
            raise UserError(
                f"{run_dir} is in use by process {pid} (lock {path}); if that process is "
                f"not a training run, remove {path}"
            )
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
    how = (
        f"continue it with --resume {run_dir / 'last.pt'}, or"
        if "last.pt" in found
        else "it has no last.pt to resume from;"
    )
    raise UserError(
        f"{run_dir} holds an earlier run's {', '.join(found)}; {how} pass --overwrite to replace "
        "them, or choose another --run_name"
    )


def check_resume_source(path: Path, saved_config: dict[str, Any]) -> Path:
    """The run folder of a checkpoint given to --resume: it must be the run's own last.pt in
    its own folder. Returns the folder."""
    if path.name != "last.pt":
        raise UserError(
            f"--resume {path}: resume only from a run's last.pt (the end of its latest epoch); "
            f"continuing from {path.name} would drop the epochs logged after it"
        )
    run_dir = path.parent
    try:
        folder_config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        folder_config = None
    # Runs record a random run_id; checkpoints written before it existed are matched by name.
    key = "run_id" if "run_id" in saved_config else "run_name"
    if not isinstance(folder_config, dict) or folder_config.get(key) != saved_config.get(key):
        raise UserError(
            f"--resume {path}: {run_dir} is not this checkpoint's own run folder (its config.json "
            "is missing or belongs to another run); resume inside the run's folder, or copy the whole folder"
        )
    return run_dir


def merge_resume_config(cfg: argparse.Namespace) -> tuple[argparse.Namespace, dict]:
    """The checkpoint's config, overridden by the options given now (`cfg.explicit`: command
    line and --config file). Changes that would break the run, and a checkpoint outside its
    own run folder, are refused. Returns (merged config, checkpoint)."""
    ckpt = ckpt_io.load_checkpoint(cfg.resume)
    saved = ckpt["config"]
    run_dir = check_resume_source(Path(ckpt["path"]), saved)
    changed = [
        f"{k}: {saved.get(k)!r} -> {getattr(cfg, k)!r}"
        for k in cfg.explicit
        if k in RUN_IDENTITY_KEYS and saved.get(k) != getattr(cfg, k)
    ]
    if changed:
        raise UserError(
            f"--resume {ckpt['path']}: these settings differ from the run's and would break it: {'; '.join(changed)}"
        )
    if cfg.overwrite:
        raise UserError(
            f"--overwrite with --resume {ckpt['path']}: a resumed run keeps its files; use one or the other"
        )
    if {"output_dir", "run_name"} & set(cfg.explicit):
        wanted = Path(cfg.output_dir if "output_dir" in cfg.explicit else run_dir.parent) / (
            cfg.run_name if "run_name" in cfg.explicit else run_dir.name
        )
        if wanted.resolve() != run_dir.resolve():
            raise UserError(
                f"--output_dir/--run_name: a resumed run continues in its own folder {run_dir}, "
                f"not {wanted}; drop these options"
            )
    if "epochs" in cfg.explicit and cfg.epochs < ckpt["epoch"]:
        raise UserError(f"--epochs {cfg.epochs}: --resume {ckpt['path']} has already completed {ckpt['epoch']} epochs")
    # A run saved before an option existed resumes with that option's current default, named.
    predates = sorted(k for k in vars(cfg) if k not in saved and k not in ("explicit", "resume", "print_config"))
    if predates:
        print(
            f"warning: --resume {ckpt['path']}: the run predates {', '.join(predates)}; "
            "resuming with their current values",
            file=sys.stderr,
        )
    merged = argparse.Namespace(
        **{
            **{k: getattr(cfg, k) for k in predates},
            **saved,
            **{k: getattr(cfg, k) for k in cfg.explicit},
            # the folder as it is now (it may have moved since the run started)
            "output_dir": str(run_dir.parent),
            "run_name": run_dir.name,
            "resume": ckpt["path"],
            "explicit": cfg.explicit,
            "print_config": cfg.print_config,
        }
    )
    validate_config(merged, cfg.explicit)  # e.g. --modulation_ends given now against the run's --modulation_starts
    return merged, ckpt


def _prove_writable(run_dir: Path) -> None:
    probe = run_dir / ".write_probe"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * (1 << 20))  # a full disk fails here, not after the first epoch
            f.flush()
            os.fsync(f.fileno())
    finally:
        probe.unlink(missing_ok=True)


def prepare_run_dir(cfg: argparse.Namespace) -> tuple[Path, RunLock]:
    """Create (or reuse, when resuming) the run folder, lock it for this run, apply the rules
    above and prove the folder is writable now. Returns the folder and its lock."""
    run_dir = Path(cfg.resume).parent if cfg.resume else Path(cfg.output_dir) / cfg.run_name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = acquire_run_lock(run_dir)
    except OSError as e:
        raise UserError(f"cannot write to the run directory {run_dir}: {e.strerror or e}") from None
    try:
        if not cfg.resume:
            check_new_run_folder(run_dir, cfg.overwrite)
        _prove_writable(run_dir)
        # what a kill left half-written; last.pt and best.pt are always whole
        ckpt_io.remove_stale_temporaries(run_dir, RUN_FILES)
        if not cfg.resume:  # --overwrite (checked above): the earlier run's files go
            remove_run_files(run_dir)
    except OSError as e:
        lock.release()
        raise UserError(f"cannot write to the run directory {run_dir}: {e.strerror or e}") from None
    except BaseException:
        lock.release()
        raise
    return run_dir, lock


def check_free_space(run_dir: Path, model: torch.nn.Module, cfg: argparse.Namespace) -> None:
    """Refuse to start when the run directory cannot hold the checkpoints of the first epoch."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    slots = 2 if cfg.optimizer == "adamw" else (1 if cfg.momentum > 0 else 0)  # optimizer state per parameter
    needed = int((params + buffers + slots * params) * (1.1 if cfg.resume else 2.2))  # last.pt and best.pt, + 10%
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise UserError(
            f"the run directory {run_dir} has {free / 2**20:.0f} MiB free; "
            f"the checkpoints need about {needed / 2**20:.0f} MiB"
        )
