"""Process helpers shared by the run folder's lock (rundir.py) and the preprocessing pool
(data/raw/pool.py). Kept free of torch: the pool's fork server imports this module, and
every worker it forks would otherwise start after seconds of imports it never uses."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True
