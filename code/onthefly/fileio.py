"""One way to replace a file atomically, used for checkpoints, cache metadata, work files
and the AV-Digits arrays; and the lenient read of a JSON object such a write left.

The new content goes to a temporary file in the destination's folder (so the final rename
never crosses a file system), is flushed and fsynced, gets the mode a plain `open()` would
give (mkstemp's files are private, 0600: others sharing the folder could not read them),
and is renamed over the destination. A kill at any moment leaves the old file or the new
one, never half of one; any failure removes the temporary file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def umask_mode() -> int:
    """The mode a new file gets from a plain open(): 0o666 less the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | Path, write: Callable[[IO], None], binary: bool = True) -> None:
    """Call `write(f)` on a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def read_json_object(path: str | Path) -> dict | None:
    """The JSON object stored in `path`, or None when the file is missing, unreadable or holds
    something else: for files that say whether earlier work can be reused, where "no" is safe."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None
